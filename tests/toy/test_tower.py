"""Stage II's discriminator tower in the toy world (train/toy/tower.py): pretrained on the world's scenes and their
prompts, as CLIP's is on captioned web images, saved and loaded by Stage II; a file that is not such a tower is
refused with the fix. The evidence that the pretraining matters (a random tower leaves the discriminator near
chance and the MLP drifting) and that it learns (the chain's tower stage reports its held-out caption accuracy) is
the toy report's; its loss stays at chance for the first ~150 steps, too long for a unit test: here, the mechanics."""
from __future__ import annotations

import pytest
import torch

from onex_export.errors import UsageError
from onex_export.models import build_tiny
from onex_export.models.compensation import CompensationMLP, save_compensation
from train.discriminator import tiny_tower
from train.toy.tower import TowerConfig, save_tower, train_tower


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    return train_tower(TowerConfig(steps=3, batch=8, lr=1e-3, seed=3))


def test_a_saved_tower_loads_into_stage_twos_discriminator_bit_for_bit(trained, tmp_path):
    matcher, _ = trained
    path = save_tower(matcher.tower, tmp_path / "tower.safetensors")
    loaded, random = tiny_tower(weights=path).eval(), tiny_tower().eval()
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        want = matcher.tower(images)
        assert torch.equal(loaded(images), want)
        assert (random(images) - want).abs().max() > 1e-2  # not the random tower by accident


def test_files_that_are_not_a_tower_are_refused_with_the_fix(tmp_path):
    mlp = save_compensation(CompensationMLP.for_transformer(build_tiny("tiny-sd3")), tmp_path / "mlp.safetensors")
    with pytest.raises(UsageError, match="not a tiny discriminator tower") as info:
        tiny_tower(weights=mlp)
    assert "bench.toy" in info.value.hint
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}")
    with pytest.raises(UsageError, match="cannot read the tiny tower"):
        tiny_tower(weights=broken)
    other = tmp_path / "other.safetensors"
    state = {k: v for k, v in tiny_tower().state_dict().items() if "stages.3" not in k}
    from onex_export.fileio import save_tensors_atomic
    save_tensors_atomic(state, other, {"format": "onex-tiny-tower"})
    with pytest.raises(UsageError, match="does not fit the tiny tower"):
        tiny_tower(weights=other)


def test_the_tower_config_is_validated():
    for bad in ({"steps": 0}, {"batch": 0}, {"lr": 0.0}, {"lr": float("nan")}):
        with pytest.raises(ValueError, match="invalid tower config"):
            TowerConfig(**bad)
