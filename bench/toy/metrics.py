"""The toy world's metrics, computed from the judge's verdicts (bench/toy/judge.py), never from a generator.

- fidelity: the fraction of images judged correct (a glyph of the prompt's digit, colour and side), and each
  attribute's own rate;
- FID in the judge's feature space (standardised features, 39 dims) against held-out real scenes and against the
  teacher's samples: ``|mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2))``;
- diversity: mode coverage (per prompt, the share of the four free-attribute modes -- small/large x top/bottom --
  that its seeds reach, averaged over prompts) and the mean pairwise feature distance among a prompt's seeds.

Images are laid out prompt-major: row ``p * seeds + s`` is prompt ``p``, seed ``s``.
"""
from __future__ import annotations

import numpy as np
import torch
from scipy import linalg

from .judge import Verdicts

MODES = 4


def fid(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to features ``a`` (n, d) and ``b`` (m, d)."""
    a, b = a.double().numpy(), b.double().numpy()
    mu_a, mu_b = a.mean(0), b.mean(0)
    # a small ridge: features constant over a set (a dead unit) would leave the covariances singular
    ridge = 1e-6 * np.eye(a.shape[1])
    cov_a, cov_b = np.cov(a, rowvar=False) + ridge, np.cov(b, rowvar=False) + ridge
    root = linalg.sqrtm(cov_a @ cov_b).real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * root))


def fidelity(v: Verdicts) -> dict[str, float]:
    """Rates over all images: ``correct`` (all three named attributes) and each attribute's own."""
    return {"correct": float(v.correct.float().mean()), "digit": float((v.present & v.digit_ok).float().mean()),
            "colour": float((v.present & v.colour_ok).float().mean()),
            "side": float((v.present & v.side_ok).float().mean()), "glyph": float(v.present.float().mean())}


def diversity(v: Verdicts, seeds: int) -> dict[str, float]:
    """Mode coverage and mean pairwise standardised-feature distance, per prompt over its ``seeds`` rows,
    averaged over prompts. Images without a glyph count for no mode."""
    if v.present.shape[0] % seeds:
        raise ValueError(f"{v.present.shape[0]} images are not whole prompts of {seeds} seeds")
    prompts = v.present.shape[0] // seeds
    modes = v.mode.view(prompts, seeds)
    present = v.present.view(prompts, seeds)
    coverage = [len(set(m[p].tolist())) / MODES for m, p in zip(modes, present)]
    feats = v.features.view(prompts, seeds, -1)
    pairs = torch.triu_indices(seeds, seeds, offset=1)
    dist = [float(torch.cdist(f, f)[pairs[0], pairs[1]].mean()) for f in feats]
    return {"mode_coverage": float(np.mean(coverage)), "pairwise_distance": float(np.mean(dist))}


def all_metrics(v: Verdicts, seeds: int, real: torch.Tensor, teacher: torch.Tensor | None) -> dict[str, float]:
    """Every metric of one set of images: fidelity, diversity, FID against ``real`` features and against the
    ``teacher``'s (when given)."""
    out = {**fidelity(v), **diversity(v, seeds), "fid_real": fid(v.features, real)}
    if teacher is not None:
        out["fid_teacher"] = fid(v.features, teacher)
    return out
