"""Random weights for the real architectures (SD3-Medium, SD3.5-Large), made directly in half precision.

Latency and build cost do not depend on the weight values, so benchmarks use random weights of the real
shapes. They are drawn tensor by tensor in the target dtype (never a float32 copy of the model: SD3.5-Large
is 32 GB in float32) with diffusers' default initialisation (PyTorch's uniform(+-1/sqrt(fan_in)) for linear
and convolution layers' weights and biases, times ``scale``; ones and zeros for norms) and the real sin-cos
position table. A scale below one shrinks each block's contribution to the residual streams against the
streams, as in the SD3.5-Large run that found fp16's rounding in a cut segment's deltas (``scale=0.5``). They
can go straight into a model (:func:`random_transformer`) or to disk the way published checkpoints are
(:func:`write_checkpoint`: diffusers folder, safetensors shards with an index, the position buffer in float32
beside half-precision weights).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Callable

import torch
from diffusers import AutoencoderKL, SD3Transformer2DModel
from diffusers.models.embeddings import PatchEmbed, get_2d_sincos_pos_embed
from safetensors.torch import save_file
from torch import nn

from onex_export.fileio import atomic_path, default_mode
from onex_export.models.text import SD3_T5_LENGTH, SD3TextEncoder
from onex_export.models.weights import INDEX_NAME, WEIGHTS_NAME, WeightSource, materialize, meta_transformer, top_level_prefixes

# Real architectures with random weights: latency and build cost do not depend on the weight values.
ARCHS = {
    "sd3-medium": dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
                       num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                       pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192),
    "sd35-large": dict(sample_size=128, patch_size=2, in_channels=16, num_layers=38, attention_head_dim=64,
                       num_attention_heads=38, joint_attention_dim=4096, caption_projection_dim=2432,
                       pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192, qk_norm="rms_norm"),
}
# SD3's VAE (SD3-Medium and SD3.5 share it): 16 latent channels, 8x down-sampling, 84 M parameters
SD3_VAE = dict(in_channels=3, out_channels=3, latent_channels=16, down_block_types=("DownEncoderBlock2D",) * 4,
               up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
               norm_num_groups=32, sample_size=1024, scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False,
               use_post_quant_conv=False)
# SD3's text encoders at their published sizes (the text_encoder, text_encoder_2 and text_encoder_3 configs of the
# SD3-Medium pipeline; SD3.5 ships the same three): CLIP-L 123 M, CLIP-G 695 M and T5-XXL's encoder 4.76 B parameters.
SD3_CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, projection_dim=768, num_hidden_layers=12,
                  num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu")
SD3_CLIP_G = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, projection_dim=1280, num_hidden_layers=32,
                  num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu")
SD3_T5_XXL = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                  feed_forward_proj="gated-gelu", relative_attention_num_buckets=32, relative_attention_max_distance=128)
SHARD_BYTES = 10 * 10**9  # diffusers' default max_shard_size ("10GB"): SD3-Medium is one file, SD3.5-Large two


class RandomSource(WeightSource):
    """A :class:`WeightSource` that draws each tensor of ``config``'s model on request, seeded by its name (the
    same tensor every time), in ``dtype``; linear and convolution weights and biases scaled by ``scale``; the
    position table is exact and float32."""

    def __init__(self, config: dict, dtype: torch.dtype, seed: int = 0, scale: float = 1.0):
        if not scale > 0:
            raise ValueError(f"the weight scale must be positive, got {scale}")
        self.config, self.dtype, self.seed, self.scale = config, dtype, seed, scale
        model = meta_transformer(config)
        self._make: dict[str, tuple[tuple[int, ...], Callable]] = {}
        for mname, module in model.named_modules():
            for pname, p in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
                key = f"{mname}.{pname}" if mname else pname
                self._make[key] = (tuple(p.shape), self._initializer(module, pname, p))
        self._shapes = {k: v[0] for k, v in self._make.items()}

    def _initializer(self, module: nn.Module, name: str, p: torch.Tensor) -> Callable:
        if isinstance(module, PatchEmbed) and name == "pos_embed":
            return lambda g: get_2d_sincos_pos_embed(
                module.proj.out_channels, module.pos_embed_max_size, base_size=module.base_size,
                interpolation_scale=module.interpolation_scale, output_type="pt").float().unsqueeze(0)
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            bound = self.scale / math.sqrt(math.prod(module.weight.shape[1:]))
            return lambda g: torch.empty(tuple(p.shape), dtype=self.dtype).uniform_(-bound, bound, generator=g)
        if name == "weight" and p.dim() == 1:  # LayerNorm / RMSNorm scales
            return lambda g: torch.ones(tuple(p.shape), dtype=self.dtype)
        if name == "bias":
            return lambda g: torch.zeros(tuple(p.shape), dtype=self.dtype)
        return lambda g: torch.empty(tuple(p.shape), dtype=self.dtype).normal_(generator=g)

    def keys(self) -> list[str]:
        return list(self._make)

    def get(self, key: str) -> torch.Tensor:
        seed = int.from_bytes(hashlib.sha256(f"{self.seed}:{key}".encode()).digest()[:7], "little")
        return self._make[key][1](torch.Generator().manual_seed(seed))

    def stored_dtypes(self) -> dict[str, int]:
        return {str(self.dtype).removeprefix("torch."): len(self._make) - 1, "float32": 1}

    def tensor_bytes(self, key: str) -> int:
        size = 4 if key.endswith("pos_embed.pos_embed") else torch.finfo(self.dtype).bits // 8
        return math.prod(self._shapes[key]) * size


def random_transformer(arch: str, dtype: torch.dtype, device: str = "cpu", seed: int = 0) -> SD3Transformer2DModel:
    """A real architecture with random weights, materialised in ``dtype`` on ``device`` tensor by tensor."""
    source = RandomSource(ARCHS[arch], dtype, seed)
    model = meta_transformer(ARCHS[arch])
    materialize(model, top_level_prefixes(model), source, lambda _: dtype, device)
    return model.eval()


def random_vae(seed: int = 0) -> AutoencoderKL:
    """SD3's VAE with seeded random weights (float32, diffusers' initialisation)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoencoderKL(**SD3_VAE).eval()


def random_text_encoder(dtype: torch.dtype, device: str = "cpu", seed: int = 0,
                        max_layers: int | None = None) -> SD3TextEncoder:
    """SD3's three text encoders at their published sizes with transformers' random initialisation, made directly
    in ``dtype`` on ``device`` (never a float32 copy: T5-XXL's encoder is 19 GB in float32, 9.5 in bf16).
    ``max_layers`` caps each encoder's depth (tests: real widths, few layers). Outputs (B, 77 + 256, 4096) and
    (B, 2048): the joint and pooled widths of SD3-Medium and SD3.5-Large."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    def depth(key: str, config: dict) -> dict:
        return {**config, key: min(config[key], max_layers or config[key])}

    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(seed)
        clip_l = CLIPTextModelWithProjection._from_config(CLIPTextConfig(**depth("num_hidden_layers", SD3_CLIP_L)),
                                                          dtype=dtype)
        clip_g = CLIPTextModelWithProjection._from_config(CLIPTextConfig(**depth("num_hidden_layers", SD3_CLIP_G)),
                                                          dtype=dtype)
        t5 = T5EncoderModel._from_config(T5Config(**depth("num_layers", SD3_T5_XXL)), dtype=dtype)
    return SD3TextEncoder(clip_l, clip_g, t5).eval()


def text_ids(batch: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Seeded token ids for :func:`random_text_encoder`: full-length CLIP (77) and T5 (256) rows, by input name."""
    g = torch.Generator().manual_seed(seed)
    clip = SD3_CLIP_L["max_position_embeddings"]
    return {"ids_l": torch.randint(0, SD3_CLIP_L["vocab_size"], (batch, clip), generator=g),
            "ids_g": torch.randint(0, SD3_CLIP_G["vocab_size"], (batch, clip), generator=g),
            "ids_t5": torch.randint(0, SD3_T5_XXL["vocab_size"], (batch, SD3_T5_LENGTH), generator=g)}


def write_checkpoint(config: dict, folder: Path, dtype: torch.dtype, seed: int = 0, shard_bytes: int = SHARD_BYTES,
                     progress: Callable[[str], None] = lambda _: None, scale: float = 1.0) -> Path:
    """Write a diffusers transformer folder of random weights (:class:`RandomSource`, ``scale``): ``config.json`` and
    safetensors shards of at most ``shard_bytes`` (with ``diffusion_pytorch_model.safetensors.index.json`` when
    there are several). Memory: one shard."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    meta_transformer(config).save_config(str(folder))
    source = RandomSource(config, dtype, seed, scale)
    # Plan the shards from the shapes first (the file names carry their count), then draw and write one at a time.
    shards, size = [[]], 0
    for key in source.keys():
        n = source.tensor_bytes(key)
        if shards[-1] and size + n > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += n
    if len(shards) == 1:
        names = [WEIGHTS_NAME]
    else:
        names = [f"diffusion_pytorch_model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    weight_map, total = {}, 0
    for i, (name, keys) in enumerate(zip(names, shards)):
        shard = {k: source.get(k) for k in keys}
        nbytes = sum(t.numel() * t.element_size() for t in shard.values())
        progress(f"writing {name} ({i + 1}/{len(shards)}, {nbytes / 1e9:.2f} GB)")
        with atomic_path(folder / name) as tmp:
            save_file(shard, str(tmp), metadata={"format": "pt"})
            os.chmod(tmp, default_mode())
        weight_map.update(dict.fromkeys(keys, name))
        total += nbytes
        del shard
    if len(names) > 1:
        with atomic_path(folder / INDEX_NAME) as tmp:
            tmp.write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return folder
