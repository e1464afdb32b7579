"""The latency report as a Markdown table and a PNG plot."""
from __future__ import annotations

import json
import textwrap
from pathlib import Path

from onex_export.fileio import atomic_path, pyplot, save_figure


def write_results(out: Path, stem: str, report: dict, table: str) -> None:
    """``<out>/<stem>.json`` (the report) and ``<out>/<stem>.md`` (the table), each written atomically."""
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / f"{stem}.json") as tmp:
        tmp.write_text(json.dumps(report, indent=2) + "\n")
    with atomic_path(out / f"{stem}.md") as tmp:
        tmp.write_text(table)


def markdown(report: dict) -> str:
    cfg = report["config"]
    noise = report.get("speedup_noise", [])
    noisy = {(n["batch"], n["schedule"]) for n in noise}
    lines = [f"# Latency: {cfg['arch']} at {cfg['resolution']} px, {report['backend']} {report['dtype']} on "
             f"{report['machine']['gpu'] or report['machine']['processor']}", ""]
    for r in report["results"]:
        lines += [f"## Batch {r['batch']}", "",
                  "| schedule | NFE | median ms | p90 ms | speed-up | NFE-predicted |", "|---|---|---|---|---|---|"]
        for name, s in r["schedules"].items():
            lines.append(f"| {name} | {s['nfe']:.3f} | {s['median_ms']:.2f} | {s['p90_ms']:.2f} | "
                         f"{s['speedup']:.1f}x{' (noise)' if (r['batch'], name) in noisy else ''} | "
                         f"{s['nfe_speedup']:.1f}x |")
        lines += ["", "| stage | median ms | p90 ms |", "|---|---|---|"]
        lines += [f"| {n} | {t['median_ms']:.3f} | {t['p90_ms']:.3f} |" for n, t in r["stages"].items()]
        lines += ["", "| ratio | value |", "|---|---|"]
        lines += [f"| {n} | {v:.4f} |" for n, v in r["derived"].items()]
        lines.append("")
    methods = report.get("stage_methods", {})
    if methods:
        lines += ["Stage rows measured as: " + "; ".join(f"{k}: {v}" for k, v in methods.items()) + ".", ""]
    if report.get("components", "measured") != "measured":
        lines += [f"Text encoders and VAE: {report['components']}.", ""]
    lines += ["## Performance bars", "", "| batch | bar | value | limit | met |", "|---|---|---|---|---|"]
    lines += [f"| {b['batch']} | {b['bar']} | {b['value']:.4f} | {b['limit']:.4f} | {'yes' if b['met'] else 'NO'} |"
              for b in report["bars"]]
    if noise:
        lines += ["", "Noise: " + "; ".join(f"batch {n['batch']}, {n['schedule']}: {n['speedup']:.1f}x" for n in noise)
                  + " over teacher 28x2, above what the schedule's NFE allows (the NFE-predicted column): timing noise "
                  "(a slow round, clocks), not a speed-up; these figures meet no bar."]
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> Path:
    """Median transformer time per schedule and batch (log scale), annotated with measured and
    NFE-predicted speed-ups over the teacher."""
    plt = pyplot("bench.latency")
    results = report["results"]
    names = list(results[0]["schedules"])
    fig, ax = plt.subplots(figsize=(10, 5))
    width = 0.8 / len(results)
    for j, r in enumerate(results):
        xs = [i + j * width for i in range(len(names))]
        values = [r["schedules"][n]["median_ms"] for n in names]
        bars = ax.bar(xs, values, width, label=f"batch {r['batch']}")
        for bar, n in zip(bars, names):
            s = r["schedules"][n]
            ax.annotate(f"{s['speedup']:.1f}x\n({s['nfe_speedup']:.1f}x)", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                        ha="center", va="bottom", fontsize=7)
    ax.set_yscale("log")
    labels = ["\n".join(textwrap.wrap(n, 14, break_on_hyphens=False)) for n in names]  # peers have long names
    ax.set_xticks([i + width * (len(results) - 1) / 2 for i in range(len(names))], labels, fontsize=8)
    ax.set_ylabel("median ms (transformer only)")
    cfg = report["config"]
    ax.set_title(f"{cfg['arch']} {cfg['resolution']}px, {report['backend']} {report['dtype']}: "
                 "speed-up over teacher (NFE-predicted)")
    ax.legend()
    return save_figure(fig, path, dpi=120)
