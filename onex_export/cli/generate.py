"""`onex-export sample` (a schedule on the PyTorch model) and `generate` (text to PNG from a build folder)."""
from __future__ import annotations

import sys
import time
from pathlib import Path

import click
import torch
from tqdm import tqdm

from ..errors import OnexError, UsageError
from ..fileio import check_destination, save_png, save_tensors_atomic
from ..models import DEFAULT_MODEL, TINY_MODELS, SplitSD3Transformer, load_compensation, load_transformer
from ..models.zoo import TINY_TEXT_LEN, default_mlp_for
from ..build import check_text_len
from ..check.reference import open_pipeline
from ..models.text import SD3_TEXT_LENGTH, text_length
from ..models.vae import vae_scale
from ..runtime import Conditioning, TorchDenoiser, sample
from ..runtime.pipeline import BACKENDS
from ..schedule import SamplingPlan
from ..params import DEVICE, SEED, VISIBLE_DEVICE, FiniteFloat

from . import DTYPES, _parse_skip, check_cuda_graph, main


@main.command(name="sample")
@click.option("--model", default=DEFAULT_MODEL, show_default=True,
              help="Embedded model name (see `onex-export models`) or a local diffusers SD3/SD3.5 folder.")
@click.option("--mlp", type=click.Path(path_type=Path), default=None,
              help="Compensation MLP weights (onex or reference-release layout). Default: an embedded trained model's "
                   "own MLP when --skip is its range, else untrained (plain reuse).")
@click.option("--skip", default="3-10", show_default=True, callback=_parse_skip,
              help="Blocks skipped in step two: 1-based, inclusive, as in the paper (3-10 = blocks[2..9]).")
@click.option("--mode", type=click.Choice(["1x", "student", "teacher"]), default="1x", show_default=True,
              help="1x: two steps, the second skipping; student: N full steps; teacher: N Euler steps with CFG.")
@click.option("--steps", type=click.IntRange(1, 1000), default=None,
              help="Steps for --mode student (default 4) or teacher (default 28).")
@click.option("--guidance", type=FiniteFloat(min=1.0), default=7.0, show_default=True,
              help="CFG scale for --mode teacher.")
@click.option("--eta", type=FiniteFloat(0.0, 1.0), default=1.0, show_default=True,
              help="Student step: 1 = deterministic Euler, 0 = re-noise like DMD2.")
@click.option("--seed", type=SEED, default=0, show_default=True)
@click.option("--batch", type=click.IntRange(1, 256), default=1, show_default=True)
@click.option("--resolution", type=click.IntRange(16, 4096), default=None,
              help="Image size in pixels (latents are 1/8). Default: the model's native size.")
@click.option("--text-len", type=click.IntRange(1, 1024), default=None,
              help=f"Text tokens. Default: what the model's text encoders give ({TINY_TEXT_LEN} for the tiny "
                   f"models, {SD3_TEXT_LENGTH} for SD3).")
@click.option("--device", type=VISIBLE_DEVICE, default="cpu", show_default=True, help="cpu, cuda or cuda:N.")
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
    mlp = mlp or default_mlp_for(model, skip)
    mlp_module = load_compensation(mlp, transformer) if mlp is not None else None
    split = SplitSD3Transformer(transformer, skip, mlp_module).to(device=device, dtype=torch_dtype)
    cfg = transformer.config

    if mode == "1x":
        plan = SamplingPlan.one_x(eta)
    elif mode == "student":
        plan = SamplingPlan.student(steps or 4, eta)
    else:
        plan = SamplingPlan.teacher(steps or 28, guidance)

    scale = vae_scale(model)
    size = resolution or cfg.sample_size * scale
    latent = size // scale
    if size % (scale * cfg.patch_size):
        raise UsageError(
            f"--resolution {size} is not a multiple of {scale * cfg.patch_size}",
            f"use e.g. {size // (scale * cfg.patch_size) * scale * cfg.patch_size}",
        )
    tokens = text_len or text_length(model)
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


@main.command(name="generate")
@click.option("--build", "build_dir", type=click.Path(path_type=Path), required=True,
              help="A build folder written by `onex-export build` (with its text encoders and VAE).")
@click.option("--prompt", "prompts", multiple=True, required=True, help="Prompt (repeatable: one batch).")
@click.option("--seed", type=SEED, default=0, show_default=True)
@click.option("--images-per-prompt", type=click.IntRange(1, 64), default=1, show_default=True)
@click.option("--resolution", type=click.IntRange(16, 4096), default=None, help="Pixels. Default: the build's optimum.")
@click.option("--backend", type=click.Choice(list(BACKENDS)), default="onnxruntime",
              show_default=True, help="tensorrt needs an NVIDIA GPU; torch runs the float32 reference model.")
@click.option("--device", type=DEVICE, default="cpu", show_default=True,
              help="cpu, cuda or cuda:N: where the tensorrt and torch backends run.")
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
    check_cuda_graph(backend, device, cuda_graph)
    pipe = open_pipeline(build_dir, backend, device, cuda_graph=cuda_graph)
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
    if pipe.manifest.model.source in TINY_MODELS:
        click.echo("note      the embedded model has random weights: its images are noise by design")
    h, w = result.images.shape[-2:]
    click.echo(f"PASSED generate: {len(paths)} image(s) of {w}x{h} with {backend} -> {', '.join(map(str, paths))} "
               f"in {time.perf_counter() - start:.1f} s")
