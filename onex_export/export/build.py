"""`onex-export build`: split, export ONNX, compile engines, gate on parity, write the manifest.

Robustness: everything is written into a temporary sibling folder and renamed into place only at
the end, so an interrupted or failed build never leaves half a build behind nor touches a good one.
A build whose parity gate fails goes to ``<out>.failed`` for inspection (or into place with
``allow_parity_failure``). Graphs and engines whose inputs are unchanged (content hashes) are reused
from the previous build.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import diffusers
import onnx
import torch

from .. import __version__
from ..config import SkipRange
from ..errors import OnexError, UsageError
from ..models import DEFAULT_MODEL, SplitSD3Transformer, load_compensation, load_transformer
from ..models.zoo import TINY_MODELS, TINY_TEXT_LEN
from ..runtime.graphs import TORCH_DTYPES, OrtGraph, TorchGraph
from ..schedule import SHIFT, SamplingPlan, timestep_from_sigma
from . import manifest as mf
from .gate import run_gate, step_inputs
from .components import COMPONENTS, Components, available, component_graphs, component_inputs, load_components, save_tokenizers, text_length
from .graphs import PLANS, TRANSFORMER_GRAPHS, graph_modules, graph_specs, graph_weights, weight_bytes
from .onnx_export import MIN_OPSET, PROTOBUF_LIMIT, export_graph, sha256_file
from .precision import ONNX_DTYPE_NAMES, for_precision
from .shapes import VAE_SCALE, DimRange, ShapeConfig
from .tensorrt import EngineBuildOptions, build_engine, flavour_version

TRT_CHOICES = ("auto", "tensorrt-rtx", "tensorrt", "none")
REAL_TEXT_LEN = 333  # CLIP 77 + T5 256 tokens


class ParityFailedError(OnexError):
    """The built graphs do not match the PyTorch reference within tolerance; ``manifest`` says how."""

    def __init__(self, message: str, hint: str, manifest: dict):
        super().__init__(message, hint)
        self.manifest = manifest


@dataclass(frozen=True)
class BuildConfig:
    """Everything a build depends on; validated on construction."""

    skip: SkipRange
    out: Path
    model: str = DEFAULT_MODEL
    mlp: Path | None = None
    precision: str = "fp32"
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
    allow_parity_failure: bool = False
    eta: float = 1.0
    external_data_threshold: int = PROTOBUF_LIMIT

    def __post_init__(self):
        if self.precision not in ONNX_DTYPE_NAMES:
            raise UsageError(f"unknown precision {self.precision!r}", f"choose one of {', '.join(ONNX_DTYPE_NAMES)}")
        if self.trt not in TRT_CHOICES:
            raise UsageError(f"unknown --trt {self.trt!r}", f"choose one of {', '.join(TRT_CHOICES)}")
        if self.opset < MIN_OPSET:
            raise UsageError(f"opset {self.opset} is too old", f"use {MIN_OPSET} or newer")

    def resolved_trt(self) -> str:
        if self.trt != "auto":
            return self.trt
        return "tensorrt-rtx" if flavour_version("tensorrt-rtx") else "none"


def _hash(*parts) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part if isinstance(part, bytes) else json.dumps(part, sort_keys=True, default=str).encode())
    return h.hexdigest()


def _weights_hash(modules) -> bytes:
    h = hashlib.sha256()
    for i, m in enumerate(modules):
        for name, t in m.state_dict().items():
            h.update(f"{i}.{name}:{t.dtype}:{tuple(t.shape)}".encode())
            h.update(t.detach().contiguous().cpu().view(torch.uint8).numpy())
    return h.digest()


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


def _clean_stale_temps(parent: Path) -> None:
    """Remove the temp folders of builds in ``parent`` whose process is gone (killed builds)."""
    for stale in parent.glob(".*.tmp-*"):
        if not stale.is_dir():
            continue
        pid = stale.name.rsplit("-", 1)[-1]
        try:
            os.kill(int(pid), 0)
        except (ValueError, ProcessLookupError):
            shutil.rmtree(stale, ignore_errors=True)
        except PermissionError:
            pass  # alive, another user's build


def _promote(tmp: Path, dest: Path) -> None:
    """Move the finished ``tmp`` folder to ``dest``, replacing an older build only at the very end."""
    if dest.exists():
        old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
        os.replace(dest, old)
        os.replace(tmp, dest)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, dest)


def _reuse(previous: dict | None, prev_dir: Path, graph: str, kind: str, key: str, tmp: Path) -> dict | None:
    """Copy an artifact from the previous build if its key matches and its file is intact."""
    if not previous:
        return None
    entry = previous.get("graphs", {}).get(graph, {})
    if entry.get(f"{kind}_key") != key or not entry.get(kind):
        return None
    files = [entry[kind]] + ([entry["onnx_data"]] if kind == "onnx" and entry.get("onnx_data") else [])
    for f in files:
        src = prev_dir / f["file"]
        if not src.is_file() or sha256_file(src) != f["sha256"]:
            return None
    for f in files:
        shutil.copy2(prev_dir / f["file"], tmp / f["file"])
    return entry


def _example_inputs(graphs: dict[str, TorchGraph], feeds: dict) -> dict[str, tuple]:
    """Inputs of each graph at the profile's optimum, from a run of the full and skipping plans."""
    h = graphs["head"](**feeds)
    s = graphs["segment"](img=h["img"], ctx=h["ctx"], temb=h["temb"])
    values = {"head": feeds, "segment": h, "reuse": {**h, **s}, "tail": {**feeds, "img": s["img_out"],
              "ctx": s["ctx_out"], "temb": h["temb"]}}
    return {name: tuple(values[name][t.name].to(TORCH_DTYPES[t.dtype]) for t in g.spec.inputs)
            for name, g in graphs.items()}


def load_reference(model: str, mlp: Path | None, skip: SkipRange) -> SplitSD3Transformer:
    """The float32 PyTorch split model that a build is checked against."""
    transformer = load_transformer(model, torch.float32)
    return SplitSD3Transformer(transformer, skip, load_compensation(mlp, transformer) if mlp else None)


def manifest_reference(manifest: dict) -> tuple[SplitSD3Transformer, Components]:
    """The float32 reference model and the components that ``manifest``'s build was made from."""
    model = manifest["model"]
    split = load_reference(model["source"], Path(model["mlp"]) if model["mlp"] else None,
                           SkipRange(manifest["skip"]["first"], manifest["skip"]["last"]))
    comps = load_components(model["source"], split.transformer.config, tuple(manifest["pipeline"]["components"]))
    return split, comps


def resolve_shapes(config: BuildConfig, split: SplitSD3Transformer, encoder_tokens: int | None = None) -> ShapeConfig:
    """The configured ranges, with defaults from the model for those left unset. ``encoder_tokens``,
    the text encoders' token count when they are built, must lie in the text-length range."""
    cfg = split.transformer.config
    native = cfg.sample_size * VAE_SCALE
    text = encoder_tokens or (TINY_TEXT_LEN if config.model in TINY_MODELS else REAL_TEXT_LEN)
    step = VAE_SCALE * cfg.patch_size
    if config.dynamic_shapes:
        res = DimRange(max(step, native // 2 // step * step), native, min(2 * native, cfg.pos_embed_max_size * VAE_SCALE))
        txt = DimRange(max(1, text // 2), text, text)
    else:
        res, txt = DimRange(native, native, native), DimRange(text, text, text)
    shapes = ShapeConfig(config.batch, config.resolution or res, config.text_len or txt)
    tl = shapes.text_len
    if encoder_tokens is not None and not tl.min <= encoder_tokens <= tl.max:
        raise UsageError(f"--text-len {tl} does not include the text encoders' {text} tokens",
                         f"use --text-len {text}, or --components vae to build without text encoders")
    return shapes.validate_for(cfg.patch_size, cfg.pos_embed_max_size)


def schedule_section(plan: SamplingPlan, num_layers: int, skip: SkipRange) -> dict:
    steps = []
    for i, (sigma, skips) in enumerate(zip(plan.sigmas, plan.skips)):
        steps.append({"sigma": sigma, "sigma_next": plan.sigma_after(i), "timestep": timestep_from_sigma(sigma),
                      "plan": "skipping" if skips else "full"})
    return {
        "name": plan.name, "shift": SHIFT, "eta": plan.eta, "sigmas": list(plan.sigmas), "steps": steps,
        "effective_nfe": plan.nfe(num_layers, skip),
        "step_rule": "x0 = x - sigma*v; eps = x + (1-sigma)*v; "
                     "x_next = (1-sigma_next)*x0 + sigma_next*(eta*eps + sqrt(1-eta^2)*noise); x_next = x0 when sigma_next = 0",
        "initial_latents": "standard normal, shape (batch, in_channels, latent_height, latent_width)",
    }


def build(config: BuildConfig, log: Callable[[str], None] = lambda _: None) -> dict:
    """Run a whole build and return its manifest. Raises :class:`ParityFailedError` (after keeping
    the artifacts in ``<out>.failed``) when the gate fails and failures are not allowed."""
    trt = config.resolved_trt()
    out = Path(config.out)
    log(f"[1/5] loading {config.model}" + (f" with MLP {config.mlp}" if config.mlp else " (untrained MLP: plain reuse)"))
    split32 = load_reference(config.model, config.mlp, config.skip)
    cfg = split32.transformer.config
    wanted = config.components if config.components is not None else (COMPONENTS if available(config.model) else ())
    comps = load_components(config.model, cfg, wanted)
    shapes = resolve_shapes(config, split32, text_length(comps) if comps.text is not None else None)
    split = for_precision(split32, config.precision)
    specs = graph_specs(split, ONNX_DTYPE_NAMES[config.precision])
    torch_graphs = {n: TorchGraph(m, specs[n]) for n, m in graph_modules(split).items()}
    weights = {n: graph_weights(split, n) for n in torch_graphs}
    for name, (module, spec) in component_graphs(comps, cfg).items():
        torch_graphs[name], specs[name], weights[name] = TorchGraph(module, spec), spec, [module]
    options = None
    if trt != "none":
        cache = config.timing_cache or (out.parent / "timing-cache.bin" if trt == "tensorrt" else None)
        options = EngineBuildOptions(trt, config.optimization_level, config.compute_capabilities, cache,
                                     tf32=config.tf32)

    out.parent.mkdir(parents=True, exist_ok=True)
    _clean_stale_temps(out.parent)
    previous = None
    if out.is_dir():
        try:
            previous = mf.read_manifest(out)
        except mf.ManifestError:
            previous = None
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    versions = _versions(trt)
    model_bytes = weight_bytes([split.transformer, split.mlp])
    count = len(torch_graphs)
    try:
        tmp.mkdir()
        examples: dict[str, tuple] = {}

        def example(name: str) -> tuple:
            """Export inputs at the profile's optimum; computed (a head and segment pass) on the first export."""
            if not examples:
                batch, lat = shapes.batch.opt, shapes.resolution.opt // VAE_SCALE
                feeds = step_inputs(split, batch, shapes.resolution.opt, shapes.text_len.opt, 1.0, 0)
                examples.update(_example_inputs({n: torch_graphs[n] for n in TRANSFORMER_GRAPHS}, feeds))
                for n, inputs in component_inputs(comps, batch, lat).items():
                    examples[n] = tuple(inputs[t.name] for t in specs[n].inputs)
            return examples[name]

        graphs_json: dict[str, dict] = {}
        common = {"precision": config.precision, "opset": config.opset, "dims": sorted(shapes.dynamic_dims),
                  "skip": str(config.skip), "config": public_config(cfg), "versions": {k: versions[k] for k in ("torch", "onnx", "onex_export")}}
        for i, (name, graph) in enumerate(torch_graphs.items(), 1):
            modules = weights[name]
            key = _hash(common, asdict(specs[name]), _weights_hash(modules))
            entry = {"onnx_key": key, "inputs": [asdict(t) for t in specs[name].inputs],
                     "outputs": [asdict(t) for t in specs[name].outputs], "weight_bytes": None}
            reused = _reuse(previous, out, name, "onnx", key, tmp)
            if reused:  # its file entries were checked against the copied files already
                log(f"[2/5] export {name} ({i}/{count}): unchanged, reused")
                entry.update(weight_bytes=reused["weight_bytes"], export_seconds=0.0, onnx=reused["onnx"],
                             onnx_data=reused.get("onnx_data"))
            else:
                log(f"[2/5] export {name} ({i}/{count}) ...")
                art = export_graph(graph.module, specs[name], example(name), tmp, shapes.dynamic_dims,
                                   weight_bytes(modules), config.opset, config.external_data_threshold)
                entry.update(weight_bytes=art.weight_bytes, export_seconds=round(art.export_seconds, 3))
                log(f"      {name}.onnx {art.path.stat().st_size / 1e6:.2f} MB in {art.export_seconds:.1f} s")
                entry["onnx"] = mf.file_entry(tmp, tmp / f"{name}.onnx")
                data = tmp / f"{name}.onnx.data"
                entry["onnx_data"] = mf.file_entry(tmp, data) if data.is_file() else None
            graphs_json[name] = entry

        for i, name in enumerate(torch_graphs, 1):
            entry = graphs_json[name]
            entry["engine"] = None
            if options is None:
                continue
            profile = shapes.profile(specs[name], cfg.patch_size)
            key = _hash(entry["onnx"]["sha256"], profile, asdict(options), versions[trt])
            entry.update(engine_key=key, profile={k: [list(s) for s in v] for k, v in profile.items()})
            reused = _reuse(previous, out, name, "engine", key, tmp)
            if reused:  # flavour, capabilities and tf32 are part of the key, so its entry still holds
                log(f"[3/5] engine {name} ({i}/{count}): unchanged, reused")
                entry.update(build_seconds=0.0, engine=reused["engine"])
                continue
            log(f"[3/5] engine {name} ({i}/{count}) with {trt} ...")
            report = build_engine(tmp / f"{name}.onnx", tmp / f"{name}.plan", profile, options)
            entry["build_seconds"] = round(report.build_seconds, 3)
            log(f"      {name}.plan {report.size_bytes / 1e6:.2f} MB in {report.build_seconds:.1f} s")
            entry["engine"] = dict(mf.file_entry(tmp, tmp / f"{name}.plan"), flavour=trt,
                                   compute_capabilities=list(options.compute_capabilities) or "default", tf32=options.tf32)

        log("[4/5] parity gate: ONNX Runtime vs PyTorch (engines need a GPU to run)")
        parity = run_gate(split32, lambda: {n: OrtGraph(tmp / f"{n}.onnx") for n in torch_graphs}, "onnxruntime",
                          config.precision, shapes, config.eta, comps, log=log)
        graph_bytes = sum(graphs_json[n]["weight_bytes"] for n in TRANSFORMER_GRAPHS)
        manifest = {
            "schema": mf.SCHEMA, "schema_version": mf.SCHEMA_VERSION, "name": out.name,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "status": parity["status"], "tool": versions,
            "model": {"source": config.model, "mlp": str(config.mlp) if config.mlp else None,
                      "num_layers": split.num_layers, "config": public_config(cfg)},
            "skip": {"one_based": str(config.skip), "first": config.skip.first, "last": config.skip.last,
                     "zero_based": list(config.skip.indices0), "count": config.skip.count},
            "precision": config.precision, "opset": config.opset, "trt": trt,
            "shapes": {"ranges": shapes.to_json(), "dims": shapes.dim_ranges(cfg.patch_size),
                       "dynamic": sorted(shapes.dynamic_dims)},
            "schedule": schedule_section(SamplingPlan.one_x(config.eta), split.num_layers, config.skip),
            "graphs": graphs_json, "plans": PLANS,
            "weights": {"model_bytes": model_bytes, "graph_bytes": graph_bytes,
                        "duplication_ratio": graph_bytes / model_bytes},
            "parity": parity,
            "pipeline": {
                "components": list(comps.names),
                "tokenizers": save_tokenizers(comps.tokenizers, tmp) if comps.tokenizers else {},
                "text_graph": "text" if comps.text is not None else None,
                "vae_graph": "vae" if comps.vae is not None else None,
                "vae_scale_factor": VAE_SCALE, "image_range": [0.0, 1.0], "component_precision": "fp32",
            },
        }
        log("[5/5] manifest")
        mf.write_manifest(tmp, manifest)
        if parity["status"] == "passed" or config.allow_parity_failure:
            _promote(tmp, out)
            return manifest
        failed = out.with_name(out.name + ".failed")
        shutil.rmtree(failed, ignore_errors=True)
        os.replace(tmp, failed)
        raise ParityFailedError(
            f"parity gate {parity['status']}" + (f": {parity['reason']}" if parity.get("reason") else "")
            + f"; the artifacts are kept in {failed} for inspection; any previous build in {out} is untouched",
            "inspect the table above; --allow-parity-failure installs the build anyway (marked failed)",
            manifest,
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
