"""The flow-matching math and the sampling plans (DESIGN.md section 2)."""
import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from onex_export.config import SkipRange
from onex_export.schedule import (
    SamplingPlan,
    eps_from_velocity,
    shift_sigma,
    student_sigmas,
    student_step,
    teacher_sigmas,
    x0_from_velocity,
)


def test_student_sigmas_match_the_paper():
    assert student_sigmas(2) == pytest.approx((1.0, 0.75), abs=1e-12)
    assert student_sigmas(4) == pytest.approx((1.0, 0.9, 0.75, 0.5), abs=1e-12)


def test_shift_endpoints_and_value():
    assert shift_sigma(0.0) == 0.0 and shift_sigma(1.0) == 1.0
    assert shift_sigma(0.25) == pytest.approx(0.5, abs=1e-12)


def test_teacher_sigmas_equal_diffusers_scheduler():
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(28)
    ours = torch.tensor(teacher_sigmas(28))
    theirs = sched.sigmas[:-1].double()
    assert torch.allclose(ours.double(), theirs, atol=1e-6)
    assert sched.sigmas[-1] == 0


def test_velocity_conversions_invert_the_forward_process():
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(2, 4, generator=g), torch.randn(2, 4, generator=g)
    s = 0.3
    xt = (1 - s) * x0 + s * eps
    v = eps - x0
    assert torch.allclose(x0_from_velocity(xt, s, v), x0, atol=1e-6)
    assert torch.allclose(eps_from_velocity(xt, s, v), eps, atol=1e-6)


def test_eta_one_step_is_the_euler_step():
    g = torch.Generator().manual_seed(1)
    x, v = torch.randn(2, 16, 8, 8, generator=g), torch.randn(2, 16, 8, 8, generator=g)
    out = student_step(x, v, 1.0, 0.75, eta=1.0)
    assert torch.allclose(out, x + (0.75 - 1.0) * v, atol=1e-6)


def test_eta_zero_renoises_x0_with_the_given_noise():
    g = torch.Generator().manual_seed(2)
    x, v, n = (torch.randn(1, 4, 4, 4, generator=g) for _ in range(3))
    out = student_step(x, v, 0.9, 0.5, eta=0.0, noise=n)
    assert torch.allclose(out, 0.5 * (x - 0.9 * v) + 0.5 * n, atol=1e-6)
    mixed = student_step(x, v, 0.9, 0.5, eta=0.6, noise=n)
    eps_mix = 0.6 * (x + 0.1 * v) + math.sqrt(1 - 0.36) * n
    assert torch.allclose(mixed, 0.5 * (x - 0.9 * v) + 0.5 * eps_mix, atol=1e-6)


def test_last_step_returns_x0_and_eta_below_one_needs_noise():
    x, v = torch.ones(1, 2), torch.full((1, 2), 0.5)
    assert torch.allclose(student_step(x, v, 0.75, 0.0, eta=0.0), x - 0.75 * v)
    with pytest.raises(ValueError, match="needs fresh `noise`"):
        student_step(x, v, 1.0, 0.75, eta=0.5)
    with pytest.raises(ValueError, match="eta must lie"):
        student_step(x, v, 1.0, 0.75, eta=1.5)


@pytest.mark.parametrize(
    "layers, skip, nfe",
    [(24, SkipRange(3, 8), 1.75), (24, SkipRange(3, 10), 1.0 + 16 / 24), (38, SkipRange(3, 12), 1.0 + 28 / 38)],
)
def test_effective_nfe_of_the_paper(layers, skip, nfe):
    assert SamplingPlan.one_x().nfe(layers, skip) == pytest.approx(nfe, abs=1e-12)


def test_effective_nfe_rounded_as_reported():
    assert round(SamplingPlan.one_x().nfe(24, SkipRange(3, 10)), 3) == 1.667
    assert round(SamplingPlan.one_x().nfe(38, SkipRange(3, 12)), 3) == 1.737


def test_baseline_plans():
    assert SamplingPlan.teacher().nfe(24, None) == 56
    assert SamplingPlan.student(4).nfe(24, SkipRange(3, 10)) == 4
    assert SamplingPlan.student(4).sigmas == pytest.approx((1.0, 0.9, 0.75, 0.5))
    assert SamplingPlan.one_x().skips == (False, True)
    assert SamplingPlan.one_x().sigma_after(1) == 0.0


def test_plan_validation():
    with pytest.raises(ValueError, match="first step must be a full step"):
        SamplingPlan("bad", (1.0, 0.75), (True, False))
    with pytest.raises(ValueError, match="decrease"):
        SamplingPlan("bad", (0.75, 1.0), (False, False))
    with pytest.raises(ValueError, match="skips has"):
        SamplingPlan("bad", (1.0, 0.75), (False,))
    with pytest.raises(ValueError, match="no skip range"):
        SamplingPlan.one_x().nfe(24, None)


def test_a_plan_writes_the_manifest_section_it_reads_back():
    plan = SamplingPlan.one_x(eta=0.5)
    section = plan.to_manifest(24, SkipRange(3, 10))
    assert SamplingPlan.from_manifest(section) == plan
    assert [s["plan"] for s in section["steps"]] == ["full", "skipping"] and section["sigmas"] == [1.0, 0.75]
    assert section["effective_nfe"] == pytest.approx(1 + 16 / 24) and section["steps"][1]["sigma_next"] == 0.0


@pytest.mark.parametrize("make", [lambda: SamplingPlan.one_x(float("nan")), lambda: SamplingPlan.teacher(28, float("nan")),
                                  lambda: SamplingPlan.teacher(28, float("inf"))])
def test_a_plan_refuses_non_finite_eta_and_guidance(make):
    """nan passes `0 <= eta <= 1`'s negation and `guidance < 1` (both false): it would turn CFG off silently."""
    with pytest.raises(ValueError, match="must be finite numbers"):
        make()
    assert SamplingPlan.teacher(28, 7.0).uses_cfg  # a finite scale is taken
