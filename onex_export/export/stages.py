"""Wall time and peak resident memory per stage of a long job (a build, a gate).

On Linux the peak (``VmHWM``) is reset at the start of each stage through ``/proc/self/clear_refs``, so a
stage's figure is its own peak, not the process's so far. Where that file cannot be written the figure is
the process's peak since it started (``peak_is_per_stage`` says which).
"""
from __future__ import annotations

import contextlib
import re
import resource
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

def reset_peak_rss() -> bool:
    """Reset the process's peak resident memory to its current value; False where the OS does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _status_bytes(field: str, pid: int | str = "self") -> int | None:
    """A ``VmRSS``/``VmHWM``-style field of ``/proc/<pid>/status`` in bytes, or None where there is none."""
    try:
        match = re.search(rf"{field}:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text())
    except OSError:
        return None
    return int(match.group(1)) * 1024 if match else None


def rss_bytes(pid: int | str = "self") -> int:
    """The resident memory now of this process (or of process ``pid``); 0 where the OS does not say."""
    return _status_bytes("VmRSS", pid) or 0


def peak_rss_bytes() -> int:
    """The peak resident memory since the last reset (or since the process started)."""
    peak = _status_bytes("VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: kB


@dataclass(frozen=True)
class StageRecord:
    seconds: float
    peak_rss_bytes: int

    def to_json(self) -> dict:
        return {"seconds": round(self.seconds, 3), "peak_rss_bytes": self.peak_rss_bytes}


class StageClock:
    """``with clock.stage("export"): ...`` records each stage's seconds and peak memory (a repeated name
    accumulates its time and keeps the larger peak)."""

    def __init__(self):
        self.records: dict[str, StageRecord] = {}
        self.peak_is_per_stage = True

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        self.peak_is_per_stage = reset_peak_rss() and self.peak_is_per_stage
        start = time.perf_counter()
        try:
            yield
        finally:
            seconds, peak = time.perf_counter() - start, peak_rss_bytes()
            if name in self.records:
                old = self.records[name]
                seconds, peak = seconds + old.seconds, max(peak, old.peak_rss_bytes)
            self.records[name] = StageRecord(seconds, peak)

    def to_json(self) -> dict:
        return {"per_stage_peak": self.peak_is_per_stage, **{n: r.to_json() for n, r in self.records.items()}}
