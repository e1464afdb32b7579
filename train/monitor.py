"""What a run leaves for people to look at: ``log.jsonl`` (one JSON object per step, every loss term)
and sample grids (``samples/step-NNNNNN.png``).

Grids decode latents with the model's VAE when the teacher is a pipeline folder that has one. The
embedded tiny models have only a random-weight VAE, whose images say nothing, so their grids show the
latents crudely instead: channels 0-2 as RGB, each image min-max normalised, upscaled 8x.
"""
from __future__ import annotations

import functools
import json
import math
from pathlib import Path
from typing import Callable

import torch

from onex_export.fileio import atomic_path, save_png


class JsonlLog:
    """Appends one JSON object a line to ``path``; on resume from ``resume_step`` it first drops the
    lines of steps after it (a killed run may have logged steps its last checkpoint does not hold)."""

    def __init__(self, path: str | Path, resume_step: int | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            self.path.write_text("")
        elif self.path.exists():
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            with atomic_path(self.path) as tmp:
                tmp.write_text("".join(line + "\n" for line in kept))

    def write(self, record: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")


def read_log(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def latents_to_rgb(latents: torch.Tensor, scale: int = 8) -> torch.Tensor:
    """Crude view of latents (B, C, h, w) without a VAE: channels 0-2, min-max per image, nearest
    upscaling by ``scale`` -> (B, 3, h * scale, w * scale) in [0, 1]."""
    x = latents[:, :3].float()
    lo = x.amin(dim=(1, 2, 3), keepdim=True)
    hi = x.amax(dim=(1, 2, 3), keepdim=True)
    x = (x - lo) / (hi - lo).clamp_min(1e-8)
    return torch.nn.functional.interpolate(x, scale_factor=scale, mode="nearest")


def save_grid(images: torch.Tensor, path: str | Path, columns: int | None = None) -> Path:
    """Tile images (B, 3, H, W) in [0, 1] into one PNG, written atomically."""
    b, _, h, w = images.shape
    columns = columns or math.ceil(math.sqrt(b))
    rows = math.ceil(b / columns)
    grid = torch.zeros(3, rows * h, columns * w)
    for i in range(b):
        r, c = divmod(i, columns)
        grid[:, r * h:(r + 1) * h, c * w:(c + 1) * w] = images[i].float().cpu()
    return save_png(grid, path)


@functools.lru_cache(maxsize=2)
def make_decoder(model: str, device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
    """latents (B, C, h, w) -> images (B, 3, H, W) in [0, 1]: the pipeline folder's VAE if there is one,
    else :func:`latents_to_rgb`."""
    from onex_export.models.zoo import model_path

    folder = model_path(model)
    if not (folder / "vae" / "config.json").is_file():
        return latents_to_rgb
    from onex_export.models.vae import LatentDecoder, load_vae

    decoder = LatentDecoder(load_vae(folder)).to(device)

    @torch.no_grad()
    def decode(latents: torch.Tensor) -> torch.Tensor:
        return decoder(latents.to(device, next(decoder.parameters()).dtype)).float()

    return decode


def format_postfix(record: dict) -> dict[str, str]:
    """The progress bar's short loss summary."""
    out = {"fake": f"{record['loss_fake']:.4g}"}
    if record.get("loss_generator") is not None:
        out["gen"] = f"{record['loss_generator']:.4g}"
    return out
