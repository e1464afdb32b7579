"""Importance sampling of the DMD timestep: the weight curve, the step windows, the sampled frequencies."""
import pytest
import torch

from onex_export.schedule import shift_sigma
from train.importance import (CURVE_ANCHORS, GRID_SIZE, TimestepSampler, dmd_grid, importance_weights, step_windows,
                              unshifted)

# chi-square critical value for 9 degrees of freedom at p = 0.001
CHI2_9_P001 = 27.877


def test_grid_runs_from_sigma_one_down_without_zero():
    grid = dmd_grid()
    assert grid.shape == (GRID_SIZE,) and grid[0] == 1.0
    assert torch.all(grid[1:] < grid[:-1]) and grid[-1] > 0
    assert grid[500] == 0.75 and grid[250] == pytest.approx(0.9) and grid[999] == pytest.approx(shift_sigma(0.001))


def test_windows_split_the_grid_at_the_student_sigmas():
    assert step_windows(2) == ((0, 500), (500, 1000))  # (0.75, 1] and (0, 0.75]
    assert step_windows(4) == ((0, 250), (250, 500), (500, 750), (750, 1000))  # sigmas 1, 0.9, 0.75, 0.5


def test_curve_c_peaks_where_the_paper_says():
    w = importance_weights("c")
    peak = int(w.argmax())
    # Anchors peak at index 300; log-space smoothing moves the peak to 224: sigma 0.912, i.e. the
    # unshifted t = 0.776 the paper calls "around t = 0.75".
    assert peak == 224
    assert float(dmd_grid()[peak]) == pytest.approx(0.9122, abs=1e-4)
    assert unshifted(float(dmd_grid()[peak])) == pytest.approx(0.776, abs=1e-6)
    assert float(w[peak]) == pytest.approx(0.9859, abs=1e-4)
    # steep fall below sigma 0.75 and the floor far out, but never below it
    assert float(w[500]) == pytest.approx(0.1313, abs=1e-4) and float(w[999]) == pytest.approx(0.00264, abs=1e-5)
    assert float(w.min()) >= 1e-6
    # step one carries most of the mass: structure first
    assert float(w[:500].sum() / w.sum()) == pytest.approx(0.9565, abs=1e-4)


def test_curves_down_weight_low_noise_except_d_and_e():
    for name in ("a", "b", "c"):
        w = importance_weights(name)
        assert w[:500].sum() > 3 * w[500:].sum(), name
    for name in ("d", "e"):
        w = importance_weights(name)
        assert w[500:].sum() > w[:500].sum(), name
    assert torch.equal(importance_weights("uniform"), torch.ones(GRID_SIZE, dtype=torch.float64))
    assert set(CURVE_ANCHORS) == {"a", "b", "c", "d", "e"}
    with pytest.raises(ValueError, match="unknown curve"):
        importance_weights("f")


@pytest.mark.parametrize("num_steps", [2, 4])
def test_samples_respect_the_window_of_their_step(num_steps):
    sampler = TimestepSampler(num_steps, "c")
    g = torch.Generator().manual_seed(0)
    steps = torch.arange(num_steps).repeat(2000)
    sigmas = sampler.sigmas(sampler.sample(steps, g))
    bounds = [1.0, 0.75, 0.0] if num_steps == 2 else [1.0, 0.9, 0.75, 0.5, 0.0]
    for k in range(num_steps):
        s = sigmas[steps == k]
        hi, lo = bounds[k], bounds[k + 1]
        assert float(s.max()) <= hi and float(s.min()) > lo, (k, float(s.min()), float(s.max()))
        assert float(s.max()) > hi - 0.05 and float(s.min()) < lo + 0.05  # the whole window is reachable


def _chi_square(indices: torch.Tensor, probabilities: torch.Tensor, start: int, bins: int, width: int) -> float:
    counts = torch.bincount((indices - start) // width, minlength=bins).double()
    expected = torch.stack([probabilities[start + i * width:start + (i + 1) * width].sum() for i in range(bins)])
    expected = expected * len(indices)
    return float(((counts - expected) ** 2 / expected).sum())


def test_sampled_frequencies_match_the_weight_chi_square():
    sampler = TimestepSampler(2, "c")
    g = torch.Generator().manual_seed(1234)
    n = 20000
    drawn = sampler.sample(torch.zeros(n, dtype=torch.long), g)  # step one: indices 0..499
    stat = _chi_square(drawn, sampler.probabilities(0), 0, bins=10, width=50)
    assert stat < CHI2_9_P001, stat
    # the fake model's sampler is uniform in the window
    fake = TimestepSampler(2, "uniform")
    drawn = fake.sample(torch.ones(n, dtype=torch.long), g)  # step two: 500..999
    assert _chi_square(drawn, fake.probabilities(1), 500, bins=10, width=50) < CHI2_9_P001


def test_chi_square_rejects_uniform_draws_against_curve_c():
    uniform = TimestepSampler(2, "uniform")
    drawn = uniform.sample(torch.zeros(20000, dtype=torch.long), torch.Generator().manual_seed(1234))
    stat = _chi_square(drawn, TimestepSampler(2, "c").probabilities(0), 0, bins=10, width=50)
    assert stat > 100 * CHI2_9_P001, stat


def test_same_generator_state_same_draws():
    sampler = TimestepSampler(2, "c")
    steps = torch.tensor([0, 1, 1, 0])
    a = sampler.sample(steps, torch.Generator().manual_seed(5))
    b = sampler.sample(steps, torch.Generator().manual_seed(5))
    c = sampler.sample(steps.repeat(8), torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a.repeat(8), c)
