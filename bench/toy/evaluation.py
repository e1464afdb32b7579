"""The evaluation stage of the toy chain: every report row's images, judged, with mean and spread over seeds.

Rows (the paper's claims at toy scale):
- ``real``: held-out scenes of the judge's glyphs (what a perfect generator would score; the judge's ceiling);
- ``teacher 28x2``: the teacher with CFG, over ``seeds`` evaluation sets of noise seeds;
- Stage I 2-step students: ``sfd`` (importance sampling + guidance control), ``uniform`` (Table 4's uniform
  timesteps), ``cfg-all`` (CFG at every sigma): each over its training seeds;
- ``sfd, cache after training``: the SFD students under the 1.x schedule with plain reuse (Table 5, row 2);
- Stage II: ``DCT`` (co-trained, no MLP) and ``DCT + MLP`` under the 1.x schedule (Table 5, rows 3-4);
- ``4-step``: one Stage I 4-step student, for reference.

FID references: held-out real scenes (``fid_real``) and a separate set of the teacher's samples (``fid_teacher``).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from onex_export.config import SkipRange
from onex_export.fileio import atomic_path, save_tensors_atomic
from onex_export.schedule import SamplingPlan
from train.toy.digits import PROMPTS

from .chain import Log, ToyConfig, check_finite_images
from .evaluate import ONE_X, ONE_X_MLP, STUDENT_2, Evaluator, Schedule, teacher_schedule
from .judge import Judge, real_scenes
from .metrics import all_metrics
from .stages import TEACHER_STEPS, stage1_runs, stage2_runs

SKIP = SkipRange.parse("3-10")
REFERENCE_OFFSET = 10**6  # noise seeds of the teacher's FID reference set, apart from every evaluated set


@dataclass(frozen=True)
class Row:
    """A report row: a name, its schedule, and per seed the transformer (and MLP) that makes its images."""

    name: str
    group: str
    schedule: Schedule
    models: tuple[tuple[str, str | None, int], ...]  # (transformer folder, MLP file or None, noise seed offset)
    nfe: float


def rows(cfg: ToyConfig) -> list[Row]:
    teacher = str(cfg.work / "teacher" / "pipeline" / "transformer")
    one = {r.name: r for r in stage1_runs(cfg)}
    two = {r.name: r for r in stage2_runs(cfg)}
    seeds = range(cfg.seeds)
    t_sched = teacher_schedule(TEACHER_STEPS, cfg.guidance)

    def students(variant: str, runs: dict) -> tuple:
        return tuple((str(runs[f"{variant}-s{s}"].student), str(runs[f"{variant}-s{s}"].mlp or ""), 0) for s in seeds)

    return [
        Row(f"teacher {TEACHER_STEPS}x2", "reference", t_sched, tuple((teacher, None, 1000 * s) for s in seeds),
            2.0 * TEACHER_STEPS),
        Row("4-step (Stage I)", "reference", Schedule("4-step", SamplingPlan.student(4)),
            ((str(one["4-step-s0"].student), None, 0),), 4.0),
        Row("2-step SFD (Stage I)", "Stage I", STUDENT_2, students("sfd", one), 2.0),
        Row("2-step, uniform timesteps", "Stage I", STUDENT_2, students("uniform", one), 2.0),
        Row("2-step, CFG at every sigma", "Stage I", STUDENT_2, students("cfg-all", one), 2.0),
        Row("1.x, cache after training", "cache", ONE_X, students("sfd", one), ONE_X.nfe(24, SKIP)),
        Row("1.x, DCT without MLP", "cache", ONE_X, students("dct", two), ONE_X.nfe(24, SKIP)),
        Row("1.x, DCT + MLP", "cache", ONE_X_MLP, students("dct-mlp", two), ONE_X.nfe(24, SKIP)),
    ]


def _summary(per_seed: list[dict]) -> dict:
    keys = per_seed[0].keys()
    return {k: {"mean": float(np.mean([m[k] for m in per_seed])), "std": float(np.std([m[k] for m in per_seed])),
                "values": [m[k] for m in per_seed]} for k in keys}


def evaluation_stage(cfg: ToyConfig, folder: Path, log: Log) -> dict:
    """Judge every row; keeps each row's first images in ``folder/images-<i>.safetensors`` for the figures."""
    evaluator = Evaluator(cfg.work / "teacher" / "pipeline")
    judge = Judge.load(cfg.work / "judge")
    prompts = evaluator.prompt_list(cfg.eval_seeds)
    real_images, real_prompts, _ = real_scenes("judge", cfg.eval_seeds, seed=7)
    real = judge(real_images, real_prompts).features
    teacher = str(cfg.work / "teacher" / "pipeline" / "transformer")
    t_sched = teacher_schedule(TEACHER_STEPS, cfg.guidance)
    teacher_ref = judge(evaluator.images(teacher, t_sched, cfg.eval_seeds, REFERENCE_OFFSET), prompts).features

    out = []
    real_rows = [real_scenes("judge", cfg.eval_seeds, seed=100 + s) for s in range(cfg.seeds)]
    real_metrics = [all_metrics(judge(im, p), cfg.eval_seeds, real, teacher_ref) for im, p, _ in real_rows]
    out.append({"name": "real held-out scenes", "group": "reference", "nfe": None, **_summary(real_metrics)})
    save_tensors_atomic({"images": real_rows[0][0]}, folder / "images-0.safetensors", {"name": out[0]["name"]})
    for i, row in enumerate(rows(cfg), start=1):
        per_seed = []
        for k, (transformer, mlp, offset) in enumerate(row.models):
            images = check_finite_images(
                evaluator.images(transformer, row.schedule, cfg.eval_seeds, offset, SKIP, Path(mlp) if mlp else None),
                row.name)
            per_seed.append(all_metrics(judge(images, prompts), cfg.eval_seeds, real, teacher_ref))
            if k == 0:
                save_tensors_atomic({"images": images}, folder / f"images-{i}.safetensors", {"name": row.name})
        out.append({"name": row.name, "group": row.group, "nfe": row.nfe, "seeds": len(row.models),
                    **_summary(per_seed)})
        log(f"evaluated    {row.name}: {out[-1]['correct']['mean']:.1%} correct, mode coverage "
            f"{out[-1]['mode_coverage']['mean']:.2f}, FID(real) {out[-1]['fid_real']['mean']:.2f}")
    with atomic_path(folder / "rows.json") as tmp:
        tmp.write_text(json.dumps(out, indent=1) + "\n")
    return {"rows": out, "prompts": len(PROMPTS), "images_per_prompt": cfg.eval_seeds}


def load_images(folder: Path, index: int) -> torch.Tensor:
    from safetensors.torch import load_file

    return load_file(str(folder / f"images-{index}.safetensors"))["images"]
