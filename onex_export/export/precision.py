"""The precision policy of exported graphs (strongly typed: the ONNX carries every type).

``fp32``: everything float32. ``fp16`` / ``bf16``: weights and activations in that type, except
- every LayerNorm (the blocks' ``norm2``/``norm2_context``, the AdaLN-Zero norms, the output norm and
  the MLP's norm) runs in float32 through diffusers' ``FP32LayerNorm``: SD3's residual stream reaches
  magnitudes whose squares overflow fp16 (max 65504), so mean/variance must be taken in float32;
- qk RMSNorm (SD3.5) already computes its variance in float32 inside diffusers;
- the ``timestep`` input stays float32 (fp16 cannot represent teacher timesteps such as 987.38, and
  diffusers' sinusoidal embedding is computed in float32 anyway).
Residual sums and the AdaLN modulation stay in the working precision: keeping them in float32 would
change diffusers' block code, which we reuse rather than copy.
"""
from __future__ import annotations

import copy

import torch
from diffusers.models.normalization import FP32LayerNorm
from torch import nn

from ..models.split import SplitSD3Transformer

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
ONNX_DTYPE_NAMES = {k: str(v).removeprefix("torch.") for k, v in PRECISIONS.items()}  # fp32 -> float32


def _to_fp32_norm(norm: nn.LayerNorm) -> FP32LayerNorm:
    affine = norm.weight is not None
    out = FP32LayerNorm(norm.normalized_shape, eps=norm.eps, elementwise_affine=affine, bias=norm.bias is not None)
    if affine:
        out.load_state_dict(norm.state_dict())
    return out


def for_precision(split: SplitSD3Transformer, precision: str) -> SplitSD3Transformer:
    """A copy of ``split`` cast to ``precision`` under the policy above (``split`` is not changed)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
    if precision == "fp32":
        return split
    out = copy.deepcopy(split)
    for module in list(out.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.LayerNorm) and not isinstance(child, FP32LayerNorm):
                setattr(module, name, _to_fp32_norm(child))
    # nn.Module.to casts parameters and buffers alike; FP32LayerNorm upcasts inside its forward.
    return nn.Module.to(out, dtype=PRECISIONS[precision])
