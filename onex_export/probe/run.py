"""``onex-export probe``: calibration prompts -> text conditioning -> the measurements of :mod:`.measure`.

The text encoders are loaded, run once over all prompts and dropped before the transformer is loaded (a real
pipeline's T5-XXL and the transformer are never in memory together).
"""
from __future__ import annotations

import time
from types import SimpleNamespace
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ..errors import UsageError
from ..models.text import SD3_TEXT_LENGTH
from ..export.components import available, load_components
from ..export.precision import PRECISIONS
from ..export.shapes import DimRange, ShapeConfig
from ..models.vae import vae_scale
from ..config import SkipRange
from ..models import DEFAULT_MODEL, SplitSD3Transformer, load_compensation, load_transformer
from ..models.weights import transformer_source
from ..models.zoo import TINY_MODELS, TRAINED_MODELS, model_source
from .measure import DEFAULT_NFES, ProbeResult, candidate_ranges, probe, skipped_for

# Calibration prompts of the kinds the paper evaluates on (objects, scenes, people, text, styles).
DEFAULT_PROMPTS = (
    "a photo of a red fox sitting in fresh snow",
    "a bowl of ramen on a wooden table, top view",
    "portrait of an old fisherman, dramatic light",
    "a city street at night in the rain, neon signs",
    "a watercolor painting of a lighthouse on a cliff",
    "a sign that says 'open', hand-lettered",
    "an astronaut riding a horse on the moon",
    "a bouquet of sunflowers in a glass vase",
)
# The same kinds for the embedded tiny-* models, whose byte-level CLIP tokenizers keep 6 bytes between their begin
# and end tokens (8 tokens): longer prompts would be cut to their first 6 bytes ("a phot").
TINY_PROMPTS = ("a fox", "ramen", "a man", "a city", "a sea", "a sign", "a moon", "a vase")


@dataclass(frozen=True)
class ProbeConfig:
    """What to probe: ``model`` (embedded name or local pipeline folder) on ``prompts`` x ``seeds``."""

    model: str = DEFAULT_MODEL
    prompts: tuple[str, ...] = DEFAULT_PROMPTS
    seeds: tuple[int, ...] = (0,)
    resolution: int | None = None  # pixels; None: the model's native size
    nfes: tuple[float, ...] = DEFAULT_NFES
    lengths: tuple[int, ...] | None = None  # range lengths measured on the outputs; None: every range
    dtype: str = "fp32"
    device: str = "cpu"
    random_text: bool = False  # seeded random text embeddings, for a folder that holds only a transformer
    mlp: Path | None = None  # a trained compensation MLP, measured on the range it was trained for:
    mlp_skip: SkipRange | None = None

    def __post_init__(self) -> None:
        if not self.prompts:
            raise UsageError("no calibration prompt given", "pass --prompts FILE with one prompt per line")
        if not self.seeds:
            raise UsageError("no seed given", "pass --seed N (repeatable)")
        if not all(0 <= seed < 2**63 for seed in self.seeds):
            raise UsageError(f"seeds must lie in 0..2^63-1, got {self.seeds}")
        for nfe in self.nfes:
            if not 1.0 < nfe < 2.0:
                raise UsageError(f"target NFE {nfe} is not one a 1.x schedule has", "use values between 1 and 2, "
                                 "e.g. --nfe 1.75 --nfe 1.667")
        if self.lengths is not None and (not self.lengths or min(self.lengths) < 1):
            raise UsageError(f"range lengths must be at least 1, got {self.lengths}")
        if (self.mlp is None) != (self.mlp_skip is None):
            raise UsageError("--mlp and --mlp-skip go together: an MLP is trained for one range",
                             "pass both, e.g. --mlp f.safetensors --mlp-skip 3-10")
        if self.dtype not in PRECISIONS:
            raise UsageError(f"unknown dtype {self.dtype!r}", f"choose one of {', '.join(PRECISIONS)}")


def read_prompts(path: Path, max_prompts: int | None = None) -> tuple[str, ...]:
    """One prompt per non-empty line (``#`` starts a comment line), at most ``max_prompts``."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read prompts from {path}: {exc}", "pass a UTF-8 text file, one prompt per line")
    prompts = tuple(line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#"))
    if not prompts:
        raise UsageError(f"{path} holds no prompt", "write one prompt per line")
    return prompts[:max_prompts] if max_prompts else prompts


def calibration_prompts(model: str, path: Path | None, max_prompts: int | None = None) -> tuple[str, ...]:
    """The prompts of ``path`` if given; else an embedded trained model's own (a toy world's words: generic prompts
    would be unknown words to its tokenizer); else :data:`TINY_PROMPTS` for an embedded tiny model (which fit its
    tokenizers); else :data:`DEFAULT_PROMPTS`. At most ``max_prompts``."""
    trained = TRAINED_MODELS.get(model)
    if path is None and trained is not None and trained.prompts.is_file():
        path = trained.prompts
    if path is not None:
        return read_prompts(path, max_prompts)
    return (TINY_PROMPTS if model in TINY_MODELS else DEFAULT_PROMPTS)[:max_prompts]


def encode_prompts(model: str, config, prompts: tuple[str, ...], random_text: bool
                   ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(text (1, T, D), pooled (1, P)) per prompt, from the model's own text encoders, which are then dropped; or
    seeded random embeddings of SD3's shapes (77 + 256 tokens) with ``random_text``. ``config``: the
    transformer's (its text widths)."""
    if random_text:
        g = torch.Generator().manual_seed(0)
        return [(torch.randn(1, SD3_TEXT_LENGTH, config.joint_attention_dim, generator=g),
                 torch.randn(1, config.pooled_projection_dim, generator=g)) for _ in prompts]
    if not available(model):
        raise UsageError(f"{model} holds only a transformer: the probe needs its text encoders",
                         "point --model at the SD3 pipeline folder (with text_encoder, text_encoder_2, "
                         "text_encoder_3), or pass --random-text to measure with random text embeddings")
    components = load_components(model, config, ("text",))
    encoder = components.load("text")
    out = []
    with torch.no_grad():
        for prompt in prompts:
            tok = components.tokenizers([prompt])
            text, pooled = encoder(tok.ids_l, tok.ids_g, tok.ids_t5)
            out.append((text.float(), pooled.float()))
    del encoder
    return out


def units_of_work(config: ProbeConfig, num_layers: int) -> int:
    """Progress units of a probe: per prompt and seed, one for the two traced steps and one per range."""
    return len(config.prompts) * len(config.seeds) * (1 + len(candidate_ranges(num_layers, config.lengths)))


def run(config: ProbeConfig, progress: Callable[[int], Callable[[int], None]] | None = None,
        log: Callable[[str], None] = lambda _: None) -> tuple[ProbeResult, dict]:
    """Probe ``config.model``; ``progress(total)`` returns the callback that advances a bar of ``total`` units.
    Returns the result (with recommendations) and the configuration recorded beside it."""
    start = time.perf_counter()
    cfg_dict, _ = transformer_source(config.model)
    cfg = SimpleNamespace(**cfg_dict)
    num_layers = cfg.num_layers
    if num_layers < 3:
        raise UsageError(f"{config.model} has {num_layers} transformer block(s): no range to probe",
                         "a range lies inside blocks 1..L-1 and a recommendation needs two blocks or more")
    scale = vae_scale(config.model)
    resolution = config.resolution or cfg.sample_size * scale
    ShapeConfig(DimRange(1, 1, 1), DimRange(resolution, resolution, resolution), DimRange(1, 1, 1),
                scale).validate_for(cfg.patch_size, cfg.pos_embed_max_size)
    if config.mlp_skip is not None:
        config.mlp_skip.validate_for(num_layers)
        if config.lengths is not None and config.mlp_skip.count not in config.lengths:
            raise UsageError(f"--mlp-skip {config.mlp_skip} has {config.mlp_skip.count} blocks, a length --lengths "
                             "leaves out", f"add {config.mlp_skip.count} to --lengths")
    if config.lengths is not None and max(config.lengths) > num_layers - 1:
        raise UsageError(f"a range of {max(config.lengths)} blocks does not fit a model of {num_layers} blocks "
                         f"(ranges lie inside 1-{num_layers - 1})")
    wanted = {skipped_for(nfe, num_layers) for nfe in config.nfes}
    if config.lengths is not None and not wanted <= set(config.lengths):
        raise UsageError(f"the target NFEs need ranges of {sorted(wanted)} blocks, which --lengths leaves out",
                         f"add --lengths {','.join(map(str, sorted(wanted | set(config.lengths))))}")
    conditioning = encode_prompts(config.model, cfg, config.prompts, config.random_text)
    log(f"text      {len(conditioning)} " + ("random embedding(s) (--random-text)" if config.random_text else
                                             f"prompt(s) encoded in {time.perf_counter() - start:.1f} s"))
    dtype = PRECISIONS[config.dtype]
    transformer = load_transformer(config.model, dtype, config.device)
    mlp = load_compensation(config.mlp, transformer, dtype) if config.mlp else None
    split = SplitSD3Transformer(transformer, None, mlp).to(config.device).eval()
    ranges = candidate_ranges(num_layers, config.lengths)
    log(f"model     {config.model}: {num_layers} blocks, {len(ranges)} ranges, {resolution} px, {config.dtype} "
        f"on {config.device}")
    latent = resolution // scale
    update = progress(units_of_work(config, num_layers)) if progress is not None else None
    result = probe(split, conditioning, config.seeds, (cfg.in_channels, latent, latent), ranges, dtype, config.device,
                   update, config.mlp_skip)
    result.recommend(config.nfes)
    recorded = {"model": model_source(config.model), "prompts": list(config.prompts), "seeds": list(config.seeds),
                "resolution": resolution, "dtype": config.dtype, "device": config.device,
                "lengths": list(config.lengths) if config.lengths else None, "nfes": list(config.nfes),
                "random_text": config.random_text,
                "mlp": str(Path(config.mlp).resolve()) if config.mlp else None,
                "mlp_skip": str(config.mlp_skip) if config.mlp_skip else None,
                "seconds": round(time.perf_counter() - start, 2)}
    return result, recorded
