"""User-facing errors, kept apart from bugs.

An :class:`OnexError` means the *input* was wrong (a bad skip range, a missing model folder, weights
that do not fit): its message says what was wrong and what to do, and the CLI prints it without a
traceback. Any other exception is a bug in onex-export and keeps its traceback.
"""
from __future__ import annotations


class OnexError(Exception):
    """An error the user can fix. ``hint`` says how."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message}\n  hint: {self.hint}" if self.hint else self.message


class UsageError(OnexError):
    """A command-line value is malformed or does not fit the model (CLI exit code 2)."""

    exit_code = 2


class SkipRangeError(UsageError, ValueError):
    """A ``--skip`` range that cannot be parsed or does not fit the model."""


class ModelLoadError(OnexError):
    """A model or weight file could not be found or read."""


class WeightMismatchError(OnexError):
    """Weights exist but do not fit the model they are loaded into."""
