"""The benchmark's training-free peers compute what they claim, on a real diffusers model and the real
cache-dit library (no mocks)."""
import pytest
import torch

from bench.peers import CacheDitPeer, SkipLayersPeer
from onex_export.config import SkipRange
from onex_export.models import SplitSD3Transformer, build_tiny
from onex_export.runtime.sampler import Conditioning, TorchDenoiser, sample
from onex_export.schedule import SamplingPlan

SKIP = SkipRange(3, 10)


class RawDeltaReference:
    """The 1.x schedule with ``f(delta) = delta``: step 2 adds step 1's raw block-range residual."""

    def __init__(self, split: SplitSD3Transformer):
        self.split = split

    def full(self, x, text, pooled, timestep):
        return self.split.full(x, text, pooled, timestep)

    def skipping(self, x, text, pooled, timestep, delta_img, delta_ctx):
        s = self.split
        img, ctx, temb = s.embed(x, text, pooled, timestep)
        img, ctx = s.run_blocks(img, ctx, temb, 0, s.skip.start0)
        img, ctx = s.run_blocks(img + delta_img, ctx + delta_ctx, temb, s.skip.stop0, s.num_layers)
        return s.project_out(img, temb, x.shape[-2], x.shape[-1])


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    transformer = build_tiny("tiny-sd3")
    split = SplitSD3Transformer(transformer, SKIP)
    cfg = transformer.config
    g = torch.Generator().manual_seed(1)
    cond = Conditioning(torch.randn(2, 16, cfg.joint_attention_dim, generator=g),
                        torch.randn(2, cfg.pooled_projection_dim, generator=g))
    return transformer, split, cond, (cfg.in_channels, 16, 16)


@torch.no_grad()
def test_cache_dit_peer_serves_exactly_the_skip_range_from_the_step_one_residual(setup):
    transformer, split, cond, latent = setup
    peer = CacheDitPeer(transformer, SKIP)
    plan = SamplingPlan.one_x()
    reference = sample(RawDeltaReference(split), plan, cond, latent, seed=3)
    first = sample(peer, plan, cond, latent, seed=3)
    second = sample(peer, plan, cond, latent, seed=3)  # the cache context must be refreshed per run
    assert (first - reference).abs().max().item() < 1e-5
    assert (second - reference).abs().max().item() < 1e-5
    # Our untrained MLP is the identity (zero-initialised output layer on a residual), so 1.x with it is
    # exactly this peer.
    untrained = sample(TorchDenoiser(split), plan, cond, latent, seed=3)
    assert (first - untrained).abs().max().item() < 1e-5
    # Negative controls: the cache was really used (not a full second step), and it is not skip_layers.
    full_two_step = sample(TorchDenoiser(split), SamplingPlan.student(2), cond, latent, seed=3)
    dropped = sample(SkipLayersPeer(split), plan, cond, latent, seed=3)
    assert (first - full_two_step).abs().max().item() > 1e-3
    assert (first - dropped).abs().max().item() > 1e-3
    # cache-dit hooks its own copy: two calls of the shared model in a row both compute every block.
    x, t = torch.randn(2, *latent), torch.full((2,), 750.0)
    for _ in range(2):
        v = transformer(x, cond.text, cond.pooled, t, return_dict=False)[0]
        assert torch.equal(v, split.full(x, cond.text, cond.pooled, t)[0])


@torch.no_grad()
def test_skip_layers_peer_equals_diffusers_skip_layers(setup):
    transformer, split, cond, latent = setup
    x = torch.randn(2, *latent)
    t = torch.full((2,), 750.0)
    out = SkipLayersPeer(split).skipping(x, cond.text, cond.pooled, t, None, None)
    ref = transformer(x, cond.text, cond.pooled, t, skip_layers=list(range(2, 10)), return_dict=False)[0]
    assert torch.equal(out, ref)
    assert (out - transformer(x, cond.text, cond.pooled, t, return_dict=False)[0]).abs().max().item() > 1e-3


def test_cache_dit_peer_refuses_a_range_starting_at_block_one(setup):
    transformer = setup[0]
    with pytest.raises(ValueError, match="starts at block 1"):
        CacheDitPeer(transformer, SkipRange(1, 5))
