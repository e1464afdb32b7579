"""What keeps a build folder honest, beside the files' sha256: every path a manifest names stays inside its folder,
and the build seals what it certified, so that a hand-edited claim (another skip range, other sigmas, a plan that
no longer skips) is caught before anything is run or certified again.

The seal is one sha256 per section of ``manifest.json``, of its canonical JSON (sorted keys, no spaces), taken
over every section but the ones ``verify`` appends to (``verifications``, ``status``) and the seal itself. Per
section, so that a changed manifest is refused naming what changed. It is not a signature: whoever can write the
folder can re-seal it. It makes the manifest's claims part of what ``verify`` and the runtime check, as the sha256
of each file makes the files.
"""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path, PurePosixPath
from typing import Iterable

SEAL_ALGORITHM = "sha256-per-section"
UNSEALED = ("verifications", "status", "seal")  # what verify may change after the build
_DRIVE = re.compile(r"^[A-Za-z]:")


def leaves_folder(path: str) -> bool:
    """Whether a manifest path could name something outside its folder by its text alone: empty, absolute, a drive,
    a backslash, or a ``..`` part."""
    return (not path or path.startswith("/") or "\\" in path or bool(_DRIVE.match(path))
            or ".." in PurePosixPath(path).parts)


def outside(folder: Path, paths: Iterable[str]) -> list[str]:
    """Problems, one per path that resolves outside ``folder`` (a symlink that leads out, or a path that leaves it);
    empty when all stay inside."""
    root = Path(folder).resolve()
    problems = []
    for path in paths:
        if leaves_folder(path):
            problems.append(f"{path}: leaves the build folder")
            continue
        target = (root / path).resolve()
        if not target.is_relative_to(root):
            problems.append(f"{path}: resolves to {target}, outside the build folder (a symlink that leads out)")
    return problems


def _digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def seal_of(data: dict) -> dict:
    """The seal of a manifest's JSON object ``data``: one digest per sealed section."""
    return {"algorithm": SEAL_ALGORITHM,
            "sections": {key: _digest(value) for key, value in data.items() if key not in UNSEALED}}


def changed_sections(data: dict) -> list[str]:
    """The sections of ``data`` (a manifest's JSON object, with its ``seal``) that differ from what was sealed:
    changed, added or removed since the build; empty when it matches."""
    sealed = data["seal"]["sections"]
    now = seal_of(data)["sections"]
    return sorted(key for key in set(sealed) | set(now) if sealed.get(key) != now.get(key))
