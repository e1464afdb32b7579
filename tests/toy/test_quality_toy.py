"""bench.quality's toy-world metrics (``--toy-judge``; the default for digits-sd3): what the shipped judge reads in
images whose truth is known, and the benchmark run on the default model.

Measured here on 10 prompts x 8 scenes (held-out real scenes: correct 0.988, toy_fid_real 1.51, coverage 1.0; the
same scenes under the next prompt: correct 0.0, toy_fid_real 5.06; uniform noise: correct 0.0, toy_fid_real 354).
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench.quality.toy_judge import ToyCorrect, ToyCoverage, ToyFIDReal, load_judge
from bench.toy.judge import JUDGE_DIR
from train.toy.digits import PROMPTS, scenes

ROOT = Path(__file__).resolve().parents[2]
SHOWN = range(0, 60, 6)  # 10 prompts: every colour, side and five digits


def _measure(make) -> list[float]:
    """correct, toy_fid_real, coverage of 8 images per prompt of SHOWN, made by ``make(prompt_ids)`` in [0, 1]."""
    judge = load_judge(JUDGE_DIR)
    metrics = [ToyCorrect(judge), ToyFIDReal(judge), ToyCoverage(judge)]
    for p in SHOWN:
        images = make(torch.full((8,), p)).clamp(0, 1).mul(255).round().to(torch.uint8).movedim(1, -1)
        for metric in metrics:
            metric.update(images, PROMPTS[p].text)
    return [m.compute() for m in metrics]


def test_real_scenes_read_as_their_prompts_and_lie_close_to_the_reference():
    correct, fid_real, coverage = _measure(lambda ids: scenes(ids, "judge", 3)[0])  # not the reference's seed 7
    assert correct >= 0.95 and fid_real < 3.0 and coverage >= 0.75


def test_wrong_prompts_and_noise_are_found():
    real_fid = _measure(lambda ids: scenes(ids, "judge", 3)[0])[1]
    correct, fid_real, _ = _measure(lambda ids: scenes((ids + 1) % len(PROMPTS), "judge", 3)[0])
    assert correct == 0.0 and fid_real > 2 * real_fid  # another prompt's scenes: wrong, and far from the reference
    correct, fid_real, _ = _measure(lambda ids: torch.rand(len(ids), 3, 64, 64, generator=torch.Generator()
                                                                  .manual_seed(0)))
    assert correct == 0.0 and fid_real > 100


def test_the_benchmark_on_the_default_model_is_judged(tmp_path):
    out = tmp_path / "quality"
    args = [sys.executable, "-m", "bench.quality", "--max-prompts", "2", "--seeds", "2", "--teacher-steps", "2"]
    result = subprocess.run([*args, "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((out / "quality.json").read_text())
    assert report["config"]["model"] == "digits-sd3" and "1.x skip 3-10 + MLP" in report["schedules"]  # its own MLP
    for name, row in report["schedules"].items():
        assert 0.0 <= row["toy_correct"] <= 1.0 and 0.0 < row["toy_fid_real"] < 1000, name
    assert report["schedules"]["2-step"]["toy_correct"] >= 0.5  # 4 images; 0.94 on 96 (bench/results)
    assert "toy_fid_real is measured" in (out / "quality.md").read_text()


def test_prompts_outside_the_toy_world_are_refused_before_a_model_loads(tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red fox\n")
    result = subprocess.run([sys.executable, "-m", "bench.quality", "--prompts", str(prompts), "--out",
                             str(tmp_path / "q")], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 2 and "toy-world prompts only" in result.stderr  # a usage error
    assert "Traceback" not in result.stderr and not (tmp_path / "q").exists()


@pytest.mark.parametrize("folder", ["missing", "empty"])
def test_a_folder_without_a_judge_is_refused(tmp_path, folder):
    from onex_export.errors import UsageError

    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="holds no judge.safetensors"):
        load_judge(tmp_path / folder)
