"""Pretrain the toy world's teacher: a diffusers ``SD3Transformer2DModel`` (24 joint blocks, SD3-Medium's topology
at width 64) trained by rectified flow on the autoencoder's latents, as SD3 itself was trained (DESIGN.md 2):

    x_t = (1 - s) x0 + s eps,   loss = || v_theta(x_t, 1000 s, text) - (eps - x0) ||^2

- ``s``: logit-normal (SD3's "lognorm(0, 1)") through the sampler's shift 3, so that training spends its effort
  where the 28-step shifted schedule and the students' sigmas {1.0, 0.75} do;
- classifier-free guidance dropout: a tenth of the rows see the empty prompt's embeddings, so that the teacher
  also learns the unconditional velocity that CFG (and Stage I's guided teacher) needs;
- an exponential moving average of the weights is the teacher that is kept (small diffusion models sample far
  better from their EMA);
- checkpoints every ``checkpoint_every`` steps and at the end (model, EMA, optimizer, step), written atomically; a
  killed run resumes from the last one and continues bit for bit, as every step's randomness comes from
  ``(seed, step)``; a finished run called again with more ``steps`` trains on from where it ended.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from diffusers import SD3Transformer2DModel

from onex_export.fileio import atomic_path
from onex_export.schedule import SHIFT, timestep_from_sigma

TEACHER_CONFIG = dict(
    sample_size=8,  # 8x8 latents: 64x64 pixels, 16 image tokens
    patch_size=2,
    in_channels=16,
    out_channels=16,
    num_layers=24,  # SD3-Medium's depth: `--skip 3-10` means what it means there
    attention_head_dim=16,
    num_attention_heads=4,
    joint_attention_dim=64,  # the toy T5's width
    caption_projection_dim=64,
    pooled_projection_dim=40,  # the toy CLIP-L + CLIP-G projections, 16 + 24
    pos_embed_max_size=8,
)


@dataclass(frozen=True)
class TeacherConfig:
    steps: int = 8000
    batch: int = 64
    # 1e-3, not 3e-4: at 3e-4 the width-64 teacher's 28x2 samples were judged correct 13% of the time after 4000
    # steps (digits at chance); at 1e-3, 77% after 4000 steps and still rising (issue 20's note)
    lr: float = 1e-3
    warmup: int = 200
    ema: float = 0.999
    cfg_dropout: float = 0.1
    checkpoint_every: int = 500
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch < 1 or self.lr <= 0 or not 0 <= self.ema < 1 or not 0 <= self.cfg_dropout < 1:
            raise ValueError(f"invalid teacher config {self}")


@dataclass(frozen=True)
class FlowData:
    """What the teacher learns from: normalised latents (n, 16, 8, 8), their prompt indices (n,), and the text
    embeddings of every prompt (P, T, J) / (P, D) and of the empty prompt (T, J) / (D,)."""

    latents: torch.Tensor
    prompt_ids: torch.Tensor
    text: torch.Tensor
    pooled: torch.Tensor
    uncond_text: torch.Tensor
    uncond_pooled: torch.Tensor


def sample_sigmas(n: int, generator: torch.Generator) -> torch.Tensor:
    """(n,) float32 sigmas in (0, 1): ``shift(sigmoid(N(0, 1)))``."""
    s = torch.sigmoid(torch.randn(n, generator=generator))
    return SHIFT * s / (1 + (SHIFT - 1) * s)


def flow_batch(data: FlowData, batch: int, cfg_dropout: float, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """One step's inputs and target: rows, noise, sigmas, conditioning (dropped to the empty prompt's with
    probability ``cfg_dropout``)."""
    rows = torch.randint(len(data.latents), (batch,), generator=generator)
    x0 = data.latents[rows]
    eps = torch.randn(x0.shape, generator=generator)
    sigma = sample_sigmas(batch, generator)
    drop = torch.rand(batch, generator=generator) < cfg_dropout
    ids = data.prompt_ids[rows]
    text = torch.where(drop.view(-1, 1, 1), data.uncond_text, data.text[ids])
    pooled = torch.where(drop.view(-1, 1), data.uncond_pooled, data.pooled[ids])
    s = sigma.view(-1, 1, 1, 1)
    return {"x_t": (1 - s) * x0 + s * eps, "target": eps - x0, "sigma": sigma, "text": text, "pooled": pooled}


def _save(path: Path, state: dict) -> None:
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def train_teacher(cfg: TeacherConfig, data: FlowData, work: Path,
                  progress: Callable[[int, dict], None] = lambda step, info: None) -> tuple[SD3Transformer2DModel, list[dict]]:
    """Train (or resume from ``work/checkpoint.pt``); returns the EMA teacher (eval) and the loss log."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = SD3Transformer2DModel(**TEACHER_CONFIG).train()
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.99), weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / cfg.warmup))
    start, log = 0, []
    ckpt = work / "checkpoint.pt"
    if ckpt.is_file():
        state = torch.load(ckpt, weights_only=False)
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        start, log = state["step"], state["log"]
    for step in range(start, cfg.steps):
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        b = flow_batch(data, cfg.batch, cfg.cfg_dropout, g)
        v = model(hidden_states=b["x_t"], encoder_hidden_states=b["text"], pooled_projections=b["pooled"],
                  timestep=timestep_from_sigma(b["sigma"]), return_dict=False)[0]
        loss = F.mse_loss(v, b["target"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        decay = min(cfg.ema, (1 + step) / (10 + step))  # a short warm-up: early weights are not averaged in
        with torch.no_grad():
            for p_ema, p in zip(ema.parameters(), model.parameters()):
                p_ema.lerp_(p, 1 - decay)
        record = {"step": step + 1, "loss": loss.item(), "grad_norm": float(norm)}
        if not (torch.isfinite(loss) and torch.isfinite(norm)):
            raise FloatingPointError(f"teacher training diverged at step {step + 1}: {record}")
        log.append(record)
        progress(step + 1, record)
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps:
            _save(ckpt, {"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                         "sched": sched.state_dict(), "step": step + 1, "log": log})
    return ema.eval(), log
