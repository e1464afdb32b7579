"""The schedules the quality benchmark compares, and the images they make, in PyTorch (the reference the
engines are checked against): same prompts, same seeds, same text encoders and VAE for all.

The text encoders run once over the prompts and are dropped before a transformer is loaded; the teacher's
transformer is dropped before the student's is loaded (a real T5-XXL, teacher and student are never in
memory together).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Iterator

import torch

from onex_export.config import SkipRange
from onex_export.errors import OnexError, UsageError
from onex_export.models.text import SD3_TEXT_LENGTH
from onex_export.export.components import available, load_components
from onex_export.export.precision import PRECISIONS
from onex_export.fileio import to_uint8
from onex_export.models import DEFAULT_MODEL, SplitSD3Transformer, load_compensation, load_transformer
from onex_export.models.vae import LatentDecoder, vae_scale
from onex_export.models.weights import transformer_source
from onex_export.probe.run import DEFAULT_PROMPTS, encode_prompts
from onex_export.runtime import Conditioning, TorchDenoiser, sample
from onex_export.schedule import SamplingPlan


@dataclass(frozen=True)
class Schedule:
    """One row of the comparison. ``name`` is the one `bench.latency` gives the same schedule."""

    name: str
    plan: SamplingPlan
    teacher: bool = False  # the teacher's weights (else the student's)
    mlp: bool = False  # the trained compensation MLP corrects the reused deltas (else plain reuse)

    @property
    def latency_name(self) -> str:
        """The `bench.latency` row that times it: the MLP runs in every 1.x step there."""
        return self.name.removesuffix(" + MLP")


def schedules(student_steps: int, skip: SkipRange, with_mlp: bool, guidance: float = 7.0,
              teacher_steps: int = 28) -> list[Schedule]:
    """Teacher (N x 2 with CFG), the N-step student, 2-step, 1.x with plain reuse and, with an MLP, 1.x with it."""
    rows = [Schedule(f"teacher {teacher_steps}x2", SamplingPlan.teacher(teacher_steps, guidance), teacher=True)]
    rows += [Schedule(f"{n}-step", SamplingPlan.student(n)) for n in dict.fromkeys((student_steps, 2))]
    rows.append(Schedule(f"1.x skip {skip}", SamplingPlan.one_x()))
    if with_mlp:
        rows.append(Schedule(f"1.x skip {skip} + MLP", SamplingPlan.one_x(), mlp=True))
    return rows


@dataclass(frozen=True)
class QualityConfig:
    """What to compare: ``model`` (the distilled student: embedded name or local pipeline folder) against
    ``teacher`` (default: the same weights), on ``prompts`` x ``seeds`` seeds (0..seeds-1)."""

    model: str = DEFAULT_MODEL
    teacher: str | None = None
    mlp: Path | None = None  # the trained compensation MLP for ``skip``; None: no "+ MLP" row
    skip: SkipRange = field(default_factory=lambda: SkipRange.parse("3-10"))
    prompts: tuple[str, ...] = DEFAULT_PROMPTS
    seeds: int = 4  # per prompt: the paper's LPIPS diversity uses 4
    student_steps: int = 4
    teacher_steps: int = 28
    guidance: float = 7.0
    resolution: int | None = None  # pixels; None: the model's native size
    dtype: str = "fp32"
    device: str = "cpu"
    # for a folder holding only a transformer (random weights written like a release): seeded random text
    # embeddings of SD3's shapes and a random SD3 VAE stand in for the pipeline's, to measure time and memory
    # at real size; the images are noise
    random_components: bool = False

    def __post_init__(self) -> None:
        if not self.prompts:
            raise UsageError("no prompt given", "pass --prompts FILE with one prompt per line")
        if self.seeds < 1 or self.student_steps < 1 or self.teacher_steps < 1:
            raise UsageError(f"seeds ({self.seeds}), --student-steps ({self.student_steps}) and --teacher-steps "
                             f"({self.teacher_steps}) must be 1 or more")
        if self.dtype not in PRECISIONS:
            raise UsageError(f"unknown dtype {self.dtype!r}", f"choose one of {', '.join(PRECISIONS)}")
        if not math.isfinite(self.guidance):
            raise UsageError(f"--guidance {self.guidance} is not a finite number", "e.g. 7.0 for SD3-Medium")
        if self.guidance <= 1.0:
            raise UsageError(f"--guidance {self.guidance} turns the teacher's CFG off (it needs a scale above 1)",
                             "use the teacher's scale, e.g. 7.0 for SD3-Medium")
        if self.mlp is not None and not Path(self.mlp).exists():
            raise UsageError(f"--mlp {self.mlp} does not exist", "pass the compensation MLP's safetensors file")

    @property
    def teacher_model(self) -> str:
        return self.teacher or self.model


class Renderer:
    """Checks on construction (loading nothing); :meth:`prepare` encodes the prompts and loads the VAE; then
    :meth:`render` gives one schedule's images prompt by prompt."""

    def __init__(self, config: QualityConfig, log: Callable[[str], None] = lambda _: None):
        self.config, self.log = config, log
        cfg_dict, _ = transformer_source(config.model)
        self.cfg = SimpleNamespace(**cfg_dict)
        if config.teacher is not None:
            teacher_cfg, _ = transformer_source(config.teacher)
            if (teacher_cfg["joint_attention_dim"], teacher_cfg["in_channels"]) != (
                    self.cfg.joint_attention_dim, self.cfg.in_channels):
                raise UsageError(f"the teacher {config.teacher} does not take the student's text and latents",
                                 "pass the teacher the student was distilled from")
        config.skip.validate_for(self.cfg.num_layers)
        self.vae_scale = vae_scale(config.model)
        self.resolution = config.resolution or self.cfg.sample_size * self.vae_scale
        step = self.vae_scale * self.cfg.patch_size
        if self.resolution % step:
            raise UsageError(f"resolution {self.resolution} is not a multiple of {step}",
                             f"use {max(step, self.resolution // step * step)}")
        if not config.random_components and not available(config.model):
            raise UsageError(f"{config.model} holds only a transformer: images need its text encoders and VAE",
                             "point --model at the SD3 pipeline folder (text_encoder*, tokenizer*, vae), or pass "
                             "--random-components to measure time and memory with random ones")
        self.text: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.vae: LatentDecoder | None = None
        self._loaded: tuple[str, torch.nn.Module] | None = None

    def prepare(self) -> None:
        """Encode the prompts and, last, the empty prompt (the teacher's unconditional branch, as SD3's pipeline
        has it; the text encoders are dropped after), then load the VAE onto the device."""
        start = time.perf_counter()
        random = self.config.random_components
        self.text = encode_prompts(self.config.model, self.cfg, (*self.config.prompts, ""), random)
        if random:
            from bench.random_weights import random_vae

            vae = LatentDecoder(random_vae()).eval()
            self.log(f"text      random embeddings ({SD3_TEXT_LENGTH} tokens) and a random SD3 VAE: the images are noise")
        else:
            vae = load_components(self.config.model, self.cfg, ("vae",)).load("vae")
            self.log(f"text      {len(self.config.prompts)} prompt(s) encoded in {time.perf_counter() - start:.1f} s")
        self.vae = vae.to(self.config.device)

    def _transformer(self, spec: str) -> torch.nn.Module:
        """The transformer of ``spec``, in the configured precision; the previous one is dropped first."""
        if self._loaded is None or self._loaded[0] != spec:
            self._loaded = None
            start = time.perf_counter()
            transformer = load_transformer(spec, PRECISIONS[self.config.dtype], self.config.device)
            self._loaded = (spec, transformer)
            self.log(f"loaded    {spec} in {time.perf_counter() - start:.1f} s")
        return self._loaded[1]

    def denoiser(self, schedule: Schedule) -> TorchDenoiser:
        transformer = self._transformer(self.config.teacher_model if schedule.teacher else self.config.model)
        mlp = load_compensation(self.config.mlp, transformer) if schedule.mlp else None  # None: plain reuse
        split = SplitSD3Transformer(transformer, self.config.skip, mlp)
        return TorchDenoiser(split.to(device=self.config.device, dtype=PRECISIONS[self.config.dtype]))

    @torch.no_grad()
    def render(self, schedule: Schedule, on_step: Callable[[int, float], None] | None = None
               ) -> Iterator[tuple[str, torch.Tensor]]:
        """(prompt, images (S, H, W, 3) uint8) per prompt, seeds 0..S-1 as the rows; ``on_step(i, sigma)`` after
        each sampling step."""
        denoiser = self.denoiser(schedule)
        seeds = self.config.seeds
        uncond_text, uncond_pooled = self.text[-1]
        latent = self.resolution // self.vae_scale
        for prompt, (text, pooled) in zip(self.config.prompts, self.text):
            cond = Conditioning(text=text.expand(seeds, -1, -1), pooled=pooled.expand(seeds, -1),
                                uncond_text=uncond_text.expand(seeds, -1, -1) if schedule.plan.uses_cfg else None,
                                uncond_pooled=uncond_pooled.expand(seeds, -1) if schedule.plan.uses_cfg else None)
            latents = sample(denoiser, schedule.plan, cond, (self.cfg.in_channels, latent, latent),
                             [(seed, 1) for seed in range(seeds)], PRECISIONS[self.config.dtype], self.config.device,
                             on_step)
            images = self.vae(latents.float()).cpu()
            if not torch.isfinite(images).all():
                raise OnexError(f"{schedule.name} made non-finite images for {prompt!r}",
                                "check the weights; in fp16 try --dtype bf16 or fp32")
            yield prompt, to_uint8(images)
