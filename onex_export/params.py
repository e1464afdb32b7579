"""Click parameter types that the tool's commands and the benchmarks share (neither imports the other)."""
from __future__ import annotations

import math

import click


class FiniteFloat(click.FloatRange):
    """A float in an optional range that is also finite: click's ``FloatRange`` lets ``nan`` through every bound
    (every comparison with it is false) and ``inf`` through an upper-open one, so ``--guidance nan`` would pass the
    check that refuses ``-1`` and silently turn guidance off."""

    name = "number"

    def convert(self, value, param, ctx):
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number: give a number such as {self._example()}", param, ctx)
        return number

    def _example(self) -> str:
        low = self.min if self.min is not None else 0.0
        return f"{low + (1.0 if self.min_open or self.min is None else 0.0):g}"


SEED = click.IntRange(0, 2**63 - 1)  # torch.Generator.manual_seed takes what fits in 64 bits; past it, a traceback


class Device(click.ParamType):
    """A torch device: cpu, cuda or cuda:N; with ``visible``, a CUDA device only where one is visible (refused at
    parse time, not by a traceback after the model has loaded). Commands that explain a missing GPU themselves
    (with what to do instead) take the syntax only."""

    name = "device"

    def __init__(self, visible: bool = False):
        self.visible = visible

    def convert(self, value, param, ctx) -> str:
        import re

        text = str(value)
        if not re.fullmatch(r"cpu|cuda(:\d+)?", text):
            self.fail(f"{value!r} is not a device: use cpu, cuda or cuda:N", param, ctx)
        if self.visible and text.startswith("cuda"):
            import torch

            index = int(text.partition(":")[2] or 0)
            if not torch.cuda.is_available() or index >= torch.cuda.device_count():
                self.fail(f"{text}: no such CUDA device is visible here ({torch.cuda.device_count()} GPUs)", param, ctx)
        return text


DEVICE, VISIBLE_DEVICE = Device(), Device(visible=True)
