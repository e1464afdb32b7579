"""Embedded tiny models and loading real ones from a local diffusers folder."""
import json

import pytest
import torch

from onex_export.errors import ModelLoadError
from onex_export.models import TINY_MODELS, build_tiny, load_transformer
from tests.conftest import make_inputs


def test_tiny_topologies(tiny_models):
    sd3, sd35m, sd35l = (tiny_models[n] for n in ("tiny-sd3", "tiny-sd35-medium", "tiny-sd35-large"))
    assert len(sd3.transformer_blocks) == 24 and len(sd35m.transformer_blocks) == 24
    assert len(sd35l.transformer_blocks) == 38
    for t in (sd3, sd35m, sd35l):
        assert t.transformer_blocks[-1].context_pre_only and not t.transformer_blocks[-2].context_pre_only
    assert sum(b.use_dual_attention for b in sd35m.transformer_blocks) == 13
    assert not any(b.use_dual_attention for b in sd3.transformer_blocks)
    assert sd35l.transformer_blocks[0].attn.norm_q is not None and sd3.transformer_blocks[0].attn.norm_q is None


def test_tiny_models_are_deterministic_and_leave_the_global_rng_alone():
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = build_tiny("tiny-sd3")
    after = torch.rand(1)
    b = build_tiny("tiny-sd3")
    assert torch.equal(before, after)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert build_tiny("tiny-sd3", seed=1).proj_out.weight.ne(a.proj_out.weight).any()


@pytest.mark.parametrize("layout", ["pipeline", "transformer"])
def test_loads_local_diffusers_folder(tmp_path, tiny_models, layout):
    t = tiny_models["tiny-sd35-medium"]
    folder = tmp_path / "model"
    t.save_pretrained(str(folder / "transformer" if layout == "pipeline" else folder))
    loaded = load_transformer(str(folder))
    inputs = make_inputs(t, batch=1)
    with torch.no_grad():
        assert torch.equal(loaded(*inputs, return_dict=False)[0], t(*inputs, return_dict=False)[0])


def test_unknown_name_and_empty_folder_and_wrong_class(tmp_path):
    with pytest.raises(ModelLoadError, match="neither an embedded model nor an existing folder") as info:
        load_transformer("tiny-sd4")
    assert "tiny-sd3" in info.value.hint
    with pytest.raises(ModelLoadError, match="holds no diffusers transformer"):
        load_transformer(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    with pytest.raises(ModelLoadError, match="not an SD3Transformer2DModel"):
        load_transformer(str(tmp_path))
    with pytest.raises(ModelLoadError, match="unknown embedded model"):
        build_tiny("nope")


def test_missing_weights_in_folder_is_a_load_error(tmp_path):
    config = dict(TINY_MODELS["tiny-sd3"].config, _class_name="SD3Transformer2DModel")
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="no safetensors weights in"):
        load_transformer(str(tmp_path))


def test_the_vae_scale_is_the_models_own(tmp_path):
    """Pixels per latent come from the model's VAE: built in code (tiny), its vae/config.json (a pipeline folder),
    SD3's 8 for a folder with a transformer alone; a config that cannot be read is a load error."""
    from onex_export.models.vae import LatentDecoder, build_tiny_vae, vae_scale

    with torch.no_grad():
        image = LatentDecoder(build_tiny_vae())(torch.zeros(1, 16, 4, 4))
    assert image.shape[-1] == 4 * vae_scale("tiny-sd3") == 32  # the scale the decoder really has
    assert vae_scale("digits-sd3") == 8
    (tmp_path / "three" / "vae").mkdir(parents=True)
    (tmp_path / "three" / "vae" / "config.json").write_text(json.dumps({"block_out_channels": [8, 16, 32]}))
    assert vae_scale(str(tmp_path / "three")) == 4
    (tmp_path / "transformer-only").mkdir()
    assert vae_scale(str(tmp_path / "transformer-only")) == 8
    (tmp_path / "broken" / "vae").mkdir(parents=True)
    (tmp_path / "broken" / "vae" / "config.json").write_text("{")
    with pytest.raises(ModelLoadError, match="block_out_channels"):
        vae_scale(str(tmp_path / "broken"))
    from onex_export.export.shapes import DimRange, ShapeConfig

    one = DimRange(1, 1, 1)
    assert ShapeConfig(one, DimRange(64, 64, 64), one, 4).dim_ranges(2)["latent_height"] == (16, 16, 16)  # 64 px / 4
    with pytest.raises(ValueError, match="not a power of two"):
        ShapeConfig(one, one, one, 6)
