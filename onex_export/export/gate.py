"""The parity gate: a build's graphs against the float32 PyTorch split model, on seeded inputs.

For each shape point (the profile's optimum and, when the profile has a range, its extremes):
- ``full`` plan vs ``split.full`` (velocity and both deltas),
- ``skipping`` plan vs ``split.skipping``, fed the reference deltas of a step at another sigma,
- the whole 1.x-NFE schedule through the sampler (final latents).
"""
from __future__ import annotations

from dataclasses import asdict
from typing import Callable

import torch

from ..models.split import SplitSD3Transformer
from ..parity import compare, rows_to_json, tolerance_for
from ..runtime.graphs import PlanDenoiser
from ..runtime.sampler import Conditioning, TorchDenoiser, sample
from ..schedule import SamplingPlan, timestep_from_sigma
from ..runtime.graphs import TorchGraph
from .components import Components, component_graphs, component_inputs
from .graphs import PLANS, run_plan
from .shapes import VAE_SCALE, ShapeConfig


def shape_points(shapes: ShapeConfig) -> list[tuple[int, int, int]]:
    """(batch, resolution, text_len) points to check: the optimum, then the extremes of any range."""
    points = [(shapes.batch.opt, shapes.resolution.opt, shapes.text_len.opt),
              (shapes.batch.max, shapes.resolution.min, shapes.text_len.min),
              (shapes.batch.min, shapes.resolution.max, shapes.text_len.max)]
    return list(dict.fromkeys(points))


def step_inputs(split: SplitSD3Transformer, batch: int, resolution: int, text_len: int, sigma: float, seed: int):
    """Seeded transformer inputs at ``sigma``; the first step's are the sampler's own (same seed, same order)."""
    cfg = split.transformer.config
    g = torch.Generator().manual_seed(seed)
    lat = resolution // VAE_SCALE
    return dict(
        hidden_states=torch.randn(batch, cfg.in_channels, lat, lat, generator=g),
        encoder_hidden_states=torch.randn(batch, text_len, cfg.joint_attention_dim, generator=g),
        pooled_projections=torch.randn(batch, cfg.pooled_projection_dim, generator=g),
        timestep=torch.full((batch,), timestep_from_sigma(sigma)),
    )


def run_gate(
    split: SplitSD3Transformer,
    load_graphs: Callable[[], dict],
    backend: str,
    precision: str,
    shapes: ShapeConfig,
    eta: float = 1.0,
    components: Components | None = None,
    seed: int = 0,
    log: Callable[[str], None] = lambda _: None,
    device: str = "cpu",
) -> dict:
    """Run every case and return the manifest's ``parity`` section (status, tolerance, rows).

    ``load_graphs()`` gives the candidate graphs; it is not called when ``backend`` cannot run
    ``precision`` at all (status ``not-run``). The reference runs in float32 on the CPU; the candidate's
    schedule runs on ``device`` ("cuda" for engines, whose outputs stay on the GPU).
    """
    tol = tolerance_for(backend, precision)
    if tol is None:
        return {"status": "not-run", "backend": backend, "precision": precision, "rows": [],
                "reason": f"{backend} cannot execute {precision} graphs on this machine (verify on a GPU)"}
    graphs = load_graphs()
    rows = []
    plan = SamplingPlan.one_x(eta)
    for batch, res, text_len in shape_points(shapes):
        tag = f"b{batch} {res}px t{text_len}"
        log(f"parity {tag}")
        step1 = step_inputs(split, batch, res, text_len, plan.sigmas[0], seed)
        step2 = step_inputs(split, batch, res, text_len, plan.sigmas[1], seed + 1)
        with torch.no_grad():
            v, d_img, d_ctx = split.full(*step1.values())
            v_skip = split.skipping(*step2.values(), d_img, d_ctx)
        rows += compare(f"full plan {tag}", {"velocity": v, "delta_img": d_img, "delta_ctx": d_ctx},
                        run_plan(PLANS["full"], graphs, step1), tol)
        rows += compare(f"skipping plan {tag}", {"velocity": v_skip},
                        run_plan(PLANS["skipping"], graphs, dict(step2, delta_img=d_img, delta_ctx=d_ctx)), tol)
        cond = Conditioning(step1["encoder_hidden_states"], step1["pooled_projections"])
        latent = (split.transformer.config.in_channels, res // VAE_SCALE, res // VAE_SCALE)
        ref = sample(TorchDenoiser(split), plan, cond, latent, seed)
        got = sample(PlanDenoiser(graphs, PLANS), plan, cond, latent, seed, device=device)
        rows += compare(f"1.x-nfe schedule {tag}", {"latents": ref}, {"latents": got}, tol)
    if components is not None:
        # Components are float32 graphs whatever the transformer's precision.
        comp_tol = tolerance_for(backend, "fp32")
        modules = component_graphs(components, split.transformer.config)
        for name, inputs in component_inputs(components, shapes.batch.opt, shapes.resolution.opt // VAE_SCALE, seed).items():
            module, spec = modules[name]
            rows += compare(f"{name} b{shapes.batch.opt}", TorchGraph(module, spec)(**inputs), graphs[name](**inputs), comp_tol)
    return {"status": "passed" if all(r.passed for r in rows) else "failed", "backend": backend,
            "precision": precision, "tolerance": asdict(tol), "rows": rows_to_json(rows)}
