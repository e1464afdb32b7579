"""One writer at a time: a build folder, or a training run folder, is written by one process at once.

The lock is an ``flock`` on a small file (``.<name>.lock`` beside a build folder, ``.lock`` inside a run
folder) that holds the owner's pid for the message the second writer gets. The kernel drops the lock
when its process dies, however it dies, so a killed run never leaves a folder locked. The file is removed
when the lock is released; a writer that locked a file just unlinked by its previous owner notices (the
path no longer names its file) and locks again.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path
from typing import Iterator

from .errors import OnexError, UsageError


class BusyError(OnexError):
    """Another process is writing the same folder."""


@contextlib.contextmanager
def exclusive(lock_file: str | os.PathLike, what: str, hint: str) -> Iterator[None]:
    """Hold ``lock_file`` (whose folder must exist) exclusively for the block; raise :class:`BusyError` at once when another process
    holds it. ``what`` names the guarded thing in the message ("build folder engines/x"), ``hint`` says what
    to do instead of waiting."""
    lock_file = Path(lock_file)
    while True:
        try:
            fd = os.open(lock_file, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except PermissionError:  # another user's, left by a killed run: flock works on a read-only descriptor
            fd = os.open(lock_file, os.O_RDONLY | os.O_CLOEXEC)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise BusyError(f"{what} is being written by another onex-export process (pid {owner})", hint) from None
        with contextlib.suppress(FileNotFoundError):
            if os.stat(lock_file).st_ino == os.fstat(fd).st_ino:
                break  # the file we locked is still the one at the path
        os.close(fd)  # its owner unlinked it while we waited for the lock: lock the new one
    try:
        with contextlib.suppress(OSError):  # the pid is for the message a second writer gets
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(lock_file)
        os.close(fd)


def build_lock(out: Path):
    """The lock of build folder ``out`` (``.<name>.lock`` beside it: the folder itself is swapped on install)."""
    out = Path(os.path.abspath(out))
    if not out.name:
        raise UsageError(f"{out} cannot be a build folder", "give --out a folder of its own, e.g. engines/my-build")
    return exclusive(out.with_name(f".{out.name}.lock"), f"build folder {out}",
                     "wait for that build (or verify) to finish, or choose another --out")
