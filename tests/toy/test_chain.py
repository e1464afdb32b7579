"""`python -m bench.toy --quick`: every stage of the toy chain (judge, autoencoder, teacher, Stage I and Stage II
through the project's trainers, evaluation, report) for a few steps each, in a fresh process; then again, which
must resume (every stage done before) rather than redo anything."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[2]
STAGES = ("judge", "autoencoder", "teacher", "stage1", "tower", "stage2", "evaluation")


def _run(work: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bench.toy", "--quick", "--work", str(work / "work"), "--out",
                           str(work / "report")], cwd=ROOT, capture_output=True, text=True, timeout=2400)


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    work = tmp_path_factory.mktemp("toy")
    first = _run(work)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    return work, first


def test_every_stage_runs_and_the_report_is_written(quick):
    work, result = quick
    assert result.stdout.strip().endswith("PASSED")
    for stage in STAGES:
        marker = json.loads((work / "work" / stage / "result.json").read_text())
        assert marker["seconds"] > 0
    report = json.loads((work / "report" / "report.json").read_text())
    names = [r["name"] for r in report["stages"]["evaluation"]["rows"]]
    assert names == ["real held-out scenes", "teacher 28x2", "4-step (Stage I)", "2-step SFD (Stage I)",
                     "2-step, uniform timesteps", "2-step, CFG at every sigma", "1.x, cache after training",
                     "1.x, DCT without MLP", "1.x, DCT + MLP"]
    for row in report["stages"]["evaluation"]["rows"]:
        assert 0.0 <= row["correct"]["mean"] <= 1.0 and row["fid_real"]["mean"] >= 0.0
    assert len(report["claims"]) == 5
    assert {c["verdict"] for c in report["claims"]} <= {"reproduced", "not reproduced", "inconclusive"}
    # the real scenes' row: its colour and side are read by the analytic detectors, which need no training (the
    # digit CNN of --quick has trained 20 steps, so its digit rate means nothing here)
    real = report["stages"]["evaluation"]["rows"][0]
    assert real["glyph"]["mean"] == 1.0 and real["colour"]["mean"] > 0.99 and real["side"]["mean"] > 0.99
    for name in ("report.md", "grid.png", "quality-vs-nfe.png"):
        assert (work / "report" / name).stat().st_size > 1000
    teacher = report["stages"]["teacher"]
    assert [c["step"] for c in teacher["checks"]] == [2, 4] and not teacher["reached_bar"]  # bar 1.0 in --quick


def test_dct_without_the_mlp_leaves_it_the_identity_and_with_it_trains_it(quick):
    work, _ = quick
    plain = load_file(str(work / "work" / "stage2" / "dct-s0" / "final" / "mlp.safetensors"))
    trained = load_file(str(work / "work" / "stage2" / "dct-mlp-s0" / "final" / "mlp.safetensors"))
    out = [k for k in plain if k.endswith(("fc2.weight", "fc2.bias"))]  # W2, b2: zero-initialised
    assert out and all(torch.count_nonzero(plain[k]) == 0 for k in out)
    assert any(torch.count_nonzero(trained[k]) > 0 for k in out)


def test_a_second_call_resumes_every_stage(quick):
    work, _ = quick
    again = _run(work)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("done before") == len(STAGES)
    assert "PASSED" in again.stdout


def test_install_writes_the_student_and_judge_with_their_hashes_and_replaces_only_its_own(quick, tmp_path):
    from bench.toy.chain import ToyConfig
    from bench.toy.install import install_default
    from onex_export.fileio import sha256_file

    work, _ = quick
    cfg = ToyConfig.quick(work / "work")
    model, judge = tmp_path / "model", tmp_path / "judge"
    assert install_default(cfg, model, judge) == model
    for folder in (model, judge):
        made = json.loads((folder / "MADE.json").read_text())
        assert made["command"] == "python -m bench.toy --install-default"
        for name, entry in made["files"].items():
            assert sha256_file(folder / name) == entry["sha256"]
        assert made["total_bytes"] == sum(e["bytes"] for e in made["files"].values())
    made = json.loads((model / "MADE.json").read_text())
    assert made["skip"] == "3-10" and "mlp.safetensors" in made["files"] and "vae/config.json" in made["files"]
    assert set(json.loads((judge / "MADE.json").read_text())["files"]) == {"judge.json", "judge.safetensors"}
    # the transformer ships in fp16, as releases do
    weights = load_file(str(model / "transformer" / "diffusion_pytorch_model.safetensors"))
    assert {t.dtype for t in weights.values()} == {torch.float16}

    install_default(cfg, model, judge)  # its own folders: replaced whole, nothing left beside them
    assert sorted(p.name for p in tmp_path.iterdir()) == ["judge", "model"]

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("not ours")
    with pytest.raises(FileExistsError, match="not made by bench.toy"):
        install_default(cfg, foreign, judge)
    assert (foreign / "keep.txt").read_text() == "not ours" and sorted(p.name for p in foreign.iterdir()) == ["keep.txt"]
