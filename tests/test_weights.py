"""Loading gives exactly the dtype asked for, from checkpoints saved the way published ones are (fp16 or bf16
weights beside an fp32 position buffer; one file or shards with an index), and modules load and unload one
at a time from a meta-device model."""
import json

import pytest
import torch
from diffusers import SD3Transformer2DModel
from safetensors.torch import load_file, save_file

from onex_export.errors import ModelLoadError, WeightMismatchError
from onex_export.models import build_tiny, load_compensation, load_transformer, save_compensation
from onex_export.models.compensation import CompensationMLP
from onex_export.models.weights import (
    INDEX_NAME, SafetensorsSource, StateDictSource, materialize, materialized, meta_transformer, release,
    transformer_source,
)
from onex_export.models.zoo import TINY_MODELS

from .conftest import make_inputs

HALF = {"fp16": torch.float16, "bf16": torch.bfloat16}


def save_like_published(folder, dtype, shard_size="200KB"):
    """tiny-sd35-large made in half precision: half weights, the sin-cos buffer stays float32 (a mixed file)."""
    model = build_tiny("tiny-sd35-large").to(dtype)
    model.pos_embed.pos_embed.data = model.pos_embed.pos_embed.float()
    model.save_pretrained(str(folder), max_shard_size=shard_size)
    return model


@pytest.mark.parametrize("stored", ["fp16", "bf16"])
@pytest.mark.parametrize("asked", [torch.float32, torch.float16, torch.bfloat16])
def test_sharded_half_checkpoint_loads_in_exactly_the_dtype_asked_for(tmp_path, stored, asked):
    saved = save_like_published(tmp_path / "m", HALF[stored])
    assert (tmp_path / "m" / INDEX_NAME).is_file() and len(list((tmp_path / "m").glob("*.safetensors"))) > 3
    _, source = transformer_source(str(tmp_path / "m"))
    assert source.stored_dtypes() == {"float32": 1, {"fp16": "float16", "bf16": "bfloat16"}[stored]: 1226}
    loaded = load_transformer(str(tmp_path / "m"), asked)
    assert {t.dtype for t in (*loaded.parameters(), *loaded.buffers())} == {asked}
    want = saved.state_dict()
    for key, value in loaded.state_dict().items():  # the stored values, cast once
        assert torch.equal(value, want[key].to(asked)), key


def test_mixed_file_breaks_from_pretrained_but_not_our_loader(tmp_path):
    """The bug of the real-size report: diffusers returns fp16 parameters for torch_dtype=float32 from a mixed
    file, and the float32 gate then crashed. Ours gives float32, and the model runs on float32 inputs."""
    saved = save_like_published(tmp_path / "m", torch.float16, shard_size="10GB")
    upstream = SD3Transformer2DModel.from_pretrained(str(tmp_path / "m"), torch_dtype=torch.float32)
    upstream_dtypes = {p.dtype for p in upstream.parameters()}  # diffusers 0.42.1: {float16, float32}, the bug
    assert upstream_dtypes <= {torch.float16, torch.float32}  # (whatever a later diffusers does, ours must hold)
    ours = load_transformer(str(tmp_path / "m"), torch.float32)
    inputs = make_inputs(ours, batch=1, text_len=5)
    with torch.no_grad():
        out = ours(*inputs, return_dict=False)[0]
        ref = saved.float()(*inputs, return_dict=False)[0]
    assert out.dtype == torch.float32 and torch.equal(out, ref)


def test_sources_agree_and_digest_tracks_every_byte(tmp_path):
    model = build_tiny("tiny-sd3")
    model.save_pretrained(str(tmp_path / "m"), max_shard_size="100KB")
    config, files = transformer_source(str(tmp_path / "m"))
    _, memory = transformer_source("tiny-sd3")
    assert config["num_layers"] == 24 and sorted(files.keys()) == sorted(memory.keys())
    prefixes = ["transformer_blocks.4", "pos_embed"]
    assert files.digest(prefixes) == memory.digest(prefixes)
    assert files.digest(["transformer_blocks.4"]) != files.digest(["transformer_blocks.5"])
    state = dict(model.state_dict())
    state["transformer_blocks.4.ff.net.2.bias"] = state["transformer_blocks.4.ff.net.2.bias"].clone()
    state["transformer_blocks.4.ff.net.2.bias"][0] += 1e-6  # one value, one ulp-ish change
    changed = StateDictSource(state)
    assert changed.digest(prefixes) != memory.digest(prefixes)
    assert changed.digest(["transformer_blocks.5"]) == memory.digest(["transformer_blocks.5"])
    assert files.stored_dtypes() == memory.stored_dtypes() == {"float32": len(files.keys())}


def test_modules_load_and_unload_one_at_a_time():
    config, source = transformer_source("tiny-sd3")
    model = meta_transformer(config)
    assert all(p.is_meta for p in model.parameters())
    with materialized(model, ["transformer_blocks.3"], source, lambda _: torch.float16):
        block = model.transformer_blocks[3]
        assert {p.dtype for p in block.parameters()} == {torch.float16} and not any(p.is_meta for p in block.parameters())
        assert all(p.is_meta for p in model.transformer_blocks[4].parameters())
        assert torch.equal(block.attn.to_q.weight, source.get("transformer_blocks.3.attn.to_q.weight").half())
    assert all(p.is_meta for p in model.parameters())
    # the loaded tensors are copies: changing them never changes the source
    materialize(model, ["proj_out"], source, lambda _: torch.float32)
    model.proj_out.weight.data.mul_(0)
    assert source.get("proj_out.weight").abs().sum() > 0
    release(model, ["proj_out"])
    assert model.proj_out.weight.is_meta


def test_checkpoint_that_does_not_fit_its_config_is_a_clear_error(tmp_path):
    build_tiny("tiny-sd3").save_pretrained(str(tmp_path / "m"))
    file = tmp_path / "m" / "diffusion_pytorch_model.safetensors"
    state = load_file(str(file))
    state["transformer_blocks.2.attn.to_q.weight"] = state["transformer_blocks.2.attn.to_q.weight"][:, :16].contiguous()
    save_file(state, str(file))
    with pytest.raises(WeightMismatchError, match=r"transformer_blocks.2.attn.to_q.weight' has \(32, 16\), the model expects \(32, 32\)"):
        load_transformer(str(tmp_path / "m"))
    del state["transformer_blocks.2.attn.to_q.weight"]
    save_file(state, str(file))
    with pytest.raises(WeightMismatchError, match=r"1 tensor\(s\) missing \(e.g. transformer_blocks.2.attn.to_q.weight\)"):
        load_transformer(str(tmp_path / "m"))
    file.write_bytes(b"not a safetensors file")
    with pytest.raises(ModelLoadError, match="cannot read .* as safetensors"):
        load_transformer(str(tmp_path / "m"))


def test_weights_that_belong_to_another_config_are_refused(tmp_path):
    """SD3.5 weights (qk RMSNorm) under a config that says SD3 (no qk_norm): the norms would be dropped silently."""
    build_tiny("tiny-sd35-large").save_pretrained(str(tmp_path / "m"))
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    config["qk_norm"] = None
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    with pytest.raises(WeightMismatchError, match=r"0 tensor\(s\) missing, 152 not in the model \(e.g. transformer_blocks"):
        load_transformer(str(tmp_path / "m"))
    (tmp_path / "m" / "diffusion_pytorch_model.safetensors").rename(tmp_path / "m" / "diffusion_pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="pickle") as info:
        load_transformer(str(tmp_path / "m"))
    assert "safe_serialization=True" in info.value.hint


def test_shard_index_naming_a_missing_file(tmp_path):
    save_like_published(tmp_path / "m", torch.float16)
    shards = sorted((tmp_path / "m").glob("*-of-*.safetensors"))
    shards[1].unlink()
    with pytest.raises(ModelLoadError, match=f"lists shards that are not in .*{shards[1].name}"):
        load_transformer(str(tmp_path / "m"))
    with pytest.raises(ModelLoadError, match="not in"):
        SafetensorsSource.from_folder(tmp_path / "m")


def test_reference_release_mlp_beside_the_transformer_loads_both(tmp_path):
    """The authors' release keeps delta_pred_* next to the transformer's tensors: the transformer loader skips
    them, the MLP loader finds them; both in the dtype asked for."""
    model = build_tiny("tiny-sd3").half()
    model.save_pretrained(str(tmp_path / "m"))
    file = tmp_path / "m" / "diffusion_pytorch_model.safetensors"
    mlp = CompensationMLP.for_transformer(model)
    torch.nn.init.normal_(mlp.img.fc2.weight, std=0.1)
    state = load_file(str(file))
    for k, v in mlp.state_dict().items():
        stream, rest = k.split(".", 1)
        state[f"{'delta_pred_hidden' if stream == 'img' else 'delta_pred_encoder'}.{rest.replace('norm.', 'ln.')}"] = v.half()
    save_file(state, str(file))
    loaded = load_transformer(str(tmp_path / "m"), torch.bfloat16)
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    f = load_compensation(tmp_path / "m", loaded, torch.bfloat16)
    assert {p.dtype for p in f.parameters()} == {torch.bfloat16}
    assert torch.equal(f.img.fc2.weight, mlp.img.fc2.weight.half().to(torch.bfloat16))
    assert load_compensation(save_compensation(mlp, tmp_path / "f.safetensors")).img.fc2.weight.dtype == torch.float32


def test_config_json_survives_the_meta_model(tmp_path):
    config = dict(TINY_MODELS["tiny-sd35-medium"].config)
    model = meta_transformer(config)
    model.save_config(str(tmp_path))
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["_class_name"] == "SD3Transformer2DModel" and saved["dual_attention_layers"] == list(range(13))
