"""Stage II's parts on tiny models: the cached fake-image path, the discriminator, and the Eq. 8 objective.

The discriminator's tower is the tiny configs' one: an open_clip model of the XXL's structure (a timm ConvNeXt
trunk, a linear projection) at the smallest timm size, with random weights; the published ones cannot be
fetched here.
"""
from __future__ import annotations


import pytest
import torch

from onex_export.config import SkipRange
from onex_export.models import SplitSD3Transformer, build_tiny
from onex_export.models.compensation import CompensationMLP
from onex_export.runtime import Conditioning, TorchDenoiser, sample
from onex_export.schedule import SamplingPlan, student_step
from train.cached_path import cached_latents, feature_kd, output_kd, step_two, velocity_error
from train.discriminator import ConvNeXtTaps, Discriminator, d_loss, g_loss, tiny_tower

def _split(skip: str = "3-10") -> SplitSD3Transformer:
    transformer = build_tiny("tiny-sd3")
    return SplitSD3Transformer(transformer, SkipRange.parse(skip), CompensationMLP.for_transformer(transformer))


def _cond(split: SplitSD3Transformer, batch: int, seed: int) -> Conditioning:
    cfg = split.transformer.config
    g = torch.Generator().manual_seed(seed)
    return Conditioning(text=torch.randn(batch, 16, cfg.joint_attention_dim, generator=g),
                        pooled=torch.randn(batch, cfg.pooled_projection_dim, generator=g))


def test_the_fake_images_are_the_runtime_1x_schedule_with_gradient_as_algorithm_1_has_it():
    """x0_cache = G(detach(x_t1), t1, f(Delta_0)): the images equal the runtime's; the gradient reaches the MLP and,
    through Delta_0, the skipped blocks (which step two does not run); not through step one's velocity."""
    split = _split()
    with torch.no_grad():
        for p in split.mlp.parameters():
            p.add_(0.02 * torch.randn_like(p))  # a non-identity MLP, so that its gradient is not trivially zero
    cond, shape, seeds = _cond(split, 2, 0), (16, 16, 16), [11, 12]
    x0 = cached_latents(split, cond, shape, seeds)
    served = sample(TorchDenoiser(split), SamplingPlan.one_x(), cond, shape, [(s, 1) for s in seeds])
    assert torch.equal(x0.detach(), served)
    x0.square().mean().backward()
    skip = split.skip
    blocks = split.transformer.transformer_blocks
    inside = blocks[skip.start0].attn.to_q.weight.grad  # run at step one only: its gradient comes through Delta_0
    assert inside is not None and inside.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in split.mlp.img.parameters())
    assert blocks[-1].ff.net[2].weight.grad.abs().sum() > 0 and blocks[0].attn.to_q.weight.grad.abs().sum() > 0

    # x_t1 is detached: with the deltas detached as well, the skipped blocks get no gradient at all
    split.zero_grad(set_to_none=True)
    state = step_two(split, cond, shape, seeds)
    v = split.skipping(state.x, state.text, state.pooled, state.timestep, state.delta_img, state.delta_ctx)
    (state.x - 0.75 * v).square().mean().backward()  # x0 = x_t1 - sigma v, the runtime's last Euler step
    assert all(p.grad is None for b in blocks[skip.start0:skip.stop0] for p in b.parameters())


def test_step_two_state_continues_to_the_runtime_images():
    split = _split()
    cond, shape, seeds = _cond(split, 2, 3), (16, 16, 16), [5, 6]
    state = step_two(split, cond, shape, seeds)
    assert state.sigma == 0.75 and state.x.shape == (2, *shape)
    with torch.no_grad():
        v = split.skipping(state.x, state.text, state.pooled, state.timestep, state.delta_img, state.delta_ctx)
        x0 = student_step(state.x, v, 0.75, 0.0, 1.0)
    served = sample(TorchDenoiser(split), SamplingPlan.one_x(), cond, shape, [(s, 1) for s in seeds])
    assert torch.equal(x0, served)


def test_eq7_feature_objective_trains_the_mlp_toward_step_twos_deltas():
    torch.manual_seed(0)
    split = _split("3-10")
    split.transformer.requires_grad_(False)
    shape = (16, 16, 16)
    held_out = step_two(split, _cond(split, 4, 999), shape, [90, 91, 92, 93])
    before = feature_kd(split, held_out).item()
    opt = torch.optim.AdamW(split.mlp.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=1e-4)
    for it in range(30):
        loss = feature_kd(split, step_two(split, _cond(split, 4, it), shape, list(range(4 * it, 4 * it + 4))))
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = feature_kd(split, held_out).item()
    print(f"\nEq. 7 on held-out noise: {before:.5f} -> {after:.5f}")
    assert after < 0.5 * before


@pytest.fixture(scope="module")
def tower():
    return tiny_tower()


def test_the_discriminator_taps_three_stage_maps_and_the_embedding(tower):
    taps = ConvNeXtTaps(tower)
    assert taps.channels == (40, 80, 160, 32)
    images = torch.rand(3, 3, 64, 64)
    maps = taps(images)
    assert [tuple(m.shape) for m in maps] == [(3, 40, 16, 16), (3, 80, 8, 8), (3, 160, 4, 4), (3, 32)]
    disc = Discriminator(taps).eval()  # eval: spectral norm's power iteration does not step between the calls
    levels = disc.levels(images)
    assert [tuple(level.shape) for level in levels] == [(3,)] * 4
    assert torch.allclose(disc(images), torch.stack(levels).sum(0))
    assert all(not p.requires_grad for p in taps.parameters())
    assert {id(p) for p in disc.trainable()} == {id(p) for p in disc.parameters() if p.requires_grad}
    disc.train()
    assert not taps.training  # the frozen tower stays in eval mode (no drop-path)


def test_the_discriminator_learns_to_separate_flat_images_from_noise(tower):
    torch.manual_seed(0)
    disc = Discriminator(ConvNeXtTaps(tower))
    opt = torch.optim.AdamW(disc.trainable(), lr=1e-2, betas=(0.9, 0.95), weight_decay=1e-4)
    g = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(40):
        flat = torch.rand(8, 3, 1, 1, generator=g).expand(8, 3, 64, 64)  # "real": one colour per image
        noise = torch.rand(8, 3, 64, 64, generator=g)  # "fake"
        loss = d_loss(disc.levels(flat), disc.levels(noise))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    disc.eval()
    with torch.no_grad():
        margin = (disc(flat).mean() - disc(noise).mean()).item()
    print(f"\nD loss on the toy: {first:.3f} -> {last:.3f}; logit margin real - fake {margin:.2f}")
    assert last < 0.8 * first  # the floor is 4 levels x H(0.8) = 2.0 with the smoothed real target
    assert margin > 2.0


def test_gan_losses_have_the_smoothed_targets():
    zero = [torch.zeros(4)]
    assert d_loss(zero, zero).item() == pytest.approx(2 * torch.log(torch.tensor(2.0)).item(), rel=1e-6)
    # a real logit of logit(0.8) is optimal for the smoothed target: its gradient vanishes
    r = torch.full((4,), torch.logit(torch.tensor(0.8)).item(), requires_grad=True)
    d_loss([r], [torch.full((4,), -20.0)]).backward()
    assert r.grad.abs().max() < 1e-6
    f = torch.zeros(4, requires_grad=True)
    g_loss([f], target=0.8).backward()
    assert f.grad.mean().item() == pytest.approx((0.5 - 0.8) / 4, rel=1e-5)


def test_eq8_training_of_the_mlp_lowers_step_twos_velocity_error_on_held_out_noise():
    """The point of Stage II's MLP, measured: a short run on the output-level objective (Eq. 8) with the student
    frozen lowers the skipping step's velocity error against the full step, on noise it was not trained on."""
    torch.manual_seed(0)
    split = _split("3-10")
    split.transformer.requires_grad_(False)
    shape = (16, 16, 16)
    held_out = [step_two(split, _cond(split, 4, 1000 + i), shape, list(range(1000 + 4 * i, 1004 + 4 * i)))
                for i in range(2)]
    before = sum(velocity_error(split, s) for s in held_out) / len(held_out)
    opt = torch.optim.AdamW(split.mlp.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=1e-4)
    for it in range(60):
        state = step_two(split, _cond(split, 4, it), shape, list(range(4 * it, 4 * it + 4)))
        loss = output_kd(split, state)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = sum(velocity_error(split, s) for s in held_out) / len(held_out)
    print(f"\nstep two velocity error on held-out noise: plain reuse {before:.4f}, Eq. 8 MLP {after:.4f} "
          f"({before / after:.2f}x lower)")
    assert after < before / 1.5
