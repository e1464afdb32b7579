"""The embedded tiny models and loading of real ones from a local diffusers folder.

Tiny models keep the block topology of the real ones (block count, dual attention, qk norm, the
``context_pre_only`` last block) at a small width, and are built in code from a fixed seed: no
downloads. Real models live in the ``transformer`` subfolder of an SD3/SD3.5 pipeline folder, or in
that subfolder itself; :mod:`.weights` loads them.
"""
from __future__ import annotations

import os

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import SD3Transformer2DModel

from ..errors import ModelLoadError

TINY_SEED = 0


@dataclass(frozen=True)
class TinySpec:
    """An embedded model: a description and the diffusers config it is built from."""

    description: str
    config: dict = field(default_factory=dict)


def _tiny_config(num_layers: int, **extra) -> dict:
    return dict(
        sample_size=16,  # latent 16x16 -> 128x128 pixels, 64 image tokens
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=num_layers,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=48,
        caption_projection_dim=32,
        pooled_projection_dim=40,
        pos_embed_max_size=32,
        **extra,
    )


TINY_MODELS: dict[str, TinySpec] = {
    "tiny-sd3": TinySpec("SD3-Medium topology: 24 joint blocks, width 32", _tiny_config(24)),
    "tiny-sd35-medium": TinySpec(
        "SD3.5-Medium topology: 24 blocks, dual attention in blocks 1-13, qk RMSNorm, width 32",
        _tiny_config(24, dual_attention_layers=tuple(range(13)), qk_norm="rms_norm"),
    ),
    "tiny-sd35-large": TinySpec(
        "SD3.5-Large topology: 38 joint blocks, qk RMSNorm, width 32", _tiny_config(38, qk_norm="rms_norm")
    ),
}
TINY_TEXT_LEN = 16  # text tokens fed to tiny models (the real SD3 encoders give 77 + 256 = 333)


@dataclass(frozen=True)
class TrainedSpec:
    """An embedded trained model: an SD3 pipeline folder shipped inside the package, its compensation MLP and the
    range that MLP was trained for, and how it was made."""

    description: str
    folder: Path
    mlp: Path
    skip: str

    @property
    def prompts(self) -> Path:
        """Prompts of the model's world (one per line): the default calibration set of probes and benchmarks."""
        return self.folder / "prompts.txt"


EMBEDDED = Path(__file__).resolve().parent / "embedded"
TRAINED_MODELS: dict[str, TrainedSpec] = {
    "digits-sd3": TrainedSpec(
        "the toy world's 1.x-Distill student: SD3-Medium topology (24 blocks) at width 64, trained on digit scenes "
        "by `python -m bench.toy` (DCT + MLP, skip 3-10); 64x64 images, prompts like 'a red 7 on the left'",
        EMBEDDED / "digits-sd3", EMBEDDED / "digits-sd3" / "mlp.safetensors", "3-10"),
}
DEFAULT_MODEL = "digits-sd3"  # a model that has learned something (issue 20): images a user can read


def is_embedded(spec: str) -> bool:
    """Whether ``spec`` names a model that ships with the package (built in code or trained)."""
    return spec in TINY_MODELS or spec in TRAINED_MODELS


def model_path(spec: str) -> Path:
    """The folder a model spec names: an embedded trained model's own, or the path itself."""
    return TRAINED_MODELS[spec].folder if spec in TRAINED_MODELS else Path(spec)


def default_mlp_for(spec: str, skip) -> Path | None:
    """The compensation MLP that comes with an embedded trained model, when ``skip`` (a SkipRange) is the range it was
    trained for; None otherwise (an MLP learns one range's contribution)."""
    trained = TRAINED_MODELS.get(spec)
    return trained.mlp if trained is not None and str(skip) == trained.skip else None


def model_source(spec: str) -> str:
    """How a build or a probe records the model it was made from: an embedded name as is, a folder by its absolute
    path (so that the record means the same from any working folder)."""
    return spec if is_embedded(spec) else os.path.abspath(spec)


def build_tiny(name: str, seed: int = TINY_SEED) -> SD3Transformer2DModel:
    """Build an embedded model with weights from ``seed`` (the same on every machine)."""
    if name not in TINY_MODELS:
        raise ModelLoadError(f"unknown embedded model {name!r}", f"choose one of {', '.join(TINY_MODELS)}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = SD3Transformer2DModel(**TINY_MODELS[name].config)
    return model.eval()


def transformer_folder(spec: str) -> Path:
    """The folder of the SD3/SD3.5 transformer that ``spec`` (a pipeline folder or its ``transformer/``) names."""
    path = model_path(spec)
    if not path.exists():
        raise ModelLoadError(
            f"model {spec!r} is neither an embedded model nor an existing folder",
            f"use one of {', '.join([*TINY_MODELS, *TRAINED_MODELS])}, or the path of a local SD3/SD3.5 diffusers folder",
        )
    folder = path / "transformer" if (path / "transformer" / "config.json").is_file() else path
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise ModelLoadError(
            f"{path} holds no diffusers transformer: neither {path}/config.json nor {path}/transformer/config.json",
            "point --model at an SD3/SD3.5 pipeline folder or at its transformer subfolder",
        )
    try:
        class_name = json.loads(config_file.read_text()).get("_class_name")
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"cannot read {config_file}: {exc}") from exc
    if class_name != "SD3Transformer2DModel":
        raise ModelLoadError(
            f"{config_file} describes a {class_name!r}, not an SD3Transformer2DModel",
            "onex-export supports Stable Diffusion 3 / 3.5 transformers",
        )
    return folder


def transformer_config(spec: str) -> dict:
    """The diffusers config of an embedded model or a local transformer, without loading any weights."""
    if spec in TINY_MODELS:
        return dict(TINY_MODELS[spec].config)
    return dict(SD3Transformer2DModel.load_config(str(transformer_folder(spec))))
