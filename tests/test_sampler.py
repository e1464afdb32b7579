"""The one sampler over every plan, checked against hand-written steps and diffusers' scheduler."""
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from onex_export.config import SkipRange
from onex_export.models import SplitSD3Transformer
from onex_export.runtime import Conditioning, TorchDenoiser, sample
from onex_export.schedule import SamplingPlan

LATENT = (16, 16, 16)


@pytest.fixture(scope="module")
def setup(tiny_models):
    t = tiny_models["tiny-sd3"]
    split = SplitSD3Transformer(t, SkipRange(3, 10))
    g = torch.Generator().manual_seed(7)
    cond = Conditioning(
        torch.randn(2, 16, 48, generator=g), torch.randn(2, 40, generator=g),
        torch.zeros(2, 16, 48), torch.zeros(2, 40),
    )
    return split, TorchDenoiser(split), cond


def test_one_x_equals_two_hand_written_steps(setup):
    split, den, cond = setup
    out = sample(den, SamplingPlan.one_x(), cond, LATENT, seed=0)
    x = torch.randn((2, *LATENT), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        v1, d_img, d_ctx = split.full(x, cond.text, cond.pooled, torch.full((2,), 1000.0))
        x = x + (0.75 - 1.0) * v1
        v2 = split.skipping(x, cond.text, cond.pooled, torch.full((2,), 750.0), d_img, d_ctx)
        x0 = x - 0.75 * v2
    assert torch.allclose(out, x0, atol=1e-6)


def test_same_seed_same_latents_other_seed_differs(setup):
    _, den, cond = setup
    a = sample(den, SamplingPlan.one_x(), cond, LATENT, seed=3)
    b = sample(den, SamplingPlan.one_x(), cond, LATENT, seed=3)
    c = sample(den, SamplingPlan.one_x(), cond, LATENT, seed=4)
    assert torch.equal(a, b)
    assert (a - c).abs().max() > 0.1


def test_skipping_changes_the_result_versus_two_full_steps(setup):
    _, den, cond = setup
    one_x = sample(den, SamplingPlan.one_x(), cond, LATENT, seed=0)
    two = sample(den, SamplingPlan.student(2), cond, LATENT, seed=0)
    assert (one_x - two).abs().max() > 1e-3


def test_eta_zero_is_seeded_and_differs_from_euler(setup):
    _, den, cond = setup
    a = sample(den, SamplingPlan.student(4, eta=0.0), cond, LATENT, seed=1)
    b = sample(den, SamplingPlan.student(4, eta=0.0), cond, LATENT, seed=1)
    c = sample(den, SamplingPlan.student(4, eta=1.0), cond, LATENT, seed=1)
    assert torch.equal(a, b) and (a - c).abs().max() > 1e-2


def test_teacher_cfg_matches_diffusers_scheduler(setup):
    split, den, cond = setup
    steps, w = 5, 4.0
    out = sample(den, SamplingPlan.teacher(steps, w), cond, LATENT, seed=2)

    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(steps)
    x = torch.randn((2, *LATENT), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        for t in sched.timesteps:
            ts = t.expand(2)
            v_c = split.transformer(x, cond.text, cond.pooled, ts, return_dict=False)[0]
            v_u = split.transformer(x, cond.uncond_text, cond.uncond_pooled, ts, return_dict=False)[0]
            x = sched.step(v_u + w * (v_c - v_u), t, x, return_dict=False)[0]
    assert torch.allclose(out, x, atol=1e-4)


def test_cfg_plan_without_unconditional_embedding_is_an_error(setup):
    _, den, cond = setup
    with pytest.raises(ValueError, match="no unconditional embedding"):
        sample(den, SamplingPlan.teacher(2), Conditioning(cond.text, cond.pooled), LATENT, seed=0)


def test_conditioning_validates_batch():
    with pytest.raises(ValueError, match="batch"):
        Conditioning(torch.zeros(2, 4, 8), torch.zeros(3, 8))
