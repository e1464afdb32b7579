"""The ``onex-export`` command line. The only module that prints and chooses exit codes:
0 success, 1 a user error (bad file, failed check), 2 bad usage (malformed or unfitting option)."""
from __future__ import annotations

import contextlib
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import click
import diffusers
import torch
from tqdm import tqdm

from . import __version__, interrupts
from .config import SkipRange
from .errors import OnexError, UsageError
from .fileio import as_disk_error, check_destination, save_png, save_tensors_atomic
from .models import DEFAULT_MODEL, TINY_MODELS, SplitSD3Transformer, load_compensation, load_transformer
from .models.zoo import TINY_TEXT_LEN
from .export.components import COMPONENTS
from .export.build import REAL_TEXT_LEN, TRT_CHOICES, BuildConfig, ParityFailedError, build, check_text_len
from .export.gate import GATE_MODES, GateConfig
from .export.graphs import DEFAULT_GRAPH_BYTES
from .export.precision import PRECISIONS, Fp32Blocks
from .export.shapes import VAE_SCALE, DimRange
from .export.verify import verify
from .parity import OutputError, format_table
from .runtime import Conditioning, TorchDenoiser, sample
from .runtime.pipeline import BACKENDS, BuildPipeline
from .schedule import SamplingPlan

DTYPES = PRECISIONS  # --dtype names, the same as the build's precisions


def exit_on_interrupt(exc: KeyboardInterrupt) -> None:
    """Report a Ctrl-C or SIGTERM (the temporary files are already gone) and exit 130 or 143."""
    name = str(exc) if isinstance(exc, interrupts.Interrupted) else "SIGINT"
    click.secho(f"interrupted ({name}): stopped; what was being written was removed, earlier results are as they were",
                fg="yellow", err=True)
    click.echo("FAILED", err=True)
    sys.exit(exc.exit_code if isinstance(exc, interrupts.Interrupted) else 130)


def exit_on_user_error(exc: OnexError) -> None:
    """Print a user error (message, hint, FAILED) without a traceback and exit with its code."""
    click.secho(f"error: {exc.message}", fg="red", err=True)
    if exc.hint:
        click.echo(f"  hint: {exc.hint}", err=True)
    click.echo("FAILED", err=True)
    sys.exit(exc.exit_code)


@contextlib.contextmanager
def errors_reported() -> Iterator[None]:
    """An entry point's body: user errors, Ctrl-C / SIGTERM and full disks become a message and an exit code
    (1 or 2, 130 or 143); bugs keep their traceback."""
    try:
        yield
    except OnexError as exc:
        exit_on_user_error(exc)
    except KeyboardInterrupt as exc:
        exit_on_interrupt(exc)
    except OSError as exc:  # a full disk or a folder not ours to write, met outside fileio.writing
        error = as_disk_error(exc, exc.filename or "a file")
        if error is None:
            raise
        exit_on_user_error(error)


class _Group(click.Group):
    """Runs every command under :func:`errors_reported`."""

    def invoke(self, ctx):
        with errors_reported():
            return super().invoke(ctx)


def _parsed_by(parse):
    """A click callback turning ``parse``'s :class:`UsageError` into click's usage error (exit 2)."""

    def callback(ctx, param, value):
        if value is None:
            return None
        try:
            return parse(value)
        except UsageError as exc:
            raise click.BadParameter(str(exc)) from exc

    return callback


def _components(text: str) -> tuple[str, ...]:
    names = () if text.strip() == "none" else tuple(n.strip() for n in text.split(",") if n.strip())
    unknown = [n for n in names if n not in COMPONENTS]
    if unknown:
        raise UsageError(f"unknown component(s) {unknown}", f"choose from {', '.join(COMPONENTS)}, or none")
    return names


_parse_skip = _parsed_by(SkipRange.parse)


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
_parse_range = _parsed_by(DimRange.parse)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="onex-export")
def main():
    """onex-export: 1.x-Distill SD3/SD3.5 models from PyTorch to TensorRT engines."""
    interrupts.install()  # Ctrl-C and SIGTERM clean up and exit 130 / 143
    diffusers.utils.logging.set_verbosity_error()  # our own output says what matters
    from transformers.utils import logging as transformers_logging  # imported here: transformers is slow to load

    transformers_logging.set_verbosity_error()  # we report truncation ourselves


@main.command()
def models():
    """List the embedded models (built in code, no downloads)."""
    for name, spec in TINY_MODELS.items():
        click.echo(f"{name:18s} {spec.description}")
    click.echo("Real models: --model PATH, a local SD3/SD3.5 diffusers folder (or its transformer/ subfolder).")


@main.command(name="sample")
@click.option("--model", default=DEFAULT_MODEL, show_default=True,
              help="Embedded model name (see `onex-export models`) or a local diffusers SD3/SD3.5 folder.")
@click.option("--mlp", type=click.Path(path_type=Path), default=None,
              help="Compensation MLP weights (onex or reference-release layout). Default: untrained (plain reuse).")
@click.option("--skip", default="3-10", show_default=True, callback=_parse_skip,
              help="Blocks skipped in step two: 1-based, inclusive, as in the paper (3-10 = blocks[2..9]).")
@click.option("--mode", type=click.Choice(["1x", "student", "teacher"]), default="1x", show_default=True,
              help="1x: two steps, the second skipping; student: N full steps; teacher: N Euler steps with CFG.")
@click.option("--steps", type=click.IntRange(1, 1000), default=None,
              help="Steps for --mode student (default 4) or teacher (default 28).")
@click.option("--guidance", type=click.FloatRange(min=1.0), default=7.0, show_default=True,
              help="CFG scale for --mode teacher.")
@click.option("--eta", type=click.FloatRange(0.0, 1.0), default=1.0, show_default=True,
              help="Student step: 1 = deterministic Euler, 0 = re-noise like DMD2.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--batch", type=click.IntRange(1, 256), default=1, show_default=True)
@click.option("--resolution", type=click.IntRange(16, 4096), default=None,
              help="Image size in pixels (latents are 1/8). Default: the model's native size.")
@click.option("--text-len", type=click.IntRange(1, 1024), default=None,
              help=f"Text tokens (default {TINY_TEXT_LEN} for embedded models, {REAL_TEXT_LEN} for real ones).")
@click.option("--device", default="cpu", show_default=True, help="torch device, e.g. cpu or cuda.")
@click.option("--dtype", type=click.Choice(list(DTYPES)), default="fp32", show_default=True)
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Latents file (safetensors). Default: samples/<model>-<mode>-seed<seed>.safetensors")
def sample_cmd(model, mlp, skip, mode, steps, guidance, eta, seed, batch, resolution, text_len, device, dtype, out):
    """Sample latents with the 1.x-NFE schedule (or a baseline) in PyTorch.

    Text embeddings are random (seeded): text encoders come with the runtime. The latents are saved
    with the schedule in their metadata.
    """
    torch_dtype = DTYPES[dtype]
    out = out or Path("samples") / f"{Path(model).name}-{mode}-seed{seed}.safetensors"
    check_destination(out)  # before the work, not after it
    transformer = load_transformer(model, torch_dtype)
    mlp_module = load_compensation(mlp, transformer) if mlp is not None else None
    split = SplitSD3Transformer(transformer, skip, mlp_module).to(device=device, dtype=torch_dtype)
    cfg = transformer.config

    if mode == "1x":
        plan = SamplingPlan.one_x(eta)
    elif mode == "student":
        plan = SamplingPlan.student(steps or 4, eta)
    else:
        plan = SamplingPlan.teacher(steps or 28, guidance)

    size = resolution or cfg.sample_size * VAE_SCALE
    latent = size // VAE_SCALE
    if size % (VAE_SCALE * cfg.patch_size):
        raise UsageError(
            f"--resolution {size} is not a multiple of {VAE_SCALE * cfg.patch_size}",
            f"use e.g. {size // (VAE_SCALE * cfg.patch_size) * VAE_SCALE * cfg.patch_size}",
        )
    tokens = text_len or (TINY_TEXT_LEN if model in TINY_MODELS else REAL_TEXT_LEN)
    check_text_len(model, tokens, str(tokens))
    gen = torch.Generator().manual_seed(seed + 1)  # embeddings from another stream than the noise
    cond = Conditioning(
        text=torch.randn(batch, tokens, cfg.joint_attention_dim, generator=gen),
        pooled=torch.randn(batch, cfg.pooled_projection_dim, generator=gen),
        uncond_text=torch.zeros(batch, tokens, cfg.joint_attention_dim) if plan.uses_cfg else None,
        uncond_pooled=torch.zeros(batch, cfg.pooled_projection_dim) if plan.uses_cfg else None,
    )

    num_layers = split.num_layers
    click.echo(f"model     {model} ({num_layers} blocks, width {transformer.inner_dim})")
    click.echo(f"skip      {skip} (1-based, inclusive) = transformer_blocks[{skip.start0}..{skip.stop0 - 1}] "
               f"(0-based), {skip.count} of {num_layers} blocks" + ("" if plan.uses_skip else " (unused by this mode)"))
    shown = [f"{s:.4g}" for s in plan.sigmas]
    arrows = " -> ".join(shown if len(shown) <= 6 else shown[:3] + ["..."] + shown[-2:]) + " -> 0"
    steps_text = ", ".join(f"step {i + 1} {'skips' if s else 'full'}" for i, s in enumerate(plan.skips))
    click.echo(f"schedule  {plan.name}: sigmas {arrows}" + (f"; {steps_text}" if plan.uses_skip else "")
               + f"; eta {plan.eta}" + (f"; CFG {plan.guidance_scale}" if plan.uses_cfg else ""))
    nfe = plan.nfe(num_layers, skip)
    teacher_nfe = SamplingPlan.teacher().nfe(num_layers, None)
    click.echo(f"NFE       {nfe:.3f} effective (teacher 28x2 = {teacher_nfe:.0f}: {teacher_nfe / nfe:.1f}x fewer)")
    click.echo(f"text      random embeddings, {batch} x {tokens} tokens (seed {seed + 1}); no text encoder yet")

    start = time.perf_counter()
    with tqdm(total=len(plan.sigmas), desc="sampling", unit="step", file=sys.stderr, leave=False) as bar:
        latents = sample(TorchDenoiser(split), plan, cond, (cfg.in_channels, latent, latent), seed,
                         torch_dtype, device, on_step=lambda i, s: bar.update())
    elapsed = time.perf_counter() - start

    bad = int((~torch.isfinite(latents)).sum())
    if bad:
        raise OnexError(f"sampling produced {bad} non-finite latent values (NaN or inf): {out} was not written",
                        "check the model's weights; in fp16 try --dtype bf16 or fp32")
    metadata = {"model": model, "plan": plan.name, "sigmas": ",".join(map(str, plan.sigmas)),
                "skip": str(skip), "eta": str(plan.eta), "seed": str(seed), "nfe": f"{nfe:.4f}"}
    save_tensors_atomic({"latents": latents}, out, metadata)
    click.echo(f"latents   {tuple(latents.shape)} saved to {out}")
    click.echo(f"PASSED sample: {plan.name} on {model}, {len(plan.sigmas)} steps in {elapsed:.2f} s, "
               f"latents finite (std {latents.float().std():.3f})")


def _echo_parity(verification: dict) -> None:
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


@main.command(name="build")
@click.option("--model", default=DEFAULT_MODEL, show_default=True,
              help="Embedded model name or a local diffusers SD3/SD3.5 folder (fp16/bf16/fp32, one file or shards).")
@click.option("--mlp", type=click.Path(path_type=Path), default=None, help="Compensation MLP weights.")
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
@click.option("--max-graph-gib", type=click.FloatRange(min=0.001), default=DEFAULT_GRAPH_BYTES / 2**30,
              show_default=True, help="Cut a graph where its weights would pass this many GiB (an engine build "
                                      "needs about 3x its graph's weights in memory).")
@click.option("--allow-parity-failure", is_flag=True, help="Install the build even if the parity gate fails.")
def build_cmd(model, mlp, skip, probe_path, out, precision, fp32_blocks, trt, batch, resolution, text_len,
              dynamic_shapes, opset, opt_level, compute_capabilities, timing_cache, tf32, components, gate_mode,
              gate_device, max_graph_gib, allow_parity_failure):
    """Split, export ONNX, compile TensorRT engines, gate on parity, and write manifest.json."""
    skip_source = None
    if isinstance(skip, AutoSkip):
        if probe_path is None:
            raise UsageError(f"--skip {skip} needs --probe: the range comes from a probe of the model",
                             f"run `onex-export probe --model {model}` and pass --probe probes/.../probe.json")
        from .probe.report import choose_skip

        auto, (skip, skip_source) = skip, choose_skip(probe_path, skip.nfe, model)
        click.echo(f"skip {auto} -> {skip} (velocity error {skip_source['velocity_error']:.4f} in {probe_path})")
    elif probe_path is not None:
        raise UsageError("--probe goes with --skip auto:NFE", "drop --probe, or pass e.g. --skip auto:1.667")
    out = out or Path("engines") / f"{Path(model).name}-skip{skip}-{precision}"
    config = BuildConfig(skip=skip, skip_source=skip_source, out=out, model=model, mlp=mlp, precision=precision, fp32_blocks=fp32_blocks,
                         trt=trt, batch=batch, resolution=resolution, text_len=text_len, dynamic_shapes=dynamic_shapes,
                         opset=opset, optimization_level=opt_level, compute_capabilities=tuple(compute_capabilities),
                         timing_cache=timing_cache, tf32=tf32, components=components,
                         gate=GateConfig(gate_mode, gate_device), allow_parity_failure=allow_parity_failure,
                         max_graph_bytes=int(max_graph_gib * 2**30))
    start = time.perf_counter()
    try:
        manifest = build(config, log=click.echo)
    except ParityFailedError as exc:
        _echo_parity(exc.manifest["verifications"][-1])
        raise
    elapsed = time.perf_counter() - start
    click.echo(f"\n{'graph':10s} {'blocks':>7s} {'weights MB':>11s} {'export s':>9s} {'engine MB':>10s} {'build s':>8s}")
    for name, g in manifest["graphs"].items():
        engine, blocks = g["engine"], (g["def"] or {}).get("blocks") or "-"
        click.echo(f"{name:10s} {blocks:>7s} {g['weight_bytes'] / 1e6:11.1f} {g['export_seconds']:9.2f} "
                   f"{(engine['bytes'] / 1e6 if engine else 0):10.1f} {g.get('build_seconds', 0):8.2f}")
    w = manifest["weights"]
    click.echo(f"weights: graphs {w['graph_bytes'] / 1e6:.1f} MB / model {w['model_bytes'] / 1e6:.1f} MB "
               f"= duplication ratio {w['duplication_ratio']:.4f} (goal <= 1.02)")
    stages = manifest["stages"]
    click.echo("stages:  " + ", ".join(f"{n} {r['seconds']:.1f} s (peak {_gib(r['peak_rss_bytes'])} GiB)"
                                      for n, r in stages.items() if n != "per_stage_peak"))
    click.echo(f"skip {manifest['skip']['one_based']} -> effective NFE {manifest['schedule']['effective_nfe']:.3f}; "
               f"engines: {manifest['trt']}; shapes {manifest['shapes']['ranges']}\n")
    verification = manifest["verifications"][-1]
    _echo_parity(verification)
    status = manifest["status"]
    if status == "unverified":
        click.echo(f"PASSED build: {out} in {elapsed:.1f} s, UNVERIFIED ({verification.get('reason', '')})")
    else:
        click.echo(f"{'PASSED' if status == 'passed' else 'FAILED'} build: {out} in {elapsed:.1f} s"
                   + ("" if status == "passed" else " (installed anyway: --allow-parity-failure)"))
    sys.exit(1 if status == "failed" else 0)


@main.command(name="verify")
@click.argument("folder", type=click.Path(path_type=Path))
@click.option("--backend", type=click.Choice(["onnxruntime", "tensorrt"]), default="onnxruntime", show_default=True,
              help="Run the ONNX graphs (CPU) or the TensorRT engines (needs an NVIDIA GPU).")
@click.option("--gate", "gate_mode", type=click.Choice(["opt", "full"]), default="opt", show_default=True,
              help="Check at the profile's optimum shape, or at every profile corner too.")
@click.option("--gate-device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
              help="Where the float32 reference runs (one module at a time).")
@click.option("--model", default=None,
              help="Where the model the build was made from is now (default: the path its manifest records).")
@click.option("--mlp", type=click.Path(path_type=Path), default=None,
              help="Where the build's compensation MLP is now (default: the path its manifest records).")
def verify_cmd(folder, backend, gate_mode, gate_device, model, mlp):
    """Check a build's files against its manifest (sha256), re-run the parity gate, and record the result in
    the manifest (its status follows)."""
    start = time.perf_counter()
    manifest, verification = verify(folder, log=click.echo, backend=backend, gate=GateConfig(gate_mode, gate_device),
                                    model=model, mlp=mlp)
    _echo_parity(verification)
    passed = verification["status"] == "passed"
    ran = "engines executed" if backend == "tensorrt" else "ONNX graphs on ONNX Runtime; engines need --backend tensorrt"
    click.echo(f"{'PASSED' if passed else 'FAILED'} verify: {folder} ({len(verification['rows'])} checks, "
               f"{time.perf_counter() - start:.1f} s; {ran}); build status now {manifest['status']!r}")
    sys.exit(0 if passed else 1)


@main.command(name="generate")
@click.option("--build", "build_dir", type=click.Path(path_type=Path), required=True,
              help="A build folder written by `onex-export build` (with its text encoders and VAE).")
@click.option("--prompt", "prompts", multiple=True, required=True, help="Prompt (repeatable: one batch).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--images-per-prompt", type=click.IntRange(1, 64), default=1, show_default=True)
@click.option("--resolution", type=click.IntRange(16, 4096), default=None, help="Pixels. Default: the build's optimum.")
@click.option("--backend", type=click.Choice(list(BACKENDS)), default="onnxruntime",
              show_default=True, help="tensorrt needs an NVIDIA GPU; torch runs the float32 reference model.")
@click.option("--device", default="cpu", show_default=True, help="torch device for the torch backend.")
@click.option("--cuda-graph", is_flag=True,
              help="Capture each transformer step as a CUDA graph (GPU: --backend tensorrt, or torch with --device cuda).")
@click.option("--out", type=click.Path(path_type=Path), default=Path("image.png"), show_default=True,
              help="PNG path; more images get -1, -2, ... before the suffix.")
def generate_cmd(build_dir, prompts, seed, images_per_prompt, resolution, backend, device, cuda_graph, out):
    """Text -> image with the 1.x-NFE schedule, from a build folder alone."""
    start = time.perf_counter()
    count = len(prompts) * images_per_prompt
    paths = [out if i == 0 else out.with_name(f"{out.stem}-{i}{out.suffix}") for i in range(count)]
    for path in paths:  # before the work, not after it
        check_destination(path)
    pipe = BuildPipeline(build_dir, backend, device, cuda_graph=cuda_graph)
    result = pipe.generate(list(prompts), seed, images_per_prompt, resolution)
    for line in result.truncated:
        click.secho(f"truncated: {line}", fg="yellow", err=True)
    bad = int((~torch.isfinite(result.images)).sum())
    if bad:
        raise OnexError(f"the {backend} run produced {bad} non-finite pixel values (NaN or inf): no image was written",
                        f"check the build with `onex-export verify {build_dir}`; an fp16 build may need --fp32-blocks")
    for image, path in zip(result.images, paths):
        save_png(image, path)
    stages = ", ".join(f"{k} {v * 1000:.1f} ms" for k, v in result.seconds.items())
    click.echo(f"stages    {stages}")
    if pipe.manifest["model"]["source"] in TINY_MODELS:
        click.echo("note      the embedded model has random weights: its images are noise by design")
    h, w = result.images.shape[-2:]
    click.echo(f"PASSED generate: {len(paths)} image(s) of {w}x{h} with {backend} -> {', '.join(map(str, paths))} "
               f"in {time.perf_counter() - start:.1f} s")


@main.command(name="probe")
@click.option("--model", default=DEFAULT_MODEL, show_default=True,
              help="Embedded model name or a local SD3/SD3.5 pipeline folder (its text encoders encode the prompts).")
@click.option("--prompts", "prompts_file", type=click.Path(path_type=Path), default=None,
              help="Calibration prompts, one per line. Default: 8 built-in prompts.")
@click.option("--max-prompts", type=click.IntRange(min=1), default=None, help="Use only the first N prompts.")
@click.option("--seed", "seeds", type=int, multiple=True, help="Noise seed (repeatable). Default: 0.")
@click.option("--nfe", "nfes", type=float, multiple=True,
              help="Target effective NFE (repeatable) to recommend a range for. Default: 1.75 and 1.667.")
@click.option("--lengths", default=None, help="Only ranges of these lengths (e.g. 6,8). Default: every range.")
@click.option("--resolution", type=click.IntRange(16, 4096), default=None, help="Pixels. Default: the model's native.")
@click.option("--dtype", type=click.Choice(list(DTYPES)), default="fp32", show_default=True)
@click.option("--device", default="cpu", show_default=True, help="torch device, e.g. cpu or cuda.")
@click.option("--mlp", type=click.Path(path_type=Path), default=None,
              help="A trained compensation MLP: its range (--mlp-skip) is measured with it too.")
@click.option("--mlp-skip", default=None, callback=_parse_skip, help="The range the MLP was trained for, e.g. 3-10.")
@click.option("--random-text", is_flag=True,
              help="Seeded random text embeddings instead of the text encoders (a folder with a transformer only).")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Folder for probe.json, heatmap.png, blocks.png. Default: probes/<model>")
def probe_cmd(model, prompts_file, max_prompts, seeds, nfes, lengths, resolution, dtype, device, mlp, mlp_skip,
              random_text, out):
    """Measure which block range step two can skip: every block's reuse error and every range's caching error
    (step two's velocity and the final latents against the uncached run), and recommend a range per NFE."""
    from .probe import DEFAULT_NFES, DEFAULT_PROMPTS, ProbeConfig, read_prompts, run
    from .probe.report import write

    try:
        parsed_lengths = tuple(int(n) for n in lengths.split(",")) if lengths else None
    except ValueError:
        raise UsageError(f"--lengths {lengths!r} is not a list of numbers", "use e.g. --lengths 6,8") from None
    prompts = read_prompts(prompts_file, max_prompts) if prompts_file else DEFAULT_PROMPTS[:max_prompts]
    config = ProbeConfig(model, prompts, tuple(seeds) or (0,), resolution, tuple(nfes) or DEFAULT_NFES,
                         parsed_lengths, dtype, device, random_text, mlp, mlp_skip)
    out = out or Path("probes") / Path(model).name
    check_destination(out / "probe.json")
    bar = None

    def progress(total):
        nonlocal bar
        bar = tqdm(total=total, desc="probe", unit="step", disable=None, leave=False)
        return bar.update

    try:
        result, recorded = run(config, progress, log=click.echo)
    finally:
        if bar is not None:
            bar.close()
    paths = write(out, result, recorded)
    worst = max(result.blocks, key=lambda b: b["e"])
    best = min(result.blocks[:-1], key=lambda b: b["e"])
    click.echo(f"blocks    reuse error e_n from {best['e']:.4f} (block {best['block']}) to {worst['e']:.4f} "
               f"(block {worst['block']})")
    for rec in result.recommendations:
        click.echo(f"NFE {rec['nfe']:.3f} (target {rec['target_nfe']:g}, {rec['skipped']} blocks): --skip {rec['skip']}"
                   f"  velocity error {rec['velocity_error']:.4f}, final latents {rec['latent_error']:.4f}")
    for row in result.ranges:
        if "mlp_velocity_error" in row:
            click.echo(f"MLP       --skip {row['skip']}: velocity error {row['velocity_error']:.4f} with plain reuse, "
                       f"{row['mlp_velocity_error']:.4f} with the MLP; final latents {row['latent_error']:.4f} -> "
                       f"{row['mlp_latent_error']:.4f}")
    click.echo(f"PASSED probe: {result.samples} sample(s), {len(result.ranges)} ranges in {recorded['seconds']:.1f} s "
               f"-> {', '.join(map(str, paths))}")


@main.command(name="serve")
@click.option("--build", "build_dir", type=click.Path(path_type=Path), required=True,
              help="A build folder written by `onex-export build` (with its text encoders and VAE).")
@click.option("--backend", type=click.Choice(list(BACKENDS)), default="onnxruntime", show_default=True,
              help="tensorrt needs an NVIDIA GPU.")
@click.option("--device", default="cpu", show_default=True, help="torch device for the torch backend.")
@click.option("--cuda-graph", is_flag=True, help="Capture each transformer step as a CUDA graph (GPU only).")
@click.option("--http-port", type=click.IntRange(1, 65535), default=8000, show_default=True)
@click.option("--grpc-port", type=click.IntRange(1, 65535), default=8001, show_default=True)
@click.option("--metrics-port", type=click.IntRange(1, 65535), default=8002, show_default=True,
              help="Prometheus metrics at /metrics.")
@click.option("--max-queue-delay-us", type=click.IntRange(0, 10_000_000), default=2000, show_default=True,
              help="How long Triton's dynamic batcher holds a request for others to batch it with.")
@click.option("--max-queue-size", type=click.IntRange(min=1), default=256, show_default=True,
              help="Requests waiting beyond this many are refused at once instead of queued.")
@click.option("--drain-seconds", type=click.FloatRange(min=0), default=60.0, show_default=True,
              help="On SIGTERM, how long the requests in flight may still take.")
@click.option("--access-token-env", default="ONEX_SERVE_ACCESS_TOKEN", show_default=True,
              help="Environment variable holding the token for Triton's management endpoints (statistics, model "
                   "repository, logging, trace; HTTP header `triton-access-token`, gRPC metadata "
                   "`triton-grpc-protocol-triton-access-token`). Unset: a random token, so they stay closed.")
def serve_cmd(build_dir, backend, device, cuda_graph, http_port, grpc_port, metrics_port, max_queue_delay_us,
              max_queue_size, drain_seconds, access_token_env):
    """Serve a build with a Triton Inference Server (model `onex`: prompt -> image) until SIGTERM or Ctrl-C,
    which let the requests in flight finish and exit 0."""
    from .serving import ServeConfig, serve

    token = os.environ.get(access_token_env) or None  # from the environment: a command line is visible to `ps`
    config = ServeConfig(build_dir, backend, device, cuda_graph, http_port, grpc_port, metrics_port,
                         max_queue_delay_us, max_queue_size, drain_seconds, token)
    images = serve(config, log=click.echo)
    click.echo(f"PASSED serve: {images} image(s) served from {build_dir}")


if __name__ == "__main__":
    main()
