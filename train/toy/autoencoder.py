"""Train the toy world's autoencoder: a diffusers ``AutoencoderKL`` with SD3's latent layout (16 channels, 8x
down-sampling, no quant convs), so that everything downstream (the teacher, the split, the ``vae`` graph of a
build) treats it as SD3's VAE.

    x (B, 3, 64, 64) in [-1, 1] -> posterior over z (B, 16, 8, 8) -> reconstruction

Loss: L1 + MSE on pixels, plus a small KL term that keeps the posterior a proper, smooth distribution (as SD's
VAEs are trained, minus the perceptual and adversarial terms that these flat scenes do not need). The scenes
are drawn fresh every step from the generation glyphs only. At the end the posterior means of a large sample of
scenes give SD3's latent normalisation: ``shift_factor`` = their mean, ``scaling_factor`` = 1 / their std, so that
the transformer sees latents of unit variance, as SD3's do (1.5305 / 0.0609 for SD3's own VAE).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL

from .digits import PROMPTS, scenes


@dataclass(frozen=True)
class AutoencoderConfig:
    steps: int = 1500
    batch: int = 32
    lr: float = 1e-3
    kl_weight: float = 1e-5  # per latent element, against the pixel losses' per-pixel means
    block_out_channels: tuple[int, ...] = (16, 32, 32, 32)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch < 1 or self.lr <= 0 or self.kl_weight < 0:
            raise ValueError(f"invalid autoencoder config {self}")
        if len(self.block_out_channels) != 4:
            raise ValueError("SD3's layout needs 4 blocks (3 down-samplings: 8x)")


def new_autoencoder(cfg: AutoencoderConfig) -> AutoencoderKL:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        return AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=16, down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=cfg.block_out_channels, layers_per_block=1,
            norm_num_groups=8, use_quant_conv=False, use_post_quant_conv=False)


def train_batch(step: int, batch: int, seed: int) -> torch.Tensor:
    """Step ``step``'s scenes (B, 3, 64, 64) in [-1, 1]: random prompts, generation glyphs, fresh layouts."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    ids = torch.randint(len(PROMPTS), (batch,), generator=g)
    images, _ = scenes(ids, "generation", int(torch.randint(2**31, (1,), generator=g)))
    return images * 2 - 1


def train_autoencoder(cfg: AutoencoderConfig, progress: Callable[[int, dict], None] = lambda step, info: None
                      ) -> tuple[AutoencoderKL, list[dict]]:
    """Train from scratch; returns the autoencoder (eval, latent normalisation set) and the loss log."""
    vae = new_autoencoder(cfg).train()
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.steps, eta_min=cfg.lr * 0.05)
    log = []
    torch.manual_seed(cfg.seed)  # the posterior samples
    for step in range(cfg.steps):
        x = train_batch(step, cfg.batch, cfg.seed)
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample()).sample
        l1, mse = F.l1_loss(recon, x), F.mse_loss(recon, x)
        kl = posterior.kl().mean() / posterior.mean[0].numel()
        loss = l1 + mse + cfg.kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        record = {"step": step + 1, "l1": l1.item(), "mse": mse.item(), "kl": kl.item()}
        if not all(torch.isfinite(torch.tensor(list(record.values()))).tolist()):
            raise FloatingPointError(f"autoencoder training diverged at step {step + 1}: {record}")
        log.append(record)
        progress(step + 1, record)
    vae.eval()
    set_latent_normalisation(vae, cfg.seed)
    return vae, log


@torch.no_grad()
def set_latent_normalisation(vae: AutoencoderKL, seed: int, count: int = 2048) -> None:
    """``shift_factor`` and ``scaling_factor`` from the posterior means of ``count`` generation scenes."""
    means = torch.cat([vae.encode(train_batch(10**6 + i, 256, seed)).latent_dist.mean for i in range(count // 256)])
    vae.register_to_config(shift_factor=float(means.mean()), scaling_factor=float(1.0 / means.std()))


@torch.no_grad()
def encode(vae: AutoencoderKL, images: torch.Tensor) -> torch.Tensor:
    """Images (B, 3, 64, 64) in [0, 1] -> normalised latents (B, 16, 8, 8) (posterior means), as the transformer
    sees them: ``(z - shift_factor) * scaling_factor``."""
    z = vae.encode(images * 2 - 1).latent_dist.mean
    return (z - vae.config.shift_factor) * vae.config.scaling_factor
