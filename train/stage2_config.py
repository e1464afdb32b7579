"""Stage II configuration: one frozen dataclass, read from YAML like Stage I's (unknown keys are errors,
``--set key=value`` overrides), written beside every checkpoint."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar
from pathlib import Path

from onex_export.config import SkipRange
from onex_export.errors import UsageError

from .config import EMBEDDING_DTYPES, PRECISIONS, RESUMABLE_KEYS, TEXT_ENCODERS, ConfigError, YamlConfig, choice


@dataclass(frozen=True)
class Stage2Config(YamlConfig):
    """Everything a Stage II run depends on. Defaults are the paper's SD3-Medium settings (Table 6) and the
    authors' release where the paper is silent."""

    run_dir: str  # checkpoints, log.jsonl, samples/, config.yaml and the final student + MLP go here

    # -- models ---------------------------------------------------------------------------------
    model: str = "tiny-sd3"  # the Stage I student: embedded name, diffusers transformer folder or pipeline folder
    pipeline: str = ""  # the pipeline folder whose text encoders and VAE are used ("" = model)
    real_model: str = ""  # the multi-step model that makes the "real" images from the same noise ("" = model)
    real_steps: int = 8  # the paper: an 8-step Stage I model; the release: 4; the teacher: 28 with CFG
    real_guidance: float = 1.0  # CFG of the real model (1 = none, for a distilled student; 7 for the teacher)
    real_cache: str = ""  # a folder of pre-generated real latents (--pregenerate); "" = made online
    skip: str = "3-10"  # the cached block range, 1-based and inclusive
    mlp_init: str = ""  # a compensation MLP to start from ("" = untrained: plain reuse)
    train_mlp: bool = True  # False: Distill-Cache co-Training without the MLP (Table 5): f stays as it starts
    resolution: int = 1024
    precision: str = "bf16"  # bf16: autocast; trained weights stay fp32
    gradient_checkpointing: bool = False
    lora_rank: int = 64  # 0 = full fine-tuning of the student
    lora_alpha: float = 64.0
    discriminator: str = "convnext_xxlarge"  # an open_clip ConvNeXt model name, or "tiny" (tests)
    # its local checkpoint (open_clip_pytorch_model.bin); for "tiny": a pretrained tower (train/toy/tower.py) or ""
    discriminator_weights: str = ""

    # -- data (as Stage I) ----------------------------------------------------------------------
    prompts: str = "prompts.txt"
    prompt_key: str = "prompt"
    text_encoder: str = "auto"
    embedding_cache: str = ""
    embedding_dtype: str = "bfloat16"
    t5_length: int = 256
    encode_batch: int = 16

    # -- Stage II -------------------------------------------------------------------------------
    batch_size: int = 32
    max_steps: int = 2000
    d_warmup: int = 50  # discriminator-only iterations first (the release: 50)
    g_every: int = 3  # afterwards the student and MLP update every this many iterations, D otherwise
    mlp_warmup: int = 500  # iterations in which the student stays frozen and only the MLP (and D) learn
    lr_generator: float = 1e-6
    lr_mlp: float = 1e-3
    lr_discriminator: float = 1e-5
    adam_betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 1e-4
    adam_eps: float = 1e-8
    clip_generator: float = 2.0  # gradient-norm clipping on the student
    real_label: float = 0.8  # one-sided label smoothing; the generator aims at it too (the release)
    gan_weight: float = 1.0
    kd_feature: float = 0.0  # Eq. 7 weight (ablation; off by default)
    kd_output: float = 0.0  # Eq. 8 weight (ablation; off by default)
    eta: float = 1.0
    seed: int = 0

    # -- output ---------------------------------------------------------------------------------
    log_every: int = 1
    sample_every: int = 100  # the fake images of that step as a grid (0 = never)
    sample_count: int = 4
    checkpoint_every: int = 100  # and always after the last step
    keep_checkpoints: int = 0
    device: str = "auto"
    cpu_threads: int = 0

    # real_cache holds what would be made online, bit for bit: a resumed run may gain or lose it
    resumable_keys: ClassVar[frozenset[str]] = RESUMABLE_KEYS | {"real_cache"}

    def __post_init__(self) -> None:
        super().__post_init__()
        choice("precision", self.precision, PRECISIONS)
        choice("text_encoder", self.text_encoder, TEXT_ENCODERS)
        choice("embedding_dtype", self.embedding_dtype, EMBEDDING_DTYPES)
        for name in ("real_steps", "batch_size", "max_steps", "g_every", "t5_length", "encode_batch", "log_every",
                     "checkpoint_every", "sample_count"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("d_warmup", "mlp_warmup", "lora_rank", "sample_every", "keep_checkpoints", "cpu_threads",
                     "kd_feature", "kd_output", "gan_weight", "weight_decay"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must not be negative, got {getattr(self, name)}")
        for name in ("lr_generator", "lr_mlp", "lr_discriminator", "clip_generator", "adam_eps", "lora_alpha"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if not 0.5 < self.real_label <= 1.0:
            raise ConfigError(f"real_label must lie in (0.5, 1], got {self.real_label}", "the release uses 0.8")
        if self.real_guidance < 1.0:
            raise ConfigError(f"real_guidance must be >= 1 (1 = no CFG), got {self.real_guidance}")
        if not 0.0 <= self.eta <= 1.0:
            raise ConfigError(f"eta must lie in [0, 1], got {self.eta}")
        if self.resolution < 16 or self.resolution % 16:
            raise ConfigError(f"resolution {self.resolution} is not a positive multiple of 16", "e.g. 1024")
        if len(self.adam_betas) != 2 or not all(0.0 <= b < 1.0 for b in self.adam_betas):
            raise ConfigError(f"adam_betas must be two numbers in [0, 1), got {list(self.adam_betas)}",
                              "Stage II uses [0.9, 0.95]")
        try:
            SkipRange.parse(self.skip)
        except UsageError as exc:
            raise ConfigError(f"skip: {exc.message}", exc.hint) from exc
        if self.discriminator != "tiny" and not self.discriminator_weights:
            raise ConfigError(f"discriminator {self.discriminator} needs discriminator_weights (a local file)",
                              "download open_clip's CLIP-convnext_xxlarge-laion2B-s34B-b82K-augreg-soup beforehand")
        if not self.run_dir:
            raise ConfigError("run_dir is empty", "set run_dir: in the config or --set run_dir=PATH")

    @property
    def skip_range(self) -> SkipRange:
        return SkipRange.parse(self.skip)

    @property
    def cache_dir(self) -> Path:
        return Path(self.embedding_cache) if self.embedding_cache else Path(self.run_dir) / "embeddings"
