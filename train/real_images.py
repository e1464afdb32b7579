"""Stage II's "real" images: a multi-step model's latents from the same noise as the student's fake images.

They dominate a step's cost (8 or 28x2 passes against the student's 2), so they can be made ahead of time, in
shards, on other machines: ``python -m train.stage2 --config C --pregenerate --shard i/n`` replays the run's
draws (the same generator, the same order) and writes the latents of every discriminator step ``s`` with
``s % n == i`` to ``real_cache/step-NNNNNNN.safetensors``. A run with ``real_cache`` set reads a step's file
when it is there and makes the latents online when not; both give the same bits.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open

from onex_export.errors import UsageError
from onex_export.fileio import save_tensors_atomic
from onex_export.models import SplitSD3Transformer
from onex_export.runtime import Conditioning, TorchDenoiser, sample
from onex_export.schedule import SamplingPlan

from .distributed import DistInfo
from .stage2_config import Stage2Config


def draw(rng: torch.Generator, cfg: Stage2Config, prompts: int) -> tuple[torch.Tensor, list[int]]:
    """One step's global batch: prompt rows (B,) and one noise seed per row; every rank draws the same."""
    rows = torch.randint(prompts, (cfg.batch_size,), generator=rng)
    seeds = torch.randint(2**62, (cfg.batch_size,), generator=rng).tolist()
    return rows, seeds


def autocast(cfg: Stage2Config, device: torch.device):
    """The run's compute precision (bf16 autocast; trained weights stay fp32), the same wherever a run's
    images are made: in training, and in pre-generation."""
    if cfg.precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def fingerprint(cfg: Stage2Config, prompts_key: str) -> str:
    """What a step's real latents depend on; a cache file made for anything else is refused, not used."""
    what = {"real_model": cfg.real_model or cfg.model, "prompts": prompts_key,
            **{k: getattr(cfg, k) for k in ("real_steps", "real_guidance", "eta", "resolution", "seed", "batch_size",
                                            "precision")}}
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]


def check_cache(cfg: Stage2Config, prompts_key: str) -> None:
    """Refuse, before any model loads, a real_cache whose files were made for another run."""
    if not cfg.real_cache or not Path(cfg.real_cache).is_dir():
        return
    expected = fingerprint(cfg, prompts_key)
    for path in sorted(Path(cfg.real_cache).glob("step-*.safetensors"))[:1]:
        with safe_open(str(path), "pt") as f:
            made_for = f.metadata().get("fingerprint")
        if made_for != expected:
            raise UsageError(f"{path} was made for another run ({made_for}, this run: {expected})",
                             "pre-generate again with this config, or clear real_cache")


def parse_shard(text: str) -> tuple[int, int]:
    """``"i/n"`` -> (i, n) with 0 <= i < n."""
    try:
        i, n = (int(part) for part in text.split("/"))
    except ValueError:
        raise UsageError(f"--shard {text!r} is not i/n", "e.g. --shard 0/4 ... --shard 3/4") from None
    if not 0 <= i < n:
        raise UsageError(f"--shard {text}: i must lie in 0..{n - 1}", f"use --shard 0/{n} ... --shard {n - 1}/{n}")
    return i, n


class RealImages:
    """The real latents of a step: from ``folder`` when it holds them, else made by ``model``."""

    def __init__(self, cfg: Stage2Config, model: SplitSD3Transformer, latent_shape: tuple[int, int, int],
                 prompts_key: str, info: DistInfo):
        self.cfg, self.model, self.latent_shape, self.info = cfg, model, latent_shape, info
        self.plan = (SamplingPlan.teacher(cfg.real_steps, cfg.real_guidance) if cfg.real_guidance > 1.0
                     else SamplingPlan.student(cfg.real_steps, cfg.eta))
        self.folder = Path(cfg.real_cache) if cfg.real_cache else None
        self.fingerprint = fingerprint(cfg, prompts_key)

    def path(self, step: int) -> Path:
        return self.folder / f"step-{step:07d}.safetensors"

    @torch.no_grad()
    def make(self, cond: Conditioning, seeds: list[int]) -> torch.Tensor:
        """The real model's latents (B, C, h, w) for these rows; ``cond`` carries the empty prompt for CFG."""
        return sample(TorchDenoiser(self.model), self.plan, cond, self.latent_shape, [(s, 1) for s in seeds],
                      torch.float32, cond.text.device)

    def latents(self, step: int, cond: Conditioning, seeds: list[int], rows: slice) -> torch.Tensor:
        """Step ``step``'s (0-based) real latents of the global batch's ``rows``: read, or made now. Under torchrun
        the ranks agree first (making them is collective: a rank that saw the file while another did not would
        leave the others waiting)."""
        have = self.folder is not None and self.path(step).is_file()
        if self.info.is_distributed:
            flag = torch.tensor([int(have)], device=self.info.device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
            have = bool(flag.item())
        if not have:
            return self.make(cond, seeds)
        with safe_open(str(self.path(step)), "pt") as f:
            made_for = f.metadata().get("fingerprint")
            if made_for != self.fingerprint:
                raise UsageError(f"{self.path(step)} was made for another run ({made_for}, this run: "
                                 f"{self.fingerprint})", "pre-generate again with this config, or clear real_cache")
            return f.get_slice("latents")[rows.start:rows.stop].to(cond.text.device)

    def pregenerate(self, steps: list[int], conditioning: Callable[[int], tuple[Conditioning, list[int]]],
                    progress: Callable[[], None] = lambda: None) -> int:
        """Write the files of ``steps`` that are missing; ``conditioning(step)`` gives the step's global batch.
        Returns how many were written."""
        written = 0
        for step in steps:
            if not self.path(step).is_file():
                cond, seeds = conditioning(step)
                save_tensors_atomic({"latents": self.make(cond, seeds)}, self.path(step),
                                    {"fingerprint": self.fingerprint, "step": str(step)})
                written += 1
            progress()
        return written
