"""What a build writes and a runtime reads: the manifest's schema name and version, its dimension names,
tensor specs, plan names and how a plan runs, the typed :class:`Manifest`, and reading and checking a build
folder. Writers construct a :class:`Manifest`; readers use its attributes.

``export/`` writes this contract and ``runtime/`` only reads it: this module imports neither, nor any
model or exporter (no diffusers, onnx or TensorRT), so a service that runs a build imports only what
running needs. The manifest's JSON Schema, for services in other languages, is ``JSON_SCHEMA``.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import NamedTuple

import torch

from ..config import SkipRange
from ..errors import OnexError
from ..fileio import sha256_file
from ..trt import FLAVOURS
from .integrity import changed_sections, leaves_folder, outside, seal_of

SCHEMA = "onex-export/build-manifest"
SCHEMA_VERSION = 2
FILENAME = "manifest.json"
JSON_SCHEMA = Path(__file__).resolve().parents[1] / "schemas" / "manifest.schema.json"

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


STATUSES = ("passed", "failed", "unverified")
PRECISIONS = ("fp32", "fp16", "bf16")
TRT_FLAVOURS = (*FLAVOURS, "none")
DIMS = (B, T, N, H, W, IH, IW)
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def _check(ok: bool, what: str) -> None:
    """Refuse a malformed section: ``ValueError`` (a writer's bug; :meth:`Manifest.from_json` reports it as the
    file's problem, with the fix)."""
    if not ok:
        raise ValueError(what)


class Range(NamedTuple):
    """A dimension's ``[min, opt, max]``: opt is the size engines are tuned for."""

    min: int
    opt: int
    max: int

    @classmethod
    def of(cls, values, what: str) -> "Range":
        """``values`` as a range, checked: three sizes, ``1 <= min <= opt <= max`` (``what`` names it)."""
        _check(len(values) == 3 and all(isinstance(v, int) and v >= 1 for v in values)
               and values[0] <= values[1] <= values[2],
               f"{what} must be [min, opt, max] with 1 <= min <= opt <= max, not {list(values)}")
        return cls(*values)


def _tensor_from_json(data: dict) -> TensorSpec:
    return TensorSpec(data["name"], tuple(data["shape"]), data["dtype"])


def _check_tensor(spec: TensorSpec) -> None:
    _check(spec.dtype in TORCH_DTYPES, f"tensor {spec.name!r} has dtype {spec.dtype!r}, not one of {list(TORCH_DTYPES)}")
    _check(all(d in DIMS if isinstance(d, str) else d >= 1 for d in spec.shape),
           f"tensor {spec.name!r} has shape {list(spec.shape)}: a dimension is a size or one of {list(DIMS)}")


def _tensor_json(spec: TensorSpec) -> dict:
    return {"name": spec.name, "shape": list(spec.shape), "dtype": spec.dtype}


@dataclass(frozen=True)
class FileEntry:
    """A file of the build: its path relative to the folder, size and sha256. An engine's entry adds how it was
    built (``extra``: flavour, target, compute capabilities, tf32), in the order the builder gave them."""

    file: str
    bytes: int
    sha256: str
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check(not leaves_folder(self.file), f"file {self.file!r} leaves the build folder (absolute, or with '..')")
        _check(isinstance(self.bytes, int) and self.bytes >= 0, f"{self.file}: bytes {self.bytes!r} is not a size")
        _check(bool(_SHA256.match(str(self.sha256))), f"{self.file}: sha256 {self.sha256!r} is not a digest")

    @classmethod
    def from_json(cls, data: dict) -> "FileEntry":
        return cls(data["file"], data["bytes"], data["sha256"],
                   {k: v for k, v in data.items() if k not in ("file", "bytes", "sha256")})

    def to_json(self) -> dict:
        return {"file": self.file, "bytes": self.bytes, "sha256": self.sha256, **self.extra}


def _file_or_none(data: dict | None) -> FileEntry | None:
    return FileEntry.from_json(data) if data is not None else None


@dataclass(frozen=True)
class GraphEntry:
    """One graph of the build: its definition (None for the text encoders and VAE), its inputs and outputs, the
    ONNX file (and external data), the engine (None without one) and the keys that decide reuse.
    ``engine_key``, ``profile`` and ``build_seconds`` are absent (None) in a build without engines."""

    definition: dict | None
    onnx_key: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    weight_bytes: int
    export_seconds: float
    onnx: FileEntry
    onnx_data: FileEntry | None
    engine: FileEntry | None = None
    engine_key: str | None = None
    profile: dict | None = None
    build_seconds: float | None = None
    weights_sha256: str | None = None  # the digest of the weights it was exported from (None: built before it was kept)
    # its AOTInductor package (None without one; extra: flavour "aoti", the torch version and device it runs on)
    compiled: FileEntry | None = None
    compiled_key: str | None = None
    compile_seconds: float | None = None

    def __post_init__(self) -> None:
        _check(bool(self.inputs) and bool(self.outputs), "a graph needs inputs and outputs")
        for spec in (*self.inputs, *self.outputs):
            _check_tensor(spec)

    @classmethod
    def from_json(cls, data: dict) -> "GraphEntry":
        return cls(data["def"], data["onnx_key"], tuple(map(_tensor_from_json, data["inputs"])),
                   tuple(map(_tensor_from_json, data["outputs"])), data["weight_bytes"], data["export_seconds"],
                   FileEntry.from_json(data["onnx"]), _file_or_none(data["onnx_data"]), _file_or_none(data["engine"]),
                   data.get("engine_key"), data.get("profile"), data.get("build_seconds"), data.get("weights_sha256"),
                   _file_or_none(data.get("compiled")), data.get("compiled_key"), data.get("compile_seconds"))

    def to_json(self) -> dict:
        out = {"def": self.definition, "onnx_key": self.onnx_key, "inputs": [_tensor_json(t) for t in self.inputs],
               "outputs": [_tensor_json(t) for t in self.outputs], "weight_bytes": self.weight_bytes,
               **({"weights_sha256": self.weights_sha256} if self.weights_sha256 else {}),
               "export_seconds": self.export_seconds, "onnx": self.onnx.to_json(),
               "onnx_data": self.onnx_data.to_json() if self.onnx_data else None}
        for key in ("engine_key", "profile", "build_seconds", "compiled_key", "compile_seconds"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        out["engine"] = self.engine.to_json() if self.engine else None
        if self.compiled is not None:
            out["compiled"] = self.compiled.to_json()
        return out

    def files(self) -> list[FileEntry]:
        """The graph's files: ONNX, its external data, the engine, the AOTInductor package (those it has)."""
        return [f for f in (self.onnx, self.onnx_data, self.engine, self.compiled) if f is not None]


@dataclass(frozen=True)
class ModelInfo:
    """What the build was made from: the model (an embedded name or an absolute folder), the MLP file (None: the
    untrained, plain-reuse MLP), its depth and the transformer's public config."""

    source: str
    mlp: str | None
    num_layers: int
    config: dict

    def __post_init__(self) -> None:
        _check(self.num_layers >= 1, f"num_layers {self.num_layers} is not a depth")
        _check("in_channels" in self.config and "patch_size" in self.config, "the model config needs in_channels and "
               "patch_size")

    @classmethod
    def from_json(cls, data: dict) -> "ModelInfo":
        return cls(data["source"], data["mlp"], data["num_layers"], data["config"])

    def to_json(self) -> dict:
        return {"source": self.source, "mlp": self.mlp, "num_layers": self.num_layers, "config": self.config}


@dataclass(frozen=True)
class SkipInfo:
    """The skipped range (its 1-based and 0-based forms are written from it, not stored); ``source`` says which
    probe chose it (``--skip auto:NFE``), else None."""

    range: SkipRange
    source: dict | None = None

    @property
    def one_based(self) -> str:
        return str(self.range)

    @property
    def first(self) -> int:
        return self.range.first

    @property
    def last(self) -> int:
        return self.range.last

    @classmethod
    def from_json(cls, data: dict) -> "SkipInfo":
        info = cls(SkipRange(data["first"], data["last"]), data.get("source"))
        _check(info.to_json() == data, f"skip {data.get('one_based')} disagrees with its blocks "
                                       f"{data['first']}-{data['last']}")
        return info

    def to_json(self) -> dict:
        r = self.range
        return {"one_based": str(r), "first": r.first, "last": r.last, "zero_based": list(r.indices0),
                "count": r.count, **({"source": self.source} if self.source else {})}


@dataclass(frozen=True)
class ShapeRanges:
    """The shapes a build runs: images per call, pixels per side, text tokens."""

    batch: Range
    resolution: Range
    text_len: Range

    def __post_init__(self) -> None:
        for name in ("batch", "resolution", "text_len"):
            Range.of(getattr(self, name), f"shapes.ranges.{name}")

    @classmethod
    def from_json(cls, data: dict) -> "ShapeRanges":
        return cls(*(Range.of(data[k], f"shapes.ranges.{k}") for k in ("batch", "resolution", "text_len")))

    def to_json(self) -> dict:
        return {"batch": list(self.batch), "resolution": list(self.resolution), "text_len": list(self.text_len)}


@dataclass(frozen=True)
class Shapes:
    """The build's shape ranges, every symbolic dimension's range they give, and which dimensions vary."""

    ranges: ShapeRanges
    dims: dict[str, Range]
    dynamic: tuple[str, ...]

    def __post_init__(self) -> None:
        _check(set(self.dims) <= set(DIMS) and set(self.dynamic) <= set(DIMS),
               f"shapes name dimensions outside {list(DIMS)}")
        for name, r in self.dims.items():
            Range.of(r, f"shapes.dims.{name}")

    @classmethod
    def from_json(cls, data: dict) -> "Shapes":
        return cls(ShapeRanges.from_json(data["ranges"]),
                   {k: Range.of(v, f"shapes.dims.{k}") for k, v in data["dims"].items()}, tuple(data["dynamic"]))

    def to_json(self) -> dict:
        return {"ranges": self.ranges.to_json(), "dims": {k: list(v) for k, v in self.dims.items()},
                "dynamic": list(self.dynamic)}


@dataclass(frozen=True)
class TokenizerEntry:
    """A tokenizer the build carries: its folder, the length it pads to, how, and its files."""

    dir: str
    max_length: int
    padding: str
    truncation: bool
    files: tuple[FileEntry, ...]

    def __post_init__(self) -> None:
        _check(not leaves_folder(self.dir), f"tokenizer folder {self.dir!r} leaves the build folder")
        for f in self.files:
            _check(f.file.startswith(self.dir.rstrip("/") + "/"), f"tokenizer file {f.file!r} is not in {self.dir!r}")

    @classmethod
    def from_json(cls, data: dict) -> "TokenizerEntry":
        return cls(data["dir"], data["max_length"], data["padding"], data["truncation"],
                   tuple(map(FileEntry.from_json, data["files"])))

    def to_json(self) -> dict:
        return {"dir": self.dir, "max_length": self.max_length, "padding": self.padding,
                "truncation": self.truncation, "files": [f.to_json() for f in self.files]}


@dataclass(frozen=True)
class Pipeline:
    """Text to image around the transformer: which components the build has (``text``, ``vae``), the tokenizers,
    the graphs that run them, the VAE's scale and the images' value range."""

    components: tuple[str, ...]
    tokenizers: dict[str, TokenizerEntry]
    text_graph: str | None
    vae_graph: str | None
    vae_scale_factor: int
    image_range: tuple[float, float]
    component_precision: str

    def __post_init__(self) -> None:
        _check(set(self.components) <= {"text", "vae"}, f"unknown components {list(self.components)}")
        _check(self.vae_scale_factor >= 1, f"vae_scale_factor {self.vae_scale_factor} is not a scale")

    @classmethod
    def from_json(cls, data: dict) -> "Pipeline":
        return cls(tuple(data["components"]), {k: TokenizerEntry.from_json(v) for k, v in data["tokenizers"].items()},
                   data["text_graph"], data["vae_graph"], data["vae_scale_factor"], tuple(data["image_range"]),
                   data["component_precision"])

    def to_json(self) -> dict:
        return {"components": list(self.components),
                "tokenizers": {k: v.to_json() for k, v in self.tokenizers.items()},
                "text_graph": self.text_graph, "vae_graph": self.vae_graph, "vae_scale_factor": self.vae_scale_factor,
                "image_range": list(self.image_range), "component_precision": self.component_precision}


def derive_status(verifications) -> str:
    """A build's ``status`` from its verifications, taking the latest of each (artifact, backend, device):
    ``failed`` if any failed, else ``passed`` if any passed, else ``unverified`` (none could run here,
    e.g. bf16 graphs on a CPU, or ``--gate none``)."""
    latest = {}
    for v in verifications:
        latest[(v["artifact"], v["backend"], v.get("device"))] = v["status"]
    if "failed" in latest.values():
        return "failed"
    return "passed" if "passed" in latest.values() else "unverified"


@dataclass(frozen=True)
class Manifest:
    """``manifest.json``, typed: what a build folder holds and promises, and what was checked about it.

    Open-ended records stay dicts: the tool versions, the precision policy, the schedule (``SamplingPlan`` writes
    and reads it), the plans (:func:`run_plan` runs them), weights, per-stage figures and each verification.
    ``to_json`` gives the keys in the order the file has them; ``from_json(d).to_json() == d`` for a manifest this
    version wrote.
    """

    name: str
    created: str
    status: str
    tool: dict
    model: ModelInfo
    skip: SkipInfo
    precision: str
    precision_policy: dict
    opset: int
    trt: str
    shapes: Shapes
    schedule: dict
    graphs: dict[str, GraphEntry]
    plans: dict[str, dict]
    weights: dict
    verifications: tuple[dict, ...]
    pipeline: Pipeline
    stages: dict
    seal: dict | None = None  # None: built before seals (read, but nothing certifies its claims)

    def __post_init__(self) -> None:
        _check(self.status in STATUSES, f"status {self.status!r} is not one of {list(STATUSES)}")
        _check(self.precision in PRECISIONS, f"precision {self.precision!r} is not one of {list(PRECISIONS)}")
        _check(self.trt in TRT_FLAVOURS, f"trt {self.trt!r} is not one of {list(TRT_FLAVOURS)}")
        _check(bool(self.graphs), "a build has at least one graph")
        _check("full" in self.plans, "a build has a full plan")
        named = [f.file for f in self.files()]
        twice = sorted({name for name in named if named.count(name) > 1})
        _check(not twice, f"{', '.join(twice)} listed for two entries (each graph and tokenizer has files of its own)")

    @classmethod
    def from_json(cls, data, where: str = FILENAME) -> "Manifest":
        """The manifest in ``data`` (parsed JSON); raises :class:`ManifestError` naming what is wrong in ``where``
        and the fix: another tool's file, another schema version, a plan this version cannot run, a missing or
        malformed section."""
        if not isinstance(data, dict) or data.get("schema") != SCHEMA:
            raise ManifestError(f"{where} is not an onex-export build manifest")
        if data.get("schema_version") != SCHEMA_VERSION:
            raise ManifestError(f"{where} has schema version {data.get('schema_version')}, this tool reads "
                                f"{SCHEMA_VERSION}", "rebuild with this version of onex-export")
        unknown = sorted(set(data.get("plans", {})) - set(PLANS))
        if unknown:
            raise ManifestError(f"{where} has plan(s) {unknown}, which this tool cannot run (it knows "
                                f"{', '.join(PLANS)})", "rebuild with this version of onex-export")
        try:
            return cls(
                data["name"], data["created"], data["status"], data["tool"], ModelInfo.from_json(data["model"]),
                SkipInfo.from_json(data["skip"]), data["precision"], data["precision_policy"], data["opset"],
                data["trt"], Shapes.from_json(data["shapes"]), data["schedule"],
                {k: GraphEntry.from_json(v) for k, v in data["graphs"].items()}, data["plans"], data["weights"],
                tuple(data["verifications"]), Pipeline.from_json(data["pipeline"]), data["stages"], data.get("seal"))
        except KeyError as exc:
            raise ManifestError(f"{where} has no {exc} entry where this version needs one",
                                "rebuild with this version of onex-export") from exc
        except (AttributeError, TypeError, ValueError) as exc:
            raise ManifestError(f"{where} is malformed: {exc}", "rebuild with `onex-export build`") from exc

    def to_json(self) -> dict:
        """The JSON object ``manifest.json`` holds (what the JSON Schema describes)."""
        return {
            "schema": SCHEMA, "schema_version": SCHEMA_VERSION, "name": self.name, "created": self.created,
            "status": self.status, "tool": self.tool, "model": self.model.to_json(), "skip": self.skip.to_json(),
            "precision": self.precision, "precision_policy": self.precision_policy, "opset": self.opset,
            "trt": self.trt, "shapes": self.shapes.to_json(), "schedule": self.schedule,
            "graphs": {k: v.to_json() for k, v in self.graphs.items()}, "plans": self.plans, "weights": self.weights,
            "verifications": list(self.verifications), "pipeline": self.pipeline.to_json(), "stages": self.stages,
            **({"seal": self.seal} if self.seal is not None else {}),
        }

    def sealed(self) -> "Manifest":
        """This manifest with the seal of what it claims now (the build seals what its gate certified)."""
        return replace(self, seal=seal_of(replace(self, seal=None).to_json()))

    def changed_since_sealed(self) -> list[str]:
        """The sections edited since the build sealed them; empty when none (or when it was built without a seal)."""
        return changed_sections(self.to_json()) if self.seal is not None else []

    def paths(self) -> list[str]:
        """Every path the manifest names inside its folder: the files, and the tokenizers' folders."""
        return [f.file for f in self.files()] + [t.dir for t in self.pipeline.tokenizers.values()]

    def with_verification(self, verification: dict) -> "Manifest":
        """This manifest with ``verification`` appended and the status it gives."""
        verifications = (*self.verifications, verification)
        return replace(self, verifications=verifications, status=derive_status(verifications))

    def files(self) -> list[FileEntry]:
        """Every file the build lists (ONNX graphs, their external data, engines, tokenizers)."""
        out = [f for g in self.graphs.values() for f in g.files()]
        return out + [f for tokenizer in self.pipeline.tokenizers.values() for f in tokenizer.files]


def read_manifest(folder: Path) -> Manifest:
    """Load ``folder/manifest.json`` and check it (schema, version, plan names, every section)."""
    path = Path(folder) / FILENAME
    if not path.is_file():
        raise ManifestError(f"no {FILENAME} in {folder}", "point at a folder written by `onex-export build`")
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ManifestError(f"cannot read {path}: {exc}", "rebuild with `onex-export build`") from exc
    return Manifest.from_json(data, str(path))


def check_claims(folder: Path, manifest: Manifest) -> list[str]:
    """Problems a runtime checks before it loads anything, without reading the files: sections of the manifest
    edited since the build sealed them, paths that resolve outside ``folder``; empty when none."""
    changed = manifest.changed_since_sealed()
    problems = [f"{FILENAME}: {', '.join(changed)} changed since the build certified "
                f"{'it' if len(changed) == 1 else 'them'} (its seal no longer matches)"] if changed else []
    return problems + outside(folder, manifest.paths())


def check_files(folder: Path, manifest: Manifest) -> list[str]:
    """:func:`check_claims`' problems, then the listed files' (missing, of another size or sha256); empty when the
    folder is what the build made."""
    problems = check_claims(folder, manifest)
    for entry in manifest.files():
        path = Path(folder) / entry.file
        if any(problem.startswith(f"{entry.file}: ") for problem in problems):
            continue  # a file outside the folder is never read
        if not path.is_file():
            problems.append(f"{entry.file}: missing")
        elif path.stat().st_size != entry.bytes or sha256_file(path) != entry.sha256:
            problems.append(f"{entry.file}: sha256 does not match the manifest (corrupted or tampered)")
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
