"""Putting a finished build folder in place without ever leaving the destination missing, and cleaning
up after builds that were killed.

A build is written to ``.<name>.tmp-<pid>-<random>`` beside its destination. Installing it swaps the two folders
in one atomic ``renameat2(RENAME_EXCHANGE)`` (Linux), so at every instant the destination holds either
the old build or the new one; the old one, now at the temporary name, is then removed. Where the exchange
is not available the fallback is two renames through ``.<name>.old-<pid>-<random>``; a kill between them leaves
the destination missing for a moment, and the next build (or ``verify``) restores the old folder.

Only folders this tool made are replaced: an existing destination must be empty or hold a build
manifest of ours.
"""
from __future__ import annotations

import ctypes
import errno
import os
import re
import secrets
import shutil
from pathlib import Path

from ..errors import UsageError
from . import manifest as mf

_AT_FDCWD, _RENAME_EXCHANGE = -100, 2


_OWNER = re.compile(r"\.(?:tmp|old)-(\d+)(?:-[0-9a-f]+)?$")


def temp_name(dest: Path, kind: str = "tmp") -> Path:
    """``.<name>.<kind>-<pid>-<random>`` beside ``dest``: unique even when a container gives every run the same
    pid, and naming the process that owns it."""
    return dest.with_name(f".{dest.name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}")


def owner_alive(path: Path) -> bool:
    """Whether the process that made a temp folder still runs. Our own pid cannot have made one yet when
    :func:`recover` runs, so it is a killed run's that had the same pid (containers reuse pids)."""
    match = _OWNER.search(path.name)
    if match is None or int(match.group(1)) == os.getpid():
        return False
    try:
        os.kill(int(match.group(1)), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's live process
    return True


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths; False where the OS or file system cannot."""
    fn = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if fn is None:
        return False
    if fn(_AT_FDCWD, os.fsencode(str(a)), _AT_FDCWD, os.fsencode(str(b)), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def check_replaceable(dest: Path) -> None:
    """Refuse a destination that exists and is not a build folder of ours (nor empty)."""
    if not dest.exists() and not dest.is_symlink():
        return
    if dest.is_symlink() or not dest.is_dir():
        raise UsageError(f"--out {dest} exists and is not a folder: a build never replaces it",
                         "choose another --out, or move that file away first")
    if any(dest.iterdir()) and not mf.is_build_folder(dest):
        raise UsageError(f"--out {dest} is a folder that holds no onex-export build (no readable manifest.json); "
                         "a build replaces only its own folders", "choose another --out, or empty that folder")


def recover(dest: Path) -> list[str]:
    """Finish what killed builds left beside ``dest``: restore an old build whose replacement never arrived,
    remove stale ``.tmp-*`` and ``.old-*`` folders of dead processes. Returns what was done, for the log."""
    done = []
    parent, name = dest.parent, dest.name
    if not parent.is_dir():
        return done
    olds = sorted((p for p in parent.glob(f".{name}.old-*") if not owner_alive(p)), key=lambda p: p.stat().st_mtime)
    if olds and not dest.exists():
        os.replace(olds.pop(), dest)  # the newest: the build that was in place when the install was killed
        done.append(f"restored the previous build of {dest} from an interrupted install")
    for stale in olds + [p for p in parent.glob(f".{name}.tmp-*") if not owner_alive(p)]:
        shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)
        done.append(f"removed {stale.name}, left by a killed build")
    return done


def install(tmp: Path, dest: Path) -> None:
    """Move the finished ``tmp`` folder to ``dest``; an older build there is replaced in one step."""
    if not dest.exists():
        os.replace(tmp, dest)
        return
    if _exchange(tmp, dest):
        shutil.rmtree(tmp, ignore_errors=True)  # the old build, now at the temporary name
        return
    old = temp_name(dest, "old")
    os.replace(dest, old)
    try:
        os.replace(tmp, dest)
    except BaseException:  # an interrupt too: put the previous build back before reporting
        os.replace(old, dest)
        raise
    shutil.rmtree(old, ignore_errors=True)
