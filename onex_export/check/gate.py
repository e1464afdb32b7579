"""The parity gate: a build's graphs (ONNX in ONNX Runtime, or engines) against the float32 PyTorch model.

What it checks, at each shape point (``opt``: the profile's optimum; ``full``: also every corner of the
profile), on seeded inputs:
- **every graph alone**, fed the reference's own inputs for it (so an error is pinned to one graph);
- **the 1.x-NFE schedule chained through the candidate graphs** from the same noise: step 1's velocity and
  deltas, step 2's velocity, and the final latents (so errors that add up along the chain are seen);
- **the range of the working precision** (fp16): every module output and every block output of the
  float32 reference is compared with fp16's largest finite value, and the report names the first block
  that would overflow, with the ``--fp32-blocks`` that avoids it. Running the reference itself in fp16
  would show the same overflow, but PyTorch's fp16 matrix products on a CPU ran at 1.3 GFLOP/s here
  (bf16: 700), so a real-size fp16 reference is out of reach without a GPU; the range check costs nothing.

Memory: the reference never exists whole. Its transformer sits on the ``meta`` device and each module
(embedders, one block, the output projection) is loaded in float32 from the checkpoint just before it
runs and dropped just after, on ``device`` ("cuda" with ``--gate-device cuda``), and the freed memory is handed
back to the OS each time (:func:`~onex_export.models.weights.return_freed_memory`). Candidate graphs are loaded
one at a time (ONNX Runtime's sessions in one shared arena, given back after the last graph, so that each graph's
first run does not pay the kernel for fresh memory); a graph's check and its chained call share one run where
their inputs are identical (step 1's first graph). Each graph's time, loading included, is logged at the end and
recorded (``time_by_graph``). Only the first call of each graph keeps its reference inputs and outputs (per
graph, its output streams and deltas: 80 MiB for SD3.5-Large at 1024 px; what the reference's memory grows by
during the gate).
"""
from __future__ import annotations

import functools
import gc
import math
import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch

from ..errors import OnexError, UsageError
from ..models.split import SplitSD3Transformer
from ..models.weights import WeightSource, materialize, release, return_freed_memory, top_level_prefixes
from .parity import Tolerances, compare, rows_to_json, tolerance_for
from ..runtime.graphs import PlanDenoiser, TorchGraph, release_shared_arena
from ..runtime.sampler import Conditioning, sample
from ..schedule import SamplingPlan
from ..export.components import Components
from ..export.graphs import GraphDef, SubgraphModule, graph_spec
from ..export.precision import PrecisionPolicy
from ..export.shapes import ShapeConfig
from ..export.stages import rss_bytes

GATE_MODES = ("opt", "full", "none")
FP16_MAX = float(torch.finfo(torch.float16).max)


@dataclass(frozen=True)
class GateConfig:
    """``mode``: opt (the profile's optimum), full (also every profile corner) or none (recorded as skipped);
    ``device``: where the float32 reference runs; ``max_rel``: per-output overrides of the table's tolerance
    ((output name, largest relative error), as ``--tolerance OUTPUT=MAX_REL``; see :class:`Tolerances`)."""

    mode: str = "opt"
    device: str = "cpu"
    seed: int = 0
    max_rel: tuple[tuple[str, float], ...] = ()

    def __post_init__(self):
        for name, value in self.max_rel:
            if not (0 < value < math.inf):
                raise UsageError(f"--tolerance {name}={value}: a relative error bound must be a positive number",
                                 f"e.g. --tolerance {name}=0.03")
        if self.mode not in GATE_MODES:
            raise UsageError(f"unknown gate mode {self.mode!r}", f"choose one of {', '.join(GATE_MODES)}")
        if self.device not in ("cpu", "cuda"):
            raise UsageError(f"unknown gate device {self.device!r}", "choose cpu or cuda")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise OnexError("--gate-device cuda needs an NVIDIA GPU with CUDA, and none is visible here",
                            "drop --gate-device (the reference then runs on the CPU, one block at a time)")


def shape_points(shapes: ShapeConfig, mode: str) -> list[tuple[int, int, int]]:
    """(batch, resolution, text_len) points to check: the optimum, then (``full``) every corner of the ranges."""
    b, r, t = shapes.batch, shapes.resolution, shapes.text_len
    points = [(b.opt, r.opt, t.opt)]
    if mode == "full":
        points += [(bb, rr, tt) for bb in (b.min, b.max) for rr in (r.min, r.max) for tt in (t.min, t.max)]
    return list(dict.fromkeys(points))


def conditioning(joint_dim: int, pooled_dim: int, batch: int, text_len: int, seed: int) -> Conditioning:
    """Seeded text conditioning for the gate's schedule (the noise is the sampler's own, from ``seed``)."""
    g = torch.Generator().manual_seed(seed + 1)
    return Conditioning(torch.randn(batch, text_len, joint_dim, generator=g), torch.randn(batch, pooled_dim, generator=g))


class StreamedReference:
    """The float32 reference over a meta-device split model: each transformer module is loaded from ``source``
    just before it runs and dropped after it (forward hooks). Records, per module, the largest |value| of its
    outputs and of every leaf module's outputs inside it (the range check)."""

    def __init__(self, split: SplitSD3Transformer, source: WeightSource, device: str):
        self.split, self.source, self.device = split, source, device
        self.max_abs: dict[str, float] = {}
        self._hooks = []
        t = split.transformer
        for prefix in top_level_prefixes(t):
            module = t.get_submodule(prefix)
            self._hooks.append(module.register_forward_pre_hook(functools.partial(self._load, prefix)))
            self._hooks.append(module.register_forward_hook(functools.partial(self._drop, prefix)))
            for inner in list(module.modules())[1:]:  # every module inside, leaves and containers alike
                self._hooks.append(inner.register_forward_hook(functools.partial(self._track, prefix)))
        for inner in split.mlp.modules():  # the reuse graph runs the MLP in the working precision too
            self._hooks.append(inner.register_forward_hook(functools.partial(self._track, "mlp")))
        split.mlp.to(device=device, dtype=torch.float32)

    def _load(self, prefix, module, args):
        materialize(self.split.transformer, [prefix], self.source, lambda _: torch.float32, self.device)

    def _drop(self, prefix, module, args, output):
        self._track(prefix, module, args, output)
        release(self.split.transformer, [prefix])

    def _track(self, prefix, module, args, output):
        outs = output if isinstance(output, tuple) else (output,)
        for o in outs:
            if isinstance(o, torch.Tensor) and o.is_floating_point() and o.numel():
                previous = self.max_abs.get(prefix, 0.0)
                if math.isnan(previous):
                    return  # a NaN, once seen, is what the range check must report
                lo, hi = torch.aminmax(o.detach())  # NaN in both where there is one; no |o| copy (10x faster)
                value = max(-float(lo), float(hi))
                self.max_abs[prefix] = value if math.isnan(value) or value > previous else previous

    def close(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()


def range_check(max_abs: dict[str, float], policy: PrecisionPolicy, num_layers: int) -> dict:
    """The first module (in execution order) whose reference values exceed the working precision's range."""
    limit = FP16_MAX if policy.precision == "fp16" else None
    result = {"limit": limit, "first_overflow": None, "first_overflow_block": None, "last_overflow_block": None,
              "nonfinite": None, "max_abs": dict(max_abs)}
    for prefix, value in max_abs.items():  # insertion order = execution order
        if value != value or value == float("inf"):
            result["nonfinite"] = result["nonfinite"] or prefix
            continue
        if limit is None or value <= limit or torch.float32 == policy.module_dtype(prefix, num_layers):
            continue
        result["first_overflow"] = result["first_overflow"] or prefix
        if prefix.startswith("transformer_blocks."):
            block = int(prefix.split(".")[1]) + 1
            result["first_overflow_block"] = result["first_overflow_block"] or block
            result["last_overflow_block"] = block
    return result


def failure_summary(verification: dict, defs: list[GraphDef] = ()) -> tuple[str, str]:
    """(what failed, what to do) for a verification that did not pass; ``defs``, the build's transformer graphs,
    let the hint name the likely cause of failing outputs (a graph, a cut segment, fp16's rounding)."""
    rc = verification.get("range_check") or {}
    if verification.get("reason"):
        return verification["reason"], "check the model's weights (they give inf/NaN in float32 already)"
    first = rc.get("first_overflow")
    if first and not first.startswith("transformer_blocks."):  # an embedder: every block after it sees the values
        return (f"{first} overflows fp16 (|value| up to {rc['max_abs'][first]:.3g} > {FP16_MAX:.0f})",
                "build with --precision bf16 (float32's range) or fp32")
    if first:
        lo, hi = _keeping_fp32_blocks(verification, rc["first_overflow_block"], rc["last_overflow_block"])
        worst = max(v for k, v in rc["max_abs"].items() if k.startswith("transformer_blocks."))
        return (f"block {rc['first_overflow_block']} (1-based) is the first whose values overflow fp16 (|value| up to "
                f"{worst:.3g} > {FP16_MAX:.0f}; blocks {rc['first_overflow_block']}-{rc['last_overflow_block']} exceed it)",
                f"keep those blocks in float32 with --fp32-blocks {lo}-{hi}, or build with --precision bf16")
    failing = [r for r in verification["rows"] if not r["passed"]]
    if not failing:
        return "no output was compared", "rebuild; if it persists, report it with the build's manifest.json"
    worst = failing[0]
    what = (f"{len(failing)} of {len(verification['rows'])} outputs differ from PyTorch beyond tolerance, first "
            f"{worst['case']} / {worst['output']} (max rel {worst['max_rel']:.3g}, cosine {worst['cosine']:.6f})")
    return what, f"{likely_cause(failing, verification, list(defs))}; --allow-parity-failure installs the build anyway " \
                 "(marked failed)"


def likely_cause(failing: list[dict], verification: dict, defs: list[GraphDef]) -> str:
    """Where failing rows point: the first graph that fails on the reference's own inputs (else the chain); and
    when the graphs' streams pass there and deltas fail, the segment's cut and whether the deltas' error is a few
    fp16 roundings of the streams they are differences of (often 100x larger than the deltas), with the fix."""
    alone = [r for r in failing if r["case"].startswith("graph ")]
    where = None
    if alone:
        name = alone[0]["case"].split()[1]
        d = next((d for d in defs if d.name == name), None)
        where = f"graph {name}" + (f" (blocks {d.start + 1}-{d.stop})" if d is not None and d.stop > d.start else "")
    deltas = [r for r in failing if r["output"].startswith("delta_")]
    segments = [d for d in defs if d.role == "segment"]
    if not deltas or not segments or any(not r["output"].startswith("delta_") for r in alone):
        return (f"{where} already differs on the reference's own inputs: the error starts there" if where else
                "every graph passes on the reference's own inputs: the error builds up along the chained schedule")
    first, last = segments[0].start + 1, segments[-1].stop  # 1-based, inclusive
    cause = ("on the reference's own inputs every graph's streams pass, but " +
             (f"the deltas fail, first in {where}" if where else "the chained schedule's deltas fail"))
    if len(segments) > 1:
        cause += (f"; the segment (blocks {first}-{last}) is cut into {len(segments)} graphs "
                  f"({', '.join(d.name for d in segments)}; --max-graph-gib)")
    max_abs = (verification.get("range_check") or {}).get("max_abs", {})
    stream = max((max_abs.get(f"transformer_blocks.{i - 1}", 0.0) for i in range(first, last + 1)), default=0.0)
    spacing = 2.0 ** (math.floor(math.log2(stream)) - 10) if stream > 0 else 0.0  # between fp16 values near ``stream``
    error = max(r["max_abs"] for r in deltas)
    if verification.get("precision") != "fp16" or not 0 < error <= 4 * spacing:
        return cause
    size = max(r["max_abs"] / r["max_rel"] for r in deltas if r["max_rel"] > 0)  # the deltas' largest |value|
    lo, hi = _keeping_fp32_blocks(verification, first, last)
    return (f"{cause}; their error ({error:.2g}) is a few fp16 roundings of the streams they are differences of "
            f"(|value| up to {stream:.3g} in those blocks, where fp16's spacing is {spacing:.2g}, while the deltas reach "
            f"{size:.2g}): keep the skipped blocks in float32 with --fp32-blocks {lo}-{hi}")


def _keeping_fp32_blocks(verification: dict, lo: int, hi: int) -> tuple[int, int]:
    """The one ``--fp32-blocks`` range (1-based) that covers ``lo..hi`` and the blocks the build already keeps."""
    if verification.get("fp32_blocks"):
        kept = [int(b) for b in verification["fp32_blocks"].split("-")]
        lo, hi = min(lo, kept[0]), max(hi, kept[-1])
    return lo, hi


class _Clock:
    """Seconds and runs per (side, graph) for the gate's time table; every call logs its time and the memory."""

    def __init__(self, log: Callable[[str], None]):
        self.log, self.seconds, self.runs = log, {}, {}

    def add(self, side: str, name: str, seconds: float, runs: int = 0) -> None:
        key = (side, name)
        self.seconds[key] = self.seconds.get(key, 0.0) + seconds
        self.runs[key] = self.runs.get(key, 0) + runs

    def timed(self, graph: Callable, side: str, name: str) -> Callable:
        def call(**inputs):
            start = time.perf_counter()
            out = graph(**inputs)
            seconds = time.perf_counter() - start
            self.add(side, name, seconds, 1)
            self.log(f"        {side} {name}: {seconds:.1f} s, resident {rss_bytes() / 2**30:.1f} GiB")
            return out
        return call

    def table(self) -> list[dict]:
        """One row per (side, graph): runs, seconds (loading included) and share of the whole."""
        total = sum(self.seconds.values()) or 1.0
        return [{"side": side, "graph": name, "runs": self.runs[(side, name)], "seconds": round(s, 3),
                 "share": round(s / total, 4)} for (side, name), s in self.seconds.items()]


class _Recorder:
    """Graph runners that keep the inputs and outputs of the first call of each graph (moved to the CPU)."""

    def __init__(self, graphs: dict, clock: _Clock):
        self.graphs, self.first, self.clock = graphs, {}, clock

    def __getitem__(self, name):
        def call(**inputs):
            out = self.clock.timed(self.graphs[name], "reference", name)(**inputs)
            if name not in self.first:
                self.first[name] = ({k: v.detach().cpu() for k, v in inputs.items()},
                                    {k: v.detach().cpu() for k, v in out.items()})
            return out
        return call


class _OneAtATime:
    """Candidate graphs loaded on first use and dropped when another is needed; checks each graph once, on its
    recorded reference inputs, while it is loaded. A chained call with exactly the inputs of that check (step
    1's first graph: the same noise and text) gets the check's outputs instead of a second identical run."""

    def __init__(self, load: Callable[[str], Callable], records: dict, check: Callable, artifact: str, clock: _Clock):
        self.load, self.records, self.check, self.artifact, self.clock = load, records, check, artifact, clock
        self.name, self.graph, self.checked, self.shared = None, None, {}, 0

    def __getitem__(self, name):
        if name != self.name:
            self.close()  # free the previous graph before loading the next
            start = time.perf_counter()
            graph = _guarded(self.load(name), name, self.artifact)
            self.clock.add(self.artifact, name, time.perf_counter() - start)
            self.name, self.graph = name, self.clock.timed(graph, self.artifact, name)
        if name not in self.checked and name in self.records:
            inputs, outputs = self.records[name]
            self.checked[name] = (inputs, self.graph(**inputs))
            self.check(name, outputs, self.checked[name][1])
        return functools.partial(self._call, name)

    def close(self) -> None:
        """Drop the loaded graph (not kept while the next shape's reference or the components run)."""
        self.name, self.graph = None, None
        gc.collect()
        return_freed_memory()

    def _call(self, name, **inputs):
        if name in self.checked and _same(inputs, self.checked[name][0]):
            self.shared += 1
            self.clock.log(f"        {self.artifact} {name}: the check's run (same inputs)")
            return self.checked[name][1]
        return self.graph(**inputs)


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        a[k].shape == b[k].shape and a[k].dtype == b[k].dtype and torch.equal(a[k].cpu(), b[k]) for k in a)


def _guarded(graph: Callable, name: str, artifact: str) -> Callable:
    """A candidate graph whose run-time failure (ONNX Runtime or TensorRT refusing it) is reported as the
    build's problem with a hint, not as a traceback."""
    def call(**inputs):
        try:
            return graph(**inputs)
        except OnexError:
            raise
        except Exception as exc:
            raise OnexError(f"the {artifact} graph {name!r} failed to run in the gate: {exc}",
                            "rebuild it; if it persists, report it with the build's manifest.json") from exc
    return call


@dataclass
class ReferencePass:
    """The float32 reference at each shape point of a gate (``points``: ``point`` (batch, resolution, text_len),
    ``first``: each graph's first inputs and outputs, ``steps``: what each step returned, ``latents``), the largest
    |value| per module (the range check's), the time per graph (``times``: (graph, seconds, runs)) and, when a
    second process made it, its ``seconds``, ``waited_seconds`` (after the build's engines) and ``peak_rss_bytes``."""

    points: list[dict]
    max_abs: dict[str, float]
    times: list[tuple[str, float, int]]
    process: dict | None = None


def reference_pass(ref_split: SplitSD3Transformer, source: WeightSource, defs: list[GraphDef], plans: dict,
                   shapes: ShapeConfig, gate: GateConfig, eta: float = 1.0,
                   log: Callable[[str], None] = lambda _: None) -> ReferencePass:
    """The streamed float32 reference through the 1.x schedule at each of the gate's shape points; ``ref_split``: a
    float32 split model on ``meta`` (its MLP loaded), ``source`` its checkpoint. Needs no candidate: a build makes it
    in another process while it exports (see :mod:`.background`)."""
    cfg, fp32 = ref_split.transformer.config, PrecisionPolicy("fp32")
    specs = {d.name: graph_spec(ref_split, d, fp32) for d in defs}
    ref_graphs = {d.name: TorchGraph(SubgraphModule(ref_split, d, specs[d.name]), specs[d.name]) for d in defs}
    reference = StreamedReference(ref_split, source, gate.device)
    clock, points = _Clock(log), []
    plan = SamplingPlan.one_x(eta)
    cuda_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # a float32 reference means float32 matrix products
    try:
        for batch, res, text_len in shape_points(shapes, gate.mode):
            cond = conditioning(cfg.joint_attention_dim, cfg.pooled_projection_dim, batch, text_len, gate.seed)
            latent = (cfg.in_channels, res // shapes.vae_scale, res // shapes.vae_scale)
            log(f"      reference b{batch} {res}px t{text_len} on {gate.device} (float32, one module at a time)")
            recorder = _Recorder(ref_graphs, clock)
            steps = _StepTap(PlanDenoiser(recorder, plans))
            with torch.no_grad():
                latents = sample(steps, plan, cond, latent, gate.seed, device=gate.device)
            points.append({"point": (batch, res, text_len), "first": recorder.first, "steps": steps.outputs,
                           "latents": latents.cpu()})
    finally:
        torch.backends.cuda.matmul.allow_tf32 = cuda_tf32
        reference.close()
    times = [(name, seconds, clock.runs[(side, name)]) for (side, name), seconds in clock.seconds.items()]
    return ReferencePass(points, dict(reference.max_abs), times)


def run_gate(ref_split: SplitSD3Transformer, source: WeightSource, defs: list[GraphDef], plans: dict,
             load_candidate: Callable[[str], Callable], *, artifact: str, backend: str, candidate_device: str,
             policy: PrecisionPolicy, shapes: ShapeConfig, gate: GateConfig, eta: float = 1.0,
             components: Components | None = None, reference: ReferencePass | None = None,
             log: Callable[[str], None] = lambda _: None) -> dict:
    """Check candidate graphs against the streamed float32 reference; returns a verification record.

    ``ref_split`` is a float32 split model on ``meta`` (its MLP loaded), ``source`` its checkpoint.
    ``load_candidate(name)`` gives a graph runner ``graph(**inputs) -> {output: tensor}``. ``reference``: the
    :func:`reference_pass` of these graphs, shapes and gate where it is made already (else it is made here)."""
    record = {"artifact": artifact, "backend": backend, "device": candidate_device, "reference_device": gate.device,
              "precision": policy.precision, "fp32_blocks": str(policy.fp32_blocks) if policy.fp32_blocks else None,
              "mode": gate.mode, "shapes": [], "rows": [], "range_check": None,
              "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    tol = tolerance_for(backend, policy.precision)
    if gate.mode == "none":
        return dict(record, status="skipped", reason="--gate none: the graphs were not compared with PyTorch")
    if tol is None:
        return dict(record, status="not-run", reason=f"{backend} cannot execute {policy.precision} graphs on this "
                    "machine; run `onex-export verify --backend tensorrt` on a GPU")
    start = time.perf_counter()
    cfg = ref_split.transformer.config
    fp32 = PrecisionPolicy("fp32")
    tols = _tolerances(tol, gate, [o.name for d in defs for o in graph_spec(ref_split, d, fp32).outputs] + ["latents"]
                       + [o.name for n in (components.names if components else ()) for o in components.spec(n).outputs])
    if reference is None:
        reference = reference_pass(ref_split, source, defs, plans, shapes, gate, eta, log)
    if [p["point"] for p in reference.points] != shape_points(shapes, gate.mode):
        raise RuntimeError("the reference pass was made for other shape points than this gate's")  # a bug, not input
    rows, clock, shared = [], _Clock(log), 0
    for name, seconds, runs in reference.times:
        clock.add("reference", name, seconds, runs)
    plan = SamplingPlan.one_x(eta)
    for ref in reference.points:
        batch, res, text_len = ref["point"]
        tag = f"b{batch} {res}px t{text_len}"
        record["shapes"].append([batch, res, text_len])
        cond = conditioning(cfg.joint_attention_dim, cfg.pooled_projection_dim, batch, text_len, gate.seed)
        latent = (cfg.in_channels, res // shapes.vae_scale, res // shapes.vae_scale)

        def check(name, want, got, tag=tag):
            rows.extend(compare(f"graph {name} {tag}", want, got, tols))

        log(f"      {artifact} graphs {tag} on {backend}, one at a time")
        candidates = _OneAtATime(load_candidate, ref["first"], check, artifact, clock)
        cand_steps = _StepTap(PlanDenoiser(candidates, plans))
        got = sample(cand_steps, plan, cond, latent, gate.seed, device=candidate_device)
        shared += candidates.shared
        candidates.close()
        release_shared_arena()  # ONNX Runtime's, kept between the graphs; not while the next reference runs
        rows += compare(f"1.x-nfe step 1 {tag}", ref["steps"][0], cand_steps.outputs[0], tols)
        rows += compare(f"1.x-nfe step 2 {tag}", ref["steps"][1], cand_steps.outputs[1], tols)
        rows += compare(f"1.x-nfe schedule {tag}", {"latents": ref["latents"]}, {"latents": got}, tols)
    record["range_check"] = range_check(reference.max_abs, policy, ref_split.num_layers)
    record["reference_process"] = reference.process
    if components is not None and components.names:
        rows += _component_rows(components, load_candidate, backend, shapes, gate, clock)
        release_shared_arena()
    record["time_by_graph"] = clock.table()
    record["shared_runs"] = shared
    for line in time_table(record["time_by_graph"], shared):
        log(line)
    status = "passed" if rows and all(r.passed for r in rows) else "failed"
    if record["range_check"]["first_overflow"]:
        status = "failed"  # found, not shipped: an engine may overflow where ONNX Runtime happened not to
    if record["range_check"]["nonfinite"]:
        status = "failed"
        record["reason"] = (f"the float32 reference itself is not finite from {record['range_check']['nonfinite']} on: "
                            "the weights are broken")
    if tols.per_output:
        record["tolerance_per_output"] = {name: asdict(t) for name, t in tols.per_output}
    return dict(record, status=status, tolerance=asdict(tol), rows=rows_to_json(rows),
                seconds=round(time.perf_counter() - start, 3))


def time_table(rows: list[dict], shared: int = 0) -> list[str]:
    """The gate's time by graph, largest first, as log lines (``rows``: a verification's ``time_by_graph``)."""
    total = sum(r["seconds"] for r in rows)
    lines = [f"      gate time by graph ({total:.1f} s in all; loading included; {shared} run(s) shared by a "
             "graph's check and the chain):"]
    for r in sorted(rows, key=lambda r: -r["seconds"]):
        lines.append(f"        {r['side']:>11} {r['graph']:<10} {r['runs']:>2} run(s) {r['seconds']:8.1f} s "
                     f"{100 * r['share']:5.1f}%")
    return lines


class _StepTap:
    """A denoiser that keeps what each step returned (step 1: velocity and deltas; step 2: velocity)."""

    def __init__(self, inner):
        self.inner, self.outputs = inner, []

    def full(self, x, text, pooled, timestep):
        v, d_img, d_ctx = self.inner.full(x, text, pooled, timestep)
        self.outputs.append({"velocity": v.cpu(), "delta_img": d_img.cpu(), "delta_ctx": d_ctx.cpu()})
        return v, d_img, d_ctx

    def skipping(self, x, text, pooled, timestep, delta_img, delta_ctx):
        v = self.inner.skipping(x, text, pooled, timestep, delta_img, delta_ctx)
        self.outputs.append({"velocity": v.cpu()})
        return v


def _tolerances(default, gate: GateConfig, outputs: list[str]) -> Tolerances:
    """The table's ``default`` with the gate's per-output overrides, each of which must name an output compared."""
    unknown = sorted({name for name, _ in gate.max_rel} - set(outputs))
    if unknown:
        raise UsageError(f"--tolerance names {', '.join(unknown)}, which this gate does not compare",
                         f"the outputs compared are {', '.join(dict.fromkeys(outputs))}")
    return Tolerances.with_max_rel(default, dict(gate.max_rel))


def _component_rows(components: Components, load_candidate, backend: str, shapes: ShapeConfig,
                    gate: GateConfig, clock: _Clock) -> list:
    """Components are float32 graphs whatever the transformer's precision. Each is loaded, run and dropped
    before its candidate is loaded: a real T5-XXL is 19 GB in float32."""
    seed = gate.seed
    tol = Tolerances.with_max_rel(tolerance_for(backend, "fp32"), dict(gate.max_rel))  # those naming its outputs
    rows = []
    for name in components.names:
        inputs = components.inputs(name, shapes.batch.opt, shapes.resolution.opt // shapes.vae_scale, seed)
        start = time.perf_counter()
        module, spec = components.load(name), components.spec(name)
        clock.add("reference", name, time.perf_counter() - start)
        want = clock.timed(TorchGraph(module, spec), "reference", name)(**inputs)
        del module
        gc.collect()
        start = time.perf_counter()
        candidate = _guarded(load_candidate(name), name, "component")
        clock.add("component", name, time.perf_counter() - start)
        rows += compare(f"{name} b{shapes.batch.opt}", want, clock.timed(candidate, "component", name)(**inputs), tol)
    return rows
