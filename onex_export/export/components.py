"""The pipeline components a build can carry beside the transformer: the text encoders (one ``text``
graph: three token-id inputs -> SD3's ``encoder_hidden_states`` and ``pooled_projections``), their
tokenizers (saved as ``tokenizer.json`` files), and the VAE decoder (``vae``: latents -> image in
[0, 1]). Components are exported in float32 whatever the transformer's precision: T5 overflows in
fp16, and the encoders run once per prompt, the decoder once per image.

Components are loaded on demand and not kept: a real pipeline's T5-XXL alone is 19 GB in float32, so a
build loads each one for its export and again for its gate check, and drops it after.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import UsageError
from ..models.text import build_tiny_text, load_text_encoder, load_tokenizers
from ..contract.tokenizers import SD3Tokenizers
from ..models.vae import LatentDecoder, build_tiny_vae, load_vae
from ..models.weights import tensors_digest
from ..models.zoo import TINY_MODELS, model_path
from . import manifest as mf
from ..contract import IH, IW, B, H, W, GraphSpec, TensorSpec, TokenizerEntry

COMPONENTS = ("text", "vae")
_FOLDERS = {"text": ("text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer", "tokenizer_2", "tokenizer_3"),
            "vae": ("vae",)}


@dataclass(frozen=True)
class Components:
    """The components of a build (``names``), loaded on demand from ``model`` (an embedded name or a pipeline
    folder); the tokenizers, small, are held."""

    model: str
    transformer_config: object
    names: tuple[str, ...]
    tokenizers: SD3Tokenizers | None

    def load(self, name: str) -> nn.Module:
        """A fresh float32 module for component ``name``: the caller owns it, and should drop it after use."""
        cfg, tiny = self.transformer_config, self.model in TINY_MODELS
        if name == "text":
            return (build_tiny_text(cfg.joint_attention_dim, cfg.pooled_projection_dim)[0] if tiny
                    else load_text_encoder(model_path(self.model)))
        if name == "vae":
            return LatentDecoder(build_tiny_vae(cfg.in_channels) if tiny else load_vae(model_path(self.model))).eval()
        raise ValueError(f"unknown component {name!r}")

    def spec(self, name: str) -> GraphSpec:
        cfg = self.transformer_config
        if name == "text":
            lc, lt = self.tokenizers.clip_l.model_max_length, self.tokenizers.t5.model_max_length
            return GraphSpec("text", (
                TensorSpec("ids_l", (B, lc), "int64"), TensorSpec("ids_g", (B, lc), "int64"),
                TensorSpec("ids_t5", (B, lt), "int64"),
            ), (
                TensorSpec("encoder_hidden_states", (B, lc + lt, cfg.joint_attention_dim), "float32"),
                TensorSpec("pooled_projections", (B, cfg.pooled_projection_dim), "float32"),
            ))
        return GraphSpec("vae", (TensorSpec("latents", (B, cfg.in_channels, H, W), "float32"),),
                         (TensorSpec("image", (B, 3, IH, IW), "float32"),))

    def digest(self, name: str) -> str:
        """The identity of a component's weights: its folders' files (a pipeline folder), or the weights of the
        module built in code (an embedded model)."""
        if self.model in TINY_MODELS:
            return tensors_digest(self.load(name).state_dict().items())
        h = hashlib.sha256()
        for folder in _FOLDERS[name]:
            root = model_path(self.model)
            for file in sorted(p for p in (root / folder).rglob("*") if p.is_file()):
                h.update(f"{file.relative_to(root)}:{file.stat().st_size}".encode())
                h.update(mf.sha256_file(file).encode())
        return h.hexdigest()

    def weight_bytes(self, name: str) -> int:
        """About the bytes of component ``name``'s float32 graph (for the disk-space check): its files are
        counted twice, as half-precision checkpoints double in float32."""
        if self.model in TINY_MODELS:
            return sum(t.numel() * 4 for t in self.load(name).state_dict().values())
        return 2 * sum(p.stat().st_size for folder in _FOLDERS[name]
                       for p in (model_path(self.model) / folder).rglob("*.safetensors") if p.is_file())

    def inputs(self, name: str, batch: int, latent: int, seed: int = 0) -> dict[str, torch.Tensor]:
        """Seeded example inputs of component ``name``, by input name."""
        if name == "text":
            tok = self.tokenizers(["a photo of a cat"] * batch)
            return {"ids_l": tok.ids_l, "ids_g": tok.ids_g, "ids_t5": tok.ids_t5}
        g = torch.Generator().manual_seed(seed)
        return {"latents": torch.randn(batch, self.transformer_config.in_channels, latent, latent, generator=g)}

    @property
    def text_length(self) -> int:
        """Tokens the text encoders give the transformer (CLIP + T5: 77 + 256 for SD3)."""
        return self.tokenizers.clip_l.model_max_length + self.tokenizers.t5.model_max_length


def available(model: str) -> bool:
    """Whether ``model`` carries text encoders and a VAE (embedded models and pipeline folders do)."""
    return model in TINY_MODELS or (model_path(model) / "text_encoder").is_dir()


def load_components(model: str, transformer_config, wanted: tuple[str, ...]) -> Components:
    """The ``wanted`` components of ``model`` (checked; loaded on demand)."""
    unknown = set(wanted) - set(COMPONENTS)
    if unknown:
        raise UsageError(f"unknown component(s) {sorted(unknown)}", f"choose from {', '.join(COMPONENTS)}")
    if wanted and not available(model):
        raise UsageError(f"{model} holds only a transformer: it has no text encoders or VAE to build",
                         "point --model at the SD3 pipeline folder, or pass --components none")
    tokenizers = None
    if "text" in wanted:
        tokenizers = (build_tiny_text(transformer_config.joint_attention_dim, transformer_config.pooled_projection_dim)[1]
                      if model in TINY_MODELS else load_tokenizers(model_path(model)))
    return Components(model, transformer_config, tuple(n for n in COMPONENTS if n in wanted), tokenizers)


def component_graphs(components: Components) -> dict[str, tuple[nn.Module, GraphSpec]]:
    """name -> (module, spec) of every component, all loaded (a runtime that keeps them)."""
    return {name: (components.load(name), components.spec(name)) for name in components.names}


def save_tokenizers(tokenizers: SD3Tokenizers, folder: Path) -> dict[str, TokenizerEntry]:
    """Write ``tokenizers/<name>/`` under the build ``folder``; the manifest's ``pipeline.tokenizers``."""
    out = {}
    for name, tok in tokenizers.items():
        target = folder / "tokenizers" / name
        tok.save_pretrained(str(target))
        out[name] = TokenizerEntry(f"tokenizers/{name}", tok.model_max_length, "max_length", True,
                                   tuple(mf.file_entry(folder, p) for p in sorted(target.iterdir())))
    return out
