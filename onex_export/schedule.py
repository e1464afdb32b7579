"""The flow-matching math of SD3 and of the 1.x-Distill student, as pure functions (no I/O).

Conventions (DESIGN.md section 2):
- ``x_t = (1 - s) x0 + s eps``; the transformer predicts ``v = eps - x0`` and is called with
  ``timestep = 1000 * s``. Hence ``x0 = x_t - s v`` and ``eps_hat = x_t + (1 - s) v``.
- ``shift(s) = k s / (1 + (k - 1) s)`` with k = 3.
- Student step: ``x_next = (1 - s_next) x0 + s_next (eta eps_hat + sqrt(1 - eta^2) n)``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .config import SkipRange

SHIFT = 3.0
NUM_TRAIN_TIMESTEPS = 1000


def shift_sigma(sigma: float, shift: float = SHIFT) -> float:
    """SD3's timestep shift ``k s / (1 + (k - 1) s)``."""
    return shift * sigma / (1.0 + (shift - 1.0) * sigma)


def student_sigmas(num_steps: int, shift: float = SHIFT) -> tuple[float, ...]:
    """The student's sigmas ``shift(linspace(1, 0, N + 1))[:-1]``: N=2 -> (1.0, 0.75)."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    return tuple(shift_sigma(1.0 - i / num_steps, shift) for i in range(num_steps))


def teacher_sigmas(
    num_steps: int = 28, shift: float = SHIFT, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS
) -> tuple[float, ...]:
    """The teacher's sigmas, as diffusers' FlowMatchEulerDiscreteScheduler sets them for SD3.

    ``shift(linspace(1, shift(1/T), N))`` with T the number of training timesteps (diffusers shifts the
    smallest training sigma, then the inference grid); the final 0 is implied.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    low = shift_sigma(1.0 / num_train_timesteps, shift)
    if num_steps == 1:
        return (shift_sigma(1.0, shift),)
    return tuple(shift_sigma(1.0 - i * (1.0 - low) / (num_steps - 1), shift) for i in range(num_steps))


def timestep_from_sigma(sigma: float) -> float:
    """The ``timestep`` argument of the SD3 transformer for noise level ``sigma``."""
    return NUM_TRAIN_TIMESTEPS * sigma


def x0_from_velocity(x: torch.Tensor, sigma: float, v: torch.Tensor) -> torch.Tensor:
    """``x0 = x_t - s v``. Shapes: ``x``, ``v`` (B, C, H, W)."""
    return x - sigma * v


def eps_from_velocity(x: torch.Tensor, sigma: float, v: torch.Tensor) -> torch.Tensor:
    """``eps_hat = x_t + (1 - s) v``. Shapes: ``x``, ``v`` (B, C, H, W)."""
    return x + (1.0 - sigma) * v


def student_step(
    x: torch.Tensor,
    v: torch.Tensor,
    sigma: float,
    sigma_next: float,
    eta: float = 1.0,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """One student step from ``sigma`` to ``sigma_next`` (shapes (B, C, H, W)).

    ``eta = 1`` is the deterministic Euler step ``x + (s_next - s) v``; ``eta = 0`` re-noises the
    predicted ``x0`` with fresh ``noise`` like DMD2. ``noise`` is required when ``eta < 1`` and
    ``sigma_next > 0``.
    """
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta must lie in [0, 1], got {eta}")
    x0 = x0_from_velocity(x, sigma, v)
    if sigma_next == 0.0:
        return x0
    eps = eps_from_velocity(x, sigma, v)
    if eta < 1.0:
        if noise is None:
            raise ValueError("student_step with eta < 1 needs fresh `noise`")
        eps = eta * eps + math.sqrt(1.0 - eta * eta) * noise
    return (1.0 - sigma_next) * x0 + sigma_next * eps


@dataclass(frozen=True)
class SamplingPlan:
    """A sampling schedule: which sigmas, which steps skip the cached range, eta and guidance.

    Every schedule of the project (1.x-NFE, N-step student, teacher with CFG) is one plan run by the
    same sampler. A step with ``skips[i]`` reuses the deltas of the most recent full step.
    """

    name: str
    sigmas: tuple[float, ...]
    skips: tuple[bool, ...]
    eta: float = 1.0
    guidance_scale: float = 1.0

    def __post_init__(self) -> None:
        if not self.sigmas:
            raise ValueError("a sampling plan needs at least one sigma")
        if len(self.skips) != len(self.sigmas):
            raise ValueError(f"skips has {len(self.skips)} entries for {len(self.sigmas)} sigmas")
        if any(b >= a for a, b in zip(self.sigmas, self.sigmas[1:])) or not 0 < self.sigmas[-1] <= 1:
            raise ValueError(f"sigmas must decrease inside (0, 1], got {self.sigmas}")
        if self.skips[0]:
            raise ValueError("the first step must be a full step: a skipping step needs cached deltas")
        if not (math.isfinite(self.eta) and math.isfinite(self.guidance_scale)):
            raise ValueError(f"eta ({self.eta}) and guidance_scale ({self.guidance_scale}) must be finite numbers")
        if not 0.0 <= self.eta <= 1.0:
            raise ValueError(f"eta must lie in [0, 1], got {self.eta}")
        if self.guidance_scale < 1.0:
            raise ValueError(f"guidance_scale must be >= 1 (1 = no guidance), got {self.guidance_scale}")

    @classmethod
    def one_x(cls, eta: float = 1.0) -> "SamplingPlan":
        """The 1.x-NFE schedule: two student steps, the second skipping the cached range."""
        return cls("1.x-nfe", student_sigmas(2), (False, True), eta)

    @classmethod
    def student(cls, num_steps: int, eta: float = 1.0) -> "SamplingPlan":
        """An N-step student without skipping (2-step, 4-step SFD)."""
        return cls(f"{num_steps}-step", student_sigmas(num_steps), (False,) * num_steps, eta)

    @classmethod
    def teacher(cls, num_steps: int = 28, guidance_scale: float = 7.0) -> "SamplingPlan":
        """The teacher's Euler sampling with classifier-free guidance (28 x 2 NFE by default)."""
        return cls(f"teacher-{num_steps}", teacher_sigmas(num_steps), (False,) * num_steps, 1.0, guidance_scale)

    @classmethod
    def from_manifest(cls, schedule: dict) -> "SamplingPlan":
        """The plan a build's manifest records in its ``schedule`` section: what a runtime runs.

        Each step names its transformer plan, ``"full"`` or ``"skipping"``; ``sigma_next`` must agree with the
        next step's sigma (0 after the last). Raises ``ValueError`` on anything else.
        """
        plans = {"full": False, "skipping": True}
        steps = schedule["steps"]
        unknown = sorted({str(s["plan"]) for s in steps} - set(plans))
        if unknown:
            raise ValueError(f"unknown step plan(s) {unknown}: a step is 'full' or 'skipping'")
        sigmas = tuple(float(s["sigma"]) for s in steps)
        for i, step in enumerate(steps):
            expected = sigmas[i + 1] if i + 1 < len(sigmas) else 0.0
            if float(step["sigma_next"]) != expected:
                raise ValueError(f"step {i + 1} goes to sigma {step['sigma_next']}, but the next step starts at {expected}")
        return cls(str(schedule["name"]), sigmas, tuple(plans[s["plan"]] for s in steps), float(schedule["eta"]))

    def to_manifest(self, num_layers: int, skip: SkipRange) -> dict:
        """The manifest's ``schedule`` section for this plan, run by a model of ``num_layers`` blocks skipping
        ``skip``: what :meth:`from_manifest` reads back, with the step rule and NFE spelled out for a service."""
        steps = [{"sigma": sigma, "sigma_next": self.sigma_after(i), "timestep": timestep_from_sigma(sigma),
                  "plan": "skipping" if skips else "full"}
                 for i, (sigma, skips) in enumerate(zip(self.sigmas, self.skips))]
        return {
            "name": self.name, "shift": SHIFT, "eta": self.eta, "sigmas": list(self.sigmas), "steps": steps,
            "effective_nfe": self.nfe(num_layers, skip),
            "step_rule": "x0 = x - sigma*v; eps = x + (1-sigma)*v; x_next = (1-sigma_next)*x0 + "
                         "sigma_next*(eta*eps + sqrt(1-eta^2)*noise); x_next = x0 when sigma_next = 0",
            "initial_latents": "standard normal, shape (batch, in_channels, latent_height, latent_width)",
        }

    @property
    def uses_cfg(self) -> bool:
        return self.guidance_scale > 1.0

    @property
    def uses_skip(self) -> bool:
        return any(self.skips)

    def sigma_after(self, step: int) -> float:
        """The sigma that step ``step`` lands on (0 after the last step)."""
        return self.sigmas[step + 1] if step + 1 < len(self.sigmas) else 0.0

    def nfe(self, num_layers: int, skip: SkipRange | None) -> float:
        """Effective NFE: fully computed blocks over ``num_layers``, twice per step under CFG."""
        if self.uses_skip and skip is None:
            raise ValueError(f"plan {self.name!r} skips blocks but no skip range was given")
        kept = (num_layers - skip.count) / num_layers if skip is not None else 1.0
        per_pass = sum(kept if s else 1.0 for s in self.skips)
        return per_pass * (2 if self.uses_cfg else 1)
