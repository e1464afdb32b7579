"""Ctrl-C and SIGTERM stop any stage within seconds, clean up after themselves and exit 130 / 143.

Python turns SIGINT into ``KeyboardInterrupt`` wherever the main thread runs Python code, and kills the
process on SIGTERM without running any ``finally``. Entry points call :func:`install` so that both
signals raise :class:`Interrupted` (a ``KeyboardInterrupt``), which unwinds through the ``finally``
blocks that remove temporary files, and the CLI exits ``128 + signal``.

Native code that calls back into Python is the exception: TensorRT's builder catches whatever its
logger or progress callback raises, logs it and carries on. Around such calls :func:`deferred` only
records the signal; the callback polls :func:`requested` to cancel the native work, and the interrupt
is raised when the block ends.
"""
from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator

SIGNALS = (signal.SIGINT, signal.SIGTERM)

_pending: int | None = None
_deferring = 0
_raised: int | None = None  # the last signal raised as Interrupted: native code may turn it into its own error


class Interrupted(KeyboardInterrupt):
    """The user or the system asked the process to stop (SIGINT or SIGTERM)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        """The shell's convention for a process stopped by a signal: 130 for SIGINT, 143 for SIGTERM."""
        return 128 + self.signum


def _on_signal(signum, frame) -> None:
    global _pending, _raised
    _pending = signum
    if not _deferring:
        _pending, _raised = None, signum
        raise Interrupted(signum)


def raised() -> int | None:
    """The signal last raised as :class:`Interrupted` in this process, if any. Native code that calls back into
    Python may turn it into an error of its own (safetensors reading a tensor gave ``ValueError: could not
    determine the shape of object type 'torch.storage.UntypedStorage'``): an entry point that meets an error
    after an interrupt reports the interrupt."""
    return _raised


def _ours(sig: int) -> bool:
    """Whether to handle ``sig``: not when it is ignored (``nohup``, a shell's background job)."""
    return signal.getsignal(sig) is not signal.SIG_IGN


def install() -> None:
    """Make SIGINT and SIGTERM raise :class:`Interrupted` in the main thread (a no-op in other threads); a
    signal the process ignores stays ignored. A new entry point starts with no interrupt raised."""
    global _raised
    _raised = None
    if threading.current_thread() is threading.main_thread():
        for sig in SIGNALS:
            if _ours(sig):
                signal.signal(sig, _on_signal)


def requested() -> bool:
    """Whether a signal arrived inside a :func:`deferred` block: native work polling this should give up."""
    return _pending is not None


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Run a native call that swallows exceptions raised in its callbacks: a signal inside the block is
    only recorded (:func:`requested` turns true), and delivered again when the block ends, to whatever
    handler was in place before it. Outside the main thread signals cannot arrive, and nothing changes."""
    global _deferring, _pending
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, _on_signal) for sig in SIGNALS if _ours(sig)}
    _deferring += 1
    try:
        yield
    finally:
        for sig, handler in previous.items():  # before leaving deferred mode: a signal now only records itself
            signal.signal(sig, handler)
        _deferring -= 1
        if not _deferring and _pending is not None:
            pending, _pending = _pending, None
            signal.raise_signal(pending)  # the handler of before: ours raises Interrupted, Python's SIGINT one
            #                               KeyboardInterrupt, the default SIGTERM action ends the process
