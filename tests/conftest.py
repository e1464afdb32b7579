"""Shared fixtures: the embedded tiny models (built in code, no downloads) and seeded inputs."""
from __future__ import annotations

import pytest
import torch

from onex_export.models import build_tiny
from onex_export.models.zoo import TINY_TEXT_LEN

# The paper's skip range for each topology (SD3-M 3-10, SD3.5-L 3-12).
PAPER_SKIPS = {"tiny-sd3": "3-10", "tiny-sd35-medium": "3-10", "tiny-sd35-large": "3-12"}


@pytest.fixture(scope="session")
def tiny_models():
    """name -> fp32 eval-mode tiny transformer; built once per session (tests must not mutate them)."""
    return {name: build_tiny(name) for name in PAPER_SKIPS}


def make_inputs(transformer, batch=2, height=16, width=16, sigma=1.0, seed=0, text_len=TINY_TEXT_LEN):
    """Seeded transformer inputs: latents (B, C, H, W), text (B, T, J), pooled (B, P), timestep (B,)."""
    g = torch.Generator().manual_seed(seed)
    cfg = transformer.config
    return (
        torch.randn(batch, cfg.in_channels, height, width, generator=g),
        torch.randn(batch, text_len, cfg.joint_attention_dim, generator=g),
        torch.randn(batch, cfg.pooled_projection_dim, generator=g),
        torch.full((batch,), 1000.0 * sigma),
    )
