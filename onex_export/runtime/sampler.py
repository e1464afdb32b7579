"""One sampler for every schedule: 1.x-NFE, N-step student, and the teacher with CFG.

The sampler is backend-agnostic: it drives a :class:`Denoiser` (PyTorch here; ONNX Runtime and
TensorRT runners implement the same two calls) through a :class:`~onex_export.schedule.SamplingPlan`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import torch

from ..schedule import SamplingPlan, student_step, timestep_from_sigma


class Denoiser(Protocol):
    """The two calls a backend provides. Shapes as in :class:`onex_export.models.split.SplitSD3Transformer`, which
    has them too."""

    def full(self, x, text, pooled, timestep) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]: ...

    def skipping(self, x, text, pooled, timestep, delta_img, delta_ctx) -> torch.Tensor: ...


class TorchDenoiser:
    """The PyTorch reference backend over a model with the two calls (a
    :class:`~onex_export.models.split.SplitSD3Transformer`), run without gradients."""

    def __init__(self, model: Denoiser):
        self.model = model

    @torch.no_grad()
    def full(self, x, text, pooled, timestep):
        return self.model.full(x, text, pooled, timestep)

    @torch.no_grad()
    def skipping(self, x, text, pooled, timestep, delta_img, delta_ctx):
        return self.model.skipping(x, text, pooled, timestep, delta_img, delta_ctx)


@dataclass(frozen=True)
class Conditioning:
    """Text conditioning of a batch: ``text`` (B, T, joint_dim) and ``pooled`` (B, pooled_dim).

    ``uncond_*`` (same shapes) are needed only by plans with classifier-free guidance.
    """

    text: torch.Tensor
    pooled: torch.Tensor
    uncond_text: torch.Tensor | None = None
    uncond_pooled: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.text.shape[0] != self.pooled.shape[0]:
            raise ValueError(f"text batch {self.text.shape[0]} != pooled batch {self.pooled.shape[0]}")
        if (self.uncond_text is None) != (self.uncond_pooled is None):
            raise ValueError("give both uncond_text and uncond_pooled, or neither")

    @property
    def batch(self) -> int:
        return self.text.shape[0]


def initial_noise(shape: tuple[int, ...], generator: torch.Generator, dtype=torch.float32, device="cpu"):
    """The starting latents ``x_1 ~ N(0, I)``, drawn on the CPU so that a seed gives the same noise
    on every device."""
    return torch.randn(shape, generator=generator, dtype=torch.float32).to(device=device, dtype=dtype)


class _Noise:
    """Noise for a batch made of groups of rows, each group drawn from its own seeded generator: a request
    batched with others gets exactly the noise it gets alone."""

    def __init__(self, groups: list[tuple[int, int]]):
        self.groups = [(torch.Generator().manual_seed(seed), rows) for seed, rows in groups]

    def draw(self, tail: tuple[int, ...], dtype, device) -> torch.Tensor:
        return torch.cat([initial_noise((rows, *tail), g, dtype, device) for g, rows in self.groups])


def sample(
    denoiser: Denoiser,
    plan: SamplingPlan,
    cond: Conditioning,
    latent_shape: tuple[int, int, int],
    seed: int | list[tuple[int, int]],
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    on_step: Callable[[int, float], None] | None = None,
) -> torch.Tensor:
    """Run ``plan`` from pure noise and return the final latents (B, C, H, W).

    Full steps keep their deltas; a skipping step feeds the most recent ones to the skipping pass.
    Under CFG the conditional and unconditional halves run as one batch of 2B. Seeded: the same
    seed, plan and inputs give the same latents. ``seed`` is one seed for the whole batch, or
    ``[(seed, rows), ...]`` groups of consecutive rows (summing to B) each with its own seed, as batched
    requests have. ``on_step(i, sigma)`` is called after each step.
    """
    if plan.uses_cfg and cond.uncond_text is None:
        raise ValueError(f"plan {plan.name!r} uses guidance {plan.guidance_scale} but no unconditional embedding was given")
    groups = [(seed, cond.batch)] if isinstance(seed, int) else list(seed)
    if sum(rows for _, rows in groups) != cond.batch:
        raise ValueError(f"seed groups cover {sum(rows for _, rows in groups)} rows of a batch of {cond.batch}")
    noise_source = _Noise(groups)
    x = noise_source.draw(tuple(latent_shape), dtype, device)
    text, pooled = cond.text, cond.pooled
    if plan.uses_cfg:
        text = torch.cat([cond.uncond_text, cond.text])
        pooled = torch.cat([cond.uncond_pooled, cond.pooled])
    text, pooled = text.to(device=device, dtype=dtype), pooled.to(device=device, dtype=dtype)

    deltas = None
    for i, (sigma, skips) in enumerate(zip(plan.sigmas, plan.skips)):
        x_in = torch.cat([x, x]) if plan.uses_cfg else x
        timestep = torch.full((x_in.shape[0],), timestep_from_sigma(sigma), device=device, dtype=dtype)
        if skips:
            v = denoiser.skipping(x_in, text, pooled, timestep, *deltas)
        else:
            v, *deltas = denoiser.full(x_in, text, pooled, timestep)
        if plan.uses_cfg:
            v_uncond, v_cond = v.chunk(2)
            v = v_uncond + plan.guidance_scale * (v_cond - v_uncond)
        sigma_next = plan.sigma_after(i)
        noise = None
        if plan.eta < 1.0 and sigma_next > 0.0:
            noise = noise_source.draw(tuple(x.shape[1:]), dtype, device)
        x = student_step(x, v, sigma, sigma_next, plan.eta, noise)
        if on_step is not None:
            on_step(i, sigma)
    return x
