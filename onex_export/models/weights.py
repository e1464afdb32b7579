"""Where a transformer's weights come from, and loading them with exactly the dtypes asked for.

A published SD3/SD3.5 checkpoint is a diffusers folder of safetensors: one file
(``diffusion_pytorch_model.safetensors``) or shards listed by ``*.safetensors.index.json``, usually in
fp16 or bf16 and sometimes mixed (a half-precision model keeps its sin-cos position buffer in fp32).
``from_pretrained(torch_dtype=...)`` does not guarantee the dtype for such files, and it materialises the
whole model at once. Here the model is built on the ``meta`` device (no memory) and tensors are read one
at a time from the files, cast to the dtype each module should have, and assigned in place:

- :func:`load_transformer` loads a whole model in one dtype (peak memory: the model in that dtype);
- :func:`materialize` / :func:`release` load and drop a few modules of a meta model, so that a build can
  export, and a gate can check, a model larger than memory one graph or one block at a time.
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import json
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch
from diffusers import SD3Transformer2DModel
from safetensors import SafetensorError, safe_open
from torch import nn

from ..config import SkipRange
from ..errors import ModelLoadError, WeightMismatchError
from .compensation import CompensationMLP, is_mlp_key, load_compensation
from .split import SplitSD3Transformer
from .zoo import TINY_MODELS, build_tiny, transformer_folder

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
INDEX_NAME = WEIGHTS_NAME + ".index.json"
_SAFETENSORS_DTYPES = {"F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64"}
DTypeOf = Callable[[str], torch.dtype]  # checkpoint key -> the dtype its tensor should have


def tensors_digest(tensors: Iterable[tuple[str, torch.Tensor]]) -> str:
    """sha256 over the name, dtype, shape and bytes of each ``(name, tensor)`` in order: the identity of those
    weights (any shapes and dtypes; tensors on any device)."""
    h = hashlib.sha256()
    for name, t in tensors:
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()


def module_nbytes(module: nn.Module) -> int:
    """Bytes of ``module``'s parameters and buffers at their current dtypes (works on the ``meta`` device)."""
    return sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))


class WeightSource:
    """A transformer's tensors by checkpoint key (``transformer_blocks.3.attn.to_q.weight``), as stored."""

    def keys(self) -> list[str]:
        raise NotImplementedError

    def get(self, key: str) -> torch.Tensor:
        raise NotImplementedError

    def __contains__(self, key: str) -> bool:
        return key in self._key_set()

    def _key_set(self) -> set[str]:
        if not hasattr(self, "_keys_cache"):
            self._keys_cache = set(self.keys())
        return self._keys_cache

    def under(self, prefixes: Iterable[str]) -> list[str]:
        """The keys of the modules named by ``prefixes`` (``"transformer_blocks.3"``, ``"pos_embed"``)."""
        heads = tuple(f"{p}." for p in prefixes)
        return sorted(k for k in self.keys() if k.startswith(heads))

    def digest(self, prefixes: Iterable[str]) -> str:
        """sha256 over the name, dtype, shape and bytes of every stored tensor under ``prefixes``: the
        identity of those weights, whatever dtype they are later cast to."""
        return tensors_digest((key, self.get(key)) for key in self.under(prefixes))

    def stored_dtypes(self) -> dict[str, int]:
        """dtype name -> number of tensors stored in it (a mixed checkpoint lists several)."""
        raise NotImplementedError

    def shape(self, key: str) -> tuple[int, ...]:
        """The stored shape of ``key``, without reading its data."""
        raise NotImplementedError


class StateDictSource(WeightSource):
    """Tensors held in memory (the embedded tiny models)."""

    def __init__(self, state: dict[str, torch.Tensor]):
        self.state = state

    def keys(self) -> list[str]:
        return list(self.state)

    def get(self, key: str) -> torch.Tensor:
        return self.state[key]

    def stored_dtypes(self) -> dict[str, int]:
        return _count(str(t.dtype).removeprefix("torch.") for t in self.state.values())

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.state[key].shape)


class SafetensorsSource(WeightSource):
    """A diffusers folder's safetensors files, read one tensor at a time. Each read opens and closes its file:
    a mapping kept open would count every page read so far as resident memory of the process."""

    def __init__(self, files: list[Path]):
        self.files = files
        self._where: dict[str, Path] = {}
        self._dtypes: dict[str, str] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        for file in files:
            with self._open(file) as handle:
                for key in handle.keys():
                    if key in self._where:
                        raise ModelLoadError(f"tensor {key!r} is stored twice: in {self._where[key].name} and {file.name}",
                                             "keep one copy of the checkpoint in the folder")
                    self._where[key] = file
                    header = handle.get_slice(key)
                    stored = str(header.get_dtype()).upper()
                    self._dtypes[key] = _SAFETENSORS_DTYPES.get(stored, stored.lower())
                    self._shapes[key] = tuple(header.get_shape())

    @classmethod
    def from_folder(cls, folder: Path) -> "SafetensorsSource":
        return cls(weight_files(folder))

    @staticmethod
    @contextlib.contextmanager
    def _open(file: Path):
        try:
            with safe_open(str(file), framework="pt") as handle:
                yield handle
        except (OSError, SafetensorError) as exc:
            raise ModelLoadError(f"cannot read {file} as safetensors: {exc}",
                                 "is the file complete? re-download or re-save the checkpoint") from exc

    def keys(self) -> list[str]:
        return list(self._where)

    def get(self, key: str) -> torch.Tensor:
        with self._open(self._where[key]) as handle:
            return handle.get_tensor(key)

    def stored_dtypes(self) -> dict[str, int]:
        return _count(self._dtypes.values())

    def shape(self, key: str) -> tuple[int, ...]:
        return self._shapes[key]


def _count(names: Iterable[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for n in names:
        out[n] = out.get(n, 0) + 1
    return out


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a diffusers model folder: the shards its index lists, or its one file."""
    index = folder / INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ModelLoadError(f"cannot read the shard index {index}: {exc}", "re-save the checkpoint") from exc
        files = [folder / name for name in dict.fromkeys(weight_map.values())]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ModelLoadError(f"{index.name} lists shards that are not in {folder}: {', '.join(missing)}",
                                 "copy every shard of the checkpoint into the folder")
        return files
    if (folder / WEIGHTS_NAME).is_file():
        return [folder / WEIGHTS_NAME]
    if list(folder.glob("*.bin")):
        raise ModelLoadError(f"{folder} holds only pickle (.bin) weights, which onex-export does not read",
                             "convert them: SD3Transformer2DModel.from_pretrained(folder).save_pretrained(folder, "
                             "safe_serialization=True)")
    found = sorted(folder.glob("*.safetensors"))
    if len(found) == 1:
        return found
    if not found:
        raise ModelLoadError(f"no safetensors weights in {folder}",
                             f"expected {WEIGHTS_NAME} or shards with {INDEX_NAME} (diffusers' save_pretrained)")
    raise ModelLoadError(f"{folder} holds several safetensors files ({', '.join(f.name for f in found)}) and no "
                         f"{INDEX_NAME} saying which belong together", "keep one checkpoint per folder")


def transformer_source(spec: str) -> tuple[dict, WeightSource]:
    """(diffusers config, weight source) of an embedded model (built in code) or a local folder."""
    if spec in TINY_MODELS:
        model = build_tiny(spec)
        return dict(model.config), StateDictSource(model.state_dict())
    folder = transformer_folder(spec)
    config = dict(SD3Transformer2DModel.load_config(str(folder)))
    return config, SafetensorsSource.from_folder(folder)


def meta_transformer(config: dict) -> SD3Transformer2DModel:
    """The model of ``config`` with every tensor on the ``meta`` device: its structure, no memory."""
    with torch.device("meta"):
        model = SD3Transformer2DModel.from_config(config)
    return model.eval().to("meta")


def materialize(root: nn.Module, prefixes: Iterable[str], source: WeightSource, dtype_of: DTypeOf,
                device: str | torch.device = "cpu") -> None:
    """Load the modules of ``root`` named by ``prefixes`` from ``source``, each tensor cast to
    ``dtype_of(key)`` on ``device``; the rest of ``root`` is left as it is (on ``meta``, say)."""
    for prefix in prefixes:
        module = root.get_submodule(prefix)
        state = {}
        for name, ref in module.state_dict(keep_vars=True).items():
            key = f"{prefix}.{name}"
            if key not in source:
                raise WeightMismatchError(f"the checkpoint has no tensor {key!r}, which its config's model needs",
                                          "the weights do not belong to this config.json: re-save the checkpoint")
            t = source.get(key)
            if tuple(t.shape) != tuple(ref.shape):
                raise WeightMismatchError(f"checkpoint tensor {key!r} has shape {tuple(t.shape)}, the model of its "
                                          f"config expects {tuple(ref.shape)}",
                                          "the weights do not belong to this config.json: re-save the checkpoint")
            state[name] = t.to(device=device, dtype=dtype_of(key), copy=True)  # own, aligned memory
        module.load_state_dict(state, strict=True, assign=True)
        leftover = [n for n, t in (*module.named_parameters(), *module.named_buffers()) if t.is_meta]
        if leftover:
            raise WeightMismatchError(f"{prefix}: no stored value for {', '.join(leftover)}",
                                      "the checkpoint must hold every parameter and buffer of the model")


def release(root: nn.Module, prefixes: Iterable[str]) -> None:
    """Drop the tensors of the modules named by ``prefixes`` (back to ``meta``), freeing their memory, and hand
    that memory back to the operating system (:func:`return_freed_memory`)."""
    for prefix in prefixes:
        root.get_submodule(prefix).to("meta")
    return_freed_memory()


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL(None).malloc_trim  # glibc
    except (OSError, AttributeError):
        return None


def return_freed_memory() -> None:
    """Give the C heap's free memory back to the operating system (glibc's ``malloc_trim``; nothing elsewhere).

    glibc maps a large allocation of its own and unmaps it when freed, but after the first such free it raises
    that threshold to the freed size (up to 32 MiB): from then on tensors of up to that size (SD3.5-Large's
    2432 x 2432 float32 weights, 23 MiB; activations) come from its heaps, which it shrinks only from their top.
    A streamed reference that loads and drops every block so kept its freed memory resident: on SD3.5-Large's blocks
    at 1024 px the gate's reference grew from 1.0 to 3.4 GiB over 11 blocks, and to 1.9 GiB when trimmed after each
    module (the rest is what it keeps: 0.85 GiB of records)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@contextlib.contextmanager
def materialized(root: nn.Module, prefixes: Iterable[str], source: WeightSource, dtype_of: DTypeOf,
                 device: str | torch.device = "cpu") -> Iterator[None]:
    """:func:`materialize` for the duration of a ``with`` block, then :func:`release`."""
    prefixes = list(prefixes)
    try:
        materialize(root, prefixes, source, dtype_of, device)
        yield
    finally:
        release(root, prefixes)


def top_level_prefixes(model: nn.Module) -> list[str]:
    """The module names that together cover every tensor of ``model``: its children, blocks one by one."""
    out = []
    for name, child in model.named_children():
        if isinstance(child, nn.ModuleList):
            out += [f"{name}.{i}" for i in range(len(child))]
        else:
            out.append(name)
    return out


def check_keys(model: nn.Module, source: WeightSource) -> None:
    """Refuse a checkpoint whose tensors are not exactly the model's (its config.json describes another model:
    weights would be missing, or silently left out). MLP weights stored beside the transformer are allowed."""
    expected, stored = set(model.state_dict()), set(source.keys())
    missing = sorted(expected - stored)
    unexpected = sorted(k for k in stored - expected if not is_mlp_key(k))
    if missing or unexpected:
        raise WeightMismatchError(
            f"the checkpoint does not match the model its config.json describes: {len(missing)} tensor(s) missing"
            f"{' (e.g. ' + ', '.join(missing[:3]) + ')' if missing else ''}, {len(unexpected)} not in the model"
            f"{' (e.g. ' + ', '.join(unexpected[:3]) + ')' if unexpected else ''}",
            "the weights do not belong to this config.json (qk_norm, dual_attention_layers, num_layers?): re-save "
            "the checkpoint with diffusers' save_pretrained")
    wrong = [(k, source.shape(k), tuple(t.shape)) for k, t in model.state_dict().items() if source.shape(k) != tuple(t.shape)]
    if wrong:  # found from the files' headers now, not after minutes of exporting the graphs before it
        key, stored, wanted = wrong[0]
        raise WeightMismatchError(
            f"{len(wrong)} checkpoint tensor(s) have another shape than the model of its config.json: e.g. {key!r} "
            f"has {stored}, the model expects {wanted}",
            "the weights do not belong to this config.json (widths, joint_attention_dim?): re-save the checkpoint")


def load_transformer(spec: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
                     ) -> SD3Transformer2DModel:
    """An embedded model by name, or a diffusers SD3/SD3.5 transformer folder, with every parameter and
    buffer in ``dtype`` whatever the files hold (fp16, bf16, fp32 or mixed; one file or shards)."""
    config, source = transformer_source(spec)
    model = meta_transformer(config)
    check_keys(model, source)
    materialize(model, top_level_prefixes(model), source, lambda _: dtype, device)
    return model.eval()


def split_on_meta(config: dict, mlp: Path | None, skip: SkipRange) -> SplitSD3Transformer:
    """A split model whose transformer is on ``meta`` and whose MLP (loaded, or untrained) is float32."""
    transformer = meta_transformer(config)
    module = load_compensation(mlp, transformer) if mlp else CompensationMLP.for_transformer(transformer)
    return SplitSD3Transformer(transformer, skip, module)
