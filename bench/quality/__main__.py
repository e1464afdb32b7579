"""`python -m bench.quality`: the paper's quality protocol on local weights only.

Schedules (same prompts, seeds, text encoders and VAE; PyTorch): teacher 28x2 with CFG, the N-step student,
2-step, 1.x with plain reuse and, with --mlp, 1.x with the trained compensation MLP. Metrics: FID against the
teacher's images, CLIP score (ViT-B/32), LPIPS diversity (pairwise over the seeds of a prompt), PickScore, the
aesthetic score and HPSv2, each from a weights path given here; a metric without weights is skipped and
listed as such (ImageReward is not supported: see bench/quality/metrics.py). --random-metrics stands seeded
random networks in for the metrics without weights (they test the plumbing; their values compare the
schedules of one run only).

Writes quality.json, quality.md, grid.png (rows = schedules, columns = prompts) and, with --latency
LATENCY.json (from `python -m bench.latency`), quality-vs-latency.png, into a new folder (--replace to replace an
earlier run's).

  python -m bench.quality --seeds 8                              # digits-sd3 with its MLP and judge; 30 s here
  python -m bench.quality --model tiny-sd3 --random-metrics      # random model and stand-in metrics: plumbing
  python -m bench.quality --model SD3_FOLDER --teacher SD3_BASE --mlp f.safetensors --skip 3-10 \\
      --prompts coco.txt --fid-weights pt_inception.pth --clip clip-vit-b32/ --lpips-backbone alexnet.pth \\
      --device cuda --dtype bf16 --latency bench/results/<...>/latency.json
"""
from __future__ import annotations

import math
import resource
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace

import click
import numpy as np
import torch

from bench.arguments import POSITIVE_INT, RESOLUTION, SKIP, command_help, invoke, replace_option, run_main
from onex_export.errors import OnexError, UsageError
from onex_export.export.precision import PRECISIONS
from onex_export.fileio import pyplot
from onex_export.outputs import report_folder
from onex_export.progress import progress_bar
from onex_export.models import DEFAULT_MODEL
from onex_export.models.vae import vae_scale
from onex_export.models.weights import transformer_source
from onex_export.models.zoo import TRAINED_MODELS, default_mlp_for
from onex_export.probe.run import calibration_prompts
from onex_export.params import DEVICE, FiniteFloat

from bench.report import write_results
from bench.toy.judge import JUDGE_DIR

from .generation import QualityConfig, Renderer, Schedule, schedules
from .metrics import MetricWeights, load_metrics
from .report import grid, markdown, quality_vs_latency, read_latency
from .stand_ins import TINY_OPEN_CLIP, TinyFeatures, write_stand_ins
from .toy_judge import check_prompts, load_judge, toy_metrics

WEIGHT_OPTIONS = {
    "fid_weights": "torch-fidelity's Inception-v3 weights (weights-inception-2015-12-05-6726825d.pth)",
    "clip": "a transformers CLIP ViT-B/32 folder (openai/clip-vit-base-patch32)",
    "lpips_backbone": "torchvision's AlexNet weights (alexnet-owt-7be5be79.pth); LPIPS' heads ship with lpips",
    "pickscore": "a transformers folder with PickScore_v1 and the CLIP-ViT-H-14 processor files",
    "aesthetic_clip": "a transformers CLIP ViT-L/14 folder, for the aesthetic head",
    "aesthetic_head": "the LAION aesthetic predictor (sac+logos+ava1-l14-linearMSE.pth)",
    "hpsv2": "the HPSv2 checkpoint for open_clip's ViT-H-14 (HPS_v2_compressed.pt or HPS_v2.1_compressed.pt)",
}


GRID_PROMPTS, THUMBNAIL = 8, 256  # the grid shows the first prompts, each image at most this many pixels


def check_request(config: QualityConfig, rows: list[Schedule], weights: MetricWeights, random_metrics: bool,
                  latency_ms: dict[str, float] | None) -> None:
    """What can be refused before anything loads: metrics that would have nothing to compare, a latency file
    that names none of the schedules."""
    if config.seeds < 2 and (weights.lpips_backbone is not None or random_metrics):
        raise UsageError(f"LPIPS diversity compares the seeds of a prompt: --seeds {config.seeds} gives none to "
                         "compare", "pass --seeds 4 (the paper's), or leave out --lpips-backbone")
    if len(config.prompts) * config.seeds < 2 and (weights.fid_weights is not None or random_metrics):
        raise UsageError("FID needs 2 images or more per schedule", "use more prompts or seeds")
    if latency_ms is not None and not {r.latency_name for r in rows} & set(latency_ms):
        raise UsageError(f"the latency file names none of the schedules ({', '.join(r.name for r in rows)}); it has "
                         f"{', '.join(latency_ms)}", "pass a bench.latency result of the same skip range and steps")


def _thumbnail(image: torch.Tensor) -> np.ndarray:
    """(H, W, 3) uint8 -> at most THUMBNAIL pixels a side."""
    from PIL import Image

    picture = Image.fromarray(image.numpy())
    picture.thumbnail((THUMBNAIL, THUMBNAIL))
    return np.asarray(picture)


def _has_reference(metric) -> bool:
    """A metric measured against the teacher's images (FID)."""
    return hasattr(metric, "add_reference")


def run(config: QualityConfig, weights: MetricWeights, random_metrics: bool, latency: Path | None,
        log=print, toy_judge: Path | None = None) -> tuple[dict, dict]:
    """Generate every schedule's images and measure them; returns the report and the grid's thumbnails."""
    rows = schedules(config.student_steps, config.skip, config.mlp is not None, config.guidance, config.teacher_steps)
    latency_ms = read_latency(latency) if latency is not None else None
    check_request(config, rows, weights, random_metrics, latency_ms)
    renderer = Renderer(config, log)  # checks the model, the skip range and the resolution; loads nothing yet
    given = weights
    with tempfile.TemporaryDirectory(prefix="onex-quality-") as tmp:
        fid_features, hpsv2_arch = None, "ViT-H-14"
        if random_metrics:  # stand-ins only where no weights were given
            stand_in = write_stand_ins(Path(tmp))
            fid_features = TinyFeatures() if weights.fid_weights is None else None
            hpsv2_arch = TINY_OPEN_CLIP if weights.hpsv2 is None else hpsv2_arch
            weights = MetricWeights(**{k: v if v is not None else getattr(stand_in, k)
                                       for k, v in asdict(weights).items()})
        metrics, skipped = load_metrics(weights, fid_features, hpsv2_arch, config.device)
        if toy_judge is not None:
            metrics += toy_metrics(toy_judge)
        renderer.prepare()  # text embeddings, then the VAE
        results, thumbnails = {}, {}
        steps = sum(len(schedule.plan.sigmas) for schedule in rows) * len(config.prompts)
        bar = progress_bar(steps, "sampling")
        for schedule in rows:
            for metric in metrics:
                metric.reset()
            start = time.perf_counter()
            thumbnails[schedule.name] = []
            bar.set_postfix_str(schedule.name)
            for prompt, images in renderer.render(schedule, on_step=lambda *_: bar.update()):
                for metric in metrics:
                    if schedule.teacher and _has_reference(metric):
                        metric.add_reference(images)  # the teacher's images are the FIDs' reference
                    else:
                        metric.update(images, prompt)
                if len(thumbnails[schedule.name]) < GRID_PROMPTS:
                    thumbnails[schedule.name].append(_thumbnail(images[0]))
            row = {"nfe": schedule.plan.nfe(renderer.cfg.num_layers, config.skip),
                   "seconds": time.perf_counter() - start}
            for metric in metrics:
                value = None if (schedule.teacher and _has_reference(metric)) else metric.compute()
                if value is not None and not math.isfinite(value):
                    raise OnexError(f"{metric.name} of {schedule.name} is {value}: nothing was written",
                                    "check the metric's weights and the model's")
                row[metric.name] = value
            if latency_ms is not None:
                row["latency_ms"] = latency_ms.get(schedule.latency_name)
            results[schedule.name] = row
            log(f"measured  {schedule.name}: " + ", ".join(
                f"{m.name} {row[m.name]:.4f}" for m in metrics if row[m.name] is not None) + f" ({row['seconds']:.1f} s)")
        bar.close()
    report = {
        "config": {"model": config.model, "teacher": config.teacher_model, "mlp": str(config.mlp) if config.mlp else None,
                   "skip": str(config.skip), "prompts": list(config.prompts), "seeds": config.seeds,
                   "student_steps": config.student_steps, "teacher_steps": config.teacher_steps,
                   "guidance": config.guidance, "resolution": renderer.resolution, "dtype": config.dtype,
                   "device": config.device, "random_components": config.random_components},
        "stand_ins": random_metrics,  # the metrics given no weights below ran on seeded random networks
        "weights": {k: str(v) if v is not None else None for k, v in asdict(given).items()},
        "metrics": {m.name: {"higher_is_better": m.higher_is_better} for m in metrics},
        "skipped": skipped,
        "schedules": results,
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,  # Linux: KiB
    }
    if latency is not None:
        report["latency"] = {"source": str(latency), "batch": 1}
    return report, thumbnails


def _weight_options(command):
    """One option per metric's weights (WEIGHT_OPTIONS), in the table's order."""
    for name, what in reversed(WEIGHT_OPTIONS.items()):
        command = click.option(f"--{name.replace('_', '-')}", name, type=click.Path(path_type=Path), default=None,
                               help=what)(command)
    return command


@click.command(name="bench.quality", help=command_help(__doc__))
@click.option("--model", default=DEFAULT_MODEL, show_default=True,
              help="the student: an embedded model or a local SD3 pipeline folder")
@click.option("--teacher", default=None, help="the teacher (default: the student's own weights)")
@click.option("--mlp", type=click.Path(path_type=Path), default=None,
              help="the trained compensation MLP for --skip (adds a row; default: an embedded trained model's own)")
@click.option("--skip", type=SKIP, default="3-10", show_default=True,
              help="the 1.x rows' skipped blocks (1-based, inclusive)")
@click.option("--prompts", type=click.Path(path_type=Path), default=None,
              help="one prompt per line (default: an embedded trained model's own prompts, else 8 built-in ones)")
@click.option("--max-prompts", type=POSITIVE_INT, default=None)
@click.option("--seeds", type=POSITIVE_INT, default=4, show_default=True,
              help="seeds per prompt (LPIPS diversity needs 2+)")
@click.option("--student-steps", type=POSITIVE_INT, default=4, show_default=True)
@click.option("--teacher-steps", type=POSITIVE_INT, default=28, show_default=True)
@click.option("--guidance", type=FiniteFloat(), default=7.0, show_default=True, help="the teacher's CFG scale")
@click.option("--resolution", type=RESOLUTION, default=None, help="pixels (default: the model's native size)")
@click.option("--device", type=DEVICE, default="cpu", show_default=True)
@click.option("--dtype", type=click.Choice(list(PRECISIONS)), default="fp32", show_default=True)
@_weight_options
@click.option("--toy-judge", type=click.Path(path_type=Path), default=None,
              help="a toy-world judge folder (default for the embedded digits-sd3: bench/toy/judge-weights): adds "
                   "toy_correct, toy_coverage and toy_fid_real for toy-world models and prompts (python -m bench.toy "
                   "trains it)")
@click.option("--random-metrics", is_flag=True,
              help="seeded random stand-ins for the metrics given no weights (plumbing; this run's ranking only)")
@click.option("--random-components", is_flag=True,
              help="for a folder holding only a transformer: random text embeddings and a random SD3 VAE, to measure "
                   "time and memory at real size (the images are noise)")
@click.option("--latency", type=click.Path(path_type=Path), default=None,
              help="a bench.latency latency.json: adds the plot of quality vs latency (its schedule names are matched)")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="a new folder (default bench/results/quality-<model>-<px>px)")
@replace_option
def command(**options) -> int:
    args = SimpleNamespace(**options)
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()  # our own lines say what matters
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()  # a bar per CLIP folder loaded
    skip = args.skip
    pyplot("bench.quality")  # the grid is drawn after the work: a missing matplotlib is refused before it
    if args.latency is not None and not args.latency.is_file():
        raise click.UsageError(f"--latency {args.latency} is not a file")
    if args.mlp is None and (own := default_mlp_for(args.model, skip)) is not None:
        args.mlp = own  # an embedded trained model's own MLP, as `build` takes it
        print(f"mlp       {args.model}'s own compensation MLP, trained for skip {skip}")
    weights = MetricWeights(**{name: getattr(args, name) for name in WEIGHT_OPTIONS})
    prompts = calibration_prompts(args.model, args.prompts, args.max_prompts)
    config = QualityConfig(args.model, args.teacher, args.mlp, skip, prompts, seeds=args.seeds,
                           student_steps=args.student_steps, teacher_steps=args.teacher_steps, guidance=args.guidance,
                           resolution=args.resolution, dtype=args.dtype, device=args.device,
                           random_components=args.random_components)
    name = Path(args.model).name
    pixels = args.resolution or transformer_source(args.model)[0]["sample_size"] * vae_scale(args.model)
    out = args.out or Path("bench/results") / f"quality-{name}-{pixels}px"
    if args.toy_judge is None and args.model in TRAINED_MODELS and JUDGE_DIR.is_dir():
        args.toy_judge = JUDGE_DIR  # the toy world's own model: judged by the shipped judge
    if args.toy_judge is not None:
        check_prompts(config.prompts)
        load_judge(args.toy_judge)  # refused before any model loads
    with report_folder(out, ("quality.json", "quality.md", "grid.png", "quality-vs-latency.png"),
                       replace=args.replace):  # before the work
        report, thumbnails = run(config, weights, args.random_metrics, args.latency, toy_judge=args.toy_judge)
        # the figures first: the results files, written last, say that the run is complete
        written = [grid(thumbnails, config.prompts[:GRID_PROMPTS], out / "grid.png")]
        if args.latency is not None:
            written.append(quality_vs_latency(report, out / "quality-vs-latency.png"))
        table = markdown(report)
        write_results(out, "quality", report, table)
    print(table)
    print(f"wrote {out}/quality.json, quality.md, " + ", ".join(p.name for p in written))
    print("PASSED quality: every schedule's images and metrics are finite")
    return 0


def main(argv: list[str] | None = None) -> int:
    return invoke(command, argv, "python -m bench.quality")


if __name__ == "__main__":
    sys.exit(run_main(main))
