"""The toy world's data: scenes composed from real handwritten digits (DESIGN.md section 6).

The glyphs are scikit-learn's bundled UCI handwritten digits (``load_digits``: 1,797 8x8 images, 16 grey levels,
inside the package: no download). A scene is a 64x64 RGB image, black, with one glyph drawn in a colour on one
side. The prompt names three attributes and leaves three free, so that every prompt has several equally likely
modes whose coverage can be counted:

- named: the digit (0-9), the colour (red, green, blue), the side (left, right): 60 prompts, e.g.
  ``"a red 7 on the left"``;
- free: the size (16 or 24 pixels, equally likely: two modes), the height of the glyph's centre (uniform over the
  canvas; its top and bottom halves are two modes), the exact horizontal place within the side, and the
  handwriting (which glyph of the digit).

64 pixels: the SD3 latent layout (16 channels, 8x down-sampling) gives an 8x8 latent, 16 image tokens after the
transformer's 2x2 patches, which keeps a 24-block teacher trainable on a 2-core CPU; 128 pixels would cost 4x.

The glyphs are split once, per digit, with a fixed seed: ``generation`` (60 %) is all that the autoencoder and the
teacher ever see; ``judge`` (40 %) trains the judge (bench/toy/judge.py) and makes the held-out real scenes, and
never reaches a generator. ``judge`` is split again into the judge's training and test glyphs.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

IMAGE = 64  # pixels
DIGITS = tuple(str(d) for d in range(10))
COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (1.0, 0.22, 0.18),
    "green": (0.22, 0.95, 0.25),
    "blue": (0.30, 0.45, 1.0),
}
SIDES = ("left", "right")
SIZES = (16, 24)  # glyph edge in pixels: the two size modes ("small", "large")
CENTRE_X = {"left": (12.0, 24.0), "right": (40.0, 52.0)}  # the glyph centre's horizontal range per side
CENTRE_Y = (12.0, 52.0)  # and its vertical range (modes: above / below the middle)
SPLIT_SEED = 20
GENERATION_SHARE = 0.6  # of each digit's glyphs; the rest is the judge's
JUDGE_TRAIN_SHARE = 0.75  # of the judge's glyphs; the rest measures the judge


@dataclass(frozen=True)
class Prompt:
    digit: int
    colour: str
    side: str

    @property
    def text(self) -> str:
        return f"a {self.colour} {self.digit} on the {self.side}"


PROMPTS: tuple[Prompt, ...] = tuple(Prompt(d, c, s) for d in range(10) for c in COLOURS for s in SIDES)
VOCABULARY: tuple[str, ...] = ("a", "on", "the", *COLOURS, *DIGITS, *SIDES)  # every word of every prompt


def prompt_index(text: str) -> int:
    """The index in :data:`PROMPTS` of a prompt's text; ``ValueError`` for anything else."""
    for i, p in enumerate(PROMPTS):
        if p.text == text:
            return i
    raise ValueError(f"{text!r} is not a toy-world prompt (e.g. {PROMPTS[0].text!r})")


@dataclass(frozen=True)
class Glyphs:
    """Glyphs (n, 8, 8) float32 in [0, 1] and their digits (n,) int64."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return self.labels.shape[0]

    def of_digit(self, digit: int) -> torch.Tensor:
        """Indices (k,) of the glyphs of ``digit``."""
        return torch.nonzero(self.labels == digit).view(-1)


@functools.lru_cache(maxsize=1)
def _all_glyphs() -> Glyphs:
    from sklearn.datasets import load_digits

    data = load_digits()
    return Glyphs(torch.tensor(data.images / 16.0, dtype=torch.float32), torch.tensor(data.target, dtype=torch.int64))


@functools.lru_cache(maxsize=4)
def glyphs(split: str) -> Glyphs:
    """The glyphs of ``split``: ``generation``, ``judge`` (= ``judge-train`` + ``judge-test``)."""
    every = _all_glyphs()
    rng = np.random.RandomState(SPLIT_SEED)
    parts: dict[str, list[int]] = {"generation": [], "judge-train": [], "judge-test": []}
    for digit in range(10):
        idx = rng.permutation(np.nonzero(every.labels.numpy() == digit)[0])
        n_gen = round(GENERATION_SHARE * len(idx))
        n_judge_train = round(JUDGE_TRAIN_SHARE * (len(idx) - n_gen))
        parts["generation"] += idx[:n_gen].tolist()
        parts["judge-train"] += idx[n_gen:n_gen + n_judge_train].tolist()
        parts["judge-test"] += idx[n_gen + n_judge_train:].tolist()
    parts["judge"] = parts["judge-train"] + parts["judge-test"]
    if split not in parts:
        raise ValueError(f"unknown glyph split {split!r}; choose one of {', '.join(parts)}")
    index = torch.tensor(sorted(parts[split]))
    return Glyphs(every.images[index], every.labels[index])


@dataclass(frozen=True)
class Layout:
    """Where and how a scene's glyph is drawn, per scene (n,): ``size`` in pixels, the glyph's centre ``cx``, ``cy``
    in pixels, and the ``glyph`` index within its split."""

    size: torch.Tensor
    cx: torch.Tensor
    cy: torch.Tensor
    glyph: torch.Tensor


def draw_layouts(prompts: list[Prompt], split: Glyphs, generator: torch.Generator) -> Layout:
    """The free attributes of one scene per prompt, drawn from ``generator``: size, centre and handwriting."""
    n = len(prompts)
    size = torch.tensor(SIZES)[torch.randint(len(SIZES), (n,), generator=generator)]
    u = torch.rand(n, 2, generator=generator, dtype=torch.float64)
    lo = torch.tensor([CENTRE_X[p.side][0] for p in prompts], dtype=torch.float64)
    hi = torch.tensor([CENTRE_X[p.side][1] for p in prompts], dtype=torch.float64)
    cx = lo + u[:, 0] * (hi - lo)
    cy = CENTRE_Y[0] + u[:, 1] * (CENTRE_Y[1] - CENTRE_Y[0])
    pick = torch.rand(n, generator=generator, dtype=torch.float64)
    glyph = torch.empty(n, dtype=torch.int64)
    for i, p in enumerate(prompts):
        of_digit = split.of_digit(p.digit)
        glyph[i] = of_digit[min(int(pick[i] * len(of_digit)), len(of_digit) - 1)]
    return Layout(size, cx.float(), cy.float(), glyph)


def render(glyphs: torch.Tensor, colours: torch.Tensor, size: torch.Tensor, cx: torch.Tensor,
           cy: torch.Tensor) -> torch.Tensor:
    """Scenes (n, 3, 64, 64) in [0, 1]: ``glyphs`` (n, 8, 8) scaled to ``size`` (n,) pixels (bilinear: smooth
    strokes), centred at (``cx``, ``cy``) (n,) with sub-pixel accuracy, times ``colours`` (n, 3)."""
    # An affine sampling grid maps the canvas onto the glyph: the glyph's [-1, 1] square covers `size` pixels.
    scale = IMAGE / size.float()
    zero = torch.zeros_like(scale)
    theta = torch.stack([torch.stack([scale, zero, -(2 * cx.float() / IMAGE - 1) * scale], -1),
                         torch.stack([zero, scale, -(2 * cy.float() / IMAGE - 1) * scale], -1)], 1)
    grid = F.affine_grid(theta, [len(scale), 1, IMAGE, IMAGE], align_corners=False)
    ink = F.grid_sample(glyphs[:, None].float(), grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return (ink * colours.view(-1, 3, 1, 1)).clamp(0, 1)


def render_scenes(prompts: list[Prompt], layout: Layout, split: Glyphs) -> torch.Tensor:
    """Scenes (n, 3, 64, 64) in [0, 1] for ``prompts`` and their ``layout``."""
    colours = torch.tensor([COLOURS[p.colour] for p in prompts])
    return render(split.images[layout.glyph], colours, layout.size, layout.cx, layout.cy)


def scenes(prompt_ids: torch.Tensor, split: str, seed: int) -> tuple[torch.Tensor, Layout]:
    """Scenes (n, 3, 64, 64) for prompt indices ``prompt_ids`` (n,), their glyphs from ``split``, the free attributes
    drawn from ``seed``; and their layout."""
    chosen = [PROMPTS[int(i)] for i in prompt_ids]
    g = glyphs(split)
    layout = draw_layouts(chosen, g, torch.Generator().manual_seed(seed))
    return render_scenes(chosen, layout, g), layout
