"""``manifest.json``, the writing side: what a service needs to run the 1.x-NFE schedule from a build folder
alone. The typed :class:`~onex_export.contract.Manifest`, reading and checking it are the contract's, which the
runtime uses.

The schema is documented in ``engines/README.md`` and versioned by ``schema_version``; a reader
rejects a major version it does not know. Files are listed with sha256 so that a tampered or
corrupted artifact is caught before it is run.
"""
from __future__ import annotations

import json
from pathlib import Path

from ..contract import (  # noqa: F401 (the reading side lives in the contract; build and verify use it from here)
    FILENAME, JSON_SCHEMA, SCHEMA, SCHEMA_VERSION, FileEntry, Manifest, ManifestError, check_files, derive_status,
    read_manifest,
)
from ..fileio import atomic_path, sha256_file


def file_entry(folder: Path, path: Path, **extra) -> FileEntry:
    """``path``'s entry (relative to the build ``folder``, size, sha256); ``extra``: how an engine was built."""
    return FileEntry(path.relative_to(folder).as_posix(), path.stat().st_size, sha256_file(path), extra)


def write_manifest(folder: Path, manifest: Manifest) -> Path:
    with atomic_path(Path(folder) / FILENAME) as tmp:
        tmp.write_text(json.dumps(manifest.to_json(), indent=2, sort_keys=False) + "\n")
    return Path(folder) / FILENAME


def is_build_folder(folder: Path) -> bool:
    """Whether ``folder`` holds a manifest written by onex-export (any schema version)."""
    try:
        return json.loads((Path(folder) / FILENAME).read_text()).get("schema") == SCHEMA
    except (OSError, ValueError, AttributeError):
        return False


def add_verification(folder: Path, verification: dict) -> Manifest:
    """Append ``verification`` to ``folder``'s manifest, re-derive ``status`` and rewrite it atomically."""
    manifest = read_manifest(folder).with_verification(verification)
    write_manifest(folder, manifest)
    return manifest
