"""Timestep-aware teacher guidance: CFG only where sigma <= alpha, the unconditional pass only if needed."""
import pytest
import torch

from train.guidance import guided_velocity, needs_uncond
from train.models import velocity_fn


class CountingTeacher:
    """A stand-in teacher whose velocity tells conditional from unconditional (by the text)."""

    def __init__(self):
        self.calls = []

    def __call__(self, x, sigma, text, pooled):
        self.calls.append("uncond" if float(text.abs().sum()) == 0 else "cond")
        return x * 0.5 + text.mean(dim=(1, 2)).view(-1, 1, 1, 1) + sigma.view(-1, 1, 1, 1).float()


def _inputs(sigmas):
    g = torch.Generator().manual_seed(0)
    b = len(sigmas)
    return (torch.randn(b, 4, 8, 8, generator=g), torch.tensor(sigmas, dtype=torch.float64),
            torch.randn(b, 5, 6, generator=g) + 1.0, torch.randn(b, 3, generator=g),
            torch.zeros(b, 5, 6), torch.zeros(b, 3))


def test_above_alpha_exactly_conditional_and_no_uncond_pass():
    teacher = CountingTeacher()
    x, s, text, pooled, ut, up = _inputs([1.0, 0.97, 0.95])
    out = guided_velocity(teacher, x, s, text, pooled, ut, up, scale=7.0, alpha=0.94)
    assert teacher.calls == ["cond"] and out.uncond_pass is False
    assert torch.equal(out.velocity, teacher(x, s, text, pooled))


def test_mixed_batch_guides_only_samples_at_or_below_alpha():
    teacher = CountingTeacher()
    x, s, text, pooled, ut, up = _inputs([1.0, 0.94, 0.5, 0.96])
    out = guided_velocity(teacher, x, s, text, pooled, ut, up, scale=7.0, alpha=0.94)
    assert teacher.calls == ["cond", "uncond"] and out.uncond_pass is True
    v_c, v_u = teacher(x, s, text, pooled), teacher(x, s, ut, up)
    cfg = v_c + 6.0 * (v_c - v_u)
    assert torch.equal(out.velocity[[0, 3]], v_c[[0, 3]])  # sigma > alpha: exactly v_c
    assert torch.equal(out.velocity[[1, 2]], cfg[[1, 2]])  # sigma <= alpha (0.94 included): CFG
    assert (cfg[1] - v_c[1]).abs().max() > 1.0  # and guidance does change them


def test_release_threshold_096_guides_sigma_095():
    teacher = CountingTeacher()
    x, s, text, pooled, ut, up = _inputs([0.95])
    paper = guided_velocity(teacher, x, s, text, pooled, ut, up, scale=7.0, alpha=0.94)
    release = guided_velocity(teacher, x, s, text, pooled, ut, up, scale=7.0, alpha=0.96)
    assert not paper.uncond_pass and release.uncond_pass
    assert (paper.velocity - release.velocity).abs().max() > 1.0


def test_scale_one_never_runs_the_unconditional_pass():
    teacher = CountingTeacher()
    x, s, text, pooled, ut, up = _inputs([0.1, 0.5])
    out = guided_velocity(teacher, x, s, text, pooled, ut, up, scale=1.0, alpha=0.94)
    assert teacher.calls == ["cond"] and not out.uncond_pass
    assert not needs_uncond(s, 1.0, 0.94).any()


def test_global_decision_runs_uncond_but_keeps_conditional_rows_exact():
    # under FSDP another rank's sample may need the pass: this rank runs it but changes nothing
    teacher = CountingTeacher()
    x, s, text, pooled, ut, up = _inputs([1.0, 0.99])
    out = guided_velocity(teacher, x, s, text, pooled, ut, up, scale=7.0, alpha=0.94, run_uncond=True)
    assert teacher.calls == ["cond", "uncond"] and out.uncond_pass
    assert torch.equal(out.velocity, teacher(x, s, text, pooled))


def test_refusing_a_needed_uncond_pass_is_a_bug():
    x, s, text, pooled, ut, up = _inputs([0.5])
    with pytest.raises(ValueError, match="need guidance"):
        guided_velocity(CountingTeacher(), x, s, text, pooled, ut, up, scale=7.0, alpha=0.94, run_uncond=False)


def test_with_the_tiny_teacher(tiny_teacher):
    v = velocity_fn(tiny_teacher, "fp32")
    g = torch.Generator().manual_seed(3)
    x, text, pooled = torch.randn(2, 16, 8, 8, generator=g), torch.randn(2, 16, 48, generator=g), torch.randn(2, 40, generator=g)
    s = torch.tensor([0.99, 0.3], dtype=torch.float64)
    ut, up = torch.zeros(2, 16, 48), torch.zeros(2, 40)
    with torch.no_grad():
        out = guided_velocity(v, x, s, text, pooled, ut, up, 7.0, 0.94).velocity
        v_c, v_u = v(x, s, text, pooled), v(x, s, ut, up)
    assert torch.equal(out[0], v_c[0])
    torch.testing.assert_close(out[1], v_c[1] + 6.0 * (v_c[1] - v_u[1]), rtol=0, atol=0)
