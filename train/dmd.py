"""One Stage I iteration: paper Algorithm 1, lines 4-17 (structure-focused distribution matching).

1. Backward simulation: roll the student from noise without gradient; each sample picks a step k and
   starts from the state ``x_k`` that inference would give it.
2. Generator update (every ``fake_updates_per_generator`` iterations): one student step with
   gradient from ``x_k``; a DMD timestep drawn by importance in step k's window; guided teacher and
   fake velocities there; the ``dmd2`` or ``trajectory`` loss; clip; AdamW.
3. Fake update (every iteration): the student's detached sample re-noised uniformly in the same
   window; flow-matching loss; clip; AdamW.

All randomness of an iteration is drawn for the global batch, on the CPU, from one generator whose
state the checkpoint keeps; each rank takes its rows (so a run is the same on any number of ranks).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

from .config import Stage1Config
from .distributed import DistInfo
from .guidance import VelocityFn, guided_velocity, needs_uncond
from .importance import TimestepSampler
from .losses import (dmd_gradient, dmd_loss, euler_to, fake_loss, noised, renoise, step_to, trajectory_loss,
                     x0_from)
from .simulation import RolloutNoise, backward_simulate, draw_rollout_noise, gather


@dataclass(frozen=True)
class Draws:
    """An iteration's randomness. Shapes for a batch of B: indices (B,), noise (B, C, H, W)."""

    rollout: RolloutNoise  # backward simulation, in the sampler's order
    prompts: torch.Tensor  # prompt index per sample
    steps: torch.Tensor  # student step k per sample, uniform over 0..N-1
    dmd_index: torch.Tensor  # grid index of the generator's DMD timestep (importance, step k's window)
    dmd_noise: torch.Tensor
    step_noise: torch.Tensor | None  # the student's own step noise when eta < 1
    fake_index: torch.Tensor  # grid index of the fake model's timestep (uniform, step k's window)
    fake_noise: torch.Tensor

    def rows(self, index: slice) -> "Draws":
        def cut(t):
            return None if t is None else t[index]

        return replace(self, rollout=self.rollout.rows(index), prompts=cut(self.prompts), steps=cut(self.steps),
                       dmd_index=cut(self.dmd_index), dmd_noise=cut(self.dmd_noise), step_noise=cut(self.step_noise),
                       fake_index=cut(self.fake_index), fake_noise=cut(self.fake_noise))


def draw(rng: torch.Generator, batch: int, latent: tuple[int, int, int], num_prompts: int, num_steps: int, eta: float,
         dmd_sampler: TimestepSampler, fake_sampler: TimestepSampler) -> Draws:
    """Draw one iteration's randomness for the global ``batch`` of latents ``latent`` (C, H, W)."""
    shape = (batch, *latent)
    rollout = draw_rollout_noise(shape, num_steps, eta, rng)  # first, so that the states are the sampler's
    prompts = torch.randint(num_prompts, (batch,), generator=rng)
    steps = torch.randint(num_steps, (batch,), generator=rng)
    dmd_index = dmd_sampler.sample(steps, rng)
    dmd_noise = torch.randn(shape, generator=rng)
    step_noise = torch.randn(shape, generator=rng) if eta < 1.0 else None
    fake_index = fake_sampler.sample(steps, rng)
    fake_noise = torch.randn(shape, generator=rng)
    return Draws(rollout, prompts, steps, dmd_index, dmd_noise, step_noise, fake_index, fake_noise)


@dataclass(frozen=True)
class Batch:
    """This rank's conditioning: ``text`` (b, T, J), ``pooled`` (b, P), and the empty prompt's, same shapes."""

    text: torch.Tensor
    pooled: torch.Tensor
    uncond_text: torch.Tensor
    uncond_pooled: torch.Tensor


@dataclass
class Parts:
    """What an iteration works on."""

    cfg: Stage1Config
    student: nn.Module
    fake: nn.Module
    student_v: VelocityFn
    fake_v: VelocityFn
    teacher_v: VelocityFn
    opt_generator: torch.optim.Optimizer
    opt_fake: torch.optim.Optimizer
    sched_generator: torch.optim.lr_scheduler.LRScheduler
    sched_fake: torch.optim.lr_scheduler.LRScheduler
    sigmas: tuple[float, ...]  # the student's (N,)
    grid: torch.Tensor  # the DMD grid, float64 (1000,)


def _update(loss: torch.Tensor, model: nn.Module, opt, sched, max_norm: float) -> float:
    """Backward, clip the gradient norm, step; returns the norm before clipping."""
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


def iteration(p: Parts, batch: Batch, draws: Draws, info: DistInfo, update_generator: bool) -> dict:
    """Run one iteration on this rank's rows of the global ``draws``; returns this rank's metrics."""
    cfg, dev = p.cfg, batch.text.device
    run_uncond = bool(needs_uncond(p.grid[draws.dmd_index], cfg.guidance_scale, cfg.guidance_alpha).any())
    until = int(draws.steps.max())  # global: under FSDP every rank must make the same forward calls
    d = draws.rows(info.rows(draws.steps.shape[0]))
    table = torch.tensor([*p.sigmas, 0.0], dtype=torch.float64, device=dev)
    k = d.steps.to(dev)
    s_k, s_next = table[k], table[k + 1]
    t, t_fake = p.grid[d.dmd_index].to(dev), p.grid[d.fake_index].to(dev)
    text, pooled = batch.text, batch.pooled
    step_noise = d.step_noise.to(dev) if d.step_noise is not None else None

    # 1. backward simulation: no gradient; the chosen state is detached (training input = inference input)
    def student_at(x, sigma: float):
        return p.student_v(x, torch.full((x.shape[0],), sigma, dtype=torch.float64, device=dev), text, pooled)

    states = backward_simulate(student_at, d.rollout.to(dev), p.sigmas, cfg.eta, until)
    x_in = gather(states, k)

    # 2. the generator: gradient through this one step only
    metrics: dict = {"uncond_pass": False}
    with torch.set_grad_enabled(update_generator):
        v = p.student_v(x_in, s_k, text, pooled)
        x0_hat = x0_from(x_in, s_k, v)
        x_next = step_to(x_in, v, s_k, s_next, cfg.eta, step_noise)
    if update_generator:
        loss_g, uncond = generator_loss(p, batch, x0_hat, x_next, s_next, t, d.dmd_noise.to(dev), run_uncond)
        metrics.update(loss_generator=float(loss_g.detach()), uncond_pass=uncond, sigma_dmd=float(t.mean()),
                       grad_norm_generator=_update(loss_g, p.student, p.opt_generator, p.sched_generator,
                                                   cfg.clip_generator))
    x0_hat, x_next = x0_hat.detach(), x_next.detach()

    # 3. the fake model learns the student's current distribution (flow matching on its samples)
    noise = d.fake_noise.to(dev)
    x_f = noised(x0_hat, t_fake, noise) if cfg.objective == "dmd2" else renoise(x_next, s_next, t_fake, noise)
    loss_f = fake_loss(p.fake_v(x_f, t_fake, text, pooled), x_f, x0_hat, t_fake)
    metrics.update(loss_fake=float(loss_f.detach()), sigma_fake=float(t_fake.mean()),
                   grad_norm_fake=_update(loss_f, p.fake, p.opt_fake, p.sched_fake, cfg.clip_fake))
    return metrics


def generator_loss(p: Parts, batch: Batch, x0_hat: torch.Tensor, x_next: torch.Tensor, s_next: torch.Tensor,
                   t: torch.Tensor, noise: torch.Tensor, run_uncond: bool) -> tuple[torch.Tensor, bool]:
    """The generator's loss at DMD timesteps ``t`` (b,) (``x0_hat``, ``x_next`` (b, C, H, W) carry the
    student's graph). Returns the loss and whether the teacher's unconditional pass ran."""
    cfg = p.cfg
    with torch.no_grad():
        x_t = noised(x0_hat, t, noise) if cfg.objective == "dmd2" else renoise(x_next, s_next, t, noise)
        real = guided_velocity(p.teacher_v, x_t, t, batch.text, batch.pooled, batch.uncond_text,
                               batch.uncond_pooled, cfg.guidance_scale, cfg.guidance_alpha, run_uncond)
        v_fake = p.fake_v(x_t, t, batch.text, batch.pooled)
        if cfg.objective == "dmd2":
            grad = dmd_gradient(x0_hat, x0_from(x_t, t, real.velocity), x0_from(x_t, t, v_fake))
        else:
            real_next, fake_next = euler_to(x_t, real.velocity, t, s_next), euler_to(x_t, v_fake, t, s_next)
    if cfg.objective == "dmd2":
        return dmd_loss(x0_hat, grad), real.uncond_pass
    return trajectory_loss(x_next, real_next, fake_next), real.uncond_pass
