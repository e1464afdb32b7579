"""`python -m bench.toy`: the toy world from nothing to the report, on the CPU (DESIGN.md section 6, issue 20).

    python -m bench.toy                      # the whole chain: a few hours on 2 cores; resumable
    python -m bench.toy --quick --work /tmp/t --out /tmp/t/report   # every stage for a few steps (minutes)
    python -m bench.toy --install-default    # then ship the trained 1.x student as the embedded default

Stages: judge -> autoencoder -> teacher (until its samples reach the fidelity bar) -> Stage I (the paper's method
and its ablations, several seeds) -> Stage II's discriminator tower (pretrained on the world's scenes, as CLIP's
is on the web's) -> Stage II (Distill-Cache co-Training with and without the MLP) -> evaluation
-> report (bench/results/toy-digits/: report.md, report.json, grid.png, quality-vs-nfe.png). A stopped chain
started again resumes at the stage it stopped in; training runs resume from their checkpoints.
"""
from __future__ import annotations

import time
from pathlib import Path

import click

from onex_export.exits import errors_reported

from .chain import ToyConfig, done, run_stage
from .evaluation import evaluation_stage
from .report import write_report
from .stages import autoencoder_stage, judge_stage, stage1_stage, stage2_stage, teacher_stage, tower_stage

STAGES = (("judge", judge_stage), ("autoencoder", autoencoder_stage), ("teacher", teacher_stage),
          ("stage1", stage1_stage), ("tower", tower_stage), ("stage2", stage2_stage), ("evaluation", evaluation_stage))


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--work", type=click.Path(file_okay=False, path_type=Path), default=Path("runs/toy"), show_default=True,
              help="Models, checkpoints and caches (large; git-ignored). Reused to resume.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("bench/results/toy-digits"),
              show_default=True, help="Where the report goes.")
@click.option("--seeds", type=click.IntRange(1), default=3, show_default=True,
              help="Training seeds per Stage I / Stage II variant.")
@click.option("--jobs", type=click.IntRange(1), default=2, show_default=True,
              help="Training runs at once, one CPU thread each.")
@click.option("--quick", is_flag=True, help="Every stage for a few steps: checks the chain, learns nothing.")
@click.option("--install-default", is_flag=True,
              help="After the report, write the trained 1.x student (the DCT + MLP seed judged best on a "
                   "selection set) as the embedded default.")
def main(work: Path, out: Path, seeds: int, jobs: int, quick: bool, install_default: bool) -> None:
    """The toy world: train every model on real digits, measure the paper's claims, write the report."""
    with errors_reported():
        cfg = ToyConfig.quick(work) if quick else ToyConfig(work, seeds=seeds, jobs=jobs)
        work.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        results = {}
        for i, (name, body) in enumerate(STAGES, start=1):
            click.echo(f"[{i}/{len(STAGES)}] {name}")
            results[name] = run_stage(work, name, lambda folder, body=body: body(cfg, folder, click.echo), click.echo)
        report = write_report(out, cfg.to_json(), results, work / "evaluation")
        click.echo(f"report: {out / 'report.md'}")
        for claim in report["claims"]:
            click.echo(f"  {claim['verdict']:<15} {claim['claim']}")
        if install_default:
            from .install import install_default as install

            click.echo(f"default model: {install(cfg)}")
        stage_seconds = sum(r["seconds"] for r in results.values())
        click.echo(f"stages {stage_seconds / 60:.0f} min in all (this call {(time.perf_counter() - start) / 60:.0f} min)")
        if done(work, "teacher") and not results["teacher"]["reached_bar"] and not quick:
            click.echo("FAILED: the teacher did not reach the fidelity bar; the report says so")
            raise SystemExit(1)
    click.echo("PASSED")


if __name__ == "__main__":
    main()
