"""Timing with warm-up, median and p90; CUDA events on a GPU so that asynchronous work is counted."""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch


@dataclass(frozen=True)
class Timing:
    median_ms: float
    p90_ms: float
    runs: int

    def as_json(self) -> dict:
        return {"median_ms": self.median_ms, "p90_ms": self.p90_ms, "runs": self.runs}


def _time_once(fn: Callable[[], object], cuda: bool) -> float:
    if cuda:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1000


def _timing(times: list[float]) -> Timing:
    times = sorted(times)
    p90 = times[min(len(times) - 1, int(round(0.9 * (len(times) - 1))))]
    return Timing(statistics.median(times), p90, len(times))


def measure_interleaved(fns: dict[str, tuple[Callable[[], object], int]], warmup: int, cuda: bool = False,
                        on_round: Callable[[int, int], None] | None = None) -> dict[str, Timing]:
    """Time several functions in rounds (a, b, c, a, b, c, ...) after ``warmup`` untimed runs of each.

    ``fns`` maps a name to ``(fn, repeats)``; a name drops out of the rounds once it has its repeats.
    Interleaving spreads a machine's drift (other load, clocks) over all of them alike, so the ratios
    between them, which are what a benchmark reports, stay fair. ``on_round(i, n)`` reports progress.
    """
    for fn, _ in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    rounds = max((repeats for _, repeats in fns.values()), default=0)
    for i in range(rounds):
        for name, (fn, repeats) in fns.items():
            if i < repeats:
                times[name].append(_time_once(fn, cuda))
        if on_round is not None:
            on_round(i + 1, rounds)
    return {name: _timing(t) for name, t in times.items()}
