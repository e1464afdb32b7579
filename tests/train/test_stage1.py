"""A few Stage I steps in-process on the tiny 24-block model."""
import dataclasses
import math
from pathlib import Path

import pytest
import torch

from onex_export.models import build_tiny, load_transformer
from train import checkpoint
from train.config import Stage1Config
from train.monitor import read_log
from train.stage1 import run

CONFIG = Path(__file__).resolve().parents[2] / "train" / "configs" / "tiny-cpu.yaml"


def _cfg(tmp_path, **overrides) -> Stage1Config:
    base = Stage1Config.load(CONFIG, [f"run_dir={tmp_path / 'run'}", f"embedding_cache={tmp_path / 'emb'}",
                                      "resolution=64", "max_steps=3", "sample_every=3", "checkpoint_every=3"])
    return dataclasses.replace(base, **overrides)


def _differs(a: torch.nn.Module, b: torch.nn.Module) -> tuple[int, int]:
    """(tensors that differ, tensors) between two models' state dicts."""
    sa, sb = a.state_dict(), b.state_dict()
    return sum(not torch.equal(sa[k], sb[k]) for k in sa), len(sa)


@pytest.fixture(scope="module")
def three_steps(tmp_path_factory):
    cfg = _cfg(tmp_path_factory.mktemp("stage1"))
    return cfg, run(cfg)


def test_only_student_and_fake_change_and_losses_are_finite(three_steps):
    cfg, result = three_steps
    assert result.step == 3 and [r["step"] for r in result.records] == [1, 2, 3]
    for r in result.records:
        for key in ("loss_fake", "loss_generator", "grad_norm_fake", "grad_norm_generator"):
            assert math.isfinite(r[key]) and r[key] > 0, (key, r)
        assert r["lr_generator"] == cfg.lr_generator and r["lr_fake"] == cfg.lr_fake
    teacher = build_tiny("tiny-sd3")
    m = result.models
    assert _differs(m.teacher, teacher) == (0, 683)  # the frozen teacher is untouched
    changed, total = _differs(m.student, teacher)
    assert changed > 0.9 * total, (changed, total)  # AdamW with beta1 = 0 moves every weight with a gradient
    changed, total = _differs(m.fake, teacher)
    assert changed > 0.9 * total, (changed, total)
    assert _differs(m.student, m.fake)[0] > 0.9 * total
    assert not any(p.requires_grad for p in m.teacher.parameters())


def test_run_folder_log_samples_and_checkpoint(three_steps):
    cfg, result = three_steps
    run_dir = Path(cfg.run_dir)
    assert read_log(run_dir / "log.jsonl") == result.records
    assert (run_dir / "samples" / "step-000003.png").stat().st_size > 0
    ckpt = checkpoint.latest(run_dir)
    assert ckpt == result.checkpoint == run_dir / "checkpoints" / "step-000003"
    assert sorted(p.name for p in ckpt.iterdir()) == ["checksums.json", "config.yaml", "fake", "student", "trainer.pt"]
    assert Stage1Config.load(ckpt / "config.yaml") == cfg
    # the student is a diffusers folder that onex-export loads as a model
    student = load_transformer(str(ckpt / "student"))
    assert _differs(student, result.models.student) == (0, 683)
    state = checkpoint.load_trainer_state(ckpt)
    assert state.step == 3 and set(state.optimizers) == {"student", "fake"}


def test_resuming_with_another_config_is_refused(three_steps):
    cfg, _ = three_steps
    with pytest.raises(checkpoint.CheckpointError, match="lr_fake: 0.0004 -> 0.001"):
        run(dataclasses.replace(cfg, lr_fake=1e-3, max_steps=4))


def test_nothing_to_do_when_the_checkpoint_is_at_max_steps(three_steps):
    cfg, _ = three_steps
    assert run(cfg).records == []


def test_two_time_scale_updates_the_generator_every_second_step(tmp_path):
    cfg = _cfg(tmp_path, fake_updates_per_generator=2, checkpoint_every=1, sample_every=0)
    result = run(cfg)
    assert [r["loss_generator"] is not None for r in result.records] == [True, False, True]
    ckpts = Path(cfg.run_dir) / "checkpoints"
    s1, s2, s3 = (load_transformer(str(ckpts / f"step-00000{i}" / "student")) for i in (1, 2, 3))
    f1, f2 = (load_transformer(str(ckpts / f"step-00000{i}" / "fake")) for i in (1, 2))
    assert _differs(s1, s2)[0] == 0  # step 2: only the fake model learned
    assert _differs(s2, s3)[0] > 0 and _differs(f1, f2)[0] > 0


def test_trajectory_objective_four_steps_eta_half(tmp_path):
    cfg = _cfg(tmp_path, objective="trajectory", num_steps=4, eta=0.5, max_steps=2, sample_every=2)
    result = run(cfg)
    assert all(math.isfinite(r["loss_fake"]) and math.isfinite(r["loss_generator"]) for r in result.records)
    assert result.records[0]["loss_generator"] > 0


def test_bf16_autocast_with_gradient_checkpointing_keeps_trained_weights_fp32(tmp_path):
    cfg = _cfg(tmp_path, precision="bf16", gradient_checkpointing=True, max_steps=1, sample_every=0)
    result = run(cfg)
    assert math.isfinite(result.records[0]["loss_fake"]) and math.isfinite(result.records[0]["loss_generator"])
    assert {p.dtype for p in result.models.student.parameters()} == {torch.float32}
    assert {p.dtype for p in result.models.teacher.parameters()} == {torch.bfloat16}
    assert result.models.student.gradient_checkpointing and result.models.fake.gradient_checkpointing
