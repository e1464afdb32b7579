"""The precision policy of exported graphs (strongly typed: the ONNX carries every type).

``fp32``: everything float32. ``fp16`` / ``bf16``: weights and activations in that type, except
- every LayerNorm (the blocks' ``norm2``/``norm2_context``, the AdaLN-Zero norms, the output norm and
  the MLP's norm) runs in float32 through diffusers' ``FP32LayerNorm``: SD3's residual stream reaches
  magnitudes whose squares overflow fp16 (max 65504), so mean/variance must be taken in float32;
- qk RMSNorm (SD3.5) already computes its variance in float32 inside diffusers;
- the ``timestep`` input stays float32 (fp16 cannot represent teacher timesteps such as 987.38, and
  diffusers' sinusoidal embedding is computed in float32 anyway);
- blocks named by ``fp32_blocks`` (``--fp32-blocks 35-38``, 1-based) keep float32 weights and compute:
  the split model casts the residual streams into a block's dtype on the way in, so a run of float32
  blocks carries float32 through and casts back at its end. A run that reaches the last block also keeps
  the output norm and projection in float32, so the stream never returns to the narrow type.
Residual sums and the AdaLN modulation stay in the working precision: keeping them in float32 would
change diffusers' block code, which we reuse rather than copy.

The policy is applied in place, to a loaded model or to one still on the ``meta`` device (then the
dtypes say how :func:`~onex_export.models.weights.materialize` must cast each tensor). Nothing is copied.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.models.normalization import FP32LayerNorm
from torch import nn

from ..config import BlockRange
from ..errors import UsageError
from ..models.split import SplitSD3Transformer

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
ONNX_DTYPE_NAMES = {k: str(v).removeprefix("torch.") for k, v in PRECISIONS.items()}  # fp32 -> float32
_OUTPUT_MODULES = ("norm_out", "proj_out")


@dataclass(frozen=True)
class Fp32Blocks(BlockRange):
    """Blocks kept in float32 inside a half-precision build (``--fp32-blocks 35-38``), 1-based, inclusive."""

    option = "--fp32-blocks"


@dataclass(frozen=True)
class PrecisionPolicy:
    """Which dtype each module of a split model gets. ``fp32_blocks`` is 1-based, inclusive."""

    precision: str = "fp32"
    fp32_blocks: BlockRange | None = None

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise UsageError(f"unknown precision {self.precision!r}", f"choose one of {', '.join(PRECISIONS)}")
        if self.fp32_blocks is not None and self.precision == "fp32":
            raise UsageError("--fp32-blocks only applies to --precision fp16 or bf16",
                             "drop --fp32-blocks: an fp32 build is float32 throughout")

    @property
    def dtype(self) -> torch.dtype:
        return PRECISIONS[self.precision]

    @property
    def onnx_dtype(self) -> str:
        return ONNX_DTYPE_NAMES[self.precision]

    def validate_for(self, num_layers: int) -> "PrecisionPolicy":
        if self.fp32_blocks is not None:
            self.fp32_blocks.validate_for(num_layers)
        return self

    def block_dtype(self, index0: int) -> torch.dtype:
        """The dtype of diffusers block ``index0`` (0-based)."""
        return torch.float32 if self.fp32_blocks is not None and index0 + 1 in self.fp32_blocks else self.dtype

    def module_dtype(self, name: str, num_layers: int) -> torch.dtype:
        """The dtype of the transformer module (or checkpoint key) ``name``."""
        if name.startswith("transformer_blocks."):
            return self.block_dtype(int(name.split(".")[1]))
        if name.split(".")[0] in _OUTPUT_MODULES:
            return self.block_dtype(num_layers - 1)  # float32 when the last block is
        return self.dtype

    def to_json(self) -> dict:
        return {"precision": self.precision, "fp32_blocks": str(self.fp32_blocks) if self.fp32_blocks else None,
                "layer_norms": "float32" if self.precision != "fp32" else "float32 (all)", "timestep": "float32"}


def _fp32_norm(norm: nn.LayerNorm) -> FP32LayerNorm:
    affine = norm.weight is not None
    device = norm.weight.device if affine else torch.device("cpu")
    with torch.device(device):  # on meta for a model not loaded yet
        out = FP32LayerNorm(norm.normalized_shape, eps=norm.eps, elementwise_affine=affine, bias=norm.bias is not None)
    if affine:
        out.load_state_dict(norm.state_dict(), assign=True)
    return out


def apply_precision(split: SplitSD3Transformer, policy: PrecisionPolicy) -> SplitSD3Transformer:
    """Apply ``policy`` to ``split`` in place (LayerNorms -> FP32LayerNorm, modules cast) and return it."""
    t = split.transformer
    policy.validate_for(split.num_layers)
    if policy.precision != "fp32":
        for module in list(split.modules()):
            for name, child in list(module.named_children()):
                if isinstance(child, nn.LayerNorm) and not isinstance(child, FP32LayerNorm):
                    setattr(module, name, _fp32_norm(child))
    for name, child in t.named_children():
        if isinstance(child, nn.ModuleList):
            for i, block in enumerate(child):
                block.to(policy.module_dtype(f"{name}.{i}", split.num_layers))
        else:
            child.to(policy.module_dtype(name, split.num_layers))
    split.mlp.to(policy.dtype)
    return split
