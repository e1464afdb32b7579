"""bench.quality's metrics for toy-world models (``--toy-judge DIR``), from the toy judge (bench/toy/judge.py)
instead of random stand-ins: the judge reads each image without any of the generator's parts.

- ``toy_correct``: the fraction of images judged correct (the prompt's digit, colour and side);
- ``toy_coverage``: mode coverage of the free attributes (size x height) over a prompt's seeds;
- ``toy_fid_real``: FID in the judge's feature space against held-out real scenes of the same prompts (glyphs no
  generator trained on, 8 per prompt, as the toy report's ``fid_real``). Real scenes, not the teacher's images: an
  embedded toy model ships without its teacher, and the student's own weights under the teacher's schedule are no
  reference.

Prompts must be the toy world's (``"a red 7 on the left"``); anything else is refused before a model loads.
"""
from __future__ import annotations

from pathlib import Path

import torch

from bench.toy.judge import Judge
from bench.toy.metrics import MODES, fid
from onex_export.errors import UsageError
from train.toy.digits import PROMPTS, prompt_index, scenes


def load_judge(folder: Path) -> Judge:
    if not (Path(folder) / "judge.safetensors").is_file():
        raise UsageError(f"--toy-judge {folder} holds no judge.safetensors",
                         "pass a judge folder written by `python -m bench.toy` (e.g. bench/toy/judge-weights)")
    return Judge.load(Path(folder))


def check_prompts(prompts: tuple[str, ...]) -> None:
    for text in prompts:
        try:
            prompt_index(text)
        except ValueError as exc:
            raise UsageError(f"--toy-judge judges toy-world prompts only: {exc}",
                             "pass --prompts with lines like 'a red 7 on the left'") from None


def _verdicts(judge: Judge, images: torch.Tensor, prompt: str):
    """(S, H, W, 3) uint8 images of one prompt -> the judge's verdicts."""
    chw = images.movedim(-1, -3).float() / 255
    return judge(chw, [PROMPTS[prompt_index(prompt)]] * chw.shape[0])


class ToyCorrect:
    name, higher_is_better = "toy_correct", True

    def __init__(self, judge: Judge):
        self.judge, self.scores = judge, []

    def reset(self) -> None:
        self.scores = []

    def update(self, images: torch.Tensor, prompt: str) -> None:
        self.scores.append(_verdicts(self.judge, images, prompt).correct.float())

    def compute(self) -> float:
        return float(torch.cat(self.scores).mean())


class ToyCoverage(ToyCorrect):
    name = "toy_coverage"

    def update(self, images: torch.Tensor, prompt: str) -> None:
        v = _verdicts(self.judge, images, prompt)
        self.scores.append(torch.tensor([len(set(v.mode[v.present].tolist())) / MODES]))


class ToyFIDReal:
    name, higher_is_better = "toy_fid_real", False
    REAL_PER_PROMPT, REAL_SEED = 8, 7  # as bench.toy's evaluation draws its fid_real reference

    def __init__(self, judge: Judge):
        self.judge, self.features, self.prompts = judge, [], set()

    def reset(self) -> None:
        self.features, self.prompts = [], set()

    def update(self, images: torch.Tensor, prompt: str) -> None:
        self.features.append(self.judge.raw_features(images.movedim(-1, -3).float() / 255)[1])
        self.prompts.add(prompt_index(prompt))

    def reference(self) -> torch.Tensor:
        """(P x 8, 39) raw judge features of real held-out scenes of the prompts seen."""
        ids = torch.tensor(sorted(self.prompts)).repeat_interleave(self.REAL_PER_PROMPT)
        return self.judge.raw_features(scenes(ids, "judge", self.REAL_SEED)[0])[1]

    def compute(self) -> float:
        if sum(len(f) for f in self.features) < 2:
            raise UsageError("toy_fid_real needs 2 images or more", "use more prompts or seeds")
        standardise = lambda x: (x - self.judge.mean) / self.judge.std  # noqa: E731
        return fid(standardise(torch.cat(self.features)), standardise(self.reference()))


def toy_metrics(folder: Path) -> list:
    judge = load_judge(folder)
    return [ToyCorrect(judge), ToyCoverage(judge), ToyFIDReal(judge)]
