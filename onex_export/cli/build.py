"""`onex-export build` and `verify`: split, export, compile, gate, install; re-check a build."""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

import click

from ..contract import Manifest
from ..errors import UsageError
from ..models import DEFAULT_MODEL
from ..models.zoo import default_mlp_for
from ..export.components import COMPONENTS
from ..build import TRT_CHOICES, BuildConfig, ParityFailedError, build
from ..check.gate import GATE_MODES, GateConfig, failure_summary
from ..check.from_manifest import manifest_defs
from ..export.graphs import DEFAULT_GRAPH_BYTES
from ..export.precision import Fp32Blocks
from ..check.verify import verify
from ..check.parity import OutputError, format_table
from ..params import FiniteFloat

from . import _parse_range, _parse_skip, _parsed_by, main


def _components(text: str) -> tuple[str, ...]:
    names = () if text.strip() == "none" else tuple(n.strip() for n in text.split(",") if n.strip())
    unknown = [n for n in names if n not in COMPONENTS]
    if unknown:
        raise UsageError(f"unknown component(s) {unknown}", f"choose from {', '.join(COMPONENTS)}, or none")
    return names


def _tolerances(values: tuple[str, ...]) -> tuple[tuple[str, float], ...]:
    """``--tolerance OUTPUT=MAX_REL`` (repeatable) as (output, bound) pairs."""
    pairs = {}
    for text in values:
        name, sep, number = text.partition("=")
        try:
            value = float(number)
        except ValueError:
            value = None
        if not sep or not name.strip() or value is None:
            raise UsageError(f"--tolerance {text!r} is not OUTPUT=MAX_REL", "e.g. --tolerance delta_img=0.03")
        if name.strip() in pairs:
            raise UsageError(f"--tolerance names {name.strip()} twice", "give each output one bound")
        pairs[name.strip()] = value
    return tuple(pairs.items())


TOLERANCE_HELP = ("Judge one output by its own largest relative error (repeatable), e.g. delta_img=0.03: the cached "
                  "deltas are differences of two hidden states and carry about 10x their relative error. Default: one "
                  "bound per backend and precision for every output.")


@dataclass(frozen=True)
class AutoSkip:
    """``--skip auto:NFE``: the range a probe recommends for that effective NFE."""

    nfe: float

    def __str__(self) -> str:
        return f"auto:{self.nfe:g}"


def _parse_build_skip(ctx, param, value):
    if not value.startswith("auto:"):
        return _parse_skip(ctx, param, value)
    try:
        nfe = float(value.removeprefix("auto:"))
    except ValueError:
        raise click.BadParameter(f"{value.removeprefix('auto:')!r} is not a number: use e.g. auto:1.667") from None
    if not 1.0 < nfe < 2.0:
        raise click.BadParameter(f"a 1.x schedule's effective NFE lies between 1 and 2, not {nfe:g}")
    return AutoSkip(nfe)


def _echo_parity(verification: dict) -> None:
    click.echo(f"parity of the {verification['artifact']} graphs on {verification['backend']} "
               f"({verification['device']}) against PyTorch float32: {verification['status']}")
    if verification["rows"]:
        click.echo(format_table([OutputError(**r) for r in verification["rows"]]))
    rc = verification.get("range_check") or {}
    if rc.get("limit"):
        worst = max(rc["max_abs"].values(), default=0.0)
        where = f"first over it: {rc['first_overflow']}" if rc["first_overflow"] else "no module over it"
        click.echo(f"fp16 range: largest |value| in the float32 reference {worst:.4g} against {rc['limit']:.0f}; {where}")
    if verification["status"] in ("not-run", "skipped"):
        click.echo(f"parity {verification['status']}: {verification.get('reason', '')}")


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f}"


def _echo_build(manifest: Manifest) -> None:
    """A build's figures, passed or failed: per graph (blocks, weights, times), weights, stages, then the gate."""
    click.echo(f"\n{'graph':10s} {'blocks':>7s} {'weights MB':>11s} {'export s':>9s} {'engine MB':>10s} {'build s':>8s}")
    for name, g in manifest.graphs.items():
        blocks = (g.definition or {}).get("blocks") or "-"
        click.echo(f"{name:10s} {blocks:>7s} {g.weight_bytes / 1e6:11.1f} {g.export_seconds:9.2f} "
                   f"{(g.engine.bytes / 1e6 if g.engine else 0):10.1f} {g.build_seconds or 0:8.2f}"
                   + (f"  aoti {g.compiled.bytes / 1e6:.1f} MB in {g.compile_seconds:.1f} s" if g.compiled else ""))
    w = manifest.weights
    click.echo(f"weights: graphs {w['graph_bytes'] / 1e6:.1f} MB / model {w['model_bytes'] / 1e6:.1f} MB "
               f"= duplication ratio {w['duplication_ratio']:.4f} (goal <= 1.02)")
    stages = manifest.stages
    click.echo("stages:  " + ", ".join(f"{n} {r['seconds']:.1f} s (peak {_gib(r['peak_rss_bytes'])} GiB)"
                                      for n, r in stages.items() if n != "per_stage_peak"))
    click.echo(f"skip {manifest.skip.one_based} -> effective NFE {manifest.schedule['effective_nfe']:.3f}; "
               f"engines: {manifest.trt}; shapes {manifest.shapes.ranges.to_json()}\n")
    for verification in manifest.verifications:  # the build's: ONNX Runtime, and AOTInductor with --aoti
        _echo_parity(verification)


@main.command(name="build")
@click.option("--model", default=DEFAULT_MODEL, show_default=True,
              help="Embedded model name or a local diffusers SD3/SD3.5 folder (fp16/bf16/fp32, one file or shards).")
@click.option("--mlp", type=click.Path(path_type=Path), default=None,
              help="Compensation MLP weights. Default: an embedded trained model's own when --skip is its range.")
@click.option("--skip", default="3-10", show_default=True, callback=_parse_build_skip,
              help="Blocks skipped in step two: 1-based, inclusive (3-10 = blocks[2..9]); or auto:NFE (e.g. "
                   "auto:1.667) for the range a probe (--probe) recommends for that effective NFE.")
@click.option("--probe", "probe_path", type=click.Path(path_type=Path), default=None,
              help="probe.json written by `onex-export probe` for this model (with --skip auto:NFE).")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Build folder. Default: engines/<model>-skip<range>-<precision>")
@click.option("--precision", type=click.Choice(["fp32", "fp16", "bf16"]), default="fp32", show_default=True,
              help="Types carried by the ONNX (strongly typed); norms stay fp32 in fp16/bf16.")
@click.option("--fp32-blocks", default=None, callback=_parsed_by(Fp32Blocks.parse),
              help="Blocks kept in float32 inside an fp16/bf16 build, 1-based (e.g. 35-38): the fix when the gate "
                   "reports a block overflowing fp16.")
@click.option("--trt", type=click.Choice(list(TRT_CHOICES)), default="auto", show_default=True,
              help="Engine flavour: tensorrt (data-centre GPUs), tensorrt-rtx (AOT on CPU), none (ONNX only); "
                   "auto = tensorrt if installed and a GPU is visible, else tensorrt-rtx if installed, else none.")
@click.option("--batch", default="1:1:4", show_default=True, callback=_parse_range, help="Batch N or MIN:OPT:MAX.")
@click.option("--resolution", default=None, callback=_parse_range,
              help="Image pixels N or MIN:OPT:MAX (a range makes latent height/width dynamic). Default: native.")
@click.option("--text-len", default=None, callback=_parse_range,
              help="Text tokens N or MIN:OPT:MAX (a range makes it dynamic).")
@click.option("--dynamic-shapes", is_flag=True,
              help="Dynamic latent size and text length with default ranges (native/2..2x, text/2..text).")
@click.option("--opset", type=click.IntRange(17, 23), default=17, show_default=True)
@click.option("--opt-level", type=click.IntRange(0, 5), default=3, show_default=True, help="Builder optimization level.")
@click.option("--compute-capability", "compute_capabilities", multiple=True,
              help="TensorRT-RTX target, e.g. 8.6 (repeatable). Default: RTX's defaults (8.0, 8.6, 8.9, 12.0+).")
@click.option("--timing-cache", type=click.Path(path_type=Path), default=None,
              help="Persistent timing cache (full TensorRT only). Default: <out>/../timing-cache.bin")
@click.option("--tf32", is_flag=True, help="Let float32 matrix products use TF32 on Ampere+ GPUs (faster, about 1e-3 "
                                          "relative error). Off by default: fp32 engines match PyTorch fp32.")
@click.option("--components", default=None, callback=_parsed_by(_components),
              help="Pipeline parts beside the transformer: text,vae | text | vae | none. Default: all the model has.")
@click.option("--gate", "gate_mode", type=click.Choice(list(GATE_MODES)), default="opt", show_default=True,
              help="Parity gate at the profile's optimum shape, at every profile corner too (full), or not at all "
                   "(none: recorded, the build is installed as unverified).")
@click.option("--gate-device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
              help="Where the float32 reference of the gate runs (one module at a time).")
@click.option("--tolerance", "tolerances", multiple=True, metavar="OUTPUT=MAX_REL", callback=_parsed_by(_tolerances),
              help=TOLERANCE_HELP)
@click.option("--max-graph-gib", type=FiniteFloat(min=0.001), default=DEFAULT_GRAPH_BYTES / 2**30,
              show_default=True, help="Cut a graph where its weights would pass this many GiB (an engine build "
                                      "needs about 3x its graph's weights in memory).")
@click.option("--aoti", is_flag=True,
              help="Also compile each graph into an AOTInductor package (.pt2) for this machine's CPU, run by "
                   "`--backend aoti` with torch alone, and gate it like the ONNX graphs (adds minutes: about 100 s "
                   "for tiny-sd3's four transformer graphs on 2 cores).")
@click.option("--allow-parity-failure", is_flag=True, help="Install the build even if the parity gate fails.")
def build_cmd(model, mlp, skip, probe_path, out, precision, fp32_blocks, trt, batch, resolution, text_len,
              dynamic_shapes, opset, opt_level, compute_capabilities, timing_cache, tf32, components, gate_mode,
              gate_device, tolerances, max_graph_gib, aoti, allow_parity_failure):
    """Split, export ONNX, compile TensorRT engines, gate on parity, and write manifest.json."""
    skip_source = None
    if isinstance(skip, AutoSkip):
        if mlp is not None:
            raise UsageError(f"--skip {skip} with --mlp: an MLP is trained for one range, which the probe might not pick",
                             "pass the MLP's own range, e.g. --skip 3-10")
        if probe_path is None:
            raise UsageError(f"--skip {skip} needs --probe: the range comes from a probe of the model",
                             f"run `onex-export probe --model {model}` and pass --probe probes/.../probe.json")
        from ..probe.report import choose_skip

        auto, (skip, skip_source) = skip, choose_skip(probe_path, skip.nfe, model)
        click.echo(f"skip {auto} -> {skip} (velocity error {skip_source['velocity_error']:.4f} in {probe_path})")
    elif probe_path is not None:
        raise UsageError("--probe goes with --skip auto:NFE", "drop --probe, or pass e.g. --skip auto:1.667")
    out = out or Path("engines") / f"{Path(model).name}-skip{skip}-{precision}"
    if mlp is None and default_mlp_for(model, skip) is not None:
        mlp = default_mlp_for(model, skip)
        click.echo(f"mlp       {model}'s own compensation MLP, trained for skip {skip}")
    config = BuildConfig(skip=skip, skip_source=skip_source, out=out, model=model, mlp=mlp, precision=precision, fp32_blocks=fp32_blocks,
                         trt=trt, batch=batch, resolution=resolution, text_len=text_len, dynamic_shapes=dynamic_shapes,
                         opset=opset, optimization_level=opt_level, compute_capabilities=tuple(compute_capabilities),
                         timing_cache=timing_cache, tf32=tf32, components=components,
                         gate=GateConfig(gate_mode, gate_device, max_rel=tolerances),
                         allow_parity_failure=allow_parity_failure,
                         max_graph_bytes=int(max_graph_gib * 2**30), aoti=aoti)
    start = time.perf_counter()
    try:
        manifest = build(config, log=click.echo)
    except ParityFailedError as exc:  # the same figures as a passing build, then the cause and its hint
        _echo_build(exc.manifest)
        raise
    elapsed = time.perf_counter() - start
    _echo_build(manifest)
    verification = manifest.verifications[-1]
    status = manifest.status
    if status == "unverified":
        click.echo(f"PASSED build: {out} in {elapsed:.1f} s, UNVERIFIED ({verification.get('reason', '')})")
    else:
        click.echo(f"{'PASSED' if status == 'passed' else 'FAILED'} build: {out} in {elapsed:.1f} s"
                   + ("" if status == "passed" else " (installed anyway: --allow-parity-failure)"))
    sys.exit(1 if status == "failed" else 0)


@main.command(name="verify")
@click.argument("folder", type=click.Path(path_type=Path))
@click.option("--backend", type=click.Choice(["onnxruntime", "aoti", "tensorrt"]), default="onnxruntime",
              show_default=True, help="Run the ONNX graphs (CPU), the AOTInductor packages (a build made with --aoti) "
                                      "or the TensorRT engines (needs an NVIDIA GPU).")
@click.option("--gate", "gate_mode", type=click.Choice(["opt", "full"]), default="opt", show_default=True,
              help="Check at the profile's optimum shape, or at every profile corner too.")
@click.option("--gate-device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
              help="Where the float32 reference runs (one module at a time).")
@click.option("--tolerance", "tolerances", multiple=True, metavar="OUTPUT=MAX_REL", callback=_parsed_by(_tolerances),
              help=TOLERANCE_HELP)
@click.option("--record/--no-record", default=True, show_default=True,
              help="Append the result to the build's manifest (--no-record: check only, for a read-only build).")
@click.option("--model", default=None,
              help="Where the model the build was made from is now (default: the path its manifest records).")
@click.option("--mlp", type=click.Path(path_type=Path), default=None,
              help="Where the build's compensation MLP is now (default: the path its manifest records).")
def verify_cmd(folder, backend, gate_mode, gate_device, tolerances, record, model, mlp):
    """Check a build's files against its manifest (sha256), re-run the parity gate, and record the result in
    the manifest (its status follows)."""
    start = time.perf_counter()
    manifest, verification = verify(folder, log=click.echo, backend=backend,
                                    gate=GateConfig(gate_mode, gate_device, max_rel=tolerances), record=record,
                                    model=model, mlp=mlp)
    _echo_parity(verification)
    passed = verification["status"] == "passed"
    if verification["status"] == "failed":
        what, hint = failure_summary(verification, manifest_defs(manifest))
        click.echo(f"{what}\n  hint: {hint}")
    ran = "engines executed" if backend == "tensorrt" else "ONNX graphs on ONNX Runtime; engines need --backend tensorrt"
    click.echo(f"{'PASSED' if passed else 'FAILED'} verify: {folder} ({len(verification['rows'])} checks, "
               f"{time.perf_counter() - start:.1f} s; {ran}); build status "
               + (f"now {manifest.status!r}" if record else f"{manifest.status!r}, this check not recorded"))
    sys.exit(0 if passed else 1)
