"""Images of a toy-world model under a schedule, through the runtime's own sampler and split model (what a build
serves), judged by the judge: the measurement every row of the toy report is made of.

Shapes: images (B, 3, 64, 64) in [0, 1], B = prompts x seeds, prompt-major; seeds 0..S-1 (plus an offset per
evaluation set), each row with its own seeded noise, as a served request.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch

from onex_export.config import SkipRange
from onex_export.export.components import load_components
from onex_export.models import SplitSD3Transformer, load_compensation, load_transformer
from onex_export.models.weights import transformer_source
from onex_export.probe.run import encode_prompts
from onex_export.runtime import Conditioning, TorchDenoiser, sample
from onex_export.schedule import SamplingPlan
from train.toy.digits import PROMPTS, Prompt

CHUNK = 240  # rows per sampler call: bounds memory, keeps each call's batch large


@dataclass(frozen=True)
class Schedule:
    """A row of the report: a plan, and whether its skipping steps go through the trained MLP."""

    name: str
    plan: SamplingPlan
    mlp: bool = False

    def nfe(self, num_layers: int, skip: SkipRange) -> float:
        return self.plan.nfe(num_layers, skip if self.plan.uses_skip else None)


def teacher_schedule(steps: int, guidance: float) -> Schedule:
    return Schedule(f"teacher {steps}x2 (CFG {guidance:g})", SamplingPlan.teacher(steps, guidance))


STUDENT_2, ONE_X = Schedule("2-step", SamplingPlan.student(2)), Schedule("1.x plain reuse", SamplingPlan.one_x())
ONE_X_MLP = Schedule("1.x + MLP", SamplingPlan.one_x(), mlp=True)


class Evaluator:
    """Text embeddings of the prompts and the VAE of a toy pipeline folder, loaded once; models come and go."""

    def __init__(self, pipeline: Path, prompts: tuple[Prompt, ...] = PROMPTS):
        self.pipeline, self.prompts = str(pipeline), prompts
        cfg, _ = transformer_source(self.pipeline)
        self.cfg = SimpleNamespace(**cfg)
        encoded = encode_prompts(self.pipeline, self.cfg, (*(p.text for p in prompts), ""), False)
        self.text = torch.cat([t for t, _ in encoded[:-1]])
        self.pooled = torch.cat([p for _, p in encoded[:-1]])
        self.uncond_text, self.uncond_pooled = encoded[-1]
        self.vae = load_components(self.pipeline, self.cfg, ("vae",)).load("vae")

    @torch.no_grad()
    def images(self, transformer: str, schedule: Schedule, seeds: int, seed_offset: int = 0,
               skip: SkipRange | None = None, mlp: Path | None = None) -> torch.Tensor:
        """(P x seeds, 3, 64, 64) images of ``transformer`` (a diffusers folder) under ``schedule``."""
        model = load_transformer(transformer)
        skip = skip or SkipRange.parse("3-10")
        split = SplitSD3Transformer(model, skip, load_compensation(mlp, model) if schedule.mlp else None)
        rows = torch.arange(len(self.prompts)).repeat_interleave(seeds)
        noise_seeds = [seed_offset + s for s in range(seeds)] * len(self.prompts)
        latent = (self.cfg.in_channels, self.cfg.sample_size, self.cfg.sample_size)
        out = []
        for start in range(0, len(rows), CHUNK):
            r = rows[start:start + CHUNK]
            n = len(r)
            cond = Conditioning(self.text[r], self.pooled[r], self.uncond_text.expand(n, -1, -1),
                                self.uncond_pooled.expand(n, -1))
            latents = sample(TorchDenoiser(split), schedule.plan, cond, latent,
                             [(s, 1) for s in noise_seeds[start:start + CHUNK]])
            out.append(self.vae(latents))
        images = torch.cat(out)
        if not torch.isfinite(images).all():
            raise FloatingPointError(f"{transformer} made non-finite images under {schedule.name}")
        return images

    def prompt_list(self, seeds: int) -> list[Prompt]:
        """The prompt of each row of :meth:`images`."""
        return [p for p in self.prompts for _ in range(seeds)]
