"""Atomic file output: write to a temporary sibling, then rename, so a reader never sees half a file
and an interrupted write never clobbers a good one."""
from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path
from typing import Iterator

import torch
from safetensors.torch import save_file

from .errors import UsageError


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is renamed to ``path``, on error removed.

    A symlink is followed (its target is replaced, the link kept); a destination that exists and is not
    a regular file (a device node, a FIFO, a folder, a socket) is refused before anything is written.
    """
    path = Path(os.path.realpath(path)) if os.path.islink(path) else Path(path)
    with contextlib.suppress(FileNotFoundError):
        mode = os.stat(path).st_mode
        if not stat.S_ISREG(mode):
            raise UsageError(f"{path} exists and is not a regular file: refusing to replace it",
                             hint="give a path to a new file or to a regular file that may be overwritten")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


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


def save_png(image: torch.Tensor, path: str | Path) -> Path:
    """Write one (3, H, W) image in [0, 1] as a PNG, atomically."""
    from PIL import Image

    path = Path(path)
    array = (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    with atomic_path(path) as tmp:
        Image.fromarray(array).save(tmp, format="PNG")
    return path
