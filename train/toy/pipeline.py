"""The toy world's models as an SD3 diffusers pipeline folder, so that every tool reads them as it reads a
published SD3 checkpoint (``--model DIR``): ``transformer/``, ``vae/``, ``text_encoder{,_2,_3}/``,
``tokenizer{,_2,_3}/``, ``scheduler/`` and ``model_index.json``; weights as safetensors, in ``dtype`` (fp16, as
releases ship, or fp32).
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

from onex_export.fileio import atomic_folder
from onex_export.models.text import SD3TextEncoder
from onex_export.contract.tokenizers import SD3Tokenizers
from onex_export.schedule import SHIFT

MODEL_INDEX = {
    "_class_name": "StableDiffusion3Pipeline",
    "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
    "text_encoder": ["transformers", "CLIPTextModelWithProjection"],
    "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
    "text_encoder_3": ["transformers", "T5EncoderModel"],
    "tokenizer": ["transformers", "PreTrainedTokenizerFast"],
    "tokenizer_2": ["transformers", "PreTrainedTokenizerFast"],
    "tokenizer_3": ["transformers", "PreTrainedTokenizerFast"],
    "transformer": ["diffusers", "SD3Transformer2DModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}


def save_transformer(model: SD3Transformer2DModel, folder: Path, dtype: torch.dtype = torch.float32) -> None:
    """``model`` as a diffusers transformer folder in ``dtype`` (the model itself is left as it is)."""
    # a converted copy: diffusers' save_pretrained writes the module's own tensors (a state_dict argument is ignored)
    copy.deepcopy(model).to(dtype).save_pretrained(str(folder), safe_serialization=True)


def save_pipeline(folder: Path, transformer: SD3Transformer2DModel, vae: AutoencoderKL, text: SD3TextEncoder,
                  tokenizers: SD3Tokenizers, dtype: torch.dtype = torch.float32) -> Path:
    """Write the pipeline folder atomically (a temporary sibling, then one rename); refuses an existing ``folder``."""
    with atomic_folder(folder) as tmp:
        save_transformer(transformer, tmp / "transformer", dtype)
        save_transformer(vae, tmp / "vae", dtype)
        for name, encoder in (("text_encoder", text.clip_l), ("text_encoder_2", text.clip_g),
                              ("text_encoder_3", text.t5)):
            state = {k: v.to(dtype) for k, v in encoder.state_dict().items()}
            encoder.save_pretrained(str(tmp / name), state_dict=state, safe_serialization=True)
        for name, (_, tok) in zip(("tokenizer", "tokenizer_2", "tokenizer_3"), tokenizers.items()):
            tok.save_pretrained(str(tmp / name))
        FlowMatchEulerDiscreteScheduler(shift=SHIFT).save_pretrained(str(tmp / "scheduler"))
        (tmp / "model_index.json").write_text(json.dumps({**MODEL_INDEX, "_diffusers_version": _diffusers()},
                                                         indent=2) + "\n")
    return folder


def _diffusers() -> str:
    import diffusers

    return diffusers.__version__
