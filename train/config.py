"""Training configuration: frozen dataclasses (Stage I here), read from YAML, validated on construction.

Unknown keys are an error (a typo must not silently fall back to a default); ``--set key=value``
overrides parse their value as YAML (``--set lr_fake=1e-4``, ``--set objective=trajectory``). The
resolved config is written beside every checkpoint, so a checkpoint says how it was made.
"""
from __future__ import annotations

import math
import dataclasses
import typing
from dataclasses import dataclass
from typing import ClassVar
from pathlib import Path

import yaml

from onex_export.errors import UsageError

OBJECTIVES = ("dmd2", "trajectory")
PRECISIONS = ("fp32", "bf16")
TEXT_ENCODERS = ("auto", "tiny", "sd3", "diffusers")
EMBEDDING_DTYPES = ("float32", "bfloat16", "float16")
CURVES = ("uniform", "a", "b", "c", "d", "e")

# Keys that may change between a checkpoint and its resumption: they do not change what is computed
# (run_dir included: a run folder that was moved or copied resumes where it is now).
RESUMABLE_KEYS = frozenset({"max_steps", "log_every", "sample_every", "sample_count", "checkpoint_every",
                            "keep_checkpoints", "device", "embedding_cache", "run_dir"})


class ConfigError(UsageError):
    """A config file or override that is malformed or inconsistent."""


@dataclass(frozen=True)
class YamlConfig:
    """What every stage's config shares: YAML in and out, ``--set`` overrides, unknown keys refused, types
    checked, and the keys a resumed run may change (:data:`RESUMABLE_KEYS`). Subclasses add the fields (a
    ``run_dir: str`` among them) and their own checks after ``super().__post_init__()``."""

    def __post_init__(self) -> None:
        _check_types(self)

    @classmethod
    def load(cls, path: str | Path | None, overrides: tuple[str, ...] | list[str] = ()):
        """Read a YAML file (or nothing), apply ``key=value`` overrides, validate."""
        values: dict = {}
        if path is not None:
            path = Path(path)
            if not path.is_file():
                raise ConfigError(f"config file {path} does not exist", "see train/configs/ for examples")
            try:
                values = yaml.safe_load(path.read_text()) or {}
            except yaml.YAMLError as exc:
                raise ConfigError(f"{path} is not valid YAML: {exc}") from exc
            if not isinstance(values, dict):
                raise ConfigError(f"{path} must hold a mapping of key: value, not a {type(values).__name__}")
        for item in overrides:
            key, sep, raw = item.partition("=")
            if not sep or not key.strip():
                raise ConfigError(f"override {item!r} is not key=value", "e.g. --set max_steps=10")
            try:
                values[key.strip()] = yaml.safe_load(raw) if raw.strip() else ""
            except yaml.YAMLError as exc:
                raise ConfigError(f"override {item!r}: the value is not valid YAML ({exc})") from exc
        return cls.from_dict(values)

    @classmethod
    def from_dict(cls, values: dict):
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown config key(s): {', '.join(unknown)}",
                              f"valid keys: {', '.join(sorted(known))}")
        if "run_dir" not in values:
            raise ConfigError("the config has no run_dir", "set run_dir: in the file or --set run_dir=PATH")
        return cls(**values)

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    resumable_keys: ClassVar[frozenset[str]] = RESUMABLE_KEYS

    def differences(self, other: "YamlConfig", ignore: frozenset[str] | None = None) -> list[str]:
        """``key: self -> other`` for every key that differs, except ``ignore`` (default: the keys a resumed
        run may change)."""
        ignore = self.resumable_keys if ignore is None else ignore
        a, b = self.to_dict(), other.to_dict()
        return [f"{k}: {a[k]!r} -> {b[k]!r}" for k in a if k not in ignore and a[k] != b[k]]


@dataclass(frozen=True)
class Stage1Config(YamlConfig):
    """Everything a Stage I run depends on. Defaults are the paper's SD3-Medium settings (Table 6)."""

    run_dir: str  # checkpoints, log.jsonl, samples/ and config.yaml go here

    # -- models ---------------------------------------------------------------------------------
    model: str = "tiny-sd3"  # the teacher: an embedded name or an SD3/SD3.5 diffusers pipeline folder
    num_steps: int = 2  # student steps N: 2 for 1.x-Distill, 4 for the SFD baseline
    eta: float = 1.0  # student step noise (DESIGN.md 2): 1 = deterministic Euler, 0 = DMD2 re-noising
    resolution: int = 1024  # pixels; latents are resolution / 8
    precision: str = "bf16"  # bf16: autocast, trained weights and optimizer state stay fp32
    gradient_checkpointing: bool = False

    # -- data -----------------------------------------------------------------------------------
    prompts: str = "prompts.txt"  # one prompt a line (.txt) or one JSON object a line (.jsonl)
    prompt_key: str = "prompt"  # the field of a JSONL line that holds the prompt
    text_encoder: str = "auto"  # auto: tiny for embedded models, sd3 for pipeline folders
    embedding_cache: str = ""  # folder of cached text embeddings; "" = <run_dir>/embeddings
    embedding_dtype: str = "bfloat16"
    t5_length: int = 256  # T5 tokens (SD3: 77 CLIP + 256 T5 = 333 text tokens)
    encode_batch: int = 16

    # -- Stage I --------------------------------------------------------------------------------
    batch_size: int = 32  # global: split evenly over the ranks
    max_steps: int = 1000  # iterations; each updates the fake model once
    fake_updates_per_generator: int = 1  # two time-scale update rule: G is updated every this many steps
    objective: str = "dmd2"  # dmd2: Eq. (2) in DMD2's form; trajectory: the authors' release
    timestep_curve: str = "c"  # importance weight of the DMD timestep (paper Fig. 10), or uniform
    guidance_scale: float = 7.0  # teacher CFG w
    guidance_alpha: float = 0.94  # CFG only where sigma <= alpha (paper 0.94; the release uses 0.96)
    lr_generator: float = 5e-6
    lr_fake: float = 4e-5
    adam_betas: tuple[float, float] = (0.0, 0.999)
    weight_decay: float = 1e-4
    adam_eps: float = 1e-8
    warmup_steps: int = 0  # linear learning-rate warm-up, then constant
    clip_generator: float = 2.0  # gradient-norm clipping (the release: 2.0 for G, 1.0 for fake)
    clip_fake: float = 1.0
    seed: int = 0

    # -- output ---------------------------------------------------------------------------------
    log_every: int = 1  # progress-bar refresh; every step is written to log.jsonl
    sample_every: int = 100  # sample grid every this many steps (0 = never)
    sample_count: int = 4  # images in a grid: the first prompts, fixed noise
    checkpoint_every: int = 100  # and always after the last step
    keep_checkpoints: int = 0  # 0 keeps all
    device: str = "auto"  # auto: cuda if available, else cpu
    cpu_threads: int = 0  # torch intra-op threads on CPU, 0 = torch's default (tiny models run best on 1)

    def __post_init__(self) -> None:
        super().__post_init__()
        choice("objective", self.objective, OBJECTIVES)
        choice("precision", self.precision, PRECISIONS)
        choice("text_encoder", self.text_encoder, TEXT_ENCODERS)
        choice("embedding_dtype", self.embedding_dtype, EMBEDDING_DTYPES)
        choice("timestep_curve", self.timestep_curve, CURVES)
        for name in ("num_steps", "batch_size", "max_steps", "fake_updates_per_generator", "t5_length",
                     "encode_batch", "log_every", "checkpoint_every", "sample_count"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("sample_every", "keep_checkpoints", "warmup_steps", "cpu_threads"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must not be negative, got {getattr(self, name)}")
        if not 0.0 <= self.eta <= 1.0:
            raise ConfigError(f"eta must lie in [0, 1], got {self.eta}")
        if self.resolution < 16 or self.resolution % 16:
            raise ConfigError(f"resolution {self.resolution} is not a positive multiple of 16",
                              "latents are resolution / 8 and the transformer patches them 2x2, e.g. 1024")
        if self.guidance_scale < 1.0:
            raise ConfigError(f"guidance_scale must be >= 1 (1 = no guidance), got {self.guidance_scale}")
        if not 0.0 < self.guidance_alpha <= 1.0:
            raise ConfigError(f"guidance_alpha must lie in (0, 1], got {self.guidance_alpha}",
                              "the paper uses 0.94, the authors' release 0.96")
        for name in ("lr_generator", "lr_fake", "clip_generator", "clip_fake", "adam_eps"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.weight_decay < 0:
            raise ConfigError(f"weight_decay must not be negative, got {self.weight_decay}")
        if len(self.adam_betas) != 2 or not all(0.0 <= b < 1.0 for b in self.adam_betas):
            raise ConfigError(f"adam_betas must be two numbers in [0, 1), got {list(self.adam_betas)}",
                              "Stage I uses [0.0, 0.999]")
        if not self.run_dir:
            raise ConfigError("run_dir is empty", "set run_dir: in the config or --set run_dir=PATH")

    @property
    def cache_dir(self) -> Path:
        return Path(self.embedding_cache) if self.embedding_cache else Path(self.run_dir) / "embeddings"


def choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{name} {value!r} is not one of {', '.join(choices)}")


def _check_types(cfg: YamlConfig) -> None:
    """YAML gives ints, floats, bools, strings and lists: check each against the field's type."""
    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        value, hint = getattr(cfg, f.name), hints[f.name]
        if hint is bool:
            ok = isinstance(value, bool)
        elif hint is int:
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif hint is float:
            if isinstance(value, str):  # YAML 1.1 reads 5e-6 (no dot) as a string
                try:
                    value = float(value)
                except ValueError:
                    pass
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            if ok and not math.isfinite(value):
                raise ConfigError(f"{f.name} is {value}: a learning rate, scale or weight must be a finite number",
                                  f"give {f.name} a number such as {getattr(type(cfg), f.name, 1.0)!r}")
            if ok:
                object.__setattr__(cfg, f.name, float(value))
        elif hint is str:
            ok = isinstance(value, str)
        else:  # tuple[float, float]
            ok = isinstance(value, (list, tuple)) and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value)
            if ok:
                object.__setattr__(cfg, f.name, tuple(float(v) for v in value))
        if not ok:
            raise ConfigError(f"{f.name} must be {getattr(hint, '__name__', str(hint))}, got {value!r}")


def check_resolution(resolution: int, model: str, vae_model: str) -> None:
    """Refuse, before a run writes anything or loads a model, a ``resolution`` that ``model``'s transformer cannot take
    (as ``build`` and ``probe`` do): past its position embedding it failed at the first step with diffusers'
    ValueError. ``vae_model``: where the VAE that sets the latent scale comes from."""
    from onex_export.models.vae import vae_scale
    from onex_export.models.zoo import transformer_config

    config, scale = transformer_config(model), vae_scale(vae_model)
    limit, step = config["pos_embed_max_size"] * scale, scale * config["patch_size"]
    if resolution % step or resolution > limit:
        raise ConfigError(f"resolution {resolution} is not one this model takes: a multiple of {step} up to {limit} "
                          f"pixels (pos_embed_max_size {config['pos_embed_max_size']} latents)",
                          f"e.g. resolution={min(limit, 1024)}")
