"""Which blocks can step two skip? Measures every block's reuse error and every range's caching error.

The 2-step schedule runs on calibration prompts and seeds with every block's input and output kept at both
steps (``S_k[n]``: the residual streams entering block n+1 at step k, so block n maps ``S_k[n-1] -> S_k[n]``).

Per block n (paper Sec. 3.2, Fig. 5a): ``Delta_{n,k} = S_k[n] - S_k[n-1]`` and the reuse error

    e_n = ||Delta_{n,2} - Delta_{n,1}||_1 / ||Delta_{n,2}||_1

over both streams (image and text tokens): the L1 error of reusing step one's contribution, relative to the
contribution itself, so that blocks of different scale and different models compare. Per-stream values too.

Per contiguous range a-b (1-based, inside 1..L-1), the error of direct caching (no MLP):
- at the range's end, exactly and for free from the kept states: step two would carry
  ``S_2[a-1] + (S_1[b] - S_1[a-1])`` instead of ``S_2[b]``, an error of ``Delta_{a:b,1} - Delta_{a:b,2}``;
  ``boundary_error`` is its L1 norm relative to ``||Delta_{a:b,2}||_1``;
- on the outputs: that cached state goes through blocks b+1..L and the output layer only (the blocks before a
  are the uncached run's, kept from step two, so nothing before the range is re-run): ``velocity_error`` is
  ``||v_cache - v||_2 / ||v||_2`` against the uncached second step and ``latent_error`` the same for the final
  latents of the 1.x schedule. Range a-b costs L - b block runs; all ranges together sum_b b (L - b) (2300
  block runs for L = 24, about 96 passes) per prompt and seed; ``lengths`` limits the ranges measured.

Recommendation: for each target effective NFE ``1 + (L - k) / L`` (``k`` skipped blocks), the range of length k
with the lowest mean velocity error.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..config import SkipRange
from ..errors import OnexError
from ..models.split import SplitSD3Transformer
from ..schedule import SamplingPlan, student_step, timestep_from_sigma

DEFAULT_NFES = (1.75, 1.667)
NORMALISATION = ("e_n = ||Delta_n(t2) - Delta_n(t1)||_1 / ||Delta_n(t2)||_1 over both streams; range errors: "
                 "velocity and final latents, ||cached - uncached||_2 / ||uncached||_2, averaged over samples")


@dataclass(frozen=True)
class Trace:
    """One transformer pass with the residual streams kept: ``img[n]``/``ctx[n]`` enter block n+1 (0 <= n <= L;
    ``ctx[L]`` is None: the last block drops the text stream). ``temb`` (B, D), ``velocity`` (B, C, H, W)."""

    img: list[torch.Tensor]
    ctx: list[torch.Tensor | None]
    temb: torch.Tensor
    velocity: torch.Tensor


def trace(split: SplitSD3Transformer, x, text, pooled, sigma: float) -> Trace:
    """Run every block of ``split`` one at a time from latents ``x`` (B, C, H, W) at ``sigma``, keeping the
    streams between blocks."""
    timestep = torch.full((x.shape[0],), timestep_from_sigma(sigma), dtype=x.dtype, device=x.device)
    img, ctx, temb = split.embed(x, text, pooled, timestep)
    imgs, ctxs = [img], [ctx]
    for n in range(split.num_layers):
        img, ctx = split.run_blocks(img, ctx, temb, n, n + 1)
        imgs.append(img)
        ctxs.append(ctx)
    return Trace(imgs, ctxs, temb, split.project_out(img, temb, *x.shape[-2:]))


def _l1(t: torch.Tensor | None) -> float:
    return 0.0 if t is None else float(t.double().abs().sum())


def _rel2(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def block_errors(t1: Trace, t2: Trace) -> list[dict]:
    """Per block n = 1..L: e_n over both streams and per stream (None where a block has no text output)."""
    out = []
    for n in range(1, len(t1.img)):
        d_img1, d_img2 = t1.img[n] - t1.img[n - 1], t2.img[n] - t2.img[n - 1]
        has_ctx = t1.ctx[n] is not None
        d_ctx1 = t1.ctx[n] - t1.ctx[n - 1] if has_ctx else None
        d_ctx2 = t2.ctx[n] - t2.ctx[n - 1] if has_ctx else None
        num_img, den_img = _l1(d_img2 - d_img1), _l1(d_img2)
        num_ctx, den_ctx = (_l1(d_ctx2 - d_ctx1), _l1(d_ctx2)) if has_ctx else (0.0, 0.0)
        out.append({"block": n, "e": (num_img + num_ctx) / max(den_img + den_ctx, 1e-30),
                    "e_img": num_img / max(den_img, 1e-30),
                    "e_ctx": num_ctx / max(den_ctx, 1e-30) if has_ctx else None})
    return out


def range_errors(split: SplitSD3Transformer, t1: Trace, t2: Trace, x2: torch.Tensor, sigma2: float,
                 ranges: list[SkipRange], on_range: Callable[[], None] | None = None,
                 mlp_skip: SkipRange | None = None) -> list[dict]:
    """Direct-caching errors of each range (see the module docstring); ``x2`` the second step's latents. The
    range ``mlp_skip`` is also measured through ``split``'s MLP (``mlp_*`` errors), the way the runtime reuses it."""
    height, width = x2.shape[-2:]
    latents = student_step(x2, t2.velocity, sigma2, 0.0)

    def errors(img, ctx, b, prefix=""):
        img, _ = split.run_blocks(img, ctx, t2.temb, b, split.num_layers)
        v = split.project_out(img, t2.temb, height, width)
        return {f"{prefix}velocity_error": _rel2(v, t2.velocity),
                f"{prefix}latent_error": _rel2(student_step(x2, v, sigma2, 0.0), latents)}

    out = []
    for r in ranges:
        a, b = r.first, r.last
        d_img, d_ctx = t1.img[b] - t1.img[a - 1], t1.ctx[b] - t1.ctx[a - 1]
        cached_img, cached_ctx = t2.img[a - 1] + d_img, t2.ctx[a - 1] + d_ctx
        boundary = ((_l1(cached_img - t2.img[b]) + _l1(cached_ctx - t2.ctx[b]))
                    / max(_l1(t2.img[b] - t2.img[a - 1]) + _l1(t2.ctx[b] - t2.ctx[a - 1]), 1e-30))
        row = {"skip": str(r), "first": a, "last": b, "boundary_error": boundary, **errors(cached_img, cached_ctx, b)}
        if r == mlp_skip:
            row.update(errors(*split.reuse(t2.img[a - 1], t2.ctx[a - 1], d_img, d_ctx), b, "mlp_"))
        out.append(row)
        if on_range is not None:
            on_range()
    return out


def candidate_ranges(num_layers: int, lengths: tuple[int, ...] | None = None) -> list[SkipRange]:
    """Every contiguous range inside 1..L-1 (of the given lengths only, when given), by start then end."""
    return [SkipRange(a, b) for a in range(1, num_layers) for b in range(a, num_layers)
            if lengths is None or b - a + 1 in lengths]


def skipped_for(nfe: float, num_layers: int) -> int:
    """Blocks a range must skip for an effective NFE of about ``nfe`` in the 1.x schedule (1 < nfe < 2)."""
    if not 1.0 < nfe < 2.0:
        raise ValueError(f"a 1.x schedule has an effective NFE between 1 and 2, not {nfe}")
    return min(num_layers - 1, max(1, round((2.0 - nfe) * num_layers)))


@dataclass
class ProbeResult:
    """Mean errors over the samples: per block and per range, plus the recommendations."""

    num_layers: int
    samples: int
    blocks: list[dict]
    ranges: list[dict]
    recommendations: list[dict] = field(default_factory=list)

    def recommend(self, nfes: tuple[float, ...]) -> list[dict]:
        """For each target NFE, the measured range of the matching length with the lowest velocity error."""
        out = []
        for nfe in nfes:
            k = skipped_for(nfe, self.num_layers)
            pool = [r for r in self.ranges if r["last"] - r["first"] + 1 == k]
            if not pool:
                continue
            best = min(pool, key=lambda r: r["velocity_error"])
            nfe_of_k = SamplingPlan.one_x().nfe(self.num_layers, SkipRange.parse(best["skip"]))
            out.append({"target_nfe": nfe, "nfe": nfe_of_k, "skipped": k,
                        "skip": best["skip"], "velocity_error": best["velocity_error"],
                        "latent_error": best["latent_error"]})
        self.recommendations = out
        return out

    def best_for(self, nfe: float) -> dict:
        """The recommendation for ``nfe``, always computed from the measured ranges; a stored one that names another
        range (a probe.json edited after the probe) is an error, not followed."""
        found = ProbeResult(self.num_layers, self.samples, self.blocks, self.ranges).recommend((nfe,))
        if not found:
            raise ValueError(f"the probe measured no range of {skipped_for(nfe, self.num_layers)} blocks "
                             f"(NFE {nfe})")
        for rec in self.recommendations:
            if math.isclose(rec["target_nfe"], nfe, abs_tol=1e-3) and rec["skip"] != found[0]["skip"]:
                raise ValueError(f"its recommendation for NFE {nfe:g}, skip {rec['skip']}, is not the range its own "
                                 f"measurements give ({found[0]['skip']}): the file was changed after the probe")
        return found[0]


def _check_finite(value, what: str, dtype: torch.dtype) -> None:
    finite = bool(torch.isfinite(value).all()) if isinstance(value, torch.Tensor) else (
        value is None or math.isfinite(value))
    if not finite:
        raise OnexError(f"{what} is not finite: the model's outputs overflow in {str(dtype).removeprefix('torch.')}",
                        "probe in float32 (--dtype fp32)")


def _mean_rows(rows: list[list[dict]], keys: tuple[str, ...]) -> list[dict]:
    out = []
    for group in zip(*rows):
        row = dict(group[0])
        for k in keys:
            values = [g[k] for g in group if g[k] is not None]
            row[k] = sum(values) / len(values) if values else None
        out.append(row)
    return out


@torch.no_grad()
def probe(split: SplitSD3Transformer, conditioning: list[tuple[torch.Tensor, torch.Tensor]], seeds: tuple[int, ...],
          latent_shape: tuple[int, int, int], ranges: list[SkipRange], dtype: torch.dtype = torch.float32,
          device: str = "cpu", progress: Callable[[int], None] | None = None,
          mlp_skip: SkipRange | None = None) -> ProbeResult:
    """Probe ``split`` (its own skip range unused) on each (text (1, T, D), pooled (1, P)) x seed; the range
    ``mlp_skip`` (one of ``ranges``) is measured with ``split``'s MLP too.

    Runs the 2-step schedule's two uncached steps with every stream kept, then each range's tail. Samples go
    one at a time (a real model's kept streams: about 1.3 GB per sample for SD3-Medium at 1024 px).
    ``progress(1)`` is called after each unit of work (a range, or a sample's two traced steps). Stops at the
    first non-finite value."""
    plan = SamplingPlan.one_x()
    sigma1, sigma2 = plan.sigmas
    per_blocks, per_ranges = [], []
    for text, pooled in conditioning:
        text, pooled = text.to(device=device, dtype=dtype), pooled.to(device=device, dtype=dtype)
        for seed in seeds:
            g = torch.Generator().manual_seed(seed)
            x1 = torch.randn((1, *latent_shape), generator=g).to(device=device, dtype=dtype)
            t1 = trace(split, x1, text, pooled, sigma1)
            x2 = student_step(x1, t1.velocity, sigma1, sigma2)
            t2 = trace(split, x2, text, pooled, sigma2)
            if progress is not None:
                progress(1)
            _check_finite(t2.velocity, "step two's velocity", dtype)  # before hours of ranges, not after
            per_blocks.append(block_errors(t1, t2))
            per_ranges.append(range_errors(split, t1, t2, x2, sigma2, ranges,
                                           (lambda: progress(1)) if progress is not None else None, mlp_skip))
            for row in [*per_blocks[-1], *per_ranges[-1]]:
                for key, value in row.items():
                    if key.startswith("e") or key.endswith("_error"):
                        _check_finite(value, f"{key} of {row.get('skip') or 'block ' + str(row['block'])}", dtype)
            del t1, t2
    blocks = _mean_rows(per_blocks, ("e", "e_img", "e_ctx"))
    rows = [_mean_rows([[r] for r in same], tuple(k for k in same[0] if k.endswith("_error")))[0]
            for same in zip(*per_ranges)]
    return ProbeResult(split.num_layers, len(per_blocks), blocks, rows)
