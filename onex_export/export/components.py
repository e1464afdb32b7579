"""The pipeline components a build can carry beside the transformer: the text encoders (one ``text``
graph: three token-id inputs -> SD3's ``encoder_hidden_states`` and ``pooled_projections``), their
tokenizers (saved as ``tokenizer.json`` files), and the VAE decoder (``vae``: latents -> image in
[0, 1]). Components are exported in float32 whatever the transformer's precision: T5 overflows in
fp16, and the encoders run once per prompt, the decoder once per image.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import UsageError
from ..models.text import SD3TextEncoder, SD3Tokenizers, build_tiny_text, load_text
from ..models.vae import LatentDecoder, build_tiny_vae, load_vae
from ..models.zoo import TINY_MODELS
from . import manifest as mf
from .graphs import IH, IW, B, H, W, GraphSpec, TensorSpec

COMPONENTS = ("text", "vae")


@dataclass(frozen=True)
class Components:
    text: SD3TextEncoder | None
    tokenizers: SD3Tokenizers | None
    vae: LatentDecoder | None

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(n for n in COMPONENTS if getattr(self, n) is not None)


def available(model: str) -> bool:
    """Whether ``model`` carries text encoders and a VAE (embedded models and pipeline folders do)."""
    return model in TINY_MODELS or (Path(model) / "text_encoder").is_dir()


def load_components(model: str, transformer_config, wanted: tuple[str, ...]) -> Components:
    """Build (embedded models) or load (pipeline folders) the ``wanted`` components."""
    unknown = set(wanted) - set(COMPONENTS)
    if unknown:
        raise UsageError(f"unknown component(s) {sorted(unknown)}", f"choose from {', '.join(COMPONENTS)}")
    if wanted and not available(model):
        raise UsageError(f"{model} holds only a transformer: it has no text encoders or VAE to build",
                         "point --model at the SD3 pipeline folder, or pass --components none")
    text = tokenizers = vae = None
    tiny = model in TINY_MODELS
    if "text" in wanted:
        text, tokenizers = (build_tiny_text(transformer_config.joint_attention_dim, transformer_config.pooled_projection_dim)
                            if tiny else load_text(Path(model)))
    if "vae" in wanted:
        vae = LatentDecoder(build_tiny_vae(transformer_config.in_channels) if tiny else load_vae(Path(model)))
    return Components(text, tokenizers, vae)


def text_length(components: Components) -> int:
    toks = components.tokenizers
    return toks.clip_l.model_max_length + toks.t5.model_max_length


def component_graphs(components: Components, transformer_config) -> dict[str, tuple[nn.Module, GraphSpec]]:
    """name -> (module, spec) of each component graph."""
    out = {}
    if components.text is not None:
        toks = components.tokenizers
        lc, lt = toks.clip_l.model_max_length, toks.t5.model_max_length
        spec = GraphSpec("text", (
            TensorSpec("ids_l", (B, lc), "int64"), TensorSpec("ids_g", (B, lc), "int64"),
            TensorSpec("ids_t5", (B, lt), "int64"),
        ), (
            TensorSpec("encoder_hidden_states", (B, lc + lt, transformer_config.joint_attention_dim), "float32"),
            TensorSpec("pooled_projections", (B, transformer_config.pooled_projection_dim), "float32"),
        ))
        out["text"] = (components.text.eval(), spec)
    if components.vae is not None:
        spec = GraphSpec("vae", (TensorSpec("latents", (B, transformer_config.in_channels, H, W), "float32"),),
                         (TensorSpec("image", (B, 3, IH, IW), "float32"),))
        out["vae"] = (components.vae.eval(), spec)
    return out


def component_inputs(components: Components, batch: int, latent: int, seed: int = 0) -> dict[str, dict]:
    """Seeded example inputs of each component graph, by input name."""
    out = {}
    if components.text is not None:
        tok = components.tokenizers(["a photo of a cat"] * batch)
        out["text"] = {"ids_l": tok.ids_l, "ids_g": tok.ids_g, "ids_t5": tok.ids_t5}
    if components.vae is not None:
        g = torch.Generator().manual_seed(seed)
        channels = components.vae.vae.config.latent_channels
        out["vae"] = {"latents": torch.randn(batch, channels, latent, latent, generator=g)}
    return out


def save_tokenizers(tokenizers: SD3Tokenizers, folder: Path) -> dict:
    """Write ``tokenizers/<name>/`` under the build ``folder``; the manifest's ``pipeline.tokenizers``."""
    out = {}
    for name, tok in tokenizers.items():
        target = folder / "tokenizers" / name
        tok.save_pretrained(str(target))
        out[name] = {"dir": f"tokenizers/{name}", "max_length": tok.model_max_length,
                     "padding": "max_length", "truncation": True,
                     "files": [mf.file_entry(folder, p) for p in sorted(target.iterdir())]}
    return out
