"""The toy report: ``report.json`` (everything), ``report.md`` (the tables, the claims and their verdicts, the
stages' times), ``grid.png`` (rows of the table x prompts) and ``quality-vs-nfe.png``.

A claim's verdict compares means and states the spread (std over seeds) beside them: "reproduced" when the
difference goes the paper's way by more than the larger of the two spreads, "not reproduced" when it goes the
other way by as much, "inconclusive" otherwise.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from onex_export.fileio import atomic_path, save_figure
from train.monitor import save_grid

from .evaluation import load_images

COLUMNS = ("correct", "digit", "colour", "side", "fid_real", "fid_teacher", "mode_coverage", "pairwise_distance")
HEADERS = ("judged correct", "digit", "colour", "side", "FID real", "FID teacher", "mode coverage", "pairwise dist.")
GRID_PROMPTS = tuple(range(0, 60, 5))  # 12 prompts: every digit, both sides, each colour


def _fmt(cell: dict, key: str) -> str:
    pct = key in ("correct", "digit", "colour", "side")
    mean, std = cell["mean"], cell["std"]
    return f"{100 * mean:.1f} ± {100 * std:.1f} %" if pct else f"{mean:.3g} ± {std:.2g}"


def verdict(better: dict, worse: dict, key: str, higher_is_better: bool = True) -> str:
    diff = (better[key]["mean"] - worse[key]["mean"]) * (1 if higher_is_better else -1)
    margin = max(better[key]["std"], worse[key]["std"])
    if diff > margin:
        return "reproduced"
    return "not reproduced" if diff < -margin else "inconclusive"


def claims(rows: dict[str, dict]) -> list[dict]:
    """The paper's claims, each as (what it says, the figures, the verdict)."""
    sfd, uni, cfg_all = rows["2-step SFD (Stage I)"], rows["2-step, uniform timesteps"], rows["2-step, CFG at every sigma"]
    after, dct, mlp = rows["1.x, cache after training"], rows["1.x, DCT without MLP"], rows["1.x, DCT + MLP"]

    def fig(row: dict, *keys: str) -> str:
        return ", ".join(f"{k} {_fmt(row[k], k)}" for k in keys)

    out = [
        {"claim": "Guidance control (Sec. 3.2): CFG only below alpha keeps more diversity than CFG at every sigma, "
                  "at comparable fidelity",
         "figures": f"alpha 0.94: {fig(sfd, 'mode_coverage', 'pairwise_distance', 'correct')}; every sigma: "
                    f"{fig(cfg_all, 'mode_coverage', 'pairwise_distance', 'correct')}",
         "verdict": verdict(sfd, cfg_all, "mode_coverage"),
         "fidelity_cost": round(cfg_all["correct"]["mean"] - sfd["correct"]["mean"], 4)},
        {"claim": "Importance sampling (Table 4): curve c beats uniform DMD timesteps",
         "figures": f"curve c: {fig(sfd, 'correct', 'fid_real')}; uniform: {fig(uni, 'correct', 'fid_real')}",
         "verdict": verdict(sfd, uni, "correct")},
        {"claim": "Cache applied after training loses quality against the uncached 2-step student (Table 5)",
         "figures": f"2-step: {fig(sfd, 'correct', 'fid_teacher')}; 1.x after training: "
                    f"{fig(after, 'correct', 'fid_teacher')}",
         "verdict": verdict(sfd, after, "correct")},
        {"claim": "DCT without the MLP recovers part of that loss (Table 5)",
         "figures": f"DCT: {fig(dct, 'correct', 'fid_teacher')}", "verdict": verdict(dct, after, "correct")},
        {"claim": "DCT with the MLP recovers more than without it (Table 5)",
         "figures": f"DCT + MLP: {fig(mlp, 'correct', 'fid_teacher')}", "verdict": verdict(mlp, dct, "correct")},
    ]
    return out


def write_report(out: Path, config: dict, stages: dict[str, dict], evaluation_dir: Path) -> dict:
    rows = stages["evaluation"]["rows"]
    by_name = {r["name"]: r for r in rows}
    found = claims(by_name)
    out.mkdir(parents=True, exist_ok=True)
    _grid(out / "grid.png", rows, evaluation_dir, config["eval_seeds"])
    _plot(out / "quality-vs-nfe.png", rows)
    report = {"config": config, "stages": stages, "claims": found}
    lines = ["# The toy world: 1.x-Distill at toy scale", "",
             f"Judged by a judge that is not the model (a digit CNN trained on held-out glyphs, analytic colour, side, "
             f"size and height detectors). {stages['evaluation']['prompts']} prompts x "
             f"{stages['evaluation']['images_per_prompt']} images per row and seed; mean ± std over seeds "
             f"({config['seeds']} training seeds per variant).", "",
             "| row | NFE | seeds | " + " | ".join(HEADERS) + " |", "|---" * (len(HEADERS) + 3) + "|"]
    for r in rows:
        nfe = "-" if r["nfe"] is None else f"{r['nfe']:.3g}"
        lines.append(f"| {r['name']} | {nfe} | {r.get('seeds', config['seeds'])} | "
                     + " | ".join(_fmt(r[k], k) for k in COLUMNS) + " |")
    lines += ["", "## Claims", "", "| claim | figures | verdict |", "|---|---|---|"]
    lines += [f"| {c['claim']} | {c['figures']} | **{c['verdict']}** |" for c in found]
    lines += ["", "## Stages", "", "| stage | seconds | figures |", "|---|---|---|"]
    for name, result in stages.items():
        lines.append(f"| {name} | {result['seconds']:.0f} | {_stage_figures(name, result)} |")
    lines += ["", "![grid](grid.png)", "", "![quality vs NFE](quality-vs-nfe.png)", ""]
    with atomic_path(out / "report.md") as tmp:
        tmp.write_text("\n".join(lines))
    with atomic_path(out / "report.json") as tmp:
        tmp.write_text(json.dumps(report, indent=1) + "\n")
    return report


def _stage_figures(name: str, result: dict) -> str:
    if name == "judge":
        return f"judge-test scenes read correctly: {100 * result['test']['correct']:.1f} %"
    if name == "autoencoder":
        return (f"held-out L1 {result['heldout_l1']:.4f}; reconstructions judged correct "
                f"{100 * result['judged']['correct']:.1f} %")
    if name == "teacher":
        last = result["checks"][-1]
        return (f"{result['steps']} steps; 28x2 CFG samples judged correct {100 * last['correct']:.1f} % "
                f"({'reached' if result['reached_bar'] else 'did NOT reach'} the bar)")
    if name == "tower":
        return (f"Stage II's discriminator tower: caption loss {result['final_loss']:.2f} (chance 4.09); held-out "
                f"scenes matched to their prompt {100 * result['heldout_caption_accuracy']:.1f} % (chance 1.7 %)")
    if name in ("stage1", "stage2"):
        return f"{len(result['runs'])} runs"
    return ""


def _grid(path: Path, rows: list[dict], folder: Path, seeds: int) -> None:
    """Rows of the table x 12 prompts (seed 0 of each), thumbnails as they are (64 px)."""
    tiles = []
    for i, _ in enumerate(rows):
        images = load_images(folder, i)
        tiles.append(images[[p * seeds for p in GRID_PROMPTS]])
    save_grid(torch.cat(tiles), path, columns=len(GRID_PROMPTS))


def _plot(path: Path, rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, label in ((axes[0], "correct", "judged correct"), (axes[1], "fid_real", "FID vs real (judge space)")):
        for r in rows:
            if r["nfe"] is None:
                ax.axhline(r[key]["mean"], color="grey", ls="--", lw=1)
                ax.text(1.0, r[key]["mean"], " real", va="bottom", color="grey", fontsize=8)
                continue
            ax.errorbar(r["nfe"], r[key]["mean"], yerr=r[key]["std"], fmt="o", capsize=3, label=r["name"])
        ax.set_xscale("log")
        ax.set_xlabel("effective NFE")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, loc="lower right")
    fig.suptitle("toy world: quality vs effective NFE")
    save_figure(fig, path)
