"""Backward simulation (DMD2 Sec. 4.4; paper Algorithm 1 line 6): the student's training inputs are
the states its own inference reaches, so that training input = inference input.

Without gradient, the student rolls pure noise through its own schedule; each sample then picks a
step k and the student gets gradient through that one step only, from the detached state ``x_k``.
The noise is drawn exactly as :func:`onex_export.runtime.sampler.sample` draws it (``x_1`` first, then,
for eta < 1, one fresh draw after each non-final step, all from one CPU generator), and the steps are
:func:`onex_export.schedule.student_step`: with the same seed the states are the sampler's, bit for bit.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from onex_export.runtime.sampler import initial_noise
from onex_export.schedule import student_step


@dataclass(frozen=True)
class RolloutNoise:
    """The rollout's randomness for a batch: ``start`` (B, C, H, W) and, for eta < 1, one (B, C, H, W)
    draw per non-final step in ``steps``."""

    start: torch.Tensor
    steps: tuple[torch.Tensor, ...] = ()

    def rows(self, index: slice) -> "RolloutNoise":
        return RolloutNoise(self.start[index], tuple(n[index] for n in self.steps))

    def to(self, device) -> "RolloutNoise":
        return RolloutNoise(self.start.to(device), tuple(n.to(device) for n in self.steps))


def draw_rollout_noise(shape: tuple[int, ...], num_steps: int, eta: float, generator: torch.Generator) -> RolloutNoise:
    """Draw in the sampler's order: the start noise, then (eta < 1) the noise of steps 0..N-2."""
    start = initial_noise(shape, generator)
    steps = tuple(initial_noise(shape, generator) for _ in range(num_steps - 1)) if eta < 1.0 else ()
    return RolloutNoise(start, steps)


@torch.no_grad()
def backward_simulate(
    velocity: Callable[[torch.Tensor, float], torch.Tensor],
    noise: RolloutNoise,
    sigmas: tuple[float, ...],
    eta: float,
    until: int,
) -> list[torch.Tensor]:
    """Roll the student from ``noise.start`` through steps ``0..until-1``.

    Args:
        velocity: ``(x (B, C, H, W), sigma) -> v (B, C, H, W)``, the student at one noise level.
        sigmas: the student's sigmas (N,), e.g. (1.0, 0.75).
        until: the last state needed, at most N - 1 (the final step's output is not an input).

    Returns:
        ``[x_0, ..., x_until]``, each (B, C, H, W); ``x_k`` is the input of step k, at ``sigmas[k]``.
    """
    if not 0 <= until < len(sigmas):
        raise ValueError(f"until must lie in 0..{len(sigmas) - 1}, got {until}")
    x = noise.start
    states = [x]
    for k in range(until):
        v = velocity(x, sigmas[k])
        x = student_step(x, v, sigmas[k], sigmas[k + 1], eta, noise.steps[k] if eta < 1.0 else None)
        states.append(x)
    return states


@torch.no_grad()
def generate(
    velocity: Callable[[torch.Tensor, float], torch.Tensor], noise: RolloutNoise, sigmas: tuple[float, ...], eta: float
) -> torch.Tensor:
    """The student's whole schedule from ``noise`` to clean latents (B, C, H, W): what
    :func:`~onex_export.runtime.sampler.sample` computes for ``SamplingPlan.student(N, eta)``."""
    last = len(sigmas) - 1
    x = backward_simulate(velocity, noise, sigmas, eta, last)[-1]
    return student_step(x, velocity(x, sigmas[last]), sigmas[last], 0.0, eta)


def gather(states: list[torch.Tensor], steps: torch.Tensor) -> torch.Tensor:
    """Each sample's chosen state: ``out[b] = states[steps[b]][b]`` (B, C, H, W); detached."""
    stacked = torch.stack(states)  # (K, B, C, H, W)
    return stacked[steps.to(stacked.device), torch.arange(stacked.shape[1], device=stacked.device)].detach()
