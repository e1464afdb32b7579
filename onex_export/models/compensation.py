"""The compensation MLP ``f`` of 1.x-Distill and its weight files.

``f(d) = d + W2 GELU(W1 LN(d) + b1) + b2`` with hidden width 2x, exact (erf) GELU, LayerNorm eps 1e-5
with affine parameters, and ``W2``, ``b2`` zero-initialised so an untrained ``f`` is the identity
(plain delta reuse). One ``f`` per stream: ``img`` (image tokens, width ``inner_dim``) and ``ctx``
(context tokens, width ``caption_projection_dim``).

Weight files are safetensors. Our own keys are ``img.{norm,fc1,fc2}.{weight,bias}`` and the same under
``ctx.``. The paper's reference release stores ``delta_pred_hidden.{ln,fc1,fc2}.*`` (image stream) and
``delta_pred_encoder.*`` (context stream), possibly under ``module.`` / ``_fsdp_wrapped_module.`` /
``transformer.`` prefixes and beside the whole transformer: both load.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from ..errors import ModelLoadError, WeightMismatchError
from ..fileio import save_tensors_atomic

FORMAT = "onex-compensation-mlp"
FORMAT_VERSION = "1"
STREAMS = ("img", "ctx")
_REFERENCE_STREAMS = {"delta_pred_hidden.": "img.", "delta_pred_encoder.": "ctx."}
_WRAPPER_PREFIXES = ("_fsdp_wrapped_module.", "module.", "transformer.")
_PARAMS = ("norm.weight", "norm.bias", "fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias")


class DeltaMLP(nn.Module):
    """Residual MLP on a cached delta: ``d + fc2(GELU(fc1(LN(d))))``. Input/output (B, N, dim)."""

    def __init__(self, dim: int, hidden_dim: int | None = None):
        super().__init__()
        hidden_dim = hidden_dim or 2 * dim
        self.norm = nn.LayerNorm(dim, eps=1e-5, elementwise_affine=True)
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU(approximate="none")
        self.fc2 = nn.Linear(hidden_dim, dim)
        # Zero output layer: an untrained f is the identity, i.e. plain delta reuse.
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)

    @property
    def dim(self) -> int:
        return self.fc1.in_features

    def forward(self, delta: torch.Tensor) -> torch.Tensor:
        return delta + self.fc2(self.act(self.fc1(self.norm(delta))))


class CompensationMLP(nn.Module):
    """The pair of :class:`DeltaMLP`, one for the image and one for the context stream."""

    def __init__(self, img_dim: int, ctx_dim: int, img_hidden: int | None = None, ctx_hidden: int | None = None):
        super().__init__()
        self.img = DeltaMLP(img_dim, img_hidden)
        self.ctx = DeltaMLP(ctx_dim, ctx_hidden)

    @classmethod
    def for_transformer(cls, transformer: nn.Module, seed: int = 0) -> "CompensationMLP":
        """An untrained (identity) MLP sized for a diffusers ``SD3Transformer2DModel``.

        ``fc1`` is initialised from ``seed`` (the global RNG is left alone), so that the same model gives
        the same MLP weights, and content hashes of builds stay stable.
        """
        img_dim, ctx_dim = stream_dims(transformer)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return cls(img_dim, ctx_dim)

    def forward(self, delta_img: torch.Tensor, delta_ctx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(f_img(delta_img), f_ctx(delta_ctx))``; shapes (B, N_img, D) and (B, N_txt, D_ctx)."""
        return self.img(delta_img), self.ctx(delta_ctx)

    def check_fits(self, transformer: nn.Module) -> None:
        """Raise :class:`WeightMismatchError` unless the stream widths match the transformer's."""
        expected = dict(zip(STREAMS, stream_dims(transformer)))
        for stream in STREAMS:
            got = getattr(self, stream).dim
            if got != expected[stream]:
                raise WeightMismatchError(
                    f"compensation MLP does not fit the transformer: its {stream} stream is {got} wide, "
                    f"the transformer's is {expected[stream]}",
                    "pass the MLP file trained with this transformer (--mlp), or none for plain delta reuse",
                )


def stream_dims(transformer: nn.Module) -> tuple[int, int]:
    """(image width, context width) of a diffusers SD3 transformer."""
    return transformer.inner_dim, transformer.config.caption_projection_dim


def save_compensation(mlp: CompensationMLP, path: str | os.PathLike) -> Path:
    """Write ``mlp`` to a safetensors file atomically (temp file, then rename)."""
    return save_tensors_atomic(mlp.state_dict(), path, {"format": FORMAT, "version": FORMAT_VERSION})


def _canonical_key(key: str) -> str | None:
    """Map a stored key to ours (``img.norm.weight``), or None if it is not an MLP weight."""
    stripped = True
    while stripped:
        stripped = False
        for prefix in _WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key, stripped = key[len(prefix):], True
    for ref_prefix, ours in _REFERENCE_STREAMS.items():
        if key.startswith(ref_prefix):
            rest = key[len(ref_prefix):]
            return ours + ("norm." + rest[3:] if rest.startswith("ln.") else rest)
    return key if key.split(".", 1)[0] in STREAMS else None


def is_mlp_key(key: str) -> bool:
    """Whether a stored key is a compensation-MLP weight (ours or the reference release's)."""
    return _canonical_key(key) is not None


def _weight_files(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise ModelLoadError(f"no .safetensors file in {path}", "pass the MLP weight file itself to --mlp")
        return files
    if not path.is_file():
        raise ModelLoadError(f"MLP weight file {path} does not exist", "check the --mlp path")
    return [path]


def load_compensation(path: str | os.PathLike, transformer: nn.Module | None = None,
                      dtype: torch.dtype = torch.float32) -> CompensationMLP:
    """Load an MLP from our layout or the reference release's (``delta_pred_*``).

    ``path`` may be a file or a folder of safetensors shards (e.g. the reference release's transformer
    folder, where the MLP sits beside the transformer weights). With ``transformer`` given, stream
    widths are checked against it and a mismatch raises :class:`WeightMismatchError`. Every tensor comes
    back in ``dtype``, whatever the file stores.
    """
    path = Path(path)
    found: dict[str, torch.Tensor] = {}
    for file in _weight_files(path):
        try:
            with safe_open(str(file), framework="pt") as handle:
                for key in handle.keys():
                    canonical = _canonical_key(key)
                    if canonical is not None:
                        found[canonical] = handle.get_tensor(key)
        except (OSError, SafetensorError) as exc:
            raise ModelLoadError(f"cannot read {file} as safetensors: {exc}", "is the file complete?") from exc
    if not found:
        raise ModelLoadError(
            f"no compensation-MLP weights in {path}: expected keys 'img.*'/'ctx.*' (onex-export) or "
            "'delta_pred_hidden.*'/'delta_pred_encoder.*' (the paper's reference release)",
            "check that this checkpoint was trained with the MLP enabled",
        )
    expected = {f"{s}.{p}" for s in STREAMS for p in _PARAMS}
    missing, unexpected = sorted(expected - found.keys()), sorted(found.keys() - expected)
    if missing or unexpected:
        raise WeightMismatchError(
            f"MLP weights in {path} are incomplete or unknown: missing {missing}, unexpected {unexpected}",
            "the file must hold LayerNorm, fc1 and fc2 of both streams",
        )
    dims = {}
    for stream in STREAMS:
        hidden, dim = found[f"{stream}.fc1.weight"].shape
        dims[stream] = (dim, hidden)
        shapes = {
            "norm.weight": (dim,), "norm.bias": (dim,), "fc1.bias": (hidden,),
            "fc2.weight": (dim, hidden), "fc2.bias": (dim,),
        }
        for param, shape in shapes.items():
            if tuple(found[f"{stream}.{param}"].shape) != shape:
                raise WeightMismatchError(
                    f"MLP weight {stream}.{param} in {path} has shape {tuple(found[f'{stream}.{param}'].shape)}, "
                    f"expected {shape} for a {dim}-wide stream with hidden width {hidden}"
                )
    mlp = CompensationMLP(dims["img"][0], dims["ctx"][0], dims["img"][1], dims["ctx"][1])
    if transformer is not None:
        mlp.check_fits(transformer)
    mlp.load_state_dict({k: v.float() for k, v in found.items()})
    return mlp.to(dtype)
