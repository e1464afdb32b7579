"""Stage II of 1.x-Distill: Distill-Cache co-Training (paper Sec. 3.3-3.4, Algorithm 1, Table 6).

    python -m train.stage2 --config train/configs/stage2-tiny-cpu.yaml
    python -m train.stage2 --config train/configs/stage2-sd3-medium-3-10.yaml

Refines the Stage I student adversarially in pixel space along the cached inference path, and trains the
compensation MLP with it. Each iteration:

- fake images: the runtime's 1.x schedule with the cache on (step one full, its state detached and its deltas
  kept; step two skipping, with gradient through the student and the MLP), decoded by the VAE;
- "real" images: a multi-step model from the same noise (an 8-step Stage I student, or the teacher with CFG);
- D alone for the first ``d_warmup`` iterations, then the student and MLP every ``g_every``-th iteration and D
  otherwise; the student stays frozen for the first ``mlp_warmup`` iterations (the MLP learns alone).

Resumes from ``<run_dir>/checkpoints/latest``; at the end writes ``<run_dir>/final/student`` (LoRA merged) and
``final/mlp.safetensors`` and prints the `onex-export build` command that takes them. Under torchrun the student
and the real model are sharded with FSDP2 per joint block, as in Stage I; the MLP and the discriminator's heads
are small and replicated, their gradients averaged over the ranks. Each rank takes its rows of the global batch,
so the numbers do not depend on the number of processes.
"""
from __future__ import annotations

import gc
import json
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import click
import torch
from diffusers import SD3Transformer2DModel
from safetensors.torch import load_file
from tqdm import tqdm

from onex_export import interrupts
from onex_export.exits import errors_reported
from onex_export.errors import UsageError
from onex_export.export.components import load_components
from onex_export.models.vae import vae_scale
from onex_export.models import SplitSD3Transformer, load_compensation, load_transformer, zoo
from onex_export.models.compensation import CompensationMLP
from onex_export.runtime import Conditioning

from . import checkpoint
from .cached_path import cached_latents, feature_kd, output_kd, step_two
from .data import EmbeddingStore, build_cache, encoder_spec, read_prompts
from .discriminator import ConvNeXtTaps, Discriminator, d_loss, g_loss, open_clip_tower, tiny_tower
from .config import ConfigError, check_resolution
from .distributed import DistInfo, init_distributed, mean_over_ranks, shard, shutdown
from .lora import add_lora, build_command, read_outputs, save_outputs
from .real_images import RealImages, autocast, check_cache, draw, parse_shard
from .monitor import JsonlLog, save_grid
from .stage2_config import Stage2Config


@dataclass
class RunResult:
    step: int
    records: list[dict] = field(default_factory=list)
    checkpoint: Path | None = None
    command: str | None = None  # the build command for the final outputs


@dataclass
class Parts:
    split: SplitSD3Transformer  # the student (LoRA-wrapped unless full fine-tuning) and the MLP
    student_params: list[torch.nn.Parameter]
    real: SplitSD3Transformer  # the multi-step "real" model, frozen
    vae: torch.nn.Module  # latents -> images in [0, 1]; frozen, gradient flows through it
    disc: Discriminator
    opts: dict[str, torch.optim.Optimizer]


def phase(cfg: Stage2Config, step: int) -> str:
    """What iteration ``step`` (0-based) updates: "d" (the discriminator), "mlp" (the MLP alone, the student
    frozen: the MLP warm-up) or "g" (student and MLP). Without ``train_mlp`` there is no MLP warm-up."""
    if step < cfg.d_warmup or (step - cfg.d_warmup) % cfg.g_every:
        return "d"
    return "mlp" if step < cfg.mlp_warmup and cfg.train_mlp else "g"


def run(cfg: Stage2Config, resume: bool = True, kill_after: int | None = None) -> RunResult:
    if cfg.cpu_threads:
        torch.set_num_threads(cfg.cpu_threads)
    info = init_distributed(cfg.device)
    try:
        if cfg.batch_size % info.world:
            raise ConfigError(f"batch_size {cfg.batch_size} does not split over {info.world} processes",
                              "make batch_size a multiple of --nproc_per_node")
        if info.is_distributed and not cfg.lora_rank:
            raise ConfigError("full fine-tuning (lora_rank 0) runs on one process only for now",
                              "train through LoRA under torchrun (lora_rank 64, the release's)")
        if cfg.discriminator_weights and not Path(cfg.discriminator_weights).is_file():
            raise ConfigError(f"discriminator_weights {cfg.discriminator_weights} is not a file",
                              "train the tiny tower first (python -m bench.toy makes <work>/tower/tower.safetensors)"
                              if cfg.discriminator == "tiny" else
                              "download open_clip's CLIP-convnext_xxlarge-laion2B-s34B-b82K-augreg-soup beforehand")
        check_resolution(cfg.resolution, cfg.model, cfg.pipeline or cfg.model)  # before the run folder is touched
        with checkpoint.run_lock(Path(cfg.run_dir), info):
            return _run(cfg, info, resume, kill_after)
    finally:
        shutdown(info)


def student_model(cfg: Stage2Config, weights: Path | None = None) -> SD3Transformer2DModel:
    """The student as trained: LoRA-wrapped (unless full fine-tuning), fp32 on the CPU; ``weights``: a
    checkpoint's ``student/`` file to load into it."""
    student = load_transformer(cfg.model)  # fp32: trained weights and the optimizer's master copy
    if cfg.lora_rank:
        add_lora(student, cfg.lora_rank, cfg.lora_alpha)
    else:
        student.requires_grad_(True)
    if weights is not None:
        student.load_state_dict(load_file(str(weights)))
    return student


def _load(cfg: Stage2Config, info: DistInfo, tconfig, ckpt: Path | None) -> Parts:
    skip = cfg.skip_range

    def place(model):
        """On the device; under torchrun each joint block becomes an FSDP2 unit. Unlike Stage I the root is not
        sharded: the split model calls the embedders and the output layers directly, not through the root's
        forward, whose hooks would gather them. They stay replicated (frozen under LoRA)."""
        return shard(model.to(info.device), info, root=False)

    student = student_model(cfg, ckpt / "student" / checkpoint.WEIGHTS if ckpt is not None else None)
    if cfg.gradient_checkpointing:
        student.enable_gradient_checkpointing()
    mlp = load_compensation(cfg.mlp_init, student) if cfg.mlp_init else CompensationMLP.for_transformer(student)
    student = place(student.train())
    student_params = [p for p in student.parameters() if p.requires_grad]  # after sharding: its parameters
    split = SplitSD3Transformer(student, skip, mlp.requires_grad_(cfg.train_mlp).to(info.device))
    real = SplitSD3Transformer(place(load_transformer(cfg.real_model or cfg.model).requires_grad_(False).eval()), skip)
    pipeline = cfg.pipeline or cfg.model
    vae = load_components(pipeline, tconfig, ("vae",)).load("vae").requires_grad_(False).to(info.device)
    if cfg.gradient_checkpointing:  # the decoder's activations at full resolution dominate the memory
        vae.vae.enable_gradient_checkpointing()
    weights = Path(cfg.discriminator_weights) if cfg.discriminator_weights else None
    tower = tiny_tower(weights=weights) if cfg.discriminator == "tiny" else open_clip_tower(cfg.discriminator, weights)
    disc = Discriminator(ConvNeXtTaps(tower)).to(info.device)
    if ckpt is not None:  # the student's weights came with it above
        mlp.load_state_dict(load_file(str(ckpt / "mlp" / checkpoint.WEIGHTS)))
        disc.heads.load_state_dict(load_file(str(ckpt / "discriminator" / checkpoint.WEIGHTS)))

    def adamw(params, lr):
        return torch.optim.AdamW(params, lr=lr, betas=cfg.adam_betas, weight_decay=cfg.weight_decay, eps=cfg.adam_eps)

    opts = {"student": adamw(student_params, cfg.lr_generator), "mlp": adamw(mlp.parameters(), cfg.lr_mlp),
            "discriminator": adamw(disc.trainable(), cfg.lr_discriminator)}
    return Parts(split, student_params, real, vae, disc, opts)


def _models(parts: Parts) -> dict[str, torch.nn.Module]:
    """What a checkpoint holds, by name (the optimizer of the same name belongs to each)."""
    return {"student": parts.split.transformer, "mlp": parts.split.mlp, "discriminator": parts.disc.heads}


def _run(cfg: Stage2Config, info: DistInfo, resume: bool, kill_after: int | None) -> RunResult:
    main = info.is_main
    run_dir = Path(cfg.run_dir)
    ckpt = checkpoint.open_run(cfg, info, resume)

    tconfig, store, batch = _data(cfg, info)
    check_cache(cfg, store.folder.name)  # before the models load
    torch.manual_seed(cfg.seed)
    parts = _load(cfg, info, tconfig, ckpt)
    rng = torch.Generator().manual_seed(cfg.seed)  # every random draw of the loop comes from here
    start = 0
    if ckpt is not None:
        state = checkpoint.load_trainer_state(ckpt)
        checkpoint.check_finite_weights(_models(parts), ckpt)
        checkpoint.restore(state, _models(parts), parts.opts, {}, rng, info)
        start = state.step
    scale = vae_scale(cfg.pipeline or cfg.model)  # the VAE the images are decoded with
    latent = (tconfig.in_channels, cfg.resolution // scale, cfg.resolution // scale)
    real = RealImages(cfg, parts.real, latent, store.folder.name, info)
    log = JsonlLog(run_dir / "log.jsonl", resume_step=start if ckpt is not None else None) if main else None
    result = RunResult(start, checkpoint=ckpt)
    local = info.rows(cfg.batch_size)

    progress = tqdm(total=cfg.max_steps, initial=start, desc="stage II", dynamic_ncols=True, disable=not main)
    for step in range(start, cfg.max_steps):
        tic = time.perf_counter()
        rows, seeds = draw(rng, cfg, len(store))  # the global batch, on every rank
        cond = batch(rows[local])
        what = phase(cfg, step)
        with autocast(cfg, info.device):
            terms = _iteration(cfg, parts, what, cond, latent, seeds[local], real, step, local, info)
        record = {"step": step + 1, "phase": what, **mean_over_ranks(terms, info)}
        record["seconds"] = round(time.perf_counter() - tic, 4)
        if main:
            log.write(record)
        checkpoint.check_finite(record, result.checkpoint, f"lower the learning rates (lr_generator "
                                f"{cfg.lr_generator:g}, lr_mlp {cfg.lr_mlp:g}, lr_discriminator {cfg.lr_discriminator:g})")
        result.records.append(record)
        result.step = step + 1
        progress.update(1)
        if (step + 1) % cfg.log_every == 0:
            progress.set_postfix({k: f"{v:.4g}" for k, v in record.items() if k.startswith("loss")})
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.max_steps:
            # a LoRA-wrapped student's state is not a diffusers model: no config.json invites loading it as one
            configs = {"student": None if cfg.lora_rank else parts.split.transformer.to_json_string()}
            result.checkpoint = checkpoint.save(cfg, step + 1, _models(parts), parts.opts, {}, rng, configs, info)
            if kill_after == step + 1:  # testing hook: die like a preempted job, no cleanup at all
                os.kill(os.getpid(), signal.SIGKILL)
    progress.close()
    if main and result.step == cfg.max_steps:
        mlp, last = parts.split.mlp, result.checkpoint
        del parts  # the final student is rebuilt unsharded on this rank: the training copies go first
        gc.collect()
        result.command = _final_outputs(cfg, run_dir / "final", mlp, last)
    return result


def _final_outputs(cfg: Stage2Config, final: Path, mlp: CompensationMLP, last: Path) -> str:
    """``final/``: the student of checkpoint ``last``, adapters merged, and the MLP; the build command. A run
    run again after it finished gets the command when ``final/`` holds exactly that checkpoint's student."""
    made_from = {"checkpoint": last.name,
                 "student_sha256": json.loads((last / checkpoint.CHECKSUMS).read_text())[f"student/{checkpoint.WEIGHTS}"]}
    if final.exists():
        if {k: read_outputs(final).get(k) for k in made_from} != made_from:
            raise UsageError(f"{final} holds the outputs of another training ({read_outputs(final) or 'unreadable'})",
                             f"move {final} away to write this run's ({last.name})")
        return build_command(final / "student", final / "mlp.safetensors", cfg.skip)
    student = student_model(cfg, last / "student" / checkpoint.WEIGHTS)
    return save_outputs(student, mlp, final, cfg.skip_range, made_from)[2]


def _data(cfg: Stage2Config, info: DistInfo) -> tuple[SimpleNamespace, EmbeddingStore,
                                                     Callable[[torch.Tensor], Conditioning]]:
    """The student's config, the prompts' cached text embeddings, and ``batch(rows)``: their conditioning (with
    the empty prompt's, for a real model under CFG) on the device."""
    prompts = read_prompts(cfg.prompts, cfg.prompt_key)
    tconfig = SimpleNamespace(**zoo.transformer_config(cfg.model))
    spec = encoder_spec(cfg.text_encoder, cfg.pipeline or cfg.model, tconfig, cfg.t5_length, info.device)
    bar = (lambda it, total: tqdm(it, total=total, desc="text embeddings", disable=not info.is_main))
    store = EmbeddingStore(build_cache(cfg.cache_dir, prompts, spec, cfg.embedding_dtype, info,
                                       batch=cfg.encode_batch, progress=bar))
    store.check_fits(tconfig)
    uncond = store.uncond()

    def batch(rows: torch.Tensor) -> Conditioning:
        emb, n = store.rows(rows), len(rows)
        return Conditioning(emb.text.to(info.device), emb.pooled.to(info.device),
                            uncond.text.expand(n, -1, -1).to(info.device), uncond.pooled.expand(n, -1).to(info.device))

    return tconfig, store, batch


def pregenerate_real(cfg: Stage2Config, shard: tuple[int, int]) -> tuple[int, int]:
    """Write the real latents of shard ``i/n`` of the run's discriminator steps to ``real_cache``; returns
    (written, shard's steps). Replays the run's draws, so shards can be made in any order, on machines with the
    same software (one process makes whole batches: the bits equal a one-process run's)."""
    if not cfg.real_cache:
        raise ConfigError("--pregenerate writes to real_cache, which is not set", "--set real_cache=PATH")
    if cfg.cpu_threads:
        torch.set_num_threads(cfg.cpu_threads)
    info = init_distributed(cfg.device)
    try:
        if info.is_distributed:
            raise ConfigError("--pregenerate runs one process per shard", "start one per shard, without torchrun")
        check_resolution(cfg.resolution, cfg.model, cfg.pipeline or cfg.model)
        tconfig, store, batch = _data(cfg, info)
        check_cache(cfg, store.folder.name)
        real_transformer = load_transformer(cfg.real_model or cfg.model).requires_grad_(False).eval().to(info.device)
        scale = vae_scale(cfg.pipeline or cfg.model)
        latent = (tconfig.in_channels, cfg.resolution // scale, cfg.resolution // scale)
        real = RealImages(cfg, SplitSD3Transformer(real_transformer, cfg.skip_range), latent, store.folder.name, info)
        rng = torch.Generator().manual_seed(cfg.seed)
        draws = [draw(rng, cfg, len(store)) for _ in range(cfg.max_steps)]
        i, n = shard
        steps = [s for s in range(cfg.max_steps) if phase(cfg, s) == "d" and s % n == i]
        with tqdm(total=len(steps), desc=f"real images {i}/{n}") as bar, autocast(cfg, info.device):
            written = real.pregenerate(steps, lambda s: (batch(draws[s][0]), draws[s][1]), bar.update)
        return written, len(steps)
    finally:
        shutdown(info)


def _iteration(cfg: Stage2Config, parts: Parts, what: str, cond: Conditioning, latent, seeds: list[int],
               real: RealImages, step: int, rows: slice, info: DistInfo) -> dict[str, float]:
    """One update of ``what``; returns its loss terms."""
    split, disc = parts.split, parts.disc
    if what == "d":
        with torch.no_grad():
            fake = parts.vae(cached_latents(split, cond, latent, seeds, cfg.eta))
            real_images = parts.vae(real.latents(step, cond, seeds, rows))
        loss = d_loss(disc.levels(real_images), disc.levels(fake), cfg.real_label)
        parts.opts["discriminator"].zero_grad(set_to_none=True)
        loss.backward()
        _average_grads(disc.trainable(), info)
        parts.opts["discriminator"].step()
        _maybe_sample(cfg, fake, step, info)
        return {"loss_d": loss.item()}
    # In the MLP warm-up the student's gradients are computed and dropped rather than switched off: FSDP2 keeps
    # the requires_grad state its units had when first run, so toggling it loses the student's later gradients.
    train_student = what == "g"
    fake = parts.vae(cached_latents(split, cond, latent, seeds, cfg.eta))
    loss_gan = g_loss(disc.levels(fake), cfg.real_label)
    loss = cfg.gan_weight * loss_gan
    terms = {"loss_g": loss_gan.item()}
    if cfg.kd_feature or cfg.kd_output:
        state = step_two(split, cond, latent, seeds, cfg.eta)
        if cfg.kd_feature:
            kd = feature_kd(split, state)
            loss = loss + cfg.kd_feature * kd
            terms["loss_kd_feature"] = kd.item()
        if cfg.kd_output:
            kd = output_kd(split, state)
            loss = loss + cfg.kd_output * kd
            terms["loss_kd_output"] = kd.item()
    parts.opts["mlp"].zero_grad(set_to_none=True)
    parts.opts["student"].zero_grad(set_to_none=True)
    loss.backward()
    parts.opts["discriminator"].zero_grad(set_to_none=True)  # D's heads got gradients through g_loss: unused
    if train_student:  # FSDP2 has averaged the student's gradients over the ranks already
        norm = torch.nn.utils.clip_grad_norm_(parts.student_params, cfg.clip_generator)
        terms["grad_norm_student"] = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
        parts.opts["student"].step()
    parts.opts["student"].zero_grad(set_to_none=True)
    if cfg.train_mlp:
        _average_grads(list(split.mlp.parameters()), info)
        parts.opts["mlp"].step()
    _maybe_sample(cfg, fake.detach(), step, info)
    return terms


def _average_grads(params: list[torch.nn.Parameter], info: DistInfo) -> None:
    """The replicated modules' gradients, averaged over the ranks (each rank's are over its equal share)."""
    if info.is_distributed:
        for p in params:
            if p.grad is not None:
                torch.distributed.all_reduce(p.grad)
                p.grad /= info.world


def _maybe_sample(cfg: Stage2Config, images: torch.Tensor, step: int, info: DistInfo) -> None:
    """Rank 0's fake images of this step as a grid, every ``sample_every`` steps."""
    if info.is_main and cfg.sample_every and (step + 1) % cfg.sample_every == 0:
        save_grid(images[:cfg.sample_count].float().cpu(), Path(cfg.run_dir) / "samples" / f"step-{step + 1:06d}.png")


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help="YAML config (see train/configs/).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a config key (repeatable).")
@click.option("--resume/--no-resume", default=True, show_default=True,
              help="Continue from run_dir's latest checkpoint when there is one.")
@click.option("--pregenerate", is_flag=True,
              help="Only write the real images of the run's discriminator steps to real_cache (with --shard).")
@click.option("--shard", default="0/1", show_default=True, metavar="I/N",
              help="With --pregenerate: this process makes the steps s with s % N == I.")
@click.option("--kill-after", type=int, default=None, hidden=True,
              help="Testing: SIGKILL this process right after writing the checkpoint of step N.")
def main(config_path, overrides, resume, pregenerate, shard, kill_after):
    """Stage II: adversarial refinement on the cached path, training the compensation MLP."""
    interrupts.install()
    with errors_reported():
        cfg = Stage2Config.load(config_path, overrides)
        if shard != "0/1" and not pregenerate:
            raise UsageError("--shard applies to --pregenerate only", "add --pregenerate, or drop --shard")
        if pregenerate:
            written, total = pregenerate_real(cfg, parse_shard(shard))
            click.echo(f"real images {shard}: {written} written, {total - written} already there, in {cfg.real_cache}")
            click.echo("PASSED")
            return
        result = run(cfg, resume=resume, kill_after=kill_after)
    if int(os.environ.get("RANK", "0")) == 0:
        click.echo(f"stage II: step {result.step}/{cfg.max_steps}; checkpoint {result.checkpoint}")
        if result.command:
            click.echo(f"build it:  {result.command}")
        click.echo("PASSED")


if __name__ == "__main__":
    main()
