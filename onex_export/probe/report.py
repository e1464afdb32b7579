"""The probe's files: ``probe.json`` (what `onex-export build --skip auto:NFE --probe` reads), a heat map of the
ranges' velocity error (start x end) and a per-block reuse-error curve, each written atomically."""
from __future__ import annotations

import json
import os
from pathlib import Path

from ..config import SkipRange
from ..errors import UsageError
from ..fileio import atomic_path, pyplot, save_figure, sha256_file
from ..models.zoo import model_source
from .measure import NORMALISATION, ProbeResult

SCHEMA = "onex-export/probe"
VERSION = 1


def to_json(result: ProbeResult, config: dict) -> dict:
    return {"schema": SCHEMA, "version": VERSION, "config": config, "num_layers": result.num_layers,
            "samples": result.samples, "normalisation": NORMALISATION, "blocks": result.blocks,
            "ranges": result.ranges, "recommendations": result.recommendations}


def read_probe(path: Path) -> tuple[ProbeResult, dict]:
    """A ``probe.json`` back as a result and its whole document; a file that is no probe is a usage error."""
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot read the probe {path}: {exc}", "pass the probe.json that `onex-export probe` wrote")
    if not isinstance(doc, dict) or doc.get("schema") != SCHEMA:
        raise UsageError(f"{path} is not a probe written by `onex-export probe`",
                         "pass the probe.json that `onex-export probe` wrote")
    if doc.get("version") != VERSION:
        raise UsageError(f"{path} is probe version {doc.get('version')}; this onex-export reads version {VERSION}",
                         "probe the model again")
    missing = [k for k in ("num_layers", "samples", "blocks", "ranges") if k not in doc]
    missing += [] if "model" in doc.get("config", {}) else ["config.model"]
    missing += [f"ranges[{i}].{k}" for i, r in enumerate(doc.get("ranges", []))
                for k in ("skip", "first", "last", "velocity_error", "latent_error") if k not in r]
    if missing:
        raise UsageError(f"{path} is an incomplete probe: no {', '.join(missing[:5])}", "probe the model again")
    return ProbeResult(doc["num_layers"], doc["samples"], doc["blocks"], doc["ranges"],
                       doc.get("recommendations", [])), doc


def write(out: Path, result: ProbeResult, config: dict) -> list[Path]:
    """``out/probe.json``, ``out/heatmap.png`` and ``out/blocks.png``; returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "probe.json") as tmp:
        tmp.write_text(json.dumps(to_json(result, config), indent=2) + "\n")
    return [out / "probe.json", heat_map(result, config, out / "heatmap.png"), block_curve(result, config,
                                                                                           out / "blocks.png")]


def check_plots() -> None:
    """Refuse (:class:`UsageError`) now, before the work, when the plots could not be drawn afterwards."""
    pyplot("the probe")


def heat_map(result: ProbeResult, config: dict, path: Path) -> Path:
    """Velocity error of direct caching per range (x: first skipped block, y: last), log colour, with the
    recommended ranges marked."""
    import numpy as np

    plt = pyplot("the probe")
    n = result.num_layers - 1
    grid = np.full((n, n), np.nan)
    for r in result.ranges:
        grid[r["last"] - 1, r["first"] - 1] = r["velocity_error"]
    fig, ax = plt.subplots(figsize=(7.5, 6.2))
    finite = grid[np.isfinite(grid)]
    from matplotlib.colors import LogNorm

    image = ax.imshow(grid, origin="lower", cmap="magma_r", extent=(0.5, n + 0.5, 0.5, n + 0.5),
                      norm=LogNorm(vmin=(low := max(finite.min(), 1e-6)), vmax=max(finite.max(), 10 * low))
                      if finite.size else None)
    fig.colorbar(image, ax=ax, label="velocity error of step two, ||v_cache - v|| / ||v||")
    for i, rec in enumerate(result.recommendations):
        first, last = map(int, rec["skip"].split("-"))
        ax.plot(first, last, "o", mfc="none", mec="cyan", ms=11, mew=2)
        # labels go into the empty triangle below the diagonal, one under the other: two targets' ranges often
        # share a row, and side by side their labels would overlap
        ax.annotate(f"NFE {rec['nfe']:.3f}: {rec['skip']}", (first, last), textcoords="offset points",
                    xytext=(14, -18 - 18 * i), fontsize=9, arrowprops=dict(arrowstyle="-", color="cyan"),
                    bbox=dict(boxstyle="round,pad=0.2", fc="white", ec="cyan", alpha=0.85))
    ax.set_xlabel("first skipped block (1-based)")
    ax.set_ylabel("last skipped block")
    ax.set_title(f"{Path(config.get('model', '')).name}: direct caching error per skip range "
                 f"({result.samples} sample{'s' if result.samples != 1 else ''})")
    return save_figure(fig, path)


def block_curve(result: ProbeResult, config: dict, path: Path) -> Path:
    """Per block, the reuse error e_n over both streams and per stream."""
    plt = pyplot("the probe")
    blocks = [b["block"] for b in result.blocks]
    fig, ax = plt.subplots(figsize=(8, 3.8))
    ax.plot(blocks, [b["e"] for b in result.blocks], "o-", label="both streams", color="black")
    ax.plot(blocks, [b["e_img"] for b in result.blocks], ".--", label="image tokens", color="tab:blue")
    ctx = [(b["block"], b["e_ctx"]) for b in result.blocks if b["e_ctx"] is not None]
    ax.plot([c[0] for c in ctx], [c[1] for c in ctx], ".--", label="text tokens", color="tab:orange")
    ax.set_xlabel("block (1-based)")
    ax.set_ylabel("e_n = |D_n(t2) - D_n(t1)|_1 / |D_n(t2)|_1")
    ax.set_title(f"{Path(config.get('model', '')).name}: reuse error per block")
    ax.set_xticks(blocks[:: max(1, len(blocks) // 24)])
    ax.grid(alpha=0.3)
    ax.legend()
    return save_figure(fig, path)


def choose_skip(path: Path, nfe: float, model: str) -> tuple[SkipRange, dict]:
    """The range ``path`` (a probe of ``model``) recommends for an effective NFE of about ``nfe``, and the record of
    where it came from, for the build's manifest."""
    result, doc = read_probe(path)
    probed = doc["config"]["model"]
    if probed != model_source(model):
        raise UsageError(f"the probe {path} measured {probed}, not {model}", f"probe {model} first: onex-export probe "
                         f"--model {model}")
    try:
        rec = result.best_for(nfe)
    except ValueError as exc:
        raise UsageError(f"{exc} in {path}", f"probe {model} again (onex-export probe --model {model}), without "
                         "--lengths or with the length this NFE needs") from exc
    source = {"probe": os.path.abspath(path), "probe_sha256": sha256_file(path), "target_nfe": nfe,
              "velocity_error": rec["velocity_error"], "latent_error": rec["latent_error"]}
    return SkipRange.parse(rec["skip"]), source
