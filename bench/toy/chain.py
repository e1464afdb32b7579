"""The toy world's chain, stage by stage: judge -> autoencoder -> teacher -> Stage I -> discriminator tower
-> Stage II -> evaluation.

Every stage writes into ``<work>/<stage>/`` and ends by writing ``result.json`` (its figures and seconds),
atomically; a stage whose ``result.json`` exists is done and is not run again, so a stopped chain resumes at the
stage it stopped in (and the training runs inside a stage resume from their checkpoints). Each stage is a function
of the chain's config and the earlier stages' results, and returns its own.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from onex_export.fileio import atomic_path
from train.toy.autoencoder import AutoencoderConfig
from train.toy.teacher import TeacherConfig
from train.toy.tower import TowerConfig

Log = Callable[[str], None]


@dataclass(frozen=True)
class ToyConfig:
    """What the chain does. The defaults are the report's; ``quick()`` is a minutes-long smoke version."""

    work: Path
    seeds: int = 3  # training seeds of every Stage I / Stage II variant (and evaluation sets of the teacher)
    eval_seeds: int = 8  # images per prompt in an evaluation: 60 x 8 = 480 per row
    guidance: float = 5.0  # the teacher's CFG scale, in sampling and in Stage I's guided teacher
    fidelity_bar: float = 0.9  # the teacher trains until its 28x2 CFG samples are judged correct this often
    judge_steps: int = 1500
    autoencoder: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)  # its ``steps``: the most it may train
    teacher_check_every: int = 2000
    teacher_check_seeds: int = 4  # images per prompt in each check of the teacher
    latents_per_prompt: int = 256  # the teacher's training set: 60 x this many scenes of generation glyphs
    stage1_steps: int = 600
    tower: TowerConfig = field(default_factory=TowerConfig)  # Stage II's discriminator tower
    stage2_steps: int = 300
    jobs: int = 2  # training runs at once (one CPU thread each)

    def __post_init__(self) -> None:
        if self.seeds < 1 or self.eval_seeds < 2 or self.jobs < 1:
            raise ValueError("seeds >= 1, eval_seeds >= 2 and jobs >= 1 are needed")
        if not 0 < self.fidelity_bar <= 1 or self.guidance <= 1:
            raise ValueError("the fidelity bar lies in (0, 1] and the guidance above 1")

    @classmethod
    def quick(cls, work: Path) -> "ToyConfig":
        """Every stage for a few steps: checks the chain end to end, learns nothing."""
        return cls(work, seeds=1, eval_seeds=2, fidelity_bar=1.0, judge_steps=20,
                   autoencoder=AutoencoderConfig(steps=5), teacher=TeacherConfig(steps=4, checkpoint_every=2),
                   teacher_check_every=2, teacher_check_seeds=1, latents_per_prompt=2, stage1_steps=2,
                   tower=TowerConfig(steps=2, batch=8), stage2_steps=2, jobs=1)

    def to_json(self) -> dict:
        return json.loads(json.dumps(asdict(self), default=str))


def done(work: Path, stage: str) -> dict | None:
    path = work / stage / "result.json"
    return json.loads(path.read_text()) if path.is_file() else None


def run_stage(work: Path, stage: str, body: Callable[[Path], dict], log: Log) -> dict:
    """``body(folder)`` unless ``stage`` is done; its result (with ``seconds``) written as the stage's marker."""
    previous = done(work, stage)
    if previous is not None:
        log(f"{stage:<12} done before ({previous['seconds']:.0f} s)")
        return previous
    folder = work / stage
    folder.mkdir(parents=True, exist_ok=True)
    log(f"{stage:<12} ...")
    start = time.perf_counter()
    result = {**body(folder), "seconds": round(time.perf_counter() - start, 1)}
    with atomic_path(folder / "result.json") as tmp:
        tmp.write_text(json.dumps(result, indent=1) + "\n")
    log(f"{stage:<12} done in {result['seconds']:.0f} s")
    return result


def check_finite_images(images: torch.Tensor, what: str) -> torch.Tensor:
    if not torch.isfinite(images).all():
        raise FloatingPointError(f"{what} made non-finite images: the chain stops, nothing is reported")
    return images
