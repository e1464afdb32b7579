"""The VAE decoder of SD3 as a latents -> image module, and the embedded tiny VAE."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import AutoencoderKL
from torch import nn

from ..errors import ModelLoadError
from .zoo import TINY_MODELS, model_path

SD3_SCALING, SD3_SHIFT = 1.5305, 0.0609  # SD3's VAE latent normalisation


class LatentDecoder(nn.Module):
    """``latents (B, 16, h, w)`` -> ``image (B, 3, 8h, 8w)`` in [0, 1], undoing SD3's latent scaling."""

    def __init__(self, vae: AutoencoderKL):
        super().__init__()
        self.vae = vae

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        cfg = self.vae.config
        z = latents / cfg.scaling_factor + (cfg.shift_factor or 0.0)
        image = self.vae.decode(z, return_dict=False)[0]
        return (image / 2 + 0.5).clamp(0, 1)


TINY_VAE_BLOCKS = (8, 8, 16, 16)
SD3_VAE_SCALE = 8  # SD3's and SD3.5's VAE: four blocks, three of them down-sampling


def scale_of(block_out_channels) -> int:
    """Pixels per latent of a diffusers AutoencoderKL with these blocks (diffusers' ``vae_scale_factor``)."""
    return 2 ** (len(block_out_channels) - 1)


def vae_scale(model: str) -> int:
    """Pixels per latent of ``model``'s VAE, from its ``vae/config.json``. The tiny models' VAE is built in code
    (:func:`build_tiny_vae`); a folder without a VAE (a transformer alone) is taken to be SD3's, 8."""
    if model in TINY_MODELS:
        return scale_of(TINY_VAE_BLOCKS)
    config = model_path(model) / "vae" / "config.json"
    if not config.is_file():
        return SD3_VAE_SCALE
    try:
        return scale_of(json.loads(config.read_text())["block_out_channels"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelLoadError(f"cannot read the VAE's block_out_channels from {config}: {exc!r}",
                             "restore the pipeline folder's vae/config.json") from None


def build_tiny_vae(latent_channels: int = 16, seed: int = 0) -> AutoencoderKL:
    """A tiny SD3-style VAE (8x down-sampling, 16 latent channels) with seeded random weights."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=latent_channels,
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=TINY_VAE_BLOCKS, layers_per_block=1, norm_num_groups=4,
            scaling_factor=SD3_SCALING, shift_factor=SD3_SHIFT, use_quant_conv=False, use_post_quant_conv=False,
        )
    return vae.eval()


def load_vae(folder: Path) -> AutoencoderKL:
    if not (folder / "vae").is_dir():
        raise ModelLoadError(f"{folder} has no vae/ folder", "point --model at an SD3 pipeline folder")
    try:
        # float32 whatever the files hold: the decoder runs once per image and is a float32 graph
        return AutoencoderKL.from_pretrained(folder / "vae", torch_dtype=torch.float32).float().eval()
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot load the VAE in {folder}: {exc}") from exc
