"""Prompts and their text embeddings, computed once and cached on disk.

SD3's text encoders (T5-XXL alone is 4.7 B parameters) would otherwise sit in GPU memory beside three
transformers for the whole run; Stage I needs only their outputs. So the embeddings of every prompt
(and of the empty prompt, the unconditional one) are computed before training, written as
safetensors shards, and the encoders are freed.

Cache layout (``<cache>/<key>/``; the key hashes the prompts, the encoder and the storage dtype):
``index.json``, ``uncond.safetensors`` and ``shard-NNNNN.safetensors``, each with ``prompt_embeds``
(n, T, J) and ``pooled`` (n, P). Shards are written atomically and independently (by rank r the
shards r, r + W, ...), so an interrupted build resumes where it stopped.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Protocol

import torch
from safetensors import safe_open

from onex_export.errors import OnexError
from onex_export.fileio import atomic_path, save_tensors_atomic

from .config import EMBEDDING_DTYPES
from .distributed import DistInfo, barrier

CACHE_FORMAT = "onex-stage1-embeddings/1"
DTYPES = {name: getattr(torch, name) for name in EMBEDDING_DTYPES}


class DataError(OnexError):
    """A prompt file or embedding cache that cannot be used."""


def read_prompts(path: str | Path, key: str = "prompt") -> list[str]:
    """Prompts from a ``.txt`` file (one a line, blank lines skipped) or a ``.jsonl`` file (one JSON
    object a line, the prompt under ``key``)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"prompt file {path} does not exist", "set prompts: to a .txt or .jsonl file")
    lines = path.read_text(encoding="utf-8").splitlines()
    if path.suffix == ".jsonl":
        prompts = []
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{n} is not JSON: {exc.msg}") from exc
            if not isinstance(obj, dict) or not isinstance(obj.get(key), str):
                raise DataError(f"{path}:{n} has no string field {key!r}", "set prompt_key: to the prompt's field")
            prompts.append(obj[key])
    else:
        prompts = [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise DataError(f"{path} holds no prompts")
    return prompts


class TextEncoder(Protocol):
    """prompts -> ``(prompt_embeds (B, T, J), pooled (B, P))``, float32 on the CPU.

    ``fingerprint`` names the encoder and its settings: a cache built by another encoder is another cache.
    """

    fingerprint: str

    def __call__(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]: ...


class SD3Encoder:
    """onex-export's CLIP-L + CLIP-G + T5 (:mod:`onex_export.models.text`), the same encoders and
    combination as a build's ``text`` graph, so a student sees the same embeddings in training and
    in ``onex-export generate``. Tiny (built in code) for the embedded models, or a pipeline folder's."""

    def __init__(self, encoder, tokenizers, fingerprint: str, device: torch.device, dtype=torch.float32):
        self.encoder = encoder.to(device=device, dtype=dtype).eval()
        self.tokenizers, self.fingerprint, self.device = tokenizers, fingerprint, device
        self.truncated: list[str] = []  # one line per prompt that lost tokens

    @torch.no_grad()
    def __call__(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        tok = self.tokenizers(prompts)
        self.truncated.extend(tok.truncated)
        embeds, pooled = self.encoder(tok.ids_l.to(self.device), tok.ids_g.to(self.device), tok.ids_t5.to(self.device))
        return embeds.float().cpu(), pooled.float().cpu()


class DiffusersEncoder:
    """diffusers' ``StableDiffusion3Pipeline.encode_prompt``, as the authors' release encodes. Same math
    as :class:`SD3Encoder` (the tests check both give identical embeddings on the tiny encoders);
    loading a real pipeline folder is not exercised here, for want of weights."""

    def __init__(self, pipe, t5_length: int, fingerprint: str):
        self.pipe, self.t5_length, self.fingerprint = pipe, t5_length, fingerprint

    @torch.no_grad()
    def __call__(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        embeds, _, pooled, _ = self.pipe.encode_prompt(
            prompt=prompts, prompt_2=None, prompt_3=None, device=self.pipe._execution_device,
            do_classifier_free_guidance=False, max_sequence_length=self.t5_length)
        return embeds.float().cpu(), pooled.float().cpu()


@dataclass(frozen=True)
class EncoderSpec:
    """Which encoder, known before it is built: the cache key needs ``fingerprint``; ``build`` runs only
    if there is something to encode."""

    fingerprint: str
    build: Callable[[], TextEncoder]


def encoder_spec(kind: str, model: str, transformer_config, t5_length: int, device: torch.device) -> EncoderSpec:
    """``kind``: auto (tiny for embedded models, sd3 for folders), tiny, sd3 or diffusers."""
    from onex_export.models.zoo import TINY_MODELS, model_path

    if kind == "auto":
        kind = "tiny" if model in TINY_MODELS else "sd3"
    if kind == "tiny":
        j, p = transformer_config.joint_attention_dim, transformer_config.pooled_projection_dim
        fingerprint = f"onex-tiny-text:{j}x{p}:seed0"

        def build_tiny() -> TextEncoder:
            from onex_export.models.text import build_tiny_text

            return SD3Encoder(*build_tiny_text(j, p), fingerprint, device)

        return EncoderSpec(fingerprint, build_tiny)
    if model in TINY_MODELS:
        raise DataError(f"text_encoder {kind} needs a pipeline folder, but model is the embedded {model}",
                        "use text_encoder: tiny (or auto)")
    folder = model_path(model).resolve()
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if kind == "sd3":
        fingerprint = f"onex-sd3-text:{folder}:t5={t5_length}"

        def build_sd3() -> TextEncoder:
            from onex_export.models.text import load_text

            return SD3Encoder(*load_text(folder, t5_length), fingerprint, device, dtype)

        return EncoderSpec(fingerprint, build_sd3)
    fingerprint = f"diffusers-sd3-text:{folder}:t5={t5_length}"

    def build_diffusers() -> TextEncoder:
        from diffusers import StableDiffusion3Pipeline

        pipe = StableDiffusion3Pipeline.from_pretrained(str(folder), transformer=None, vae=None, torch_dtype=dtype,
                                                        local_files_only=True).to(device)
        return DiffusersEncoder(pipe, t5_length, fingerprint)

    return EncoderSpec(fingerprint, build_diffusers)


# -- the cache ----------------------------------------------------------------------------------------


def cache_key(prompts: list[str], fingerprint: str, dtype: str, shard_size: int) -> str:
    h = hashlib.sha256(json.dumps([CACHE_FORMAT, fingerprint, dtype, shard_size, prompts]).encode())
    return h.hexdigest()[:16]


def _shard_path(folder: Path, i: int) -> Path:
    return folder / f"shard-{i:05d}.safetensors"


def build_cache(root: str | Path, prompts: list[str], spec: EncoderSpec, dtype: str, info: DistInfo,
                shard_size: int = 1024, batch: int = 16,
                progress: Callable[[Iterable, int], Iterable] = lambda it, total: it) -> Path:
    """Encode ``prompts`` into ``<root>/<key>/`` unless that cache is complete; returns the folder.

    The encoder is built only if this rank has shards to write, and dropped before returning;
    ``progress(iterable, total)`` may wrap the shard loop in a progress bar.
    """
    fingerprint = spec.fingerprint
    folder = Path(root) / cache_key(prompts, fingerprint, dtype, shard_size)
    if (folder / "index.json").is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    n_shards = -(-len(prompts) // shard_size)
    mine = [i for i in range(info.rank, n_shards, info.world) if not _shard_path(folder, i).is_file()]
    need_uncond = info.is_main and not (folder / "uncond.safetensors").is_file()
    encoder = spec.build() if mine or need_uncond else None
    store = DTYPES[dtype]
    for i in progress(mine, len(mine)):
        chunk = prompts[i * shard_size:(i + 1) * shard_size]
        parts = [encoder(chunk[j:j + batch]) for j in range(0, len(chunk), batch)]
        embeds = torch.cat([p[0] for p in parts]).to(store)
        pooled = torch.cat([p[1] for p in parts]).to(store)
        save_tensors_atomic({"prompt_embeds": embeds, "pooled": pooled}, _shard_path(folder, i),
                            {"first": str(i * shard_size), "count": str(len(chunk))})
    if need_uncond:
        embeds, pooled = encoder([""])  # the unconditional embedding is the empty prompt's
        save_tensors_atomic({"prompt_embeds": embeds.to(store), "pooled": pooled.to(store)},
                            folder / "uncond.safetensors", {"prompt": ""})
    truncated = len(getattr(encoder, "truncated", []))
    del encoder  # the encoders' memory goes back before the transformers load
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    barrier(info)
    if info.is_main:
        with safe_open(str(_shard_path(folder, 0)), "pt") as f:
            t_len, j_dim = f.get_slice("prompt_embeds").get_shape()[1:]
            p_dim = f.get_slice("pooled").get_shape()[1]
        index = {"format": CACHE_FORMAT, "encoder": fingerprint, "dtype": dtype, "count": len(prompts),
                 "shard_size": shard_size, "shards": n_shards, "text_shape": [t_len, j_dim], "pooled_dim": p_dim,
                 "truncated_on_rank0": truncated}
        with atomic_path(folder / "index.json") as tmp:
            tmp.write_text(json.dumps(index, indent=1))
    barrier(info)
    return folder


@dataclass(frozen=True)
class Embeddings:
    text: torch.Tensor  # (B, T, J) float32
    pooled: torch.Tensor  # (B, P) float32


class EmbeddingStore:
    """Reads rows of a built cache; tensors come back float32 on the CPU."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        try:
            self.index = json.loads((self.folder / "index.json").read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise DataError(f"{self.folder} is not a complete embedding cache: {exc}",
                            "delete it; the next run rebuilds it") from exc
        if self.index.get("format") != CACHE_FORMAT:
            raise DataError(f"{self.folder} has cache format {self.index.get('format')!r}, expected {CACHE_FORMAT}")

    def __len__(self) -> int:
        return self.index["count"]

    def check_fits(self, transformer_config) -> None:
        j, p = self.index["text_shape"][1], self.index["pooled_dim"]
        if (j, p) != (transformer_config.joint_attention_dim, transformer_config.pooled_projection_dim):
            raise DataError(f"cached embeddings are {j}/{p} wide but the model takes "
                            f"{transformer_config.joint_attention_dim}/{transformer_config.pooled_projection_dim}",
                            "use the text encoders of the model's own pipeline")

    def rows(self, indices: torch.Tensor) -> Embeddings:
        """The embeddings of prompts ``indices`` (B,) int64, in that order."""
        size = self.index["shard_size"]
        text, pooled = [], []
        for i in indices.tolist():
            with safe_open(str(_shard_path(self.folder, i // size)), "pt") as f:
                r = i % size
                text.append(f.get_slice("prompt_embeds")[r:r + 1])
                pooled.append(f.get_slice("pooled")[r:r + 1])
        return Embeddings(torch.cat(text).float(), torch.cat(pooled).float())

    def uncond(self) -> Embeddings:
        """The empty prompt's embeddings, (1, T, J) and (1, P)."""
        with safe_open(str(self.folder / "uncond.safetensors"), "pt") as f:
            return Embeddings(f.get_tensor("prompt_embeds").float(), f.get_tensor("pooled").float())
