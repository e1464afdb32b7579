"""Atomic file output: write to a temporary sibling, then rename, so a reader never sees half a file
and an interrupted write never clobbers a good one. A full disk or a path that cannot be written is a
user error (:class:`DiskError`) naming the path, never a traceback."""
from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
import stat
from pathlib import Path
from typing import Iterator

import torch
from safetensors.torch import save_file

from .errors import OnexError, UsageError

_REASONS = {
    errno.ENOSPC: "no space is left on its file system", errno.EDQUOT: "the disk quota is exhausted",
    errno.EFBIG: "the file is too large for its file system", errno.EROFS: "its file system is read-only",
    errno.EACCES: "permission denied", errno.EPERM: "the operation is not permitted",
}
_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
_FULL_TEXT = ("no space left", "os error 28", "quota exceeded", "file write failed", "unexpected pos")
LOW_SPACE = 16 * 2**20  # an unexplained write failure with less than this free is taken for a full disk


class DiskError(OnexError):
    """A file could not be written: its disk is full, or its folder is read-only or not ours to write."""


def free_bytes(path: str | os.PathLike) -> int | None:
    """Free bytes on the file system that holds ``path`` (or its nearest existing parent)."""
    path = Path(os.path.abspath(path))
    for folder in (path, *path.parents):
        with contextlib.suppress(OSError):
            if folder.exists():
                return shutil.disk_usage(folder).free
    return None


def _size(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def as_disk_error(exc: BaseException, path: str | os.PathLike, needed: int | None = None) -> DiskError | None:
    """The user error behind ``exc``, raised while writing ``path``, when it is a full disk or a permission
    problem (libraries report these as ``OSError``, or as their own errors that only quote the OS); else None."""
    code = exc.errno if isinstance(exc, OSError) else None
    if code is None:
        text = str(exc).lower()
        if any(t in text for t in _FULL_TEXT) and ("space" in text or (free_bytes(path) or 0) < LOW_SPACE):
            code = errno.ENOSPC
    if code not in _REASONS:
        return None
    filename = getattr(exc, "filename", None)
    # the user's path rather than our hidden temporary or lock file beside it
    where = path if not filename or os.path.basename(filename).startswith(".") else filename
    message = f"cannot {'write' if code in _FULL or code == errno.EROFS else 'access'} {where}: {_REASONS[code]}"
    if code in _FULL:
        free = free_bytes(where)
        message += f" ({_size(free) if free is not None else 'unknown'} free"
        message += f", about {_size(needed)} needed)" if needed else ")"
        hint = "free some space there, or write somewhere else"
    else:
        hint = "choose a location you may write to, or fix the permissions"
    return DiskError(message, hint)


@contextlib.contextmanager
def writing(path: str | os.PathLike, needed: int | None = None) -> Iterator[None]:
    """Turn a full disk or a permission error while writing ``path`` into a :class:`DiskError`."""
    try:
        yield
    except OnexError:
        raise
    except Exception as exc:
        error = as_disk_error(exc, path, needed)
        if error is None:
            raise
        raise error from exc


def check_destination(path: str | os.PathLike) -> Path:
    """Check, before any work, that a file can be written at ``path``; return it with symlinks followed.

    Refused: an existing destination that is not a regular file (a device node, a FIFO, a folder), and a
    path below a file or in a folder this process may not write to (:class:`DiskError`).
    """
    path = Path(os.path.realpath(path)) if os.path.islink(path) else Path(path)
    with contextlib.suppress(FileNotFoundError, NotADirectoryError):
        if not stat.S_ISREG(os.stat(path).st_mode):
            raise UsageError(f"{path} exists and is not a regular file: refusing to replace it",
                             hint="give a path to a new file or to a regular file that may be overwritten")
    folder = Path(os.path.abspath(path)).parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise UsageError(f"cannot write {path}: {folder} is a file, not a folder", "choose another path")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise DiskError(f"cannot write {path}: {folder} is not writable"
                        + (" (read-only file system)" if _read_only(folder) else ""),
                        "choose a location you may write to, or fix the folder's permissions")
    return path


def _read_only(folder: Path) -> bool:
    return bool(os.statvfs(folder).f_flag & os.ST_RDONLY)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is renamed to ``path``, on error removed.

    A symlink is followed (its target is replaced, the link kept); a destination that exists and is not
    a regular file (a device node, a FIFO, a folder, a socket) is refused before anything is written.
    """
    path = check_destination(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with writing(path):
            path.parent.mkdir(parents=True, exist_ok=True)
            yield tmp
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a new temporary folder beside ``path``; on success it is renamed to ``path`` (so the folder appears
    complete or not at all), on error removed. An existing ``path`` is never replaced: ``FileExistsError``."""
    path = Path(path)
    if path.exists() or path.is_symlink():
        raise FileExistsError(f"{path} exists")
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)  # a leftover of this pid's earlier, killed attempt
    try:
        with writing(path):
            tmp.mkdir(parents=True)
            yield tmp
            os.rename(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """The sha256 hex digest of a file, read in chunks (a multi-GB graph is never whole in memory)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def default_mode() -> int:
    """The permissions a new file gets from the process's umask (safetensors creates its files 0600)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def save_tensors_atomic(tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str]) -> Path:
    """Save ``tensors`` as safetensors at ``path`` atomically, readable as any other file the user makes."""
    with atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)
        os.chmod(tmp, default_mode())
    return Path(path)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Images (..., 3, H, W) in [0, 1] as 8-bit channels-last (..., H, W, 3), rounded to the nearest level."""
    return (images.clamp(0, 1) * 255).round().to(torch.uint8).movedim(-3, -1)


PLOTS_HINT = "pip install -c constraints.txt -e '.[bench]'"


def pyplot(what: str):
    """matplotlib's pyplot on the Agg backend, or :class:`UsageError` saying that ``what`` needs it. Commands call
    it before their work too, so that a missing matplotlib is refused before, not after, minutes of measuring."""
    try:
        import matplotlib
    except ImportError as exc:
        raise UsageError(f"{what} needs matplotlib for its plots, which is not installed", PLOTS_HINT) from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | Path, dpi: int = 110) -> Path:
    """A matplotlib figure laid out and written as a PNG, atomically; the figure is closed."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    plt.close(fig)
    return Path(path)


def save_png(image: torch.Tensor, path: str | Path) -> Path:
    """Write one (3, H, W) image in [0, 1] as a PNG, atomically."""
    from PIL import Image

    path = Path(path)
    array = to_uint8(image).numpy()
    with atomic_path(path) as tmp:
        Image.fromarray(array).save(tmp, format="PNG")
    return path
