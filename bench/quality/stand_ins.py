"""Seeded random stand-ins for the metrics' networks, built in code (``--random-metrics``; the tests).

They have the real interfaces (a transformers CLIP folder with tokenizer and image processor, torchvision's
AlexNet state dict, the aesthetic head's ``layers.<i>`` file) and go through the same loading code as real
weights, so they test the plumbing. Their values compare schedules within one run only: they are not the
published metrics.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from .metrics import MetricWeights, quiet_open_clip

CLIP_SIZE = 32  # the tiny CLIP's image size


class TinyFeatures(nn.Module):
    """FID's stand-in feature extractor: (N, 3, H, W) uint8 -> (N, 64), a random conv net with average pooling."""

    def __init__(self, seed: int = 0, width: int = 64):
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.net = nn.Sequential(nn.Conv2d(3, 32, 4, stride=4), nn.GELU(), nn.Conv2d(32, width, 3, stride=2),
                                     nn.GELU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images.float() / 127.5 - 1)


def write_tiny_clip(folder: Path, seed: int = 0, projection_dim: int = 32) -> Path:
    """A tiny random CLIP (transformers ``CLIPModel``), its byte-level tokenizer and image processor in ``folder``."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    from onex_export.models.text import byte_tokenizer

    text = dict(vocab_size=259, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                max_position_embeddings=16, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  image_size=CLIP_SIZE, patch_size=8)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=projection_dim))
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    byte_tokenizer(16, clip_style=True).save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": CLIP_SIZE},
                       crop_size={"height": CLIP_SIZE, "width": CLIP_SIZE}).save_pretrained(folder)
    return folder


def random_alexnet(seed: int = 0) -> dict[str, torch.Tensor]:
    """torchvision's AlexNet feature layers with seeded random weights, keyed as its state dict is."""
    import torchvision

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        features = torchvision.models.alexnet(weights=None).features
    return {f"features.{k}": v for k, v in features.state_dict().items()}


def random_aesthetic_head(dim: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """The aesthetic predictor's layer stack (dim -> 1024 -> 128 -> 64 -> 16 -> 1, at layers 0, 2, 4, 6, 7 as
    released, dropout between) with seeded random weights."""
    widths = (dim, 1024, 128, 64, 16, 1)
    state = {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for index, (n_in, n_out) in zip((0, 2, 4, 6, 7), zip(widths, widths[1:])):
            layer = nn.Linear(n_in, n_out)
            state[f"layers.{index}.weight"], state[f"layers.{index}.bias"] = layer.weight.data, layer.bias.data
    return state


TINY_OPEN_CLIP = "onex-tiny-open-clip"  # HPSv2's stand-in architecture, registered with open_clip


def register_tiny_open_clip(folder: Path) -> str:
    """Register a tiny open_clip CLIP (ViT and text tower of 2 layers, 32-d embeddings; open_clip's own BPE
    tokenizer) under :data:`TINY_OPEN_CLIP`; returns the name."""
    import open_clip

    config = {"embed_dim": 32,
              "vision_cfg": {"image_size": CLIP_SIZE, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
              "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}}
    path = folder / f"{TINY_OPEN_CLIP}.json"
    path.write_text(json.dumps(config))
    open_clip.add_model_config(path)
    return TINY_OPEN_CLIP


def random_hpsv2(folder: Path, seed: int = 0) -> dict[str, torch.Tensor]:
    """A checkpoint of the tiny open_clip model with seeded random weights, keyed as HPSv2's ``state_dict`` is."""
    import open_clip

    name = register_tiny_open_clip(folder)
    with quiet_open_clip(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = open_clip.create_model(name, pretrained=None)
    return {"state_dict": model.state_dict()}


def write_stand_ins(folder: Path, seed: int = 0) -> MetricWeights:
    """Write every stand-in's files under ``folder``; the weights of all metrics but FID (whose stand-in is
    :class:`TinyFeatures`, not an Inception file). HPSv2's stand-in is of architecture :data:`TINY_OPEN_CLIP`."""
    clip = write_tiny_clip(folder / "clip", seed)
    torch.save(random_alexnet(seed), folder / "alexnet.pth")
    torch.save(random_aesthetic_head(32, seed), folder / "aesthetic-head.pth")
    torch.save(random_hpsv2(folder, seed), folder / "hpsv2.pt")
    return MetricWeights(clip=clip, lpips_backbone=folder / "alexnet.pth", pickscore=clip, aesthetic_clip=clip,
                         aesthetic_head=folder / "aesthetic-head.pth", hpsv2=folder / "hpsv2.pt")
