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


def measure(fn: Callable[[], object], warmup: int, repeats: int, cuda: bool = False) -> Timing:
    """Run ``fn`` ``warmup`` times untimed, then ``repeats`` times timed."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1000)
    times.sort()
    p90 = times[min(len(times) - 1, int(round(0.9 * (len(times) - 1))))]
    return Timing(statistics.median(times), p90, len(times))
