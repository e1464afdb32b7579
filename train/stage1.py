"""Stage I of 1.x-Distill: structure-focused distribution matching (paper Sec. 3.3, Algorithm 1).

    python -m train.stage1 --config train/configs/tiny-cpu.yaml
    torchrun --nproc_per_node 8 -m train.stage1 --config train/configs/sd3-medium.yaml

Turns an SD3/SD3.5 teacher into an N-step student (N = 2 for 1.x-Distill, 4 for the SFD baseline).
Reads the config, caches the prompts' text embeddings, loads teacher, student and fake model, then
runs the loop below; it resumes from ``<run_dir>/checkpoints/latest`` when there is one. The entry
point is the only place that prints.
"""
from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import click
import torch
from tqdm import tqdm

from onex_export import interrupts
from onex_export.exits import errors_reported
from onex_export.models.vae import vae_scale
from onex_export.schedule import student_sigmas

from . import checkpoint
from .config import ConfigError, Stage1Config, check_resolution
from .data import EmbeddingStore, build_cache, encoder_spec, read_prompts
from .distributed import DistInfo, init_distributed, mean_over_ranks, shutdown
from .dmd import Batch, Parts, draw, iteration
from .importance import TimestepSampler
from .models import Transformers, load_transformers, velocity_fn
from .monitor import JsonlLog, format_postfix, make_decoder, save_grid
from .simulation import draw_rollout_noise, generate


@dataclass
class RunResult:
    step: int  # iterations done
    records: list[dict] = field(default_factory=list)  # this process's log records of this run
    checkpoint: Path | None = None
    models: Transformers | None = None


def transformer_config(model: str):
    """The teacher's diffusers config without loading its weights (the text encoders run first)."""
    from types import SimpleNamespace

    from onex_export.models import zoo

    return SimpleNamespace(**zoo.transformer_config(model))


def run(cfg: Stage1Config, resume: bool = True, kill_after: int | None = None) -> RunResult:
    if cfg.cpu_threads:
        torch.set_num_threads(cfg.cpu_threads)
    info = init_distributed(cfg.device)
    try:
        check_resolution(cfg.resolution, cfg.model, cfg.model)  # before the run folder is touched
        with checkpoint.run_lock(Path(cfg.run_dir), info):
            return _run(cfg, info, resume, kill_after)
    finally:
        shutdown(info)


def _run(cfg: Stage1Config, info: DistInfo, resume: bool, kill_after: int | None) -> RunResult:
    if cfg.batch_size % info.world:
        raise ConfigError(f"batch_size {cfg.batch_size} does not split over {info.world} processes",
                          "make batch_size a multiple of --nproc_per_node")
    main = info.is_main
    run_dir = Path(cfg.run_dir)
    ckpt = checkpoint.open_run(cfg, info, resume)

    # -- data: every prompt's text embeddings, computed once, before the transformers take the memory
    prompts = read_prompts(cfg.prompts, cfg.prompt_key)
    tconfig = transformer_config(cfg.model)
    spec = encoder_spec(cfg.text_encoder, cfg.model, tconfig, cfg.t5_length, info.device)
    bar = (lambda it, total: tqdm(it, total=total, desc="text embeddings", disable=not main))
    store = EmbeddingStore(build_cache(cfg.cache_dir, prompts, spec, cfg.embedding_dtype, info,
                                       batch=cfg.encode_batch, progress=bar))
    store.check_fits(tconfig)
    uncond = store.uncond()

    # -- models and optimizers (paper B.2: AdamW, betas (0, 0.999), weight decay 1e-4)
    torch.manual_seed(cfg.seed)
    models = load_transformers(cfg.model, cfg.precision, cfg.gradient_checkpointing, info, ckpt)

    def adamw(model, lr):
        return torch.optim.AdamW(model.parameters(), lr=lr, betas=cfg.adam_betas, weight_decay=cfg.weight_decay,
                                 eps=cfg.adam_eps)

    def warmup(opt):
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / cfg.warmup_steps)
                                                 if cfg.warmup_steps else 1.0)

    opt_g, opt_f = adamw(models.student, cfg.lr_generator), adamw(models.fake, cfg.lr_fake)
    sched_g, sched_f = warmup(opt_g), warmup(opt_f)
    named = {"student": models.student, "fake": models.fake}
    optimizers, schedulers = {"student": opt_g, "fake": opt_f}, {"student": sched_g, "fake": sched_f}
    rng = torch.Generator().manual_seed(cfg.seed)  # every random draw of the loop comes from here
    start = 0
    if ckpt is not None:
        state = checkpoint.load_trainer_state(ckpt)
        checkpoint.check_finite_weights(named, ckpt)
        checkpoint.restore(state, named, optimizers, schedulers, rng, info)
        start = state.step
    sigmas = student_sigmas(cfg.num_steps)
    dmd_sampler = TimestepSampler(cfg.num_steps, cfg.timestep_curve)
    fake_sampler = TimestepSampler(cfg.num_steps, "uniform")
    parts = Parts(cfg, models.student, models.fake, velocity_fn(models.student, cfg.precision),
                  velocity_fn(models.fake, cfg.precision), velocity_fn(models.teacher, cfg.precision),
                  opt_g, opt_f, sched_g, sched_f, sigmas, dmd_sampler.grid.to(info.device))
    scale = vae_scale(cfg.model)
    latent = (tconfig.in_channels, cfg.resolution // scale, cfg.resolution // scale)
    log = JsonlLog(run_dir / "log.jsonl", resume_step=start if ckpt is not None else None) if main else None
    local = info.rows(cfg.batch_size)
    result = RunResult(start, checkpoint=ckpt, models=models)
    # The empty prompt's embeddings for this rank's rows: the same every step, so copied to the device once.
    b = local.stop - local.start
    uncond_text = uncond.text.expand(b, -1, -1).to(info.device)
    uncond_pooled = uncond.pooled.expand(b, -1).to(info.device)

    # -- the loop
    progress = tqdm(total=cfg.max_steps, initial=start, desc="stage I", disable=not main, dynamic_ncols=True)
    for step in range(start, cfg.max_steps):
        tic = time.perf_counter()
        draws = draw(rng, cfg.batch_size, latent, len(store), cfg.num_steps, cfg.eta, dmd_sampler, fake_sampler)
        rows = store.rows(draws.prompts[local])
        batch = Batch(rows.text.to(info.device), rows.pooled.to(info.device), uncond_text, uncond_pooled)
        update_generator = step % cfg.fake_updates_per_generator == 0  # two time-scale update rule
        metrics = iteration(parts, batch, draws, info, update_generator)
        uncond_pass = metrics.pop("uncond_pass")
        metrics = mean_over_ranks(metrics, info)
        record = {"step": step + 1, "loss_fake": metrics.pop("loss_fake"),
                  "loss_generator": metrics.pop("loss_generator", None), **metrics, "uncond_pass": uncond_pass,
                  "lr_generator": sched_g.get_last_lr()[0], "lr_fake": sched_f.get_last_lr()[0],
                  "seconds": round(time.perf_counter() - tic, 4)}
        if main:
            log.write(record)
        checkpoint.check_finite(record, result.checkpoint, f"lower the learning rates (lr_generator "
                                f"{cfg.lr_generator:g}, lr_fake {cfg.lr_fake:g}) or check the teacher's weights")
        result.records.append(record)
        result.step = step + 1
        progress.update(1)
        if (step + 1) % cfg.log_every == 0:
            progress.set_postfix(format_postfix(record))
        if cfg.sample_every and (step + 1) % cfg.sample_every == 0:
            sample_grid(cfg, models, store, sigmas, latent, info, step + 1)
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.max_steps:
            result.checkpoint = checkpoint.save(cfg, step + 1, named, optimizers, schedulers, rng,
                                                models.config_json, info)
            if kill_after == step + 1:  # testing hook: die like a preempted job, no cleanup at all
                os.kill(os.getpid(), signal.SIGKILL)
    progress.close()
    return result


@torch.no_grad()
def sample_grid(cfg: Stage1Config, models: Transformers, store: EmbeddingStore, sigmas, latent, info: DistInfo,
                step: int) -> None:
    """The student's samples for the first prompts from fixed noise (every rank runs the collective
    forwards; rank 0 writes ``samples/step-NNNNNN.png``)."""
    n = min(cfg.sample_count, len(store))
    rows = store.rows(torch.arange(n))
    text, pooled = rows.text.to(info.device), rows.pooled.to(info.device)
    student_v = velocity_fn(models.student, cfg.precision)

    def velocity(x, sigma: float):
        return student_v(x, torch.full((n,), sigma, dtype=torch.float64, device=info.device), text, pooled)

    noise = draw_rollout_noise((n, *latent), cfg.num_steps, cfg.eta, torch.Generator().manual_seed(cfg.seed))
    latents = generate(velocity, noise.to(info.device), sigmas, cfg.eta)
    if info.is_main:
        save_grid(make_decoder(cfg.model, info.device)(latents), Path(cfg.run_dir) / "samples" / f"step-{step:06d}.png")


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help="YAML config (see train/configs/).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a config key (repeatable).")
@click.option("--resume/--no-resume", default=True, show_default=True,
              help="Continue from run_dir's latest checkpoint when there is one.")
@click.option("--kill-after", type=int, default=None, hidden=True,
              help="Testing: SIGKILL this process right after writing the checkpoint of step N.")
def main(config_path, overrides, resume, kill_after):
    """Stage I: distil an SD3/SD3.5 teacher into an N-step student by distribution matching."""
    interrupts.install()  # Ctrl-C / SIGTERM: the checkpoint being saved is dropped, the last one kept; exit 130 / 143
    with errors_reported():
        cfg = Stage1Config.load(config_path, overrides)
        result = run(cfg, resume=resume, kill_after=kill_after)
    if int(os.environ.get("RANK", "0")) == 0:
        last = result.records[-1] if result.records else None
        summary = (f"loss_fake {last['loss_fake']:.5g}" + (f", loss_generator {last['loss_generator']:.5g}"
                   if last.get("loss_generator") is not None else "")) if last else "nothing to do"
        click.echo(f"stage I: step {result.step}/{cfg.max_steps}, {summary}; checkpoint {result.checkpoint}")
        click.echo("PASSED")


if __name__ == "__main__":
    main()
