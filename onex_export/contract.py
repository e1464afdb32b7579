"""What a build writes and a runtime reads: the manifest's schema name and version, its dimension names,
tensor specs, plan names and how a plan runs, and reading and checking a build folder.

``export/`` writes this contract and ``runtime/`` only reads it: this module imports neither, nor any
model or exporter (no diffusers, onnx or TensorRT), so a service that runs a build imports only what
running needs. The manifest's JSON Schema, for services in other languages, is ``JSON_SCHEMA``.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import OnexError
from .fileio import sha256_file

SCHEMA = "onex-export/build-manifest"
SCHEMA_VERSION = 2
FILENAME = "manifest.json"
JSON_SCHEMA = Path(__file__).resolve().parent / "schemas" / "manifest.schema.json"

# Symbolic dimension names shared by all graphs (and by the manifest's shape ranges).
B, T, N, H, W = "batch", "text_len", "img_tokens", "latent_height", "latent_width"
IH, IW = "image_height", "image_width"  # 8x the latent size (the VAE decoder's output)
PLANS = ("full", "skipping")  # the transformer plans: every block, or the cached range's deltas reused
TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "int64": torch.int64}


@dataclass(frozen=True)
class TensorSpec:
    """A graph input or output: name and symbolic shape (ints are static, strings symbolic)."""

    name: str
    shape: tuple[int | str, ...]
    dtype: str  # "float32" | "float16" | "bfloat16" | "int64"


@dataclass(frozen=True)
class GraphSpec:
    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]


class ManifestError(OnexError):
    """A build folder's manifest is missing, unreadable, or does not match its files."""


def read_manifest(folder: Path) -> dict:
    """Load ``folder/manifest.json`` and check its schema, version and plan names."""
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
    unknown = sorted(set(manifest.get("plans", {})) - set(PLANS))
    if unknown:
        raise ManifestError(f"{path} has plan(s) {unknown}, which this tool cannot run (it knows {', '.join(PLANS)})",
                            "rebuild with this version of onex-export")
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


def run_plan(plan: dict, graphs, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Execute a plan over callables ``graphs[name](**inputs) -> {output: tensor}``.

    This is the whole contract a service implements from the manifest; the ONNX Runtime and
    TensorRT runners and the parity gate all go through it.
    """
    values = {f"inputs.{k}": v for k, v in feeds.items()}
    for step in plan["steps"]:
        outs = graphs[step["graph"]](**{name: values[src] for name, src in step["bind"].items()})
        values.update({f"{step['graph']}.{k}": v for k, v in outs.items()})
    return {name: values[src] for name, src in plan["outputs"].items()}
