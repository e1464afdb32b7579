"""The default model, digits-sd3: the toy chain's trained 1.x-Distill student, shipped in the package with its judge.

What it must do, judged by the toy judge (a digit CNN plus analytic colour and side detectors; it reads images
without any of the generator's parts):
- the README's first command builds it, and the built ONNX graphs draw what a prompt asks for;
- its compensation MLP recovers what plain reuse of the cached blocks loses (the paper's central claim);
- the folders are exactly what the chain wrote (MADE.json sha256 entries), and small enough to ship.

Measured here (2-core CPU, issue 20): the built ONNX graphs' 1.x images 95.0% judged correct on the prompts below
with 2 seeds (40 images); through PyTorch with 4 seeds, 1.x + MLP 93.8% against plain reuse 85.0% (80 images
each). The bars leave room for the platform's float differences, not for a model that draws noise (0% correct) or
an MLP that hurts.
"""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import onex_export
from bench.toy.evaluate import ONE_X, ONE_X_MLP, Evaluator
from bench.toy.install import check_made
from bench.toy.judge import Judge
from onex_export.config import SkipRange
from onex_export.models.zoo import DEFAULT_MODEL, TRAINED_MODELS
from train.toy.digits import PROMPTS

ROOT = Path(__file__).resolve().parents[2]
MODEL = TRAINED_MODELS["digits-sd3"]
JUDGE = ROOT / "bench" / "toy" / "judge-weights"
SUBSET = PROMPTS[::3]  # 20 of the 60 prompts: every digit, colour and side
ONNX_CORRECT_AT_LEAST = 0.80  # measured 0.950 (40 images)
MLP_MARGIN = 0.03  # measured 0.938 vs 0.850 (80 images each)
SHIPPED_MB_AT_MOST = 20


def test_the_default_is_the_trained_model():
    assert DEFAULT_MODEL == "digits-sd3"
    assert MODEL.skip == "3-10" and MODEL.mlp.is_file()


@pytest.mark.parametrize("folder", [MODEL.folder, JUDGE], ids=["model", "judge"])
def test_the_shipped_folders_are_what_the_chain_wrote_and_small(folder):
    assert check_made(folder) == []
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    assert 1e5 < size < SHIPPED_MB_AT_MOST * 1e6  # model 8.7 MB, judge 0.4 MB


def test_a_changed_or_extra_file_is_found(tmp_path):
    copy = tmp_path / "judge"
    shutil.copytree(JUDGE, copy)
    text = (copy / "judge.json").read_text()
    (copy / "judge.json").write_text(text.replace("}", " }"))
    (copy / "stray.txt").write_text("not the chain's")
    problems = check_made(copy)
    assert len(problems) == 2
    assert problems[0].startswith("judge.json: sha256") and problems[1] == "stray.txt: not recorded"
    (copy / "judge.safetensors").unlink()
    assert "judge.safetensors: missing" in check_made(copy)


def test_the_mlp_recovers_what_plain_reuse_loses():
    """The same student, the same noise: 1.x through the shipped MLP against 1.x reusing the cached blocks as is."""
    evaluator, judge = Evaluator(MODEL.folder, SUBSET), Judge.load(JUDGE)
    prompts, skip = evaluator.prompt_list(4), SkipRange.parse(MODEL.skip)
    plain = judge(evaluator.images(str(MODEL.folder), ONE_X, 4, 0, skip), prompts).correct.float().mean()
    mlp = judge(evaluator.images(str(MODEL.folder), ONE_X_MLP, 4, 0, skip, MODEL.mlp), prompts).correct.float().mean()
    print(f"1.x + MLP {mlp:.3f}, plain reuse {plain:.3f}")
    assert mlp >= plain + MLP_MARGIN, f"1.x + MLP {mlp:.3f} vs plain reuse {plain:.3f}"
    assert mlp >= 0.80


def test_the_readme_build_draws_what_the_prompt_asks(tmp_path):
    """The README's first command on the default model (ONNX only: engines need a GPU to run), then text to image
    through the built graphs, as a service runs them."""
    out = tmp_path / "engines"
    build = subprocess.run([sys.executable, "-m", "onex_export.cli", "build", "--skip", "3-10", "--trt", "none",
                            "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    assert build.stdout.strip().splitlines()[-1].startswith("PASSED build:")
    pipe = onex_export.BuildPipeline(out, backend="onnxruntime")
    results = pipe.generate_batch([onex_export.Request((p.text,), seed) for p in SUBSET for seed in (0, 1)])
    images = torch.cat([r.images for r in results])
    assert images.shape == (2 * len(SUBSET), 3, 64, 64) and torch.isfinite(images).all()
    verdicts = Judge.load(JUDGE)(images, [p for p in SUBSET for _ in (0, 1)])
    correct = verdicts.correct.float().mean()
    print(f"ONNX 1.x images judged correct: {correct:.3f}")
    assert correct >= ONNX_CORRECT_AT_LEAST
