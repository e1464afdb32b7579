"""Where the DMD timestep lands: the teacher's 1000-point sigma grid, each student step's window on
it, and the importance weight over it (paper Sec. 3.3 and Fig. 10, "structure-focused" Stage I).

Grid: ``sigma_i = shift(1 - i / 1000)`` for ``i = 0..999`` (index 0 is sigma 1; sigma 0 is not on it).
Student step k (sigma_k -> sigma_k+1) owns the indices whose sigma lies in ``(sigma_k+1, sigma_k]``:
for N = 2, step one owns 0..499 (sigma in (0.75, 1]) and step two 500..999 (sigma in (0, 0.75]).

Weights: anchor points (index, weight) linearly interpolated over 0..1000, then smoothed with a
Gaussian of width 100 indices in log space (edge padding), floor 1e-6; the curves are the presets of
the authors' release, "c" being the paper's choice (it peaks at index 224, sigma 0.912 = unshifted
t 0.776, the paper's "around t = 0.75", and falls off steeply below sigma 0.75).
"""
from __future__ import annotations

import torch

from onex_export.schedule import SHIFT, shift_sigma, student_sigmas

GRID_SIZE = 1000
SMOOTH_WIDTH = 100.0  # Gaussian sigma, in grid indices
WEIGHT_FLOOR = 1e-6

# (grid index, weight) anchors. Only "c" is specified by the paper's text (and is its best curve); the
# others are the authors' release's presets for the Fig. 10 ablation: a and b down-weight low noise
# like c, d favours low noise, e is d with more weight at the pure-noise end.
CURVE_ANCHORS: dict[str, tuple[tuple[int, float], ...]] = {
    "a": ((0, 1.0), (250, 0.8), (400, 0.2), (1000, 0.001)),
    "b": ((0, 1.0), (100, 1.0), (250, 1.0), (500, 0.3), (750, 0.05), (1000, 0.001)),
    "c": ((0, 0.6), (300, 1.3), (500, 0.05), (1000, 0.001)),
    "d": ((0, 0.01), (300, 0.1), (500, 0.95), (1000, 1.0)),
    "e": ((0, 0.4), (300, 0.05), (500, 0.95), (1000, 1.0)),
}


def dmd_grid(shift: float = SHIFT) -> torch.Tensor:
    """The teacher's sigmas ``shift(1 - i / 1000)``, ``i = 0..999``: float64 (1000,), decreasing."""
    return torch.tensor([shift_sigma(1.0 - i / GRID_SIZE, shift) for i in range(GRID_SIZE)], dtype=torch.float64)


def step_windows(num_steps: int, shift: float = SHIFT) -> tuple[tuple[int, int], ...]:
    """Per student step, the half-open grid index range ``[start, stop)`` of sigmas in
    ``(sigma_k+1, sigma_k]`` (the last step's window ends at the grid's end, just above sigma 0)."""
    grid = dmd_grid(shift)
    starts = [int((grid - s).abs().argmin()) for s in student_sigmas(num_steps, shift)]
    bounds = starts + [GRID_SIZE]
    windows = tuple((bounds[k], bounds[k + 1]) for k in range(num_steps))
    if any(stop <= start for start, stop in windows):
        raise ValueError(f"{num_steps} student steps leave an empty window on a {GRID_SIZE}-point grid")
    return windows


def _smooth_log(values: torch.Tensor, width: float) -> torch.Tensor:
    """Gaussian smoothing (radius 3 width, edge padding) of ``values`` (float64, 1-D)."""
    radius = max(1, round(3 * width))
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (offsets / width) ** 2)
    kernel = kernel / kernel.sum()
    padded = torch.cat([values[:1].expand(radius), values, values[-1:].expand(radius)])
    return torch.nn.functional.conv1d(padded.view(1, 1, -1), kernel.view(1, 1, -1)).view(-1)


def importance_weights(curve: str, width: float = SMOOTH_WIDTH, floor: float = WEIGHT_FLOOR) -> torch.Tensor:
    """Unnormalised weight of each grid index for ``curve`` ("uniform" or a preset): float64 (1000,)."""
    if curve == "uniform":
        return torch.ones(GRID_SIZE, dtype=torch.float64)
    if curve not in CURVE_ANCHORS:
        raise ValueError(f"unknown curve {curve!r}; choose uniform or one of {', '.join(CURVE_ANCHORS)}")
    anchors = CURVE_ANCHORS[curve]
    xs = torch.tensor([a for a, _ in anchors], dtype=torch.float64)
    ys = torch.tensor([w for _, w in anchors], dtype=torch.float64)
    grid_x = torch.arange(0, GRID_SIZE + 1, dtype=torch.float64)  # the anchors span 0..1000
    seg = torch.clamp(torch.searchsorted(xs, grid_x, right=True) - 1, 0, len(xs) - 2)
    frac = (grid_x - xs[seg]) / (xs[seg + 1] - xs[seg])
    linear = ys[seg] + frac.clamp(0, 1) * (ys[seg + 1] - ys[seg])
    smooth = torch.exp(_smooth_log(torch.log(linear.clamp_min(floor)), width))
    return smooth.clamp_min(floor)[:GRID_SIZE]


class TimestepSampler:
    """Draws a grid index per sample inside the window of that sample's student step.

    Args:
        num_steps: the student's N.
        curve: "uniform" or a preset of :data:`CURVE_ANCHORS` (the generator's DMD timestep uses "c";
            the fake model's diffusion loss uses "uniform").
    """

    def __init__(self, num_steps: int, curve: str, shift: float = SHIFT):
        self.grid = dmd_grid(shift)
        self.windows = step_windows(num_steps, shift)
        self.weights = importance_weights(curve)
        index = torch.arange(GRID_SIZE)
        # (N, 1000): the weight of each index for a sample of step k, zero outside step k's window.
        self.table = torch.stack([self.weights * ((index >= a) & (index < b)) for a, b in self.windows])

    def probabilities(self, step: int) -> torch.Tensor:
        """The distribution over the grid for a sample of student step ``step``: float64 (1000,)."""
        row = self.table[step]
        return row / row.sum()

    def sample(self, steps: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Grid indices (B,) int64 for student steps ``steps`` (B,) int64, drawn from ``generator``."""
        return torch.multinomial(self.table[steps], 1, generator=generator).view(-1)

    def sigmas(self, indices: torch.Tensor) -> torch.Tensor:
        """The float64 sigmas (B,) of grid ``indices`` (B,)."""
        return self.grid[indices]


def unshifted(sigma: float, shift: float = SHIFT) -> float:
    """The inverse of :func:`~onex_export.schedule.shift_sigma` (the paper plots t before the shift)."""
    return sigma / (shift - (shift - 1.0) * sigma)
