"""Stage I losses: the DMD gradient vanishes when fake == real, the fake loss when the predictor is exact."""
import copy
import math
from dataclasses import replace

import pytest
import torch

from train.config import Stage1Config
from train.dmd import Batch, Parts, generator_loss
from train.losses import (dmd_gradient, dmd_loss, fake_loss, huber_c, noised, renoise, step_to, trajectory_loss,
                          x0_from)
from train.models import velocity_fn

SHAPE = (2, 16, 8, 8)


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_dmd_gradient_is_zero_when_fake_equals_real_and_normalised_otherwise():
    x0_hat, x0_real = _rand(*SHAPE, seed=1), _rand(*SHAPE, seed=2)
    assert torch.count_nonzero(dmd_gradient(x0_hat, x0_real, x0_real.clone())) == 0
    x0_fake = x0_real + 0.1
    grad = dmd_gradient(x0_hat, x0_real, x0_fake)
    norm = (x0_hat - x0_real).abs().mean(dim=(1, 2, 3), keepdim=True)
    torch.testing.assert_close(grad, 0.1 / norm.expand_as(grad), rtol=1e-5, atol=0)
    # the normaliser is per sample over all of C, H, W
    assert torch.allclose(grad[0], grad[0].flatten()[0]) and not torch.allclose(grad[0, 0, 0, 0], grad[1, 0, 0, 0])


def test_dmd_loss_injects_the_gradient():
    x0_hat = _rand(*SHAPE, seed=3).requires_grad_(True)
    grad = _rand(*SHAPE, seed=4)
    loss = dmd_loss(x0_hat, grad)
    loss.backward()
    # x0_hat - (x0_hat - grad) rounds: equal to grad / numel up to float32 cancellation
    torch.testing.assert_close(x0_hat.grad, grad / grad.numel(), rtol=1e-4, atol=1e-10)
    assert float(loss.detach()) == pytest.approx(0.5 * float((grad ** 2).mean()), rel=1e-6)


def test_fake_loss_is_zero_for_the_exact_predictor():
    # A student that always outputs c: the exact velocity of its noised samples is (x_t - c) / sigma.
    c = _rand(1, 16, 8, 8, seed=5).expand(*SHAPE)
    sigma = torch.tensor([0.9, 0.05], dtype=torch.float64)
    x_t = noised(c, sigma, _rand(*SHAPE, seed=6))
    exact = (x_t - c) / sigma.view(-1, 1, 1, 1).float()
    assert float(fake_loss(exact, x_t, c, sigma)) == 0.0
    # also from a state that was itself partly noised (the trajectory objective's source)
    x_mid = noised(c, torch.tensor([0.3, 0.3]), _rand(*SHAPE, seed=7))
    x_r = renoise(x_mid, torch.tensor([0.3, 0.3]), sigma, _rand(*SHAPE, seed=8))
    assert float(fake_loss((x_r - c) / sigma.view(-1, 1, 1, 1).float(), x_r, c, sigma)) == 0.0
    # a wrong predictor is penalised
    assert float(fake_loss(exact + 0.1, x_t, c, sigma)) == pytest.approx(0.01, rel=1e-4)


def test_noised_target_is_eps_minus_x0():
    x0, eps = _rand(*SHAPE, seed=9), _rand(*SHAPE, seed=10)
    sigma = torch.tensor([0.8, 0.2], dtype=torch.float64)
    x_t = noised(x0, sigma, eps)
    assert float(fake_loss(eps - x0, x_t, x0, sigma)) < 1e-10


def test_renoise_gives_the_flow_marginal():
    # x at s1 carries noise std s1 (x0 = 0); re-noised to s2 it must carry std s2 and scale (1 - s2)
    s1, s2 = torch.tensor([0.3, 0.0]), torch.tensor([0.8, 0.6])
    a = (1 - s2) / (1 - s1)
    b = torch.sqrt(s2 ** 2 - (a * s1) ** 2)
    torch.testing.assert_close(a ** 2 * s1 ** 2 + b ** 2, s2 ** 2)
    x0 = torch.ones(2, 1, 1, 1)
    out = renoise(noised(x0, s1, torch.zeros(2, 1, 1, 1)), s1, s2, torch.zeros(2, 1, 1, 1))
    torch.testing.assert_close(out.view(-1), 1 - s2)


def test_step_to_matches_the_schedule_step():
    from onex_export.schedule import student_step

    x, v, n = _rand(*SHAPE, seed=11), _rand(*SHAPE, seed=12), _rand(*SHAPE, seed=13)
    for eta in (1.0, 0.3):
        ours = step_to(x, v, torch.tensor([1.0, 1.0]), torch.tensor([0.75, 0.75]), eta, n)
        torch.testing.assert_close(ours, student_step(x, v, 1.0, 0.75, eta, n), rtol=0, atol=1e-6)
    last = step_to(x, v, torch.tensor([0.75, 0.75]), torch.tensor([0.0, 0.0]), 1.0, None)
    torch.testing.assert_close(last, x0_from(x, torch.tensor([0.75, 0.75]), v), rtol=0, atol=1e-6)


def test_trajectory_loss_zero_when_real_equals_fake_and_positive_otherwise():
    x_next = _rand(*SHAPE, seed=14).requires_grad_(True)
    real = _rand(*SHAPE, seed=15)
    zero = trajectory_loss(x_next, real, real.clone())
    assert float(zero.detach()) == 0.0
    zero.backward()
    assert torch.count_nonzero(x_next.grad) == 0
    loss = trajectory_loss(x_next, real, real - 0.5)  # fake behind real: pull x_next towards +0.5
    x_next.grad = None
    loss.backward()
    assert float(loss.detach()) > 0 and float(x_next.grad.mean()) < 0
    assert huber_c(64 * 64 * 4) == pytest.approx(1e-3) and huber_c(16 * 128 * 128) == pytest.approx(4e-3)


@pytest.mark.parametrize("objective", ["dmd2", "trajectory"])
def test_generator_gradient_is_exactly_zero_when_fake_is_the_teacher(tiny_teacher, objective):
    """mu_fake == mu_real (no guidance, or sigma above alpha): the student gets no gradient at all."""
    student = copy.deepcopy(tiny_teacher).requires_grad_(True)
    fake = copy.deepcopy(tiny_teacher)
    cfg = Stage1Config(run_dir="unused", objective=objective, precision="fp32", guidance_scale=7.0, guidance_alpha=0.94)
    parts = Parts(cfg, student, fake, velocity_fn(student, "fp32"), velocity_fn(fake, "fp32"),
                  velocity_fn(tiny_teacher, "fp32"), None, None, None, None, (1.0, 0.75), None)
    g = torch.Generator().manual_seed(0)
    batch = Batch(torch.randn(2, 16, 48, generator=g), torch.randn(2, 40, generator=g),
                  torch.zeros(2, 16, 48), torch.zeros(2, 40))
    x_in = torch.randn(*SHAPE, generator=g)
    s_k, s_next = torch.tensor([1.0, 1.0], dtype=torch.float64), torch.tensor([0.75, 0.75], dtype=torch.float64)
    v = parts.student_v(x_in, s_k, batch.text, batch.pooled)
    x0_hat, x_next = x0_from(x_in, s_k, v), step_to(x_in, v, s_k, s_next, 1.0, None)
    t = torch.tensor([0.99, 0.97], dtype=torch.float64)  # above alpha: the teacher is purely conditional
    noise = torch.randn(*SHAPE, generator=g)
    loss, uncond = generator_loss(parts, batch, x0_hat, x_next, s_next, t, noise, run_uncond=False)
    loss.backward()
    assert float(loss.detach()) == 0.0 and not uncond
    assert all(p.grad is None or torch.count_nonzero(p.grad) == 0 for p in student.parameters())

    # negative: below alpha the guided teacher differs from the fake, and the student gets a gradient
    student.zero_grad(set_to_none=True)
    v = parts.student_v(x_in, s_k, batch.text, batch.pooled)
    x0_hat, x_next = x0_from(x_in, s_k, v), step_to(x_in, v, s_k, s_next, 1.0, None)
    t_low = torch.tensor([0.9, 0.8], dtype=torch.float64)
    loss, uncond = generator_loss(parts, batch, x0_hat, x_next, s_next, t_low, noise, run_uncond=True)
    loss.backward()
    assert float(loss.detach()) > 0 and uncond
    total = math.sqrt(sum(float(p.grad.square().sum()) for p in student.parameters() if p.grad is not None))
    assert total > 1e-6

    # and with guidance off the fake-equals-teacher case is zero even below alpha
    student.zero_grad(set_to_none=True)
    parts_off = replace(parts, cfg=replace(cfg, guidance_scale=1.0))
    loss, uncond = generator_loss(parts_off, batch, x0_hat.detach(), x_next.detach(), s_next, t_low, noise, False)
    assert float(loss.detach()) == 0.0 and not uncond
