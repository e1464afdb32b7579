"""Ship the toy chain's trained 1.x student as the package's embedded default model (``digits-sd3``).

The folder is an SD3 pipeline folder (transformer in fp16, as releases ship; the small VAE and text encoders in
fp32) plus the compensation MLP, ``prompts.txt`` (its calibration prompts) and ``MADE.json``: what it was made from, the command that makes it, and the sha256
and size of every file (the tests check the files against it). It is written beside the old one and swapped in
whole; only a folder that this tool made (it has a ``MADE.json``) is ever replaced.

The judge ships too (``bench/toy/judge-weights/``, with its own ``MADE.json``): the tests judge the default's
images with it, and ``bench.quality --toy-judge`` reads it. It is data, not a model of the package.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from onex_export.config import SkipRange
from onex_export.export.install import install, temp_name
from onex_export.fileio import atomic_folder, sha256_file
from onex_export.models import load_transformer
from onex_export.models.zoo import TRAINED_MODELS
from train.toy.digits import PROMPTS
from train.toy.pipeline import save_transformer

from .chain import ToyConfig
from .evaluate import ONE_X_MLP, Evaluator
from .judge import JUDGE_DIR, Judge
from .runs import Run
from .stages import stage2_runs

NAME = "digits-sd3"
MADE = "MADE.json"
COMMAND = "python -m bench.toy --install-default"
COPIED = ("vae", "text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer", "tokenizer_2", "tokenizer_3",
          "scheduler", "model_index.json")


def file_table(folder: Path) -> dict[str, dict]:
    """Every file under ``folder`` but MADE.json: relative path -> sha256 and bytes."""
    return {str(p.relative_to(folder)): {"sha256": sha256_file(p), "bytes": p.stat().st_size}
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MADE}


def check_made(folder: Path) -> list[str]:
    """What differs between ``folder`` and its MADE.json: files missing, changed (sha256) or not recorded. Empty
    when the folder is what the chain wrote."""
    made = json.loads((folder / MADE).read_text())
    actual = file_table(folder)
    problems = [f"{name}: missing" for name in made["files"] if name not in actual]
    problems += [f"{name}: sha256 {actual[name]['sha256'][:12]}... is not the recorded {entry['sha256'][:12]}..."
                 for name, entry in made["files"].items() if name in actual and actual[name] != entry]
    return problems + [f"{name}: not recorded" for name in actual if name not in made["files"]]


SELECTION_OFFSET = 5 * 10**5  # noise seeds of the selection set: apart from the report's and the FID reference's
SELECTION_IMAGES = 4  # per prompt


def choose_student(cfg: ToyConfig) -> tuple[Run, dict]:
    """The DCT + MLP run whose 1.x images (through its MLP) the chain's judge finds correct most often, on a selection
    set of noise seeds that no report row uses (so the report's figures stay unbiased by the choice); and the
    scores. Seeds differ a lot after Stage II (the first chain: 75-90% judged correct), and a user gets the default."""
    evaluator, judge = Evaluator(cfg.work / "teacher" / "pipeline"), Judge.load(cfg.work / "judge")
    prompts = evaluator.prompt_list(SELECTION_IMAGES)
    runs = [r for r in stage2_runs(cfg) if r.name.startswith("dct-mlp-")]
    scores = {}
    for run in runs:
        images = evaluator.images(str(run.student), ONE_X_MLP, SELECTION_IMAGES, SELECTION_OFFSET,
                                  SkipRange.parse(run.config["skip"]), run.mlp)
        scores[run.name] = float(judge(images, prompts).correct.float().mean())
    best = max(runs, key=lambda r: scores[r.name])
    return best, {"judged_correct": scores, "images_per_prompt": SELECTION_IMAGES,
                  "noise_seed_offset": SELECTION_OFFSET, "chosen": best.name}


def install_default(cfg: ToyConfig, target: Path | None = None, judge_target: Path | None = None) -> Path:
    """Write the chosen DCT + MLP student (:func:`choose_student`) with the teacher pipeline's components to
    ``target`` (default: the embedded model's folder in the package), and the judge to ``judge_target`` (default:
    :data:`JUDGE_DIR`). Returns the model's folder."""
    target = Path(target or TRAINED_MODELS[NAME].folder)
    judge_target = Path(judge_target or JUDGE_DIR)
    for folder in (target, judge_target):
        if folder.exists() and not (folder / MADE).is_file():
            raise FileExistsError(f"{folder} exists and was not made by bench.toy (no {MADE}): not replacing it")
    pipeline = cfg.work / "teacher" / "pipeline"
    run, selection = choose_student(cfg)

    def model(tmp: Path) -> dict:
        save_transformer(load_transformer(str(run.student)), tmp / "transformer", torch.float16)
        for name in COPIED:
            source = pipeline / name
            (shutil.copytree if source.is_dir() else shutil.copy2)(source, tmp / name)
        shutil.copy2(run.mlp, tmp / "mlp.safetensors")
        # its calibration prompts (probe, bench.quality): every digit, colour and side, in the model's own words
        (tmp / "prompts.txt").write_text("".join(p.text + "\n" for p in PROMPTS[::5]))
        return {"model": NAME, "skip": run.config["skip"],
                "made_from": {"student": f"stage2/{run.name} (DCT + MLP)", "components": "teacher/pipeline",
                              "selection": selection, "config": cfg.to_json()}}

    def judge(tmp: Path) -> dict:
        for name in ("judge.json", "judge.safetensors"):
            shutil.copy2(cfg.work / "judge" / name, tmp / name)
        return {"model": "toy judge", "made_from": {"judge": "judge stage", "config": cfg.to_json()}}

    _swap_in(target, model)
    _swap_in(judge_target, judge)
    return target


def _swap_in(target: Path, fill) -> None:
    """Fill a fresh folder beside ``target`` (``fill(tmp)`` returns MADE.json's description), record every file's
    hash and size, then put it in place of ``target`` in one step (the build folders' own install)."""
    fresh = temp_name(target)
    with atomic_folder(fresh) as tmp:
        made = fill(tmp)
        files = file_table(tmp)
        made.update(command=COMMAND, total_bytes=sum(f["bytes"] for f in files.values()), files=files)
        (tmp / MADE).write_text(json.dumps(made, indent=1) + "\n")
    try:
        install(fresh, target)
    except BaseException:
        shutil.rmtree(fresh, ignore_errors=True)
        raise
