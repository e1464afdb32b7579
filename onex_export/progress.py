"""Progress of long work (a probe, a benchmark), on stderr so that stdout carries only results.

On a terminal it is a tqdm bar. Elsewhere (a log file, CI, ``nohup``, a pipe), where a bar's carriage returns would
pile up into one unreadable line or tqdm would stay silent, it is a plain line at most every ``interval`` seconds and
one at the end, so that a run of minutes still says how far it got.
"""
from __future__ import annotations

import sys
import time
from typing import TextIO

from tqdm import tqdm

LOG_INTERVAL = 30.0  # seconds between two lines when stderr is not a terminal


class LineProgress:
    """``update`` / ``set_postfix_str`` / ``close`` like a tqdm bar, written as ``desc: n/total unit (p%), m:ss``
    lines. Nothing is written for work that ends within its first ``interval``."""

    def __init__(self, total: int, desc: str, unit: str, file: TextIO, interval: float):
        self.total, self.desc, self.unit, self.file, self.interval = total, desc, unit, file, interval
        self.n, self.postfix, self.written = 0, "", 0
        self.start = self.last = time.monotonic()

    def update(self, n: int = 1) -> None:
        self.n += n
        if time.monotonic() - self.last >= self.interval:
            self._write()

    def set_postfix_str(self, text: str) -> None:
        self.postfix = text

    def close(self) -> None:
        if self.written and self.written != self.n:
            self._write()

    def _write(self) -> None:
        self.last = time.monotonic()
        elapsed = int(self.last - self.start)
        share = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        postfix = f", {self.postfix}" if self.postfix else ""
        print(f"{self.desc}: {self.n}/{self.total} {self.unit}{share}, {elapsed // 60}:{elapsed % 60:02d} elapsed"
              f"{postfix}", file=self.file, flush=True)
        self.written = self.n

    def __enter__(self) -> "LineProgress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def progress_bar(total: int, desc: str, unit: str = "step", file: TextIO | None = None,
                 interval: float = LOG_INTERVAL) -> tqdm | LineProgress:
    """A bar of ``total`` units on ``file`` (default: stderr): tqdm on a terminal, else :class:`LineProgress`."""
    file = file if file is not None else sys.stderr
    if file.isatty():
        return tqdm(total=total, desc=desc, unit=unit, file=file, leave=False, dynamic_ncols=True)
    return LineProgress(total, desc, unit, file, interval)
