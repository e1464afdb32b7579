"""The compensation MLP: its formula, identity at init, and both weight-file layouts."""
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from onex_export.errors import ModelLoadError, WeightMismatchError
from onex_export.models import CompensationMLP, DeltaMLP, SplitSD3Transformer, load_compensation, save_compensation
from onex_export.config import SkipRange

OUR_KEYS = sorted(f"{s}.{p}" for s in ("img", "ctx") for p in
                  ("norm.weight", "norm.bias", "fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"))


def randomized(mlp: CompensationMLP, seed=0) -> CompensationMLP:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in mlp.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return mlp


def test_untrained_mlp_is_exactly_the_identity():
    f = DeltaMLP(32)
    d = torch.randn(2, 10, 32)
    assert torch.equal(f(d), d)
    assert f.fc1.out_features == 64  # hidden width 2x


def test_formula_exact_gelu_and_layernorm_eps():
    f = randomized(CompensationMLP(32, 32)).img
    d = torch.randn(2, 10, 32) * 3
    mu, var = d.mean(-1, keepdim=True), d.var(-1, unbiased=False, keepdim=True)
    ln = (d - mu) / torch.sqrt(var + 1e-5) * f.norm.weight + f.norm.bias
    h = ln @ f.fc1.weight.T + f.fc1.bias
    gelu = 0.5 * h * (1 + torch.erf(h / 2 ** 0.5))
    expected = d + gelu @ f.fc2.weight.T + f.fc2.bias
    with torch.no_grad():
        assert torch.allclose(f(d), expected, atol=1e-5)
        # tanh-approximate GELU would differ measurably at this scale
        approx = d + torch.nn.functional.gelu(h, approximate="tanh") @ f.fc2.weight.T + f.fc2.bias
        assert (approx - expected).abs().max() > 1e-6


def test_save_load_roundtrip_with_stable_keys(tmp_path):
    mlp = randomized(CompensationMLP(32, 32))
    path = save_compensation(mlp, tmp_path / "mlp.safetensors")
    with safe_open(str(path), "pt") as h:
        assert sorted(h.keys()) == OUR_KEYS
        assert h.metadata()["format"] == "onex-compensation-mlp"
    loaded = load_compensation(path)
    for k, v in mlp.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    assert not list(tmp_path.glob(".*tmp*"))  # atomic write left no temp file


def reference_state(mlp: CompensationMLP, prefix: str) -> dict:
    """The paper's release layout: delta_pred_hidden/encoder with `ln` for the LayerNorm."""
    out = {}
    for k, v in mlp.state_dict().items():
        stream, rest = k.split(".", 1)
        rest = rest.replace("norm.", "ln.")
        out[f"{prefix}delta_pred_{'hidden' if stream == 'img' else 'encoder'}.{rest}"] = v.clone()
    return out


@pytest.mark.parametrize("prefix", ["", "module.", "_fsdp_wrapped_module.", "transformer.", "module._fsdp_wrapped_module."])
def test_loads_reference_release_layout(tmp_path, prefix):
    mlp = randomized(CompensationMLP(32, 32), seed=3)
    state = reference_state(mlp, prefix)
    state[f"{prefix}transformer_blocks.0.attn.to_q.weight"] = torch.zeros(4, 4)  # transformer weights beside it
    save_file(state, str(tmp_path / "diffusion_pytorch_model.safetensors"))
    loaded = load_compensation(tmp_path / "diffusion_pytorch_model.safetensors")
    d = torch.randn(1, 5, 32)
    with torch.no_grad():
        assert torch.equal(loaded.img(d), mlp.img(d)) and torch.equal(loaded.ctx(d), mlp.ctx(d))


def test_loads_from_a_folder_of_shards(tmp_path):
    mlp = randomized(CompensationMLP(32, 32), seed=4)
    state = reference_state(mlp, "")
    keys = sorted(state)
    save_file({k: state[k] for k in keys[:5]}, str(tmp_path / "model-00001-of-00002.safetensors"))
    save_file({k: state[k] for k in keys[5:]}, str(tmp_path / "model-00002-of-00002.safetensors"))
    loaded = load_compensation(tmp_path)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in mlp.state_dict().items())


def test_hidden_width_is_read_from_the_file(tmp_path):
    mlp = CompensationMLP(32, 32, img_hidden=96, ctx_hidden=48)
    loaded = load_compensation(save_compensation(mlp, tmp_path / "m.safetensors"))
    assert (loaded.img.fc1.out_features, loaded.ctx.fc1.out_features) == (96, 48)


def test_width_mismatch_with_transformer_is_a_clear_error(tmp_path, tiny_models):
    path = save_compensation(CompensationMLP(64, 64), tmp_path / "wide.safetensors")
    with pytest.raises(WeightMismatchError, match="img stream is 64 wide, the transformer's is 32"):
        load_compensation(path, tiny_models["tiny-sd3"])
    with pytest.raises(WeightMismatchError, match="64 wide"):
        SplitSD3Transformer(tiny_models["tiny-sd3"], SkipRange(3, 10), CompensationMLP(64, 64))


def test_inconsistent_shapes_inside_the_file(tmp_path):
    state = CompensationMLP(32, 32).state_dict()
    state["ctx.fc2.weight"] = torch.zeros(32, 10)
    save_file(state, str(tmp_path / "bad.safetensors"))
    with pytest.raises(WeightMismatchError, match=r"ctx.fc2.weight .* shape \(32, 10\)"):
        load_compensation(tmp_path / "bad.safetensors")


def test_missing_keys_named(tmp_path):
    state = CompensationMLP(32, 32).state_dict()
    del state["ctx.norm.bias"]
    save_file(state, str(tmp_path / "partial.safetensors"))
    with pytest.raises(WeightMismatchError, match="missing \\['ctx.norm.bias'\\]"):
        load_compensation(tmp_path / "partial.safetensors")


def test_file_without_mlp_weights(tmp_path):
    save_file({"transformer_blocks.0.w": torch.zeros(2)}, str(tmp_path / "t.safetensors"))
    with pytest.raises(ModelLoadError, match="delta_pred_hidden"):
        load_compensation(tmp_path / "t.safetensors")


def test_missing_and_corrupt_files(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_compensation(tmp_path / "nope.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file" * 4)
    with pytest.raises(ModelLoadError, match="cannot read"):
        load_compensation(tmp_path / "junk.safetensors")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="no .safetensors file"):
        load_compensation(tmp_path / "empty")
