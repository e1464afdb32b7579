"""`onex-export build`: load -> plan the graphs -> export -> engines -> gate -> manifest, in that order.

Memory: the model is never whole in memory. It is built on the ``meta`` device, and each graph's modules
are read from the checkpoint in the export precision just for that graph's export, then dropped; engines
are built one at a time from the ONNX files alone; the gate streams a float32 reference one module at a
time. A graph is cut where its weights would pass ``max_graph_bytes``, because an engine build holds
about three times its graph's weights.

Robustness: everything is written into a temporary sibling folder and swapped into place only at the
end (:mod:`.install`), so an interrupted or failed build never leaves half a build behind nor touches a
good one. A build whose gate fails goes to ``<out>.failed`` for inspection (or into place with
``allow_parity_failure``). Artifacts whose key (a hash of everything they depend on) is unchanged are
reused from the previous build.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Callable

import diffusers
import onnx
import torch

from .. import __version__
from ..config import BlockRange, SkipRange
from ..contract import GraphEntry, Manifest, ModelInfo, Pipeline, Range, ShapeRanges, Shapes, SkipInfo
from ..errors import OnexError, UsageError
from ..fileio import DiskError, free_bytes, sha256_file, writing
from ..locks import build_lock
from ..models import DEFAULT_MODEL, SplitSD3Transformer
from ..models.weights import (
    WeightSource, check_keys, materialized, module_nbytes, release, split_on_meta, tensors_digest,
    top_level_prefixes, transformer_source,
)
from ..models.text import SD3_MAX_TEXT_LENGTH, text_length
from ..models.vae import vae_scale
from ..models.zoo import model_source
from ..runtime.graphs import OrtGraph, aoti_graph
from ..schedule import SamplingPlan
from ..trt import flavour_version, load_trt
from ..export import aoti
from ..export import manifest as mf
from ..export.components import COMPONENTS, Components, available, load_components, save_tokenizers
from ..check.background import BackgroundReference, in_background, job_for_build
from ..check.gate import GateConfig, failure_summary, run_gate
from ..export.graphs import (
    DEFAULT_GRAPH_BYTES, GraphDef, SubgraphModule, build_plans, module_bytes, transformer_graphs, weights_digest,
)
from ..export.install import check_replaceable, install, recover, temp_name
from ..export.onnx_export import EXPORTER, MIN_OPSET, PROTOBUF_LIMIT, TRACE_DIMS, export_graph, trace_inputs
from ..export.precision import PrecisionPolicy, apply_precision
from ..export.shapes import DimRange, ShapeConfig
from ..export.stages import StageClock
from ..export.tensorrt import EngineBuildOptions, build_engine, choose_trt

TRT_CHOICES = ("auto", "tensorrt-rtx", "tensorrt", "none")
MAX_BATCH = 256


def check_text_len(model: str, tokens: int, given: str) -> None:
    """Refuse ``--text-len`` (``given``, reaching ``tokens``) past the most tokens ``model``'s text encoders can
    give the transformer: CLIP 77 + T5 512 for SD3's, exactly 16 for the embedded tiny ones."""
    limit = text_length(model, t5_length=None)
    if tokens > limit:
        raise UsageError(f"--text-len {given} goes past the {limit} tokens the text encoders of {model} can give",
                         f"use at most {limit}" + (" (CLIP 77 + T5 512)" if limit == SD3_MAX_TEXT_LENGTH else ""))


class ParityFailedError(OnexError):
    """The built graphs do not match the PyTorch reference within tolerance; ``manifest`` says how."""

    def __init__(self, message: str, hint: str, manifest: Manifest):
        super().__init__(message, hint)
        self.manifest = manifest


@dataclass(frozen=True)
class BuildConfig:
    """Everything a build depends on; validated on construction."""

    skip: SkipRange
    out: Path
    skip_source: dict | None = None  # where an automatic range came from (a probe), recorded in the manifest
    model: str = DEFAULT_MODEL
    mlp: Path | None = None
    precision: str = "fp32"
    fp32_blocks: BlockRange | None = None
    trt: str = "auto"
    batch: DimRange = field(default_factory=lambda: DimRange(1, 1, 4))
    resolution: DimRange | None = None  # default: the model's native size, static
    text_len: DimRange | None = None  # default: 16 for embedded models, 333 for real ones, static
    dynamic_shapes: bool = False  # unset ranges become dynamic: resolution native/2..2x, text 1/2..1x
    components: tuple[str, ...] | None = None  # "text", "vae"; None: all the model has
    opset: int = MIN_OPSET
    optimization_level: int = 3
    compute_capabilities: tuple[str, ...] = ()
    timing_cache: Path | None = None
    tf32: bool = False
    gate: GateConfig = field(default_factory=GateConfig)
    allow_parity_failure: bool = False
    eta: float = 1.0
    external_data_threshold: int = PROTOBUF_LIMIT
    max_graph_bytes: int = DEFAULT_GRAPH_BYTES
    aoti: bool = False  # also compile each graph into an AOTInductor package for this machine's CPU, and gate it
    reference_process: bool | None = None  # the gate's reference made during export by a second process; None: auto

    def __post_init__(self):
        if self.trt not in TRT_CHOICES:
            raise UsageError(f"unknown --trt {self.trt!r}", f"choose one of {', '.join(TRT_CHOICES)}")
        if self.trt == "none" and self.compute_capabilities:  # would be silently ignored: no engine is built
            raise UsageError(f"--compute-capability {' '.join(self.compute_capabilities)} targets TensorRT-RTX engines, "
                             "and --trt none builds none", "drop --compute-capability, or build with --trt tensorrt-rtx")
        if self.opset < MIN_OPSET:
            raise UsageError(f"opset {self.opset} is too old", f"use {MIN_OPSET} or newer")
        if self.max_graph_bytes <= 0:
            raise UsageError(f"the per-graph weight budget must be positive, got {self.max_graph_bytes} bytes",
                             "use e.g. --max-graph-gib 2")
        self.policy  # validates precision and fp32_blocks
        if self.batch.max > MAX_BATCH:
            raise UsageError(f"--batch {self.batch} goes past {MAX_BATCH} images per call",
                             f"use at most {MAX_BATCH}; a service splits larger requests")
        if self.text_len is not None:
            check_text_len(self.model, self.text_len.max, str(self.text_len))

    @property
    def policy(self) -> PrecisionPolicy:
        return PrecisionPolicy(self.precision, self.fp32_blocks)


def _hash(*parts) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part if isinstance(part, bytes) else json.dumps(part, sort_keys=True, default=str).encode())
    return h.hexdigest()


def public_config(cfg) -> dict:
    """A diffusers config without its private ``_*`` bookkeeping (whose order is not stable)."""
    return {k: v for k, v in dict(cfg).items() if not k.startswith("_")}


def _versions(trt: str) -> dict:
    out = {"onex_export": __version__, "python": platform.python_version(), "torch": torch.__version__,
           "diffusers": diffusers.__version__, "onnx": onnx.__version__}
    try:
        import onnxruntime
        out["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        out["onnxruntime"] = None
    if trt != "none":
        out[trt] = flavour_version(trt)
    return out


# -- load ---------------------------------------------------------------------------------------------------

@dataclass
class LoadedModel:
    """A model ready to export: its config and checkpoint, and a split model on ``meta`` with the precision
    policy applied (its small MLP loaded, cast)."""

    config: dict
    source: WeightSource
    split: SplitSD3Transformer
    mlp_digest: str


def load_model(model: str, mlp: Path | None, skip: SkipRange, policy: PrecisionPolicy) -> LoadedModel:
    config, source = transformer_source(model)
    split = split_on_meta(config, mlp, skip)
    check_keys(split.transformer, source)
    mlp_digest = tensors_digest(split.mlp.state_dict().items())  # as stored, before any cast
    return LoadedModel(config, source, apply_precision(split, policy), mlp_digest)


def resolve_shapes(config: BuildConfig, split: SplitSD3Transformer, encoder_tokens: int | None = None) -> ShapeConfig:
    """The configured ranges, with defaults from the model for those left unset. ``encoder_tokens``,
    the text encoders' token count when they are built, must lie in the text-length range."""
    cfg, scale = split.transformer.config, vae_scale(config.model)
    native = cfg.sample_size * scale
    text = encoder_tokens or text_length(config.model)
    step = scale * cfg.patch_size
    if config.dynamic_shapes:
        res = DimRange(max(step, native // 2 // step * step), native, min(2 * native, cfg.pos_embed_max_size * scale))
        txt = DimRange(max(1, text // 2), text, text)
    else:
        res, txt = DimRange(native, native, native), DimRange(text, text, text)
    shapes = ShapeConfig(config.batch, config.resolution or res, config.text_len or txt, scale)
    tl = shapes.text_len
    if encoder_tokens is not None and not tl.min <= encoder_tokens <= tl.max:
        raise UsageError(f"--text-len {tl} does not include the text encoders' {text} tokens",
                         f"use --text-len {text}, or --components vae to build without text encoders")
    return shapes.validate_for(cfg.patch_size, cfg.pos_embed_max_size)


# -- export and engines -------------------------------------------------------------------------------------

def _reuse(previous: Manifest | None, prev_dir: Path, graph: str, kind: str, key: str,
           tmp: Path) -> GraphEntry | None:
    """Copy an artifact (``kind``: "onnx", "engine" or "compiled") from the previous build if its key matches and
    its files are intact; returns the previous build's entry for the graph."""
    entry = previous.graphs.get(graph) if previous else None
    if entry is None or getattr(entry, f"{kind}_key") != key or getattr(entry, kind) is None:
        return None
    files = [entry.onnx, *([entry.onnx_data] if entry.onnx_data else [])] if kind == "onnx" else [getattr(entry, kind)]
    for f in files:
        src = prev_dir / f.file
        if not src.is_file() or src.stat().st_size != f.bytes or sha256_file(src) != f.sha256:
            return None
    for f in files:
        try:
            os.link(prev_dir / f.file, tmp / f.file)  # no second copy of gigabytes (the old folder goes)
        except OSError:
            shutil.copy2(prev_dir / f.file, tmp / f.file)
    return entry


@dataclass(frozen=True)
class _Graph:
    """One graph to export: its definition (None for components), spec, the identity of the weights it carries,
    and the transformer modules to load from the checkpoint while it is exported (a component loads whole)."""

    d: GraphDef | None
    spec: object
    weight_key: str
    prefixes: tuple[str, ...]


def _graphs(loaded: LoadedModel, defs: list[GraphDef], specs: dict, comps: Components) -> dict[str, _Graph]:
    out = {}
    for d in defs:
        prefixes = tuple(n for n in d.module_names() if n != "mlp")
        out[d.name] = _Graph(d, specs[d.name], weights_digest(d, loaded.mlp_digest, loaded.source), prefixes)
    for name in comps.names:
        out[name] = _Graph(None, comps.spec(name), comps.digest(name), ())
    return out


def export_stage(config: BuildConfig, loaded: LoadedModel, comps: Components, graphs: dict[str, _Graph],
                 previous: Manifest | None, tmp: Path, versions: dict, log) -> dict[str, GraphEntry]:
    """Export each graph (or reuse it), loading only its own weights while it is exported."""
    split, policy, L = loaded.split, config.policy, loaded.split.num_layers
    tool = {"opset": config.opset, "exporter": EXPORTER, "trace": TRACE_DIMS,
            "versions": {k: versions[k] for k in ("torch", "onnx", "diffusers", "onex_export")},
            "external_data_threshold": config.external_data_threshold}
    transformer = {"policy": policy.to_json(), "skip": str(config.skip), "config": public_config(loaded.config)}
    entries = {}
    for i, (name, g) in enumerate(graphs.items(), 1):
        # a component's key leaves out the transformer's settings: a new --skip or --precision keeps T5's export
        key = _hash(tool, transformer if g.d else None, asdict(g.spec), g.d.to_json() if g.d else name, g.weight_key)
        entry = partial(GraphEntry, g.d.to_json() if g.d else None, key, g.spec.inputs, g.spec.outputs,
                        weights_sha256=g.weight_key)
        reused = _reuse(previous, Path(config.out), name, "onnx", key, tmp)
        if reused:
            log(f"[2/5] export {name} ({i}/{len(graphs)}): unchanged, reused")
            entries[name] = entry(reused.weight_bytes, 0.0, reused.onnx, reused.onnx_data)
            continue
        log(f"[2/5] export {name} ({i}/{len(graphs)}) ...")
        inputs = trace_inputs(g.spec, split.transformer.config.patch_size)
        if g.d is not None:
            with materialized(split.transformer, g.prefixes, loaded.source, lambda k: policy.module_dtype(k, L)):
                art = export_graph(SubgraphModule(split, g.d, g.spec), g.spec, inputs, tmp,
                                   module_bytes(split, g.d.module_names()), config.opset, config.external_data_threshold,
                                   release_weights=lambda: release(split.transformer, g.prefixes))
        else:
            module = comps.load(name)
            art = export_graph(module, g.spec, inputs, tmp, module_nbytes(module), config.opset,
                               config.external_data_threshold, release_weights=lambda: module.to("meta"))
            del module
        log(f"      {name}.onnx {art.weight_bytes / 1e6:.1f} MB of weights in {art.export_seconds:.1f} s")
        data = tmp / f"{name}.onnx.data"
        entries[name] = entry(art.weight_bytes, round(art.export_seconds, 3), mf.file_entry(tmp, tmp / f"{name}.onnx"),
                              mf.file_entry(tmp, data) if data.is_file() else None)
    return entries


def _engine_options(config: BuildConfig, trt: str) -> EngineBuildOptions:
    cache = config.timing_cache or (Path(config.out).parent / "timing-cache.bin" if trt == "tensorrt" else None)
    return EngineBuildOptions(trt, config.optimization_level, config.compute_capabilities, cache, tf32=config.tf32)


def engine_stage(config: BuildConfig, trt: str, entries: dict[str, GraphEntry], specs: dict, shapes: ShapeConfig,
                 patch_size: int, previous: Manifest | None, tmp: Path, versions: dict, log) -> dict[str, GraphEntry]:
    """Build one engine per graph from its ONNX file alone (or reuse it); returns the entries with their engines."""
    if trt == "none":
        return entries
    options = _engine_options(config, trt)
    target = (torch.cuda.get_device_name() if torch.cuda.is_available() else None) if trt == "tensorrt" \
        else (list(options.compute_capabilities) or "default")
    out = {}
    for i, (name, entry) in enumerate(entries.items(), 1):
        profile = shapes.profile(specs[name], patch_size)
        onnx_files = [f.sha256 for f in (entry.onnx, entry.onnx_data) if f]
        opts = {k: v for k, v in asdict(options).items() if k != "timing_cache"}
        key = _hash(onnx_files, profile, opts, trt, versions[trt], target)
        engine = partial(replace, entry, engine_key=key, profile={k: [list(s) for s in v] for k, v in profile.items()})
        reused = _reuse(previous, Path(config.out), name, "engine", key, tmp)
        if reused:
            log(f"[3/5] engine {name} ({i}/{len(entries)}): unchanged, reused")
            out[name] = engine(build_seconds=0.0, engine=reused.engine)
            continue
        log(f"[3/5] engine {name} ({i}/{len(entries)}) with {trt} ...")
        report = build_engine(tmp / f"{name}.onnx", tmp / f"{name}.plan", profile, options)
        log(f"      {name}.plan {report.size_bytes / 1e6:.1f} MB in {report.build_seconds:.1f} s")
        out[name] = engine(build_seconds=round(report.build_seconds, 3), engine=mf.file_entry(
            tmp, tmp / f"{name}.plan", flavour=trt, target=target,
            compute_capabilities=list(options.compute_capabilities) or "default", tf32=options.tf32))
    return out


def compile_stage(config: BuildConfig, loaded: LoadedModel, comps: Components, graphs: dict[str, _Graph],
                  entries: dict[str, GraphEntry], ranges: dict, previous: Manifest | None, tmp: Path,
                  log) -> dict[str, GraphEntry]:
    """With ``--aoti``: one AOTInductor package per graph (or reuse it), compiled from the module the ONNX came
    from, its own weights loaded meanwhile; returns the entries with their packages."""
    if not config.aoti:
        return entries
    split, policy, L = loaded.split, config.policy, loaded.split.num_layers
    patch, out = split.transformer.config.patch_size, {}
    for i, (name, g) in enumerate(graphs.items(), 1):
        key = _hash(entries[name].onnx_key, ranges, torch.__version__, platform.machine(), aoti.FLAVOUR)
        package = partial(replace, entries[name], compiled_key=key)
        reused = _reuse(previous, Path(config.out), name, "compiled", key, tmp)
        if reused:
            log(f"[3/5] aoti {name} ({i}/{len(graphs)}): unchanged, reused")
            out[name] = package(compile_seconds=0.0, compiled=reused.compiled)
            continue
        log(f"[3/5] aoti {name} ({i}/{len(graphs)}): compiling with AOTInductor for the CPU ...")
        with contextlib.ExitStack() as held:
            if g.d is not None:
                held.enter_context(materialized(split.transformer, g.prefixes, loaded.source,
                                                lambda k: policy.module_dtype(k, L)))
                module = SubgraphModule(split, g.d, g.spec)
                held.callback(release, split.transformer, g.prefixes)
            else:
                module = comps.load(name)
            art = aoti.compile_package(module, g.spec, ranges, patch, tmp / f"{name}.pt2")
            del module
        log(f"      {name}.pt2 {art.path.stat().st_size / 1e6:.1f} MB in {art.compile_seconds:.1f} s")
        out[name] = package(compile_seconds=round(art.compile_seconds, 3), compiled=mf.file_entry(
            tmp, art.path, flavour=aoti.FLAVOUR, torch=torch.__version__, device="cpu"))
    return out


# -- the gate ----------------------------------------------------------------------------------------------

def gate_stage(config: BuildConfig, loaded: LoadedModel, defs: list[GraphDef], plans: dict, shapes: ShapeConfig,
               comps, tmp: Path, entries: dict[str, GraphEntry], background: BackgroundReference | None,
               log) -> tuple[dict, ...]:
    """The ONNX graphs in ONNX Runtime against the streamed float32 reference (engines need a GPU to run), and
    with ``--aoti`` the AOTInductor packages the same way: one verification each. The reference is the one made
    in ``background`` where there is one."""
    candidates = [("onnx", "onnxruntime", lambda n: OrtGraph(tmp / f"{n}.onnx", low_memory=True))]
    if config.aoti:
        candidates.append(("compiled", "aoti", lambda n: aoti_graph(tmp, n, entries[n])))
    made = background.result(log) if background is not None else None
    out = []
    for artifact, backend, load in candidates:
        reference = split_on_meta(loaded.config, config.mlp, config.skip)
        out.append(run_gate(reference, loaded.source, defs, plans, load, artifact=artifact, backend=backend,
                            candidate_device="cpu", policy=config.policy, shapes=shapes, gate=config.gate,
                            eta=config.eta, components=comps, reference=made, log=log))
    return tuple(out)


# -- the whole build -----------------------------------------------------------------------------------------

def build(config: BuildConfig, log: Callable[[str], None] = lambda _: None) -> Manifest:
    """Run a whole build and return its manifest. Raises :class:`ParityFailedError` (after keeping
    the artifacts in ``<out>.failed``) when the gate fails and failures are not allowed, and
    :class:`~..locks.BusyError` when another process is writing the same folder."""
    out = Path(config.out)
    check_replaceable(out)
    made = [p for p in (out.parent, *out.parent.parents) if not p.exists()]  # deepest first
    try:
        with writing(out):
            out.parent.mkdir(parents=True, exist_ok=True)
        with writing(out), build_lock(out):  # before the (long) load: a second writer or an unwritable --out stops at once
            check_replaceable(out)  # again: another process may have put something there meanwhile
            for line in recover(out):
                log(line)
            return _build(config, out, log)
    except BaseException:
        for folder in made:  # folders made only to hold this build, still empty: a failed build leaves none
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise


def _space_needed(loaded: LoadedModel, comps: Components, trt: str) -> int:
    """Bytes a fresh build writes: every graph's weights in the ONNX files, again in the engines."""
    weights = module_bytes(loaded.split, [*top_level_prefixes(loaded.split.transformer), "mlp"])
    weights += sum(comps.weight_bytes(n) for n in comps.names)
    return int(weights * (2 if trt != "none" else 1) * 1.05)


def _build(config: BuildConfig, out: Path, log) -> Manifest:
    trt = choose_trt(config.trt, config.compute_capabilities, log)
    if trt != "none":  # a missing flavour or a bad option stops here, not after minutes of export
        load_trt(trt)
        _engine_options(config, trt)
    clock = StageClock()
    with clock.stage("load"):
        log(f"[1/5] loading {config.model}" + (f" with MLP {config.mlp}" if config.mlp else " (untrained MLP: plain reuse)"))
        loaded = load_model(config.model, config.mlp, config.skip, config.policy)
        cfg = loaded.split.transformer.config
        wanted = config.components if config.components is not None else (COMPONENTS if available(config.model) else ())
        comps = load_components(config.model, cfg, wanted)
        shapes = resolve_shapes(config, loaded.split, comps.text_length if "text" in comps.names else None)
        defs, specs = transformer_graphs(loaded.split, config.policy, config.max_graph_bytes)
        plans = build_plans(defs)
        log("      hashing the weights of each graph (an artifact is reused only if they are identical)")
        graphs = _graphs(loaded, defs, specs, comps)
        specs = {n: g.spec for n, g in graphs.items()}
    log(f"      {len(defs)} transformer graphs ({', '.join(d.name for d in defs)}), at most "
        f"{max(module_bytes(loaded.split, d.module_names()) for d in defs) / 2**30:.2f} GiB of weights each")

    previous = None
    if out.is_dir():
        try:
            previous = mf.read_manifest(out)
        except mf.ManifestError:
            previous = None  # an older schema: nothing is reused
    needed, free = _space_needed(loaded, comps, trt), free_bytes(out.parent)
    if previous is None and free is not None and free < needed:  # a rebuild links what it reuses: no check
        raise DiskError(f"{out.parent} has {free / 2**20:.1f} MiB free; this build writes about "
                        f"{needed / 2**20:.1f} MiB", "free some space there, or build elsewhere (--out)")
    tmp = temp_name(out)
    try:
        with writing(out, needed):
            return _write_build(config, loaded, comps, trt, defs, specs, plans, graphs, shapes, previous, tmp,
                                _versions(trt), clock, log)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _write_build(config: BuildConfig, loaded: LoadedModel, comps: Components, trt: str, defs, specs, plans, graphs,
                 shapes: ShapeConfig, previous: Manifest | None, tmp: Path, versions: dict, clock: StageClock,
                 log) -> Manifest:
    """Export, build engines, gate and write the manifest into ``tmp``, then install it (or keep it as
    ``<out>.failed``)."""
    out, cfg = Path(config.out), loaded.split.transformer.config
    tmp.mkdir()
    with in_background(job_for_build(config, loaded.split, defs, plans, shapes), tmp) as background:
        with clock.stage("export"):
            entries = export_stage(config, loaded, comps, graphs, previous, tmp, versions, log)
        with clock.stage("engines"):
            entries = engine_stage(config, trt, entries, specs, shapes, cfg.patch_size, previous, tmp, versions, log)
            entries = compile_stage(config, loaded, comps, graphs, entries, shapes.dim_ranges(cfg.patch_size),
                                    previous, tmp, log)
        with clock.stage("gate"):
            log(f"[4/5] parity gate ({config.gate.mode}): ONNX Runtime{' and AOTInductor' if config.aoti else ''} vs "
                f"PyTorch float32 on {config.gate.device}"
                + (" (engines run only on a GPU: onex-export verify --backend tensorrt)" if trt != "none" else ""))
            verifications = gate_stage(config, loaded, defs, plans, shapes, comps, tmp, entries, background, log)
            verification = next((v for v in verifications if v["status"] == "failed"), verifications[0])
    graph_bytes = sum(entries[d.name].weight_bytes for d in defs)
    model_bytes = module_bytes(loaded.split, [*top_level_prefixes(loaded.split.transformer), "mlp"])
    manifest = Manifest(
        name=out.name, created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        status=mf.derive_status(list(verifications)), tool=versions,
        model=ModelInfo(model_source(config.model),
                        os.path.abspath(config.mlp) if config.mlp else None,  # absolute: verify runs from anywhere
                        loaded.split.num_layers, public_config(cfg)),
        skip=SkipInfo(config.skip, config.skip_source), precision=config.precision,
        precision_policy=config.policy.to_json(), opset=config.opset, trt=trt,
        shapes=Shapes(ShapeRanges.from_json(shapes.to_json()),
                      {k: Range(*v) for k, v in shapes.dim_ranges(cfg.patch_size).items()},
                      tuple(sorted(shapes.dynamic_dims))),
        schedule=SamplingPlan.one_x(config.eta).to_manifest(loaded.split.num_layers, config.skip),
        graphs=entries, plans=plans,
        weights={"model_bytes": model_bytes, "graph_bytes": graph_bytes, "duplication_ratio": graph_bytes / model_bytes,
                 "max_graph_bytes": config.max_graph_bytes},
        verifications=verifications,
        pipeline=Pipeline(tuple(comps.names), save_tokenizers(comps.tokenizers, tmp) if comps.tokenizers else {},
                          "text" if "text" in comps.names else None, "vae" if "vae" in comps.names else None,
                          shapes.vae_scale, (0.0, 1.0), "fp32"),
        stages=clock.to_json(),
    ).sealed()  # what the gate certified: an edit of any claim is caught by verify and the runtime
    log("[5/5] manifest")
    mf.write_manifest(tmp, manifest)
    if manifest.status != "failed" or config.allow_parity_failure:
        install(tmp, out)
        return manifest
    failed = out.with_name(out.name + ".failed")
    shutil.rmtree(failed, ignore_errors=True)
    os.replace(tmp, failed)
    what, hint = failure_summary(verification, defs)
    raise ParityFailedError(f"parity gate failed: {what}; the artifacts are kept in {failed} for inspection; "
                            f"any previous build in {out} is untouched", hint, manifest)
