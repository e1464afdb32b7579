"""The Stage I entry point in fresh processes: the README's tiny CPU command, kill-and-resume
bit-identity, and torchrun with FSDP2 (gloo, CPU) against the single process."""
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from train.checkpoint import load_trainer_state
from train.monitor import read_log

ROOT = Path(__file__).resolve().parents[2]
TINY = ["--config", "train/configs/tiny-cpu.yaml"]
LOSSES = ("loss_fake", "loss_generator", "grad_norm_fake", "grad_norm_generator", "sigma_dmd", "sigma_fake")


def _stage1(*args, launcher=(sys.executable, "-m", "train.stage1")):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([*launcher, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def _weights(ckpt: Path, name: str) -> dict[str, torch.Tensor]:
    return load_file(str(ckpt / name / "diffusion_pytorch_model.safetensors"))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The README's tiny command, as is, in its own run folder: 6 steps, checkpoints at 3 and 6."""
    run_dir = tmp_path_factory.mktemp("cli") / "full"
    proc = _stage1(*TINY, "--set", f"run_dir={run_dir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().endswith("PASSED")
    return run_dir


def test_tiny_command_runs_logs_and_samples(uninterrupted):
    log = read_log(uninterrupted / "log.jsonl")
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5, 6]
    assert all(r["loss_fake"] > 0 and r["loss_generator"] > 0 for r in log)
    assert sorted(p.name for p in (uninterrupted / "samples").iterdir()) == ["step-000003.png", "step-000006.png"]
    assert sorted(p.name for p in (uninterrupted / "checkpoints").iterdir()) == ["latest", "step-000003", "step-000006"]


def test_kill_after_step_3_then_resume_is_bit_identical(uninterrupted):
    run_dir = uninterrupted.parent / "killed"
    killed = _stage1(*TINY, "--set", f"run_dir={run_dir}", "--kill-after", "3")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step-000003"
    assert not (run_dir / "checkpoints" / "step-000006").exists()
    resumed = _stage1(*TINY, "--set", f"run_dir={run_dir}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    full, res = uninterrupted / "checkpoints" / "step-000006", run_dir / "checkpoints" / "step-000006"
    for name in ("student", "fake"):
        a, b = _weights(full, name), _weights(res, name)
        assert a.keys() == b.keys()
        different = [k for k in a if not torch.equal(a[k], b[k])]
        assert different == [], f"{name}: {len(different)} tensors differ, e.g. {different[:3]}"
    sa, sb = load_trainer_state(full), load_trainer_state(res)
    for name in ("student", "fake"):
        for fqn, st in sa.optimizers[name]["state"].items():
            for key, value in st.items():
                assert torch.equal(value, sb.optimizers[name]["state"][fqn][key]), (name, fqn, key)
    assert torch.equal(sa.rng["train"], sb.rng["train"])
    la, lb = read_log(uninterrupted / "log.jsonl"), read_log(run_dir / "log.jsonl")
    assert [r["step"] for r in lb] == [1, 2, 3, 4, 5, 6]
    assert [[r[k] for k in LOSSES] for r in la] == [[r[k] for k in LOSSES] for r in lb]

    # negative: the weights of step 3 and step 6 do differ, so the comparison above has teeth
    early = _weights(uninterrupted / "checkpoints" / "step-000003", "student")
    assert any(not torch.equal(early[k], _weights(full, "student")[k]) for k in early)


def test_torchrun_fsdp2_on_two_cpu_ranks_matches_the_single_process(uninterrupted):
    run_dir = uninterrupted.parent / "fsdp"
    launcher = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                "-m", "train.stage1")
    proc = _stage1(*TINY, "--set", f"run_dir={run_dir}", "--set", "max_steps=3", "--set", "sample_every=0",
                   launcher=launcher)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("PASSED") == 1  # rank 0 only
    ckpt = run_dir / "checkpoints" / "step-000003"
    assert load_trainer_state(ckpt).world_size == 2
    single, dist = read_log(uninterrupted / "log.jsonl")[:3], read_log(run_dir / "log.jsonl")
    assert [r["step"] for r in dist] == [1, 2, 3]
    for a, b in zip(single, dist):
        for key in LOSSES:  # the global batch is the same; only float reduction order differs
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-9), (a["step"], key, a[key], b[key])
    for name in ("student", "fake"):
        a, b = _weights(uninterrupted / "checkpoints" / "step-000003", name), _weights(ckpt, name)
        worst = max(float((a[k] - b[k]).abs().max()) for k in a)
        assert worst < 1e-5, (name, worst)
