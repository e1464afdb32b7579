"""Small frozen configuration types, validated on construction."""
from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import SkipRangeError

_RANGE_RE = re.compile(r"^\s*(\d+)\s*(?:-\s*(\d+)\s*)?$")
_EXAMPLE = "write FIRST-LAST with 1-based, inclusive block numbers as in the paper, e.g. --skip 3-10"


@dataclass(frozen=True)
class SkipRange:
    """A contiguous range of transformer blocks skipped in the second step.

    ``first`` and ``last`` are **1-based and inclusive**, as in the 1.x-Distill paper: ``SkipRange(3, 10)``
    skips the paper's layers 3..10, i.e. diffusers ``transformer_blocks[2..9]``. Use :attr:`start0` and
    :attr:`stop0` (0-based, half-open) to index diffusers' block list.
    """

    first: int
    last: int

    def __post_init__(self) -> None:
        for name in ("first", "last"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise SkipRangeError(f"skip range {name} must be an integer, got {value!r}", _EXAMPLE)
        if self.first < 1:
            raise SkipRangeError(
                f"skip range {self.first}-{self.last} starts below 1: block numbers are 1-based", _EXAMPLE
            )
        if self.last < self.first:
            raise SkipRangeError(
                f"skip range {self.first}-{self.last} is reversed: FIRST must not exceed LAST",
                f"did you mean {self.last}-{self.first}?",
            )

    @classmethod
    def parse(cls, text: str) -> "SkipRange":
        """Parse ``"3-10"`` (or ``"5"`` for a single block) into a range."""
        if text is None or not str(text).strip():
            raise SkipRangeError("empty skip range", _EXAMPLE)
        match = _RANGE_RE.match(str(text))
        if match is None:
            raise SkipRangeError(f"malformed skip range {text!r}", _EXAMPLE)
        first = int(match.group(1))
        last = int(match.group(2)) if match.group(2) is not None else first
        return cls(first, last)

    def validate_for(self, num_layers: int) -> "SkipRange":
        """Check the range against a model with ``num_layers`` blocks; returns ``self``.

        SD3's last block is ``context_pre_only`` (it drops the context stream), so a range must lie in
        ``1..num_layers-1``.
        """
        if num_layers < 2:
            raise SkipRangeError(f"a model with {num_layers} transformer block(s) has no skippable block")
        if self.last > num_layers - 1:
            where = (
                f"block {num_layers} is the last, context_pre_only block and cannot be skipped"
                if self.last == num_layers
                else f"the model has only {num_layers} blocks"
            )
            raise SkipRangeError(
                f"skip range {self} does not fit this model: it has {num_layers} transformer blocks and a "
                f"skip range must lie inside 1-{num_layers - 1} ({where})",
                f"choose FIRST-LAST within 1-{num_layers - 1}, e.g. --skip 3-{min(10, num_layers - 1)}",
            )
        return self

    @property
    def count(self) -> int:
        """Number of skipped blocks ``k``."""
        return self.last - self.first + 1

    @property
    def start0(self) -> int:
        """0-based index of the first skipped block (the block whose input is ``I_n``)."""
        return self.first - 1

    @property
    def stop0(self) -> int:
        """0-based index one past the last skipped block (the block whose output is ``O_m`` is ``stop0 - 1``)."""
        return self.last

    @property
    def indices0(self) -> tuple[int, ...]:
        """The 0-based diffusers block indices that are skipped."""
        return tuple(range(self.start0, self.stop0))

    def __str__(self) -> str:
        return f"{self.first}-{self.last}"
