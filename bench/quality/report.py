"""The quality report: JSON, a Markdown table, an image grid and a quality-vs-latency plot."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from onex_export.errors import UsageError
from onex_export.fileio import pyplot, save_figure

LABELS = {"fid": "FID vs teacher", "clip": "CLIP score", "lpips_diversity": "LPIPS diversity",
          "pickscore": "PickScore", "aesthetic": "aesthetic score", "hpsv2": "HPSv2"}


def markdown(report: dict) -> str:
    cfg = report["config"]
    metrics = list(report["metrics"])
    lines = [f"# Quality: {cfg['model']} at {cfg['resolution']} px, {len(cfg['prompts'])} prompt(s) x "
             f"{cfg['seeds']} seed(s)", ""]
    if cfg.get("random_components"):
        lines += ["Text embeddings and VAE: **random** (`--random-components`): this run measures time and memory at "
                  "real size; the images are noise.", ""]
    if report["stand_ins"]:
        lines += ["Metric networks: **seeded random stand-ins** built in code (`--random-metrics`): they compare "
                  "the schedules of this run only and are not the published metrics.", ""]
    head = ["schedule", "NFE", *(f"{LABELS.get(m, m)} {'↑' if report['metrics'][m]['higher_is_better'] else '↓'}"
                                 for m in metrics), "seconds"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, row in report["schedules"].items():
        values = [("–" if row.get(m) is None else f"{row[m]:.4g}") for m in metrics]
        lines.append(f"| {name} | {row['nfe']:.3f} | " + " | ".join(values) + f" | {row['seconds']:.1f} |")
    lines += ["", f"Peak memory (RSS) of the run: {report['peak_rss_gb']:.1f} GB.",
              "", "FID is measured against the teacher's images (as the paper's Table 1), so the teacher has none."]
    if "toy_fid_real" in metrics:
        lines += ["", "toy_fid_real is measured in the toy judge's feature space against held-out real scenes of the "
                  "same prompts (8 each), so every row has one."]
    if cfg.get("teacher") == cfg["model"]:
        lines += ["", "The teacher row runs the student's own weights under the teacher's schedule (no --teacher)."]
    lines += ["", "Skipped: " + ("; ".join(f"{k} ({v})" for k, v in report["skipped"].items()) or "none") + "."]
    return "\n".join(lines) + "\n"


def grid(thumbnails: dict[str, list[np.ndarray]], prompts: tuple[str, ...], path: Path) -> Path:
    """Rows = schedules, columns = prompts (each prompt's first seed)."""
    plt = pyplot("bench.quality")
    rows, cols = len(thumbnails), len(prompts)
    fig, axes = plt.subplots(rows, cols, figsize=(1.8 * cols + 1.2, 1.8 * rows + 0.4), squeeze=False)
    for r, (name, images) in enumerate(thumbnails.items()):
        for c, image in enumerate(images):
            ax = axes[r][c]
            ax.imshow(image)
            ax.set_xticks([]), ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(name, fontsize=8)
            if r == 0:
                ax.set_title(prompts[c][:28] + ("…" if len(prompts[c]) > 28 else ""), fontsize=7)
    return save_figure(fig, path)


def read_latency(path: Path) -> dict[str, float]:
    """Schedule name -> median ms at batch 1, from a `bench.latency` latency.json."""
    try:
        report = json.loads(Path(path).read_text())
        batch1 = next(r for r in report["results"] if r["batch"] == 1)
        return {name: s["median_ms"] for name, s in batch1["schedules"].items()}
    except (OSError, ValueError, KeyError, TypeError, StopIteration) as exc:
        raise UsageError(f"{path} is not a bench.latency result with a batch-1 row ({type(exc).__name__}: {exc})",
                         "pass the latency.json that `python -m bench.latency` wrote") from exc


def quality_vs_latency(report: dict, path: Path) -> Path:
    """One panel per metric: each schedule's value against its batch-1 latency (log scale), one colour per
    schedule across the panels."""
    plt = pyplot("bench.quality")
    from matplotlib.ticker import NullFormatter

    metrics = list(report["metrics"])
    cols = min(3, len(metrics))
    rows = -(-len(metrics) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.4 * cols, 3.4 * rows + 0.6), squeeze=False)
    colours = dict(zip(report["schedules"], plt.get_cmap("tab10").colors))
    for ax, metric in zip(axes.flat, metrics):
        for name, row in report["schedules"].items():
            if row.get("latency_ms") is not None and row.get(metric) is not None:
                ax.scatter(row["latency_ms"], row[metric], s=40, color=colours[name], label=name)
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("latency at batch 1 (ms)", fontsize=8)
        arrow = "higher is better" if report["metrics"][metric]["higher_is_better"] else "lower is better"
        ax.set_title(f"{LABELS.get(metric, metric)} ({arrow})", fontsize=9)
        ax.grid(alpha=0.3)
    spare = list(axes.flat)[len(metrics):]
    for ax in spare:
        ax.axis("off")
    handles = [plt.Line2D([], [], marker="o", linestyle="", color=c, label=n) for n, c in colours.items()]
    if spare:  # the legend in the first empty panel, else in the first panel
        spare[0].legend(handles=handles, loc="center", fontsize=9, frameon=False)
    else:
        axes.flat[0].legend(handles=handles, fontsize=7)
    stand_in = " (random stand-in metrics)" if report["stand_ins"] else ""
    fig.suptitle(f"Quality vs latency: {report['config']['model']}{stand_in}; latency from "
                 f"{report['latency']['source']}", fontsize=9)
    return save_figure(fig, path)
