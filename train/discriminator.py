"""Stage II's discriminator (paper Sec. 3.4, Appendix B.1): a frozen CLIP ConvNeXt image tower, trainable heads.

The tower is OpenCLIP's ``convnext_xxlarge`` image encoder (laion2b_s34b_b82k_augreg_soup), loaded from a local
weights file through open-clip-torch: a timm ConvNeXt trunk plus a linear projection. Images in [0, 1] are
normalised with CLIP's mean and std. Four taps feed four heads:

- the outputs of the trunk's first three stages (384, 768 and 1536 channels for XXL), each into a spatial head:
  BlurPool, spectrally normalised 3x3 conv (stride 2), LeakyReLU(0.2), BlurPool, spectrally normalised 1x1 conv;
- the pooled, projected image embedding (1024-d; it replaces the last stage's map): SN-Linear(1024, 512),
  LeakyReLU(0.2), SN-Linear(512, 1), as the authors' release has it (the paper says "a linear classifier").

A level's logit is the mean of its head's logit map; the discriminator's output is the sum over levels. No text
conditioning. The tower is frozen, but gradients flow through it to the generator's images.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from onex_export.errors import UsageError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class BlurPool(nn.Module):
    """Anti-aliased down-sampling by 2: a fixed binomial [1, 2, 1] x [1, 2, 1] / 16 filter per channel, stride 2."""

    def __init__(self, channels: int):
        super().__init__()
        k = torch.tensor([1.0, 2.0, 1.0])
        self.register_buffer("kernel", (k[:, None] * k[None, :] / 16).expand(channels, 1, 3, 3).clone(),
                             persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.pad(x, (1, 1, 1, 1), mode="replicate")  # replicate: a 1x1 map (small images) still pads
        return F.conv2d(x, self.kernel.to(x.dtype), stride=2, groups=x.shape[1])


class SpatialHead(nn.Module):
    """(B, C, h, w) stage map -> (B, 1, h/8, w/8) logit map."""

    def __init__(self, channels: int):
        super().__init__()
        self.net = nn.Sequential(
            BlurPool(channels), spectral_norm(nn.Conv2d(channels, channels, 3, stride=2, padding=1)),
            nn.LeakyReLU(0.2), BlurPool(channels), spectral_norm(nn.Conv2d(channels, 1, 1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class PooledHead(nn.Module):
    """(B, D) image embedding -> (B, 1) logit."""

    def __init__(self, dim: int, hidden: int = 512):
        super().__init__()
        self.net = nn.Sequential(spectral_norm(nn.Linear(dim, hidden)), nn.LeakyReLU(0.2),
                                 spectral_norm(nn.Linear(hidden, 1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class ConvNeXtTaps(nn.Module):
    """A frozen open_clip timm-ConvNeXt image tower: images (B, 3, H, W) in [0, 1] -> its first three stage maps
    and its pooled projected embedding."""

    def __init__(self, visual: nn.Module):
        super().__init__()
        if not hasattr(visual, "trunk") or not hasattr(visual.trunk, "stages") or len(visual.trunk.stages) != 4:
            raise UsageError("the discriminator needs an open_clip image tower with a timm ConvNeXt trunk",
                             "use convnext_xxlarge (or another convnext_* open_clip model)")
        self.visual = visual.requires_grad_(False).eval()
        self.register_buffer("mean", torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(CLIP_STD).view(1, 3, 1, 1), persistent=False)

    @property
    def channels(self) -> tuple[int, ...]:
        """The taps' widths: three stage maps, then the embedding."""
        stages = tuple(info["num_chs"] for info in self.visual.trunk.feature_info[:3])
        return (*stages, self.visual.head.proj.out_features)

    def train(self, mode: bool = True):  # frozen: always in eval mode (no dropout, no drop-path)
        return super().train(False)

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        trunk = self.visual.trunk
        x = trunk.stem((images - self.mean) / self.std)
        taps = []
        for stage in trunk.stages:
            x = stage(x)
            taps.append(x)
        pooled = trunk.forward_head(trunk.norm_pre(x))  # the trunk's pool and norm (its classifier is removed)
        return [*taps[:3], self.visual.head(pooled)]


def open_clip_tower(arch: str, weights: Path | None) -> nn.Module:
    """The image tower of open_clip model ``arch``, its weights from ``weights`` (a full CLIP checkpoint file:
    open_clip_pytorch_model.bin / .safetensors); None gives random weights (tests, tiny configs)."""
    import open_clip

    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)  # open_clip warns that the model is random before the weights come
    try:
        model = open_clip.create_model(arch, pretrained=None)
    finally:
        logging.disable(previous)
    if weights is not None:
        if not Path(weights).is_file():
            raise UsageError(f"discriminator weights {weights} not found",
                             "download open_clip's convnext_xxlarge laion2b_s34b_b82k_augreg_soup file beforehand")
        try:
            open_clip.load_checkpoint(model, str(weights))
        except Exception as exc:  # a wrong or damaged file fails in many ways inside the loader
            raise UsageError(f"cannot load {weights} into open_clip's {arch}: {type(exc).__name__}: {exc}",
                             "pass the CLIP-convnext_xxlarge-laion2B-s34B-b82K-augreg-soup weights file") from exc
    return model.visual


# The tiny configs' tower: an open_clip model of convnext_xxlarge's structure (timm ConvNeXt trunk, linear
# projection, the trunk's own pooling) on timm's smallest ConvNeXt (atto: 40, 80, 160, 320 channels), random.
TINY_TOWER = "onex-tiny-convnext"
_TINY_TOWER_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"timm_model_name": "convnext_atto", "timm_model_pretrained": False, "timm_pool": "",
                   "timm_proj": "linear", "timm_drop": 0.0, "timm_drop_path": 0.1, "image_size": 64},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


TOWER_FORMAT = "onex-tiny-tower"  # the safetensors metadata of a pretrained tiny tower (train/toy/tower.py)


def tiny_tower(seed: int = 0, weights: Path | None = None) -> nn.Module:
    """The tiny configs' discriminator tower (see :data:`TINY_TOWER`): seeded random weights, or the pretrained
    ones in ``weights`` (a safetensors file of the tower's state, as ``train.toy.tower.save_tower`` writes)."""
    import json
    import tempfile

    import open_clip

    with tempfile.TemporaryDirectory() as folder:  # open_clip registers model configs from files
        path = Path(folder) / f"{TINY_TOWER}.json"
        path.write_text(json.dumps(_TINY_TOWER_CONFIG))
        open_clip.add_model_config(path)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tower = open_clip_tower(TINY_TOWER, None)
    if weights is not None:
        from safetensors import SafetensorError, safe_open

        hint = ("pass the tower.safetensors that `python -m bench.toy` trains (<work>/tower/), "
                "or none for a random tower")
        try:
            with safe_open(str(weights), framework="pt") as handle:
                if (handle.metadata() or {}).get("format") != TOWER_FORMAT:
                    raise UsageError(f"{weights} is not a tiny discriminator tower (no '{TOWER_FORMAT}' format tag)",
                                     hint)
                state = {key: handle.get_tensor(key) for key in handle.keys()}
        except (OSError, SafetensorError) as exc:
            raise UsageError(f"cannot read the tiny tower's weights {weights}: {exc}", hint) from exc
        try:
            tower.load_state_dict(state)
        except RuntimeError as exc:
            raise UsageError(f"{weights} does not fit the tiny tower: {str(exc).splitlines()[0]}", hint) from exc
    return tower


class Discriminator(nn.Module):
    """Frozen taps + trainable heads: images (B, 3, H, W) in [0, 1] -> per-level logits, each (B,)."""

    def __init__(self, taps: ConvNeXtTaps):
        super().__init__()
        self.taps = taps
        *maps, dim = taps.channels
        self.heads = nn.ModuleList([*(SpatialHead(c) for c in maps), PooledHead(dim)])

    def levels(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Each level's logit: its head's logit map averaged over positions, (B,)."""
        return [head(tap).flatten(1).mean(1) for head, tap in zip(self.heads, self.taps(images))]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """The discriminator's logit, (B,): the levels' logits summed."""
        return torch.stack(self.levels(images)).sum(0)

    def trainable(self) -> list[nn.Parameter]:
        return list(self.heads.parameters())


def d_loss(real: list[torch.Tensor], fake: list[torch.Tensor], real_target: float = 0.8) -> torch.Tensor:
    """Non-saturating GAN loss of D, BCE with logits per level, summed over levels; one-sided label smoothing:
    real images aim at ``real_target`` (the release: 0.8), fake ones at 0."""
    return sum(F.binary_cross_entropy_with_logits(r, torch.full_like(r, real_target)) +
               F.binary_cross_entropy_with_logits(f, torch.zeros_like(f)) for r, f in zip(real, fake))


def g_loss(fake: list[torch.Tensor], target: float = 0.8) -> torch.Tensor:
    """The generator's non-saturating loss: its images' logits toward ``target`` (the release uses the same
    smoothed target as D's real images), summed over levels."""
    return sum(F.binary_cross_entropy_with_logits(f, torch.full_like(f, target)) for f in fake)
