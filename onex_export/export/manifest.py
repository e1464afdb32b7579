"""``manifest.json``: what a service needs to run the 1.x-NFE schedule from a build folder alone.

The schema is documented in ``engines/README.md`` and versioned by ``schema_version``; a reader
rejects a major version it does not know. Files are listed with sha256 so that a tampered or
corrupted artifact is caught before it is run.
"""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import OnexError
from ..fileio import atomic_path
from .onnx_export import sha256_file

SCHEMA = "onex-export/build-manifest"
SCHEMA_VERSION = 2
FILENAME = "manifest.json"
JSON_SCHEMA = Path(__file__).resolve().parents[1] / "schemas" / "manifest.schema.json"  # for services to validate with


class ManifestError(OnexError):
    """A build folder's manifest is missing, unreadable, or does not match its files."""


def file_entry(folder: Path, path: Path) -> dict:
    """``{"file", "bytes", "sha256"}`` of ``path``, relative to the build ``folder``."""
    return {"file": path.relative_to(folder).as_posix(), "bytes": path.stat().st_size, "sha256": sha256_file(path)}


def write_manifest(folder: Path, manifest: dict) -> Path:
    with atomic_path(Path(folder) / FILENAME) as tmp:
        tmp.write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
    return Path(folder) / FILENAME


def is_build_folder(folder: Path) -> bool:
    """Whether ``folder`` holds a manifest written by onex-export (any schema version)."""
    try:
        return json.loads((Path(folder) / FILENAME).read_text()).get("schema") == SCHEMA
    except (OSError, ValueError, AttributeError):
        return False


def read_manifest(folder: Path) -> dict:
    """Load and check the schema of ``folder/manifest.json``."""
    path = Path(folder) / FILENAME
    if not path.is_file():
        raise ManifestError(f"no {FILENAME} in {folder}", "point at a folder written by `onex-export build`")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ManifestError(f"cannot read {path}: {exc}", "rebuild with `onex-export build`") from exc
    if not isinstance(manifest, dict) or manifest.get("schema") != SCHEMA:
        raise ManifestError(f"{path} is not an onex-export build manifest")
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise ManifestError(f"{path} has schema version {manifest.get('schema_version')}, this tool reads "
                            f"{SCHEMA_VERSION}", "rebuild with this version of onex-export")
    return manifest


def derive_status(verifications: list[dict]) -> str:
    """A build's ``status`` from its verifications, taking the latest of each (artifact, backend, device):
    ``failed`` if any failed, else ``passed`` if any passed, else ``unverified`` (none could run here,
    e.g. bf16 graphs on a CPU, or ``--gate none``)."""
    latest = {}
    for v in verifications:
        latest[(v["artifact"], v["backend"], v.get("device"))] = v["status"]
    if "failed" in latest.values():
        return "failed"
    return "passed" if "passed" in latest.values() else "unverified"


def add_verification(folder: Path, verification: dict) -> dict:
    """Append ``verification`` to ``folder``'s manifest, re-derive ``status`` and rewrite it atomically."""
    manifest = read_manifest(folder)
    manifest["verifications"].append(verification)
    manifest["status"] = derive_status(manifest["verifications"])
    write_manifest(folder, manifest)
    return manifest


def artifact_entries(manifest: dict) -> list[dict]:
    """Every file entry the manifest lists (ONNX graphs, their external data, engines, tokenizers)."""
    out = []
    for graph in manifest["graphs"].values():
        for kind in ("onnx", "onnx_data", "engine"):
            if graph.get(kind):
                out.append(graph[kind])
    for tokenizer in manifest.get("pipeline", {}).get("tokenizers", {}).values():
        out.extend(tokenizer["files"])
    return out


def check_files(folder: Path, manifest: dict) -> list[str]:
    """Problems with the listed files (missing, size or sha256 mismatch); empty when all match."""
    problems = []
    for entry in artifact_entries(manifest):
        path = Path(folder) / entry["file"]
        if not path.is_file():
            problems.append(f"{entry['file']}: missing")
        elif path.stat().st_size != entry["bytes"] or sha256_file(path) != entry["sha256"]:
            problems.append(f"{entry['file']}: sha256 does not match the manifest (corrupted or tampered)")
    return problems
