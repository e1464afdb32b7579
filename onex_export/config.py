"""Small frozen configuration types, validated on construction."""
from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import SkipRangeError

_RANGE_RE = re.compile(r"^\s*(\d+)\s*(?:-\s*(\d+)\s*)?$")


@dataclass(frozen=True)
class BlockRange:
    """A contiguous range of transformer blocks, **1-based and inclusive** as in the 1.x-Distill paper:
    ``BlockRange(3, 10)`` is the paper's layers 3..10, i.e. diffusers ``transformer_blocks[2..9]``.
    Use :attr:`start0` and :attr:`stop0` (0-based, half-open) to index diffusers' block list."""

    first: int
    last: int
    option = "--blocks"  # the command-line option that takes this kind of range, for messages
    kind = "block range"

    @classmethod
    def example(cls) -> str:
        return f"write FIRST-LAST with 1-based, inclusive block numbers as in the paper, e.g. {cls.option} 3-10"

    def __post_init__(self) -> None:
        for name in ("first", "last"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise SkipRangeError(f"{self.kind} {name} must be an integer, got {value!r}", self.example())
        if self.first < 1:
            raise SkipRangeError(
                f"{self.kind} {self.first}-{self.last} starts below 1: block numbers are 1-based", self.example()
            )
        if self.last < self.first:
            raise SkipRangeError(
                f"{self.kind} {self.first}-{self.last} is reversed: FIRST must not exceed LAST",
                f"did you mean {self.last}-{self.first}?",
            )

    @classmethod
    def parse(cls, text: str):
        """Parse ``"3-10"`` (or ``"5"`` for a single block) into a range."""
        if text is None or not str(text).strip():
            raise SkipRangeError(f"empty {cls.kind}", cls.example())
        match = _RANGE_RE.match(str(text))
        if match is None:
            raise SkipRangeError(f"malformed {cls.kind} {text!r}", cls.example())
        first = int(match.group(1))
        last = int(match.group(2)) if match.group(2) is not None else first
        return cls(first, last)

    def validate_for(self, num_layers: int):
        """Check the range against a model with ``num_layers`` blocks; returns ``self``."""
        if self.last > num_layers:
            raise SkipRangeError(f"{self.option} {self} does not fit this model: it has {num_layers} transformer blocks",
                                 f"choose FIRST-LAST within 1-{num_layers}")
        return self

    def __contains__(self, block: int) -> bool:
        """Whether 1-based ``block`` lies in the range."""
        return self.first <= block <= self.last

    @property
    def count(self) -> int:
        """Number of blocks in the range."""
        return self.last - self.first + 1

    @property
    def start0(self) -> int:
        """0-based index of the first block of the range."""
        return self.first - 1

    @property
    def stop0(self) -> int:
        """0-based index one past the last block of the range."""
        return self.last

    @property
    def indices0(self) -> tuple[int, ...]:
        """The 0-based diffusers block indices of the range."""
        return tuple(range(self.start0, self.stop0))

    def __str__(self) -> str:
        return f"{self.first}-{self.last}"


@dataclass(frozen=True)
class SkipRange(BlockRange):
    """The blocks skipped in the second step (``I_n`` is the input of block ``first``, ``O_m`` the output
    of block ``last``). Parsed and numbered like every :class:`BlockRange`."""

    option = "--skip"
    kind = "skip range"

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
