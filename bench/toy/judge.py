"""The toy world's judge: reads a 64x64 scene the way a person would, without any of the generators' parts.

- analytic detectors: the ink (each pixel's brightest channel) above a threshold is the glyph; its bounding box
  gives the size, its ink-weighted centroid the side (left of the middle or not) and the height (top or bottom
  half), its mean colour the nearest named colour;
- a small CNN reads the digit from the ink cropped to its bounding box (square, 16x16, scaled to unit peak). It is
  trained here on scenes of the ``judge-train`` glyphs only (the generators never see the judge's glyphs), with
  blur, noise, dimming and continuous sizes so that it reads a slightly soft decoder output as it reads a sharp
  scene; ``judge-test`` glyphs measure it.
- features: the CNN's penultimate layer (32) plus the detected geometry and colour (7), standardised by the real
  held-out scenes' statistics, for FID and pairwise distances in the judge's own space.

Shapes: images (B, 3, 64, 64) in [0, 1] throughout.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from onex_export.fileio import atomic_path, save_tensors_atomic
from train.toy.digits import COLOURS, IMAGE, PROMPTS, SIZES, Layout, Prompt, glyphs, render, scenes

INK = 0.2  # a pixel whose brightest channel exceeds this is ink
MIN_INK = 8  # fewer ink pixels than this: no glyph
CROP = 16
JUDGE_DIR = Path(__file__).resolve().parent / "judge-weights"  # the shipped judge (bench.toy --install-default)
PALETTE = torch.nn.functional.normalize(torch.tensor(list(COLOURS.values())), dim=1)


class DigitNet(nn.Module):
    """(B, 1, 16, 16) crops -> (features (B, 32), logits (B, 10))."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1, stride=2), nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1, stride=2), nn.ReLU())
        self.features = nn.Sequential(nn.Flatten(), nn.Dropout(0.2), nn.Linear(64 * 16, 32), nn.ReLU())
        self.head = nn.Linear(32, 10)

    def forward(self, crops: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.features(self.conv(crops))
        return f, self.head(f)


@dataclass(frozen=True)
class Detections:
    """Per image (B,): whether a glyph is there, its centroid, bounding-box height/width (pixels), mean ink colour
    (B, 3), and its 16x16 crop (B, 1, 16, 16)."""

    present: torch.Tensor
    cx: torch.Tensor
    cy: torch.Tensor
    height: torch.Tensor
    width: torch.Tensor
    colour: torch.Tensor
    crops: torch.Tensor

    @property
    def colour_index(self) -> torch.Tensor:
        """(B,) index into COLOURS of the nearest named colour (cosine)."""
        return (F.normalize(self.colour, dim=1) @ PALETTE.T).argmax(1)


def detect(images: torch.Tensor) -> Detections:
    """The analytic part of the judge on ``images`` (B, 3, 64, 64)."""
    ink = images.float().amax(1)  # (B, 64, 64)
    mask = ink > INK
    weight = ink * mask
    total = weight.sum((1, 2)).clamp_min(1e-8)
    coords = torch.arange(IMAGE, dtype=torch.float32) + 0.5
    cx = (weight.sum(1) * coords).sum(1) / total
    cy = (weight.sum(2) * coords).sum(1) / total
    colour = (images.float() * mask[:, None]).sum((2, 3)) / mask.sum((1, 2)).clamp_min(1)[:, None]
    present = mask.sum((1, 2)) >= MIN_INK
    (y0, y1), (x0, x1) = _extent(mask.any(2)), _extent(mask.any(1))
    return Detections(present, cx, cy, (y1 - y0).clamp_min(0), (x1 - x0).clamp_min(0), colour,
                      _square_crops(ink, x0, x1, y0, y1))


def _extent(any_ink: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """First and one-past-last index (B,) float of the True entries of (B, L) rows (0, 0 when none)."""
    n = any_ink.shape[1]
    first = any_ink.int().argmax(1)
    last = n - any_ink.flip(1).int().argmax(1)
    none = ~any_ink.any(1)
    return torch.where(none, 0, first).float(), torch.where(none, 0, last).float()


def _square_crops(ink: torch.Tensor, x0, x1, y0, y1) -> torch.Tensor:
    """Each image's ink box centred in a square with a one-pixel margin, resampled to (B, 1, 16, 16) (bilinear at
    twice the size, then 2x2 means: a light anti-aliasing), each scaled to peak 1."""
    side = (torch.maximum(x1 - x0, y1 - y0) + 2).clamp_min(2) / IMAGE  # in units of the canvas
    zero = torch.zeros_like(side)
    cx, cy = (x0 + x1) / IMAGE - 1, (y0 + y1) / IMAGE - 1  # the box centre, normalised to [-1, 1]
    theta = torch.stack([torch.stack([side, zero, cx], -1), torch.stack([zero, side, cy], -1)], 1)
    grid = F.affine_grid(theta, [len(side), 1, 2 * CROP, 2 * CROP], align_corners=False)
    crops = F.avg_pool2d(F.grid_sample(ink[:, None], grid, mode="bilinear", align_corners=False), 2)
    return (crops / crops.amax((1, 2, 3), keepdim=True).clamp_min(1e-6)).clamp(0, 1)


# -- training --------------------------------------------------------------------------------------------------


def augmented_scenes(split: str, count: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` scenes (B, 3, 64, 64) of ``split``'s glyphs with their digits (B,): any colour near the palette's,
    continuous sizes around both modes, any position, blurred, dimmed and noised at random."""
    g = glyphs(split)
    pick = torch.randint(len(g), (count,), generator=generator)
    base = torch.tensor(list(COLOURS.values()))[torch.randint(len(COLOURS), (count,), generator=generator)]
    colours = (base * (0.6 + 0.4 * torch.rand(count, 1, generator=generator))).clamp(0, 1)
    size = min(SIZES) - 3 + torch.rand(count, generator=generator) * (max(SIZES) - min(SIZES) + 6)
    cx = 12 + torch.rand(count, generator=generator) * (IMAGE - 24)
    cy = 12 + torch.rand(count, generator=generator) * (IMAGE - 24)
    images = render(g.images[pick], colours, size, cx, cy)
    images = _blur(images, torch.rand(count, generator=generator) * 1.2)
    images = images + 0.03 * torch.rand(count, 1, 1, 1, generator=generator) * torch.randn(images.shape,
                                                                                             generator=generator)
    return images.clamp(0, 1), g.labels[pick]


def _blur(images: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """A separable Gaussian blur of each image (B, 3, H, W) with its own ``sigma`` (B,) in pixels (0: none)."""
    x = torch.arange(-3, 4, dtype=torch.float32)
    k = torch.exp(-0.5 * (x / sigma.clamp_min(1e-3).view(-1, 1)) ** 2)
    k = (k / k.sum(1, keepdim=True)).repeat_interleave(3, 0)  # (3B, 7): one kernel per channel of each image
    b, c, h, w = images.shape
    flat = images.reshape(1, b * c, h, w)
    flat = F.conv2d(flat, k.view(-1, 1, 1, 7), padding=(0, 3), groups=b * c)
    return F.conv2d(flat, k.view(-1, 1, 7, 1), padding=(3, 0), groups=b * c).view(b, c, h, w)


def train_digit_net(steps: int = 1500, batch: int = 128, seed: int = 0,
                    progress: Callable[[int, dict], None] = lambda step, info: None) -> DigitNet:
    """The judge's CNN, trained on augmented ``judge-train`` scenes."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = DigitNet()
        opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
        g = torch.Generator().manual_seed(seed)
        for step in range(steps):
            images, labels = augmented_scenes("judge-train", batch, g)
            _, logits = net(detect(images).crops)
            loss = F.cross_entropy(logits, labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            progress(step + 1, {"loss": loss.item()})
    return net.eval()


# -- the judge -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Verdicts:
    """Per image (B,): what was read and whether it matches the prompt; ``features`` (B, 39) standardised."""

    present: torch.Tensor
    digit: torch.Tensor
    digit_ok: torch.Tensor
    colour_ok: torch.Tensor
    side_ok: torch.Tensor
    large: torch.Tensor  # the size mode: True = the larger size
    top: torch.Tensor  # the height mode: True = the glyph's centre above the middle
    features: torch.Tensor

    @property
    def correct(self) -> torch.Tensor:
        """(B,) bool: a glyph, of the prompt's digit, colour and side."""
        return self.present & self.digit_ok & self.colour_ok & self.side_ok

    @property
    def mode(self) -> torch.Tensor:
        """(B,) int in 0..3: the free attributes' mode, 2 x size + height."""
        return 2 * self.large.long() + self.top.long()


class Judge:
    """The digit CNN plus the analytic detectors and their calibration (size threshold, feature statistics)."""

    def __init__(self, net: DigitNet, size_threshold: float, mean: torch.Tensor, std: torch.Tensor):
        self.net, self.size_threshold, self.mean, self.std = net.eval(), size_threshold, mean, std

    @torch.no_grad()
    def raw_features(self, images: torch.Tensor, det: Detections | None = None) -> tuple[Detections, torch.Tensor,
                                                                                         torch.Tensor]:
        det = det if det is not None else detect(images)
        feats, logits = [], []
        for i in range(0, len(det.crops), 512):
            f, lg = self.net(det.crops[i:i + 512])
            feats.append(f), logits.append(lg)
        geometry = torch.stack([det.cx / IMAGE, det.cy / IMAGE, det.height / IMAGE, det.width / IMAGE], 1)
        return det, torch.cat([torch.cat(feats), geometry, det.colour], 1), torch.cat(logits)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: list[Prompt]) -> Verdicts:
        """Judge ``images`` (B, 3, 64, 64) against their ``prompts`` (B)."""
        if len(prompts) != images.shape[0]:
            raise ValueError(f"{images.shape[0]} images for {len(prompts)} prompts")
        det, raw, logits = self.raw_features(images)
        digit = logits.argmax(1)
        colours = list(COLOURS)
        want_digit = torch.tensor([p.digit for p in prompts])
        want_colour = torch.tensor([colours.index(p.colour) for p in prompts])
        want_left = torch.tensor([p.side == "left" for p in prompts])
        return Verdicts(det.present, digit, digit == want_digit, det.colour_index == want_colour,
                        (det.cx < IMAGE / 2) == want_left, det.height > self.size_threshold, det.cy < IMAGE / 2,
                        (raw - self.mean) / self.std)

    def save(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        save_tensors_atomic({**{f"net.{k}": v for k, v in self.net.state_dict().items()},
                             "mean": self.mean, "std": self.std}, folder / "judge.safetensors", {})
        with atomic_path(folder / "judge.json") as tmp:
            tmp.write_text(json.dumps({"size_threshold": self.size_threshold}))

    @classmethod
    def load(cls, folder: Path) -> "Judge":
        tensors = load_file(str(folder / "judge.safetensors"))
        net = DigitNet()
        net.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("net.")})
        calibration = json.loads((folder / "judge.json").read_text())
        return cls(net, calibration["size_threshold"], tensors["mean"], tensors["std"])


def real_scenes(split: str, per_prompt: int, seed: int) -> tuple[torch.Tensor, list[Prompt], Layout]:
    """``per_prompt`` real scenes of every prompt (B = 60 x per_prompt, prompt-major) from ``split``'s glyphs, with
    their prompts and drawn layout."""
    ids = torch.arange(len(PROMPTS)).repeat_interleave(per_prompt)
    images, layout = scenes(ids, split, seed)
    return images, [PROMPTS[int(i)] for i in ids], layout


def build_judge(steps: int = 1500, seed: int = 0, progress: Callable[[int, dict], None] = lambda s, i: None) -> Judge:
    """Train the CNN, then calibrate on real ``judge`` scenes: the size threshold halfway between the two size
    modes' mean ink heights, the feature statistics for standardising."""
    net = train_digit_net(steps, seed=seed, progress=progress)
    images, _, layout = real_scenes("judge", 8, seed=seed + 1)
    det = detect(images)
    small, large = det.height[layout.size == min(SIZES)], det.height[layout.size == max(SIZES)]
    threshold = float((small.mean() + large.mean()) / 2)
    _, raw, _ = Judge(net, threshold, torch.zeros(39), torch.ones(39)).raw_features(images, det)
    return Judge(net, threshold, raw.mean(0), raw.std(0).clamp_min(1e-3))
