"""LoRA on the Stage II student, and what Stage II hands to `onex-export build`.

The authors' release trains the student through LoRA (rank 64, alpha 64) on every joint block's attention
projections (q, k, v, out), the context stream's projections (add_q/k/v, to_add_out) and both feed-forwards,
and merges it into the weights at the end. peft supplies the adapters, through diffusers' own adapter support;
the merged model is a plain diffusers transformer again, so the build needs nothing of peft.
"""
from __future__ import annotations

import json
import shlex
from pathlib import Path

import torch

from diffusers import SD3Transformer2DModel
from torch import nn

from onex_export.config import SkipRange
from onex_export.errors import OnexError, UsageError
from onex_export.fileio import atomic_folder
from onex_export.models.compensation import CompensationMLP, save_compensation

# Module-name suffixes that get an adapter (SD3's last block has no context output projection or feed-forward:
# it is simply not matched there).
OUTPUTS = "outputs.json"  # beside the student and the MLP: what they were made from
LORA_TARGETS = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
                "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
                "ff_context.net.2")


def add_lora(transformer: SD3Transformer2DModel, rank: int = 64, alpha: float = 64.0) -> list[nn.Parameter]:
    """Wrap the target layers in LoRA adapters (B = 0: the model is unchanged until trained) and freeze the
    rest; returns the adapters' parameters, the only trainable ones."""
    from peft import LoraConfig

    if rank < 1 or alpha <= 0:
        raise UsageError(f"LoRA needs rank >= 1 and alpha > 0, got rank {rank}, alpha {alpha}",
                         "the release uses lora_rank 64, lora_alpha 64")
    transformer.requires_grad_(False)
    transformer.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(LORA_TARGETS),
                                       init_lora_weights=True))
    return [p for name, p in transformer.named_parameters() if "lora_" in name]


def merge_lora(transformer: SD3Transformer2DModel) -> SD3Transformer2DModel:
    """Fold the adapters into the weights (checked finite) and remove them: a plain diffusers model again."""
    try:
        transformer.fuse_lora(lora_scale=1.0, safe_fusing=True)
    except ValueError as exc:  # safe_fusing found non-finite merged weights
        raise OnexError(f"merging the LoRA adapters gave non-finite weights ({exc}): nothing was written",
                        "resume from an earlier checkpoint with lower learning rates") from exc
    transformer.unload_lora()
    return transformer


def build_command(student: Path, mlp: Path, skip: SkipRange | str) -> str:
    """The `onex-export build` command for Stage II's outputs."""
    return shlex.join(["onex-export", "build", "--model", str(student), "--mlp", str(mlp), "--skip", str(skip)])


def read_outputs(folder: Path) -> dict:
    """What ``folder/outputs.json`` says the outputs were made from ({} when it cannot be read)."""
    try:
        return json.loads((folder / OUTPUTS).read_text())
    except (OSError, ValueError):
        return {}


def save_outputs(transformer: SD3Transformer2DModel, mlp: CompensationMLP, folder: Path, skip: SkipRange,
                 made_from: dict | None = None) -> tuple[Path, Path, str]:
    """Write ``folder/student/`` (a diffusers transformer folder, adapters merged), ``folder/mlp.safetensors`` and
    ``folder/outputs.json`` (``made_from``: what they came from) as one folder, renamed into place complete;
    returns the two paths and the `onex-export build` command that consumes them. Nothing is overwritten."""
    if folder.exists():
        raise UsageError(f"{folder} already exists: Stage II does not overwrite finished outputs",
                         "move it away, or give the run another run_dir")
    if getattr(transformer, "peft_config", None):
        merge_lora(transformer)
    bad = [name for name, t in transformer.state_dict().items() if not torch.isfinite(t).all()]
    if bad or not all(torch.isfinite(t).all() for t in mlp.state_dict().values()):
        raise OnexError(f"the trained weights are not finite ({', '.join(bad[:3]) or 'the MLP'}): nothing was written",
                        "resume from an earlier checkpoint with lower learning rates")
    with atomic_folder(folder) as tmp:  # the student and its MLP appear together or not at all
        transformer.save_pretrained(tmp / "student", safe_serialization=True)
        save_compensation(mlp, tmp / "mlp.safetensors")
        (tmp / OUTPUTS).write_text(json.dumps({"skip": str(skip), **(made_from or {})}, indent=1) + "\n")
    student, mlp_path = folder / "student", folder / "mlp.safetensors"
    return student, mlp_path, build_command(student, mlp_path, skip)
