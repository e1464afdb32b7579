"""Timestep-aware teacher guidance (paper Sec. 3.2, Eq. (4); DESIGN.md section 2).

``v_real = v_c + (w - 1)(v_c - v_u)`` where ``sigma <= alpha``, and the purely conditional ``v_c``
above alpha: at high noise, strong guidance drives the student to collapse early onto a few modes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

# (x (B, C, H, W), sigma (B,), text (B, T, J), pooled (B, P)) -> velocity (B, C, H, W)
VelocityFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Guided:
    velocity: torch.Tensor  # (B, C, H, W)
    uncond_pass: bool  # whether the unconditional pass ran


def needs_uncond(sigma: torch.Tensor, scale: float, alpha: float) -> torch.Tensor:
    """(B,) bool: which samples get classifier-free guidance."""
    if scale == 1.0:
        return torch.zeros_like(sigma, dtype=torch.bool)
    return sigma <= alpha


def guided_velocity(
    teacher: VelocityFn,
    x: torch.Tensor,
    sigma: torch.Tensor,
    text: torch.Tensor,
    pooled: torch.Tensor,
    uncond_text: torch.Tensor,
    uncond_pooled: torch.Tensor,
    scale: float,
    alpha: float,
    run_uncond: bool | None = None,
) -> Guided:
    """The teacher's velocity with guidance only where ``sigma <= alpha``.

    Args:
        teacher: the frozen teacher's velocity function.
        x: noisy latents (B, C, H, W) at noise levels ``sigma`` (B,).
        text, pooled: the prompts' embeddings (B, T, J), (B, P); ``uncond_*`` the empty prompt's, same shapes.
        scale: guidance scale w (1 disables guidance).
        alpha: the control threshold.
        run_uncond: whether to run the unconditional pass; by default, iff some sample here needs it.
            Under FSDP every rank must run the same passes, so the trainer decides this for the global
            batch and passes it in; samples that do not need guidance keep ``v_c`` exactly either way.

    Returns:
        :class:`Guided`: the velocity (B, C, H, W) and whether the unconditional pass ran.
    """
    mask = needs_uncond(sigma, scale, alpha)
    if run_uncond is None:
        run_uncond = bool(mask.any())
    elif not run_uncond and bool(mask.any()):
        raise ValueError("run_uncond=False, but some samples have sigma <= alpha and need guidance")
    v_cond = teacher(x, sigma, text, pooled)
    if not run_uncond:
        return Guided(v_cond, False)
    v_uncond = teacher(x, sigma, uncond_text, uncond_pooled)
    v_cfg = v_cond + (scale - 1.0) * (v_cond - v_uncond)
    return Guided(torch.where(mask.view(-1, 1, 1, 1), v_cfg, v_cond), True)
