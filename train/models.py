"""The three transformers of Stage I (paper Algorithm 1, lines 1-2) and how they are called.

- ``teacher`` (mu_real): the pretrained SD3/SD3.5 transformer, frozen; bf16 weights under bf16.
- ``student`` (G) and ``fake`` (mu_fake): start as copies of the teacher, or from a checkpoint on
  resume; trained, so their weights (the optimizer's master copy) stay fp32 and bf16 is autocast.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import SD3Transformer2DModel

from onex_export.models import load_transformer
from onex_export.schedule import timestep_from_sigma

from .distributed import DistInfo, shard
from .guidance import VelocityFn

AUTOCAST = {"fp32": None, "bf16": torch.bfloat16}


@dataclass
class Transformers:
    teacher: SD3Transformer2DModel
    student: SD3Transformer2DModel
    fake: SD3Transformer2DModel
    config_json: str  # the diffusers config.json of the student and fake, as the checkpoints write it


def load_transformers(model: str, precision: str, gradient_checkpointing: bool, info: DistInfo,
                      resume: Path | None = None) -> Transformers:
    """Load the teacher; copy it (or load the checkpoint's) into student and fake; shard under torchrun.

    Each copy is sharded (and so moved to its device) before the next is made, which bounds host
    memory to about two fp32 copies per process.
    """
    base = load_transformer(model)  # fp32, eval, on CPU
    config_json = base.to_json_string()

    def trainable(folder: str) -> SD3Transformer2DModel:
        net = load_transformer(str(resume / folder)) if resume is not None else copy.deepcopy(base)
        net.requires_grad_(True).train()
        if gradient_checkpointing:
            net.enable_gradient_checkpointing()
        return _place(net, info)

    student = trainable("student")
    fake = trainable("fake")
    teacher = base.requires_grad_(False).eval()
    if precision == "bf16":
        teacher = teacher.to(torch.bfloat16)  # frozen: no master copy needed
    teacher = _place(teacher, info)
    return Transformers(teacher, student, fake, config_json)


def _place(net: SD3Transformer2DModel, info: DistInfo) -> SD3Transformer2DModel:
    """Onto this process's device: sharded under torchrun (fully_shard moves each shard there)."""
    return shard(net, info) if info.is_distributed else net.to(info.device)


def velocity_fn(model: SD3Transformer2DModel, precision: str) -> VelocityFn:
    """``(x (B, C, H, W), sigma (B,), text (B, T, J), pooled (B, P)) -> v (B, C, H, W)`` in float32.

    ``timestep = 1000 * sigma`` is formed in float64 and rounded once to float32, as the sampler forms
    it from a Python float, so training and inference give the model bit-identical timesteps.
    """
    dtype = AUTOCAST[precision]

    def velocity(x: torch.Tensor, sigma: torch.Tensor, text: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        timestep = timestep_from_sigma(sigma.to(torch.float64)).to(device=x.device, dtype=torch.float32)
        with torch.autocast(device_type=x.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            v = model(hidden_states=x, encoder_hidden_states=text, pooled_projections=pooled, timestep=timestep,
                      return_dict=False)[0]
        return v.float()

    return velocity
