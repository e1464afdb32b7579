"""Stage II's fake images, made along the inference path with the cache on (paper Sec. 3.4, Algorithm 1).

Step one is the full pass: it gives ``x_{t1}``, detached, and the two block-range deltas ``Delta_0``, which keep
their gradient (Algorithm 1, line 22: ``G(detach(x_t1), t1, f(Delta_0))``). Step two is the skipping pass for
the configured range, with gradient through the student and the compensation MLP, and gives ``x0_cache``. Both run through the runtime's own sampler and split model (``onex_export``), so the
images trained on are the images served: a test checks that they are equal.

The optional knowledge-distillation objectives of the paper's ablation (off by default) are here too:
feature level ``||Delta_1 - f(Delta_0)||^2`` (Eq. 7) and output level ``||v(x_t1) - v_cache(x_t1, f(Delta_0))||^2``
(Eq. 8), both at step two's state.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from onex_export.models import SplitSD3Transformer
from onex_export.models.split import weight_dtype
from onex_export.runtime import Conditioning, TorchDenoiser, sample
from onex_export.schedule import SamplingPlan, timestep_from_sigma


class DetachedState:
    """The runtime's PyTorch denoiser (the split model's two passes) with gradients, except through step one's
    velocity: the state ``x_t1`` it moves to is a constant of the update, the deltas are not (the runtime's
    :class:`TorchDenoiser` runs both passes without gradient)."""

    def __init__(self, split: SplitSD3Transformer):
        self.split = split

    def full(self, x, text, pooled, timestep):
        v, delta_img, delta_ctx = self.split.full(x, text, pooled, timestep)
        return v.detach(), delta_img, delta_ctx

    def skipping(self, x, text, pooled, timestep, delta_img, delta_ctx):
        return self.split.skipping(x, text, pooled, timestep, delta_img, delta_ctx)


def cached_latents(split: SplitSD3Transformer, cond: Conditioning, latent_shape: tuple[int, int, int],
                   seeds: list[int], eta: float = 1.0) -> torch.Tensor:
    """``x0_cache`` (B, C, h, w) of the 1.x schedule from each row's seeded noise, differentiable with respect
    to the student and the MLP through step two and step one's deltas. ``seeds``: one per row, as a served
    request's."""
    parameter = next(split.parameters())
    return sample(DetachedState(split), SamplingPlan.one_x(eta), cond, latent_shape,
                  [(seed, 1) for seed in seeds], parameter.dtype, parameter.device)


@dataclass
class StepTwo:
    """Step two's state of a 1.x run: ``x`` at ``sigma``, with step one's deltas (all without gradient)."""

    x: torch.Tensor
    sigma: float
    delta_img: torch.Tensor
    delta_ctx: torch.Tensor
    text: torch.Tensor
    pooled: torch.Tensor

    @property
    def timestep(self) -> torch.Tensor:
        return torch.full((self.x.shape[0],), timestep_from_sigma(self.sigma), dtype=self.x.dtype,
                          device=self.x.device)


@torch.no_grad()
def step_two(split: SplitSD3Transformer, cond: Conditioning, latent_shape: tuple[int, int, int],
             seeds: list[int], eta: float = 1.0) -> StepTwo:
    """Run step one of the 1.x schedule (the runtime's sampler, stopped after it) and keep its deltas."""
    plan = SamplingPlan.one_x(eta)
    kept = {}
    denoiser = TorchDenoiser(split)

    class Recording:
        def full(self, x, text, pooled, timestep):
            v, d_img, d_ctx = denoiser.full(x, text, pooled, timestep)
            kept.update(delta_img=d_img, delta_ctx=d_ctx, text=text, pooled=pooled)
            return v, d_img, d_ctx

        def skipping(self, x, *rest):
            kept["x"] = x
            raise _Stop

    parameter = next(split.parameters())
    try:
        sample(Recording(), plan, cond, latent_shape, [(seed, 1) for seed in seeds], parameter.dtype, parameter.device)
    except _Stop:
        pass
    return StepTwo(kept["x"], plan.sigmas[1], kept["delta_img"], kept["delta_ctx"], kept["text"], kept["pooled"])


class _Stop(Exception):
    """Ends a sampler run at step two, whose input is all that was wanted."""


def feature_kd(split: SplitSD3Transformer, state: StepTwo) -> torch.Tensor:
    """Eq. 7: ``||Delta_1 - f(Delta_0)||^2`` (mean over elements, both streams): the MLP's corrected step-one
    deltas against the range's true contribution at step two."""
    with torch.no_grad():
        _, true_img, true_ctx = split.full(state.x, state.text, state.pooled, state.timestep)
    dtype = weight_dtype(split.mlp)  # the MLP's precision, as the skipping pass casts the deltas for it
    pred_img, pred_ctx = split.mlp(state.delta_img.to(dtype), state.delta_ctx.to(dtype))
    return F.mse_loss(pred_img.float(), true_img.float()) + F.mse_loss(pred_ctx.float(), true_ctx.float())


def output_kd(split: SplitSD3Transformer, state: StepTwo) -> torch.Tensor:
    """Eq. 8: ``||v(x_t1) - v_cache(x_t1, f(Delta_0))||^2`` (mean over elements): the skipping pass's velocity
    against the full pass's, at step two's state."""
    with torch.no_grad():
        v_full = split.full(state.x, state.text, state.pooled, state.timestep)[0]
    v_cache = split.skipping(state.x, state.text, state.pooled, state.timestep, state.delta_img, state.delta_ctx)
    return F.mse_loss(v_cache.float(), v_full.float())


def velocity_error(split: SplitSD3Transformer, state: StepTwo) -> float:
    """Step two's relative velocity error of the skipping pass against the full one, ``||v_cache - v||/||v||``."""
    with torch.no_grad():
        v_full = split.full(state.x, state.text, state.pooled, state.timestep)[0].float()
        v_cache = split.skipping(state.x, state.text, state.pooled, state.timestep, state.delta_img,
                                 state.delta_ctx).float()
    return float((v_cache - v_full).norm() / v_full.norm())
