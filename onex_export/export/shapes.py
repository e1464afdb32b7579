"""Shape ranges of a build: batch, image resolution and text length, each ``min:opt:max``.

A range with ``min == max`` is static; the batch is always dynamic in the exported graphs (its range
then only bounds the TensorRT profile). Resolution is in pixels; latents are 1/``vae_scale`` of it (the model's
VAE says how much: 8 for SD3's), image tokens ``(h / 16) * (w / 16)`` for SD3's VAE and patch size 2.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import UsageError
from ..contract import IH, IW, B, H, N, T, W, GraphSpec

@dataclass(frozen=True)
class DimRange:
    """``min <= opt <= max``, all positive."""

    min: int
    opt: int
    max: int

    def __post_init__(self):
        if not 0 < self.min <= self.opt <= self.max:
            raise UsageError(f"bad range {self}: need 0 < MIN <= OPT <= MAX", "write N or MIN:OPT:MAX, e.g. 1:1:4")

    @classmethod
    def parse(cls, text: str | int) -> "DimRange":
        parts = str(text).split(":")
        try:
            values = [int(p) for p in parts]
        except ValueError:
            raise UsageError(f"malformed range {text!r}", "write N or MIN:OPT:MAX, e.g. 1:1:4") from None
        if len(values) == 1:
            return cls(values[0], values[0], values[0])
        if len(values) != 3:
            raise UsageError(f"malformed range {text!r}", "write N or MIN:OPT:MAX, e.g. 1:1:4")
        return cls(*values)

    @property
    def static(self) -> bool:
        return self.min == self.max

    def scaled(self, factor: int) -> tuple[int, int, int]:
        return self.min // factor, self.opt // factor, self.max // factor

    def __str__(self) -> str:
        return str(self.opt) if self.static else f"{self.min}:{self.opt}:{self.max}"


@dataclass(frozen=True)
class ShapeConfig:
    batch: DimRange
    resolution: DimRange  # pixels, square images
    text_len: DimRange
    vae_scale: int  # pixels per latent: models.vae.vae_scale of the model

    def __post_init__(self):
        if self.vae_scale < 1 or self.vae_scale & (self.vae_scale - 1):
            raise ValueError(f"vae_scale {self.vae_scale} is not a power of two")

    def validate_for(self, patch_size: int, pos_embed_max_size: int) -> "ShapeConfig":
        step = self.vae_scale * patch_size
        limit = pos_embed_max_size * self.vae_scale
        for value in (self.resolution.min, self.resolution.opt, self.resolution.max):
            if value % step:
                raise UsageError(f"resolution {value} is not a multiple of {step}", f"use e.g. {value // step * step or step}")
            if value > limit:
                raise UsageError(f"resolution {value} exceeds this model's limit of {limit} pixels "
                                 f"(pos_embed_max_size {pos_embed_max_size} latents)", f"use at most {limit}")
        return self

    @property
    def dynamic_dims(self) -> frozenset[str]:
        dims = {B}
        if not self.resolution.static:
            dims |= {H, W, N, IH, IW}
        if not self.text_len.static:
            dims.add(T)
        return frozenset(dims)

    def dim_ranges(self, patch_size: int) -> dict[str, tuple[int, int, int]]:
        """(min, opt, max) of every symbolic dimension."""
        lat = self.resolution.scaled(self.vae_scale)
        tokens = tuple((v // patch_size) ** 2 for v in lat)
        pixels = (self.resolution.min, self.resolution.opt, self.resolution.max)
        return {B: (self.batch.min, self.batch.opt, self.batch.max), H: lat, W: lat, N: tokens, IH: pixels, IW: pixels,
                T: (self.text_len.min, self.text_len.opt, self.text_len.max)}

    def profile(self, spec: GraphSpec, patch_size: int) -> dict[str, tuple[tuple[int, ...], ...]]:
        """The TensorRT optimization profile of a graph's inputs."""
        ranges = self.dim_ranges(patch_size)
        out = {}
        for t in spec.inputs:
            dims = [ranges[d] if isinstance(d, str) else (d, d, d) for d in t.shape]
            out[t.name] = tuple(tuple(r[i] for r in dims) for i in range(3))
        return out

    def to_json(self) -> dict:
        return {"batch": [self.batch.min, self.batch.opt, self.batch.max],
                "resolution": [self.resolution.min, self.resolution.opt, self.resolution.max],
                "text_len": [self.text_len.min, self.text_len.opt, self.text_len.max]}
