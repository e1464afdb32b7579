"""The split transformer against diffusers' own forward, for every embedded topology.

Tolerances: fp32 on CPU. Identical op sequences give bit-equal results (atol 1e-6 leaves room for
BLAS differences); the skipping pass re-associates one sum, hence atol 1e-5.
"""
import pytest
import torch

from onex_export.config import SkipRange
from onex_export.models import SplitSD3Transformer
from tests.conftest import PAPER_SKIPS, make_inputs

TOPOLOGIES = list(PAPER_SKIPS)


def diffusers_forward(transformer, inputs, skip_layers=None):
    with torch.no_grad():
        return transformer(*inputs, return_dict=False, skip_layers=skip_layers)[0]


@pytest.mark.parametrize("name", TOPOLOGIES)
def test_without_skip_range_equals_diffusers(tiny_models, name):
    t = tiny_models[name]
    split = SplitSD3Transformer(t, None)
    inputs = make_inputs(t)
    with torch.no_grad():
        v, d_img, d_ctx = split.full(*inputs)
    assert torch.allclose(v, diffusers_forward(t, inputs), atol=1e-6, rtol=0)
    assert d_img.abs().max() == 0 and d_ctx.abs().max() == 0
    with pytest.raises(ValueError, match="needs a skip range"):
        split.skipping(*inputs, d_img, d_ctx)


@pytest.mark.parametrize("name", TOPOLOGIES)
def test_full_pass_with_range_equals_diffusers_and_deltas_are_the_range_contribution(tiny_models, name):
    t = tiny_models[name]
    skip = SkipRange.parse(PAPER_SKIPS[name])
    split = SplitSD3Transformer(t, skip)
    inputs = make_inputs(t)
    seen = {}
    first, last = t.transformer_blocks[skip.start0], t.transformer_blocks[skip.stop0 - 1]
    hooks = [
        first.register_forward_hook(lambda m, a, kw, out: seen.update(i=(kw["hidden_states"], kw["encoder_hidden_states"])), with_kwargs=True),
        last.register_forward_hook(lambda m, a, kw, out: seen.update(o=(out[1], out[0])), with_kwargs=True),
    ]
    try:
        with torch.no_grad():
            v, d_img, d_ctx = split.full(*inputs)
    finally:
        for h in hooks:
            h.remove()
    assert torch.allclose(v, diffusers_forward(t, inputs), atol=1e-6, rtol=0)
    # delta = O_m - I_n per stream, observed independently on diffusers' own blocks.
    assert torch.equal(d_img, seen["o"][0] - seen["i"][0])
    assert torch.equal(d_ctx, seen["o"][1] - seen["i"][1])
    assert d_img.shape == (2, 64, t.inner_dim) and d_ctx.shape == (2, 16, t.config.caption_projection_dim)
    assert d_img.abs().mean() > 1e-2  # the range really contributes


@pytest.mark.parametrize("name", TOPOLOGIES)
def test_skipping_pass_with_same_input_deltas_reproduces_full_pass(tiny_models, name):
    t = tiny_models[name]
    split = SplitSD3Transformer(t, SkipRange.parse(PAPER_SKIPS[name]))
    inputs = make_inputs(t)
    with torch.no_grad():
        v, d_img, d_ctx = split.full(*inputs)
        v_skip = split.skipping(*inputs, d_img, d_ctx)
    assert torch.allclose(v_skip, v, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", TOPOLOGIES)
def test_skipping_pass_with_deltas_of_another_timestep_differs(tiny_models, name):
    t = tiny_models[name]
    split = SplitSD3Transformer(t, SkipRange.parse(PAPER_SKIPS[name]))
    step1 = make_inputs(t, sigma=1.0)
    step2 = make_inputs(t, sigma=0.75)
    with torch.no_grad():
        _, d_img, d_ctx = split.full(*step1)
        v_full = split.full(*step2)[0]
        v_skip = split.skipping(*step2, d_img, d_ctx)
    assert (v_skip - v_full).abs().max() > 1e-3


@pytest.mark.parametrize("name", TOPOLOGIES)
def test_zero_deltas_equal_diffusers_skip_layers(tiny_models, name):
    t = tiny_models[name]
    skip = SkipRange.parse(PAPER_SKIPS[name])
    split = SplitSD3Transformer(t, skip)  # untrained MLP: f(0) = 0
    inputs = make_inputs(t)
    with torch.no_grad():
        _, d_img, d_ctx = split.full(*inputs)
        v = split.skipping(*inputs, torch.zeros_like(d_img), torch.zeros_like(d_ctx))
    expected = diffusers_forward(t, inputs, skip_layers=list(skip.indices0))
    assert torch.allclose(v, expected, atol=1e-6, rtol=0)
    assert (v - diffusers_forward(t, inputs)).abs().max() > 1e-3  # skipping really changed the output


def test_trained_mlp_changes_the_skipping_pass_only(tiny_models):
    t = tiny_models["tiny-sd3"]
    split = SplitSD3Transformer(t, SkipRange(3, 10))
    inputs = make_inputs(t)
    with torch.no_grad():
        v, d_img, d_ctx = split.full(*inputs)
        before = split.skipping(*inputs, d_img, d_ctx)
        torch.nn.init.normal_(split.mlp.img.fc2.weight, std=0.1)
        after = split.skipping(*inputs, d_img, d_ctx)
        v_again = split.full(*inputs)[0]
    assert (after - before).abs().max() > 1e-3
    assert torch.equal(v_again, v)


@pytest.mark.parametrize("batch, height, width", [(1, 16, 16), (3, 16, 16), (3, 8, 12), (2, 32, 32)])
def test_any_batch_and_resolution(tiny_models, batch, height, width):
    t = tiny_models["tiny-sd3"]
    split = SplitSD3Transformer(t, SkipRange(3, 10))
    inputs = make_inputs(t, batch=batch, height=height, width=width)
    with torch.no_grad():
        v, d_img, d_ctx = split.full(*inputs)
        v_skip = split.skipping(*inputs, d_img, d_ctx)
    assert v.shape == (batch, 16, height, width)
    assert d_img.shape == (batch, height * width // 4, t.inner_dim)
    assert torch.allclose(v, diffusers_forward(t, inputs), atol=1e-6, rtol=0)
    assert torch.allclose(v_skip, v, atol=1e-5, rtol=0)


def test_split_rejects_range_outside_model(tiny_models):
    from onex_export.errors import SkipRangeError

    with pytest.raises(SkipRangeError, match="24 transformer blocks"):
        SplitSD3Transformer(tiny_models["tiny-sd3"], SkipRange(20, 24))


def test_both_passes_export_with_torch_export():
    """Plain tensors in and out, no data-dependent Python: both passes export as graphs."""
    from diffusers import SD3Transformer2DModel

    from onex_export.models.zoo import TINY_MODELS

    config = dict(TINY_MODELS["tiny-sd3"].config, num_layers=4)
    torch.manual_seed(0)
    split = SplitSD3Transformer(SD3Transformer2DModel(**config).eval(), SkipRange(2, 3))

    class Full(torch.nn.Module):
        def __init__(self, s):
            super().__init__()
            self.s = s

        def forward(self, *a):
            return self.s.full(*a)

    class Skipping(Full):
        def forward(self, *a):
            return self.s.skipping(*a)

    inputs = make_inputs(split.transformer)
    with torch.no_grad():
        v, d_img, d_ctx = split.full(*inputs)
        full_prog = torch.export.export(Full(split), inputs)
        skip_prog = torch.export.export(Skipping(split), (*inputs, d_img, d_ctx))
        v_exported, d_img_exported, _ = full_prog.module()(*inputs)
        v_skip_exported = skip_prog.module()(*inputs, d_img, d_ctx)
    assert torch.allclose(v_exported, v, atol=1e-6) and torch.allclose(d_img_exported, d_img, atol=1e-6)
    assert torch.allclose(v_skip_exported, v, atol=1e-5)
