"""The toy world's stand-in for the pretrained CLIP ConvNeXt image tower under Stage II's discriminator.

The paper's discriminator reads its images through a frozen tower that CLIP pretrained on web images and their
captions; its heads are all that Stage II trains. A random tower is no stand-in: on these scenes (a small glyph
on black) its features hardly tell a glyph from a grid of dots, the heads stay near chance, and the generator's
adversarial gradient is noise, which the MLP (lr 1e-3) follows into nonsense (issue 20's first chain: DCT + MLP
judged 24% correct against 84% with plain reuse). So the tower is pretrained here the way CLIP is, on the world's
own images and captions: the tiny tower (``train.discriminator.tiny_tower``: convnext_atto, 32-d projection)
learns to match generation scenes to their prompt among the 60, against one learned embedding per prompt (CLIP's
contrastive objective over a closed caption set is this classification). Its data is the teacher's (generation
glyphs); the judge's glyphs stay unseen, and the judge is a different network trained on another split.

    scenes (B, 3, 64, 64) in [0, 1] -> tower -> (B, 32) -> logits over the 60 prompts
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from onex_export.fileio import save_tensors_atomic

from ..discriminator import CLIP_MEAN, CLIP_STD, TOWER_FORMAT, tiny_tower
from .digits import PROMPTS, scenes


@dataclass(frozen=True)
class TowerConfig:
    steps: int = 1200
    batch: int = 64
    lr: float = 1e-3
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch < 1 or not self.lr > 0:
            raise ValueError(f"invalid tower config {self}: steps and batch >= 1, lr > 0")


class CaptionMatcher(nn.Module):
    """The tower and one embedding per prompt: scenes (B, 3, 64, 64) in [0, 1] -> logits (B, 60)."""

    def __init__(self, tower: nn.Module):
        super().__init__()
        self.tower = tower
        self.captions = nn.Parameter(torch.randn(len(PROMPTS), tower.head.proj.out_features) * 0.1)
        self.register_buffer("mean", torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(CLIP_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.tower((images - self.mean) / self.std) @ self.captions.T


def train_tower(cfg: TowerConfig, progress: Callable[[int, dict], None] = lambda step, record: None
                ) -> tuple[CaptionMatcher, list[dict]]:
    """Pretrain the tiny tower on generation scenes; returns it with its caption embeddings (eval mode) and the
    per-step losses."""
    torch.manual_seed(cfg.seed)
    model = CaptionMatcher(tiny_tower(cfg.seed)).train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(cfg.seed)
    losses = []
    for step in range(cfg.steps):
        ids = torch.randint(len(PROMPTS), (cfg.batch,), generator=generator)
        images, _ = scenes(ids, "generation", cfg.seed * 10**6 + step)
        logits = model(images)
        loss = F.cross_entropy(logits, ids)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"the tower's loss is {loss.item()} at step {step + 1}: lower its lr ({cfg.lr:g})")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        record = {"step": step + 1, "loss": loss.item(), "accuracy": float((logits.argmax(1) == ids).float().mean())}
        losses.append(record)
        progress(step + 1, record)
    return model.eval(), losses


@torch.no_grad()
def caption_accuracy(matcher: CaptionMatcher, split: str, per_prompt: int, seed: int) -> float:
    """How often ``matcher`` gives ``split``'s scenes (``per_prompt`` of each prompt) their own prompt."""
    ids = torch.arange(len(PROMPTS)).repeat(per_prompt)
    images, _ = scenes(ids, split, seed)
    return float((matcher(images).argmax(1) == ids).float().mean())


def save_tower(tower: nn.Module, path: Path) -> Path:
    """The tower's weights as safetensors (what Stage II's ``discriminator_weights`` takes with ``tiny``)."""
    return save_tensors_atomic(tower.state_dict(), path, {"format": TOWER_FORMAT})
