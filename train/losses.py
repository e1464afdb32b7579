"""The Stage I losses, as pure functions of tensors (shapes (B, C, H, W); sigmas (B,)).

Flow matching as in DESIGN.md 2: ``x_t = (1 - s) x0 + s eps``, ``v = eps - x0``, ``x0 = x_t - s v``.

- Fake model: flow-matching velocity MSE on re-noised student samples; the target is the velocity
  that points from the student's ``x0`` through ``x_t``, ``(x_t - x0) / s`` (= ``eps - x0`` when ``x_t``
  was noised straight from ``x0``).
- Generator, ``dmd2``: the distribution-matching gradient of the paper's Eq. (2) in DMD2's form,
  ``grad = (x0_fake - x0_real) / mean|x0_hat - x0_real|`` (per sample, over C, H, W), injected through
  ``0.5 * mse(x0_hat, (x0_hat - grad).detach())`` whose gradient w.r.t. ``x0_hat`` is ``grad / numel``.
- Generator, ``trajectory``: the authors' release. The student's one step lands on ``x_next``; real and
  fake each take an Euler step over the same window from the re-noised ``x_next``, and ``x_next`` is
  pulled towards ``x_next + (real - fake)`` by a pseudo-Huber loss normalised per sample.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from onex_export.schedule import eps_from_velocity, x0_from_velocity


def per_sample(s: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, 1, 1, 1), for broadcasting over latents."""
    return s.reshape(-1, 1, 1, 1)


def noised(x0: torch.Tensor, sigma: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """``x_t = (1 - s) x0 + s n`` with per-sample ``sigma`` (B,)."""
    s = per_sample(sigma).to(x0.dtype)
    return (1.0 - s) * x0 + s * noise


def renoise(x: torch.Tensor, sigma_from: torch.Tensor, sigma_to: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The flow's forward transition from ``sigma_from`` to ``sigma_to >= sigma_from``.

    ``x_to = a x + b n`` with ``a = (1 - s_to) / (1 - s_from)`` and ``b = sqrt(s_to^2 - (a s_from)^2)``,
    so that a sample at ``s_from`` lands at ``s_to`` with the right marginal; from ``s_from = 0`` this is
    ``(1 - s) x0 + s n``.
    """
    s_from, s_to = per_sample(sigma_from).to(x.dtype), per_sample(sigma_to).to(x.dtype)
    a = (1.0 - s_to) / (1.0 - s_from)
    b = torch.sqrt((s_to * s_to - (a * s_from) ** 2).clamp_min(0.0))
    return a * x + b * noise


def x0_from(x: torch.Tensor, sigma: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``x0 = x_t - s v`` with per-sample ``sigma`` (B,)."""
    return x0_from_velocity(x, per_sample(sigma).to(x.dtype), v)


def step_to(x: torch.Tensor, v: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor, eta: float,
            noise: torch.Tensor | None) -> torch.Tensor:
    """The student step of DESIGN.md 2 with per-sample sigmas (B,):
    ``(1 - s') x0 + s' (eta eps_hat + sqrt(1 - eta^2) n)``; ``noise`` is needed only when eta < 1."""
    s, s_next = per_sample(sigma).to(x.dtype), per_sample(sigma_next).to(x.dtype)
    x0, eps = x0_from_velocity(x, s, v), eps_from_velocity(x, s, v)
    if eta < 1.0:
        eps = eta * eps + math.sqrt(1.0 - eta * eta) * noise
    return (1.0 - s_next) * x0 + s_next * eps


def euler_to(x: torch.Tensor, v: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
    """A deterministic Euler step ``x + (s' - s) v`` with per-sample sigmas (B,)."""
    return x + per_sample(sigma_next - sigma).to(x.dtype) * v


def fake_loss(v_pred: torch.Tensor, x_t: torch.Tensor, x0: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Flow-matching MSE of the fake model's ``v_pred`` at ``x_t`` (noise ``sigma``) for clean ``x0``."""
    target = (x_t - x0) / per_sample(sigma).to(x_t.dtype)
    return F.mse_loss(v_pred.float(), target.float())


def dmd_gradient(x0_hat: torch.Tensor, x0_real: torch.Tensor, x0_fake: torch.Tensor) -> torch.Tensor:
    """DMD2's normalised distribution-matching gradient w.r.t. ``x0_hat`` (B, C, H, W), no graph.

    ``(x0_fake - x0_real)`` is ``-(s_real - s_fake)`` up to a positive factor: descending it moves the
    student's samples towards the teacher's distribution. The per-sample normaliser makes the step size
    independent of how far the teacher's denoised estimate is from the sample.
    """
    with torch.no_grad():
        x0_hat, x0_real, x0_fake = x0_hat.float(), x0_real.float(), x0_fake.float()
        norm = (x0_hat - x0_real).abs().mean(dim=(1, 2, 3), keepdim=True)
        # A sample already on the teacher's estimate (norm 0) gets no push, rather than inf.
        return torch.where(norm > 0, (x0_fake - x0_real) / norm.clamp_min(1e-30), 0.0)


def dmd_loss(x0_hat: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """``0.5 * mse(x0_hat, (x0_hat - grad).detach())``: its gradient w.r.t. ``x0_hat`` is ``grad / numel``
    and its value ``0.5 * mean(grad^2)``."""
    x0_hat = x0_hat.float()
    return 0.5 * F.mse_loss(x0_hat, (x0_hat - grad).detach())


def huber_c(latent_numel: int) -> float:
    """The release's pseudo-Huber constant: 1e-3 at 64x64x4 latents, scaled with sqrt(C H W)."""
    return 1e-3 * math.sqrt(latent_numel / (64 * 64 * 4))


def trajectory_loss(x_next: torch.Tensor, real_next: torch.Tensor, fake_next: torch.Tensor) -> torch.Tensor:
    """The release's window objective: pseudo-Huber between the student's ``x_next`` (with graph) and
    ``x_next + real_next - fake_next`` (no graph), divided per sample by ``mean|x_next - real_next|``.

    (The release averages that normaliser over dims (1, 2) only, leaving one per image column; here it
    is one number per sample over C, H, W, as for ``dmd2``.)
    """
    x_next = x_next.float()
    with torch.no_grad():
        target = x_next + (real_next.float() - fake_next.float())  # exactly x_next when real == fake
        norm = (x_next - real_next.float()).abs().mean(dim=(1, 2, 3), keepdim=True)
    c = huber_c(x_next[0].numel())
    d2 = (x_next - target) ** 2
    loss = d2 / (torch.sqrt(d2 + c * c) + c)  # = sqrt(d^2 + c^2) - c, without the cancellation near 0
    return torch.where(norm > 0, loss / norm.clamp_min(1e-30), 0.0).mean()
