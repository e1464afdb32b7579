"""Stage II end to end in fresh processes on tiny-sd3: the schedule, what each phase changes, kill-and-resume
bit-identity, and the outputs building and passing the parity gate."""
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from onex_export.models import build_tiny
from train.checkpoint import load_trainer_state
from train.config import ConfigError
from train.monitor import read_log
from train.stage2 import phase
from train.stage2_config import Stage2Config

ROOT = Path(__file__).resolve().parents[2]
TINY = ["--config", "train/configs/stage2-tiny-cpu.yaml"]


def _stage2(*args):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "train.stage2", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=900)


def _weights(ckpt: Path, name: str) -> dict[str, torch.Tensor]:
    return load_file(str(ckpt / name / "diffusion_pytorch_model.safetensors"))


def _params(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Trained parameters only: spectral norm's power-iteration vectors (_u, _v) move on every forward."""
    return {k: v for k, v in state.items() if not k.endswith(("._u", "._v"))}


def _changed(a: dict, b: dict) -> bool:
    return any(not torch.equal(a[k], b[k]) for k in a)


def test_the_schedule_is_d_warm_up_then_g_every_third_with_an_mlp_warm_up():
    cfg = Stage2Config.load(ROOT / "train/configs/stage2-tiny-cpu.yaml", ["run_dir=unused"])
    assert [phase(cfg, s) for s in range(9)] == ["d", "d", "mlp", "d", "d", "g", "d", "d", "g"]
    paper = Stage2Config(run_dir="x", discriminator_weights="w.bin")  # defaults: the release's 50 / 3 / 500
    assert [phase(paper, s) for s in (0, 49, 50, 51, 52, 53, 497, 500, 501, 503)] == [
        "d", "d", "mlp", "d", "d", "mlp", "mlp", "g", "d", "g"]
    no_mlp = Stage2Config(run_dir="x", discriminator_weights="w.bin", train_mlp=False)  # DCT without the MLP
    assert [phase(no_mlp, s) for s in (0, 49, 50, 51, 53, 500)] == ["d", "d", "g", "d", "g", "g"]


def test_config_refusals():
    with pytest.raises(ConfigError, match="needs discriminator_weights"):
        Stage2Config(run_dir="x")
    with pytest.raises(ConfigError, match="skip"):
        Stage2Config(run_dir="x", discriminator="tiny", skip="10-3")
    with pytest.raises(ConfigError, match="unknown config key"):
        Stage2Config.from_dict({"run_dir": "x", "discriminator": "tiny", "lr_d": 1.0})


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("stage2") / "full"
    proc = _stage2(*TINY, "--set", f"run_dir={run_dir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().endswith("PASSED")
    return run_dir, proc.stdout


def test_the_tiny_run_logs_every_phase_and_its_outputs_build_and_pass_parity(uninterrupted, tmp_path):
    run_dir, stdout = uninterrupted
    log = read_log(run_dir / "log.jsonl")
    assert [r["phase"] for r in log] == ["d", "d", "mlp", "d", "d", "g", "d", "d", "g"]
    assert all(r["loss_d"] > 0 for r in log if r["phase"] == "d")
    assert all(r["loss_g"] > 0 for r in log if r["phase"] != "d")
    assert all("grad_norm_student" in r for r in log if r["phase"] == "g")
    assert sorted(p.name for p in (run_dir / "samples").iterdir()) == [
        "step-000003.png", "step-000006.png", "step-000009.png"]
    line = next(line for line in stdout.splitlines() if line.startswith("build it:"))
    command = line.split(":", 1)[1].split()
    assert command[:3] == ["onex-export", "build", "--model"] and command[-2:] == ["--skip", "3-10"]
    build = subprocess.run([sys.executable, "-m", "onex_export.cli", *command[1:], "--trt", "none", "--components",
                            "none", "--out", str(tmp_path / "engines")], cwd=ROOT, capture_output=True, text=True,
                           timeout=600)
    assert build.returncode == 0, build.stderr[-3000:]
    assert "PASSED build" in build.stdout


def test_the_mlp_warm_up_leaves_the_student_alone_and_later_phases_change_what_they_train(uninterrupted):
    run_dir, _ = uninterrupted
    ckpts = {s: run_dir / "checkpoints" / f"step-{s:06d}" for s in (3, 6, 9)}
    base = build_tiny("tiny-sd3").state_dict()
    s3 = _weights(ckpts[3], "student")
    # steps 1-3 were D, D and the MLP warm-up: the adapters are still the identity (B = 0), the base untouched
    assert all(not v.any() for k, v in s3.items() if "lora_B" in k)
    assert all(torch.equal(v, base[k.replace(".base_layer", "")]) for k, v in s3.items() if "lora_" not in k)
    mlp3 = _weights(ckpts[3], "mlp")
    assert any(v.any() for k, v in mlp3.items() if "fc2" in k)  # the MLP left the identity (zero fc2)
    # steps 4-6 were D, D, G: all three changed
    for name in ("student", "mlp", "discriminator"):
        assert _changed(_params(_weights(ckpts[3], name)), _params(_weights(ckpts[6], name))), name
    assert any(v.any() for k, v in _weights(ckpts[6], "student").items() if "lora_B" in k)


def test_kill_after_step_3_then_resume_is_bit_identical(uninterrupted):
    full_dir, _ = uninterrupted
    run_dir = full_dir.parent / "killed"
    killed = _stage2(*TINY, "--set", f"run_dir={run_dir}", "--kill-after", "3")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step-000003"
    resumed = _stage2(*TINY, "--set", f"run_dir={run_dir}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    full, res = full_dir / "checkpoints" / "step-000009", run_dir / "checkpoints" / "step-000009"
    for name in ("student", "mlp", "discriminator"):
        a, b = _weights(full, name), _weights(res, name)
        different = [k for k in a if not torch.equal(a[k], b[k])]
        assert a.keys() == b.keys() and different == [], f"{name}: {different[:3]}"
    assert torch.equal(load_trainer_state(full).rng["train"], load_trainer_state(res).rng["train"])
    keys = ("phase", "loss_d", "loss_g")
    assert [[r.get(k) for k in keys] for r in read_log(full_dir / "log.jsonl")] == \
        [[r.get(k) for k in keys] for r in read_log(run_dir / "log.jsonl")]
    # the final outputs of both runs hold the same tensors
    for name in ("student/diffusion_pytorch_model.safetensors", "mlp.safetensors"):
        a, b = load_file(str(full_dir / "final" / name)), load_file(str(run_dir / "final" / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_resuming_with_another_config_is_refused(uninterrupted):
    run_dir, _ = uninterrupted
    proc = _stage2(*TINY, "--set", f"run_dir={run_dir}", "--set", "lr_mlp=0.5", "--set", "max_steps=12")
    assert proc.returncode == 1
    assert "lr_mlp: 0.001 -> 0.5" in proc.stderr and "PASSED" not in proc.stdout


def test_torchrun_on_two_cpu_ranks_matches_the_single_process(uninterrupted):
    """FSDP2 per joint block (gloo), the MLP and D heads replicated: the same global batch on two ranks."""
    full_dir, _ = uninterrupted
    run_dir = full_dir.parent / "torchrun"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "train.stage2", *TINY, "--set", f"run_dir={run_dir}", "--set", "sample_every=0"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("PASSED") == 1  # rank 0 only
    assert load_trainer_state(run_dir / "checkpoints" / "step-000009").world_size == 2
    single, dist = read_log(full_dir / "log.jsonl"), read_log(run_dir / "log.jsonl")
    assert [r["phase"] for r in dist] == [r["phase"] for r in single]
    for a, b in zip(single, dist):
        for key in ("loss_d", "loss_g", "grad_norm_student"):
            if key in a:  # only float reduction order differs
                assert b[key] == pytest.approx(a[key], rel=1e-5), (a["step"], key, a[key], b[key])
    # Adam turns float-order noise in near-zero gradients into steps of up to its learning rate (1e-3 for D here)
    for name, tolerance in (("student", 1e-4), ("mlp", 1e-4), ("discriminator", 1e-3)):
        a = _weights(full_dir / "checkpoints" / "step-000009", name)
        b = _weights(run_dir / "checkpoints" / "step-000009", name)
        worst = max(float((a[k] - b[k]).abs().max()) for k in a)
        assert worst < tolerance, (name, worst)
    assert (run_dir / "final" / "student" / "config.json").is_file()


def test_an_eq8_run_of_the_trainer_lowers_step_twos_velocity_error_on_held_out_noise(tmp_path):
    """The point of the stage through the trainer itself: the output-level objective (Eq. 8) alone, the student
    frozen (MLP warm-up for the whole run), 80 iterations; then the trained MLP against plain reuse on the run's
    prompts with noise (seeds) the run never drew."""
    from onex_export.models import SplitSD3Transformer
    from onex_export.models.compensation import load_compensation
    from onex_export.runtime import Conditioning
    from train.cached_path import step_two, velocity_error
    from train.data import EmbeddingStore
    from train.stage2 import run

    cfg = Stage2Config.load(ROOT / "train/configs/stage2-tiny-cpu.yaml", [
        f"run_dir={tmp_path / 'eq8'}", "gan_weight=0", "kd_output=1", "d_warmup=0", "g_every=1", "mlp_warmup=1000",
        "max_steps=80", "batch_size=4", "sample_every=0", "checkpoint_every=80", f"prompts={ROOT / 'train/prompts/tiny.txt'}"])
    result = run(cfg)
    assert [r["phase"] for r in result.records] == ["mlp"] * 80
    transformer = build_tiny("tiny-sd3")
    plain = SplitSD3Transformer(transformer, cfg.skip_range)
    trained = SplitSD3Transformer(transformer, cfg.skip_range, load_compensation(tmp_path / "eq8" / "final" / "mlp.safetensors"))
    store = EmbeddingStore(next(cfg.cache_dir.rglob("index.json")).parent)  # the run's prompts, new seeds
    errors = {"plain": [], "trained": []}
    for i in range(2):
        emb = store.rows(torch.arange(4 * i, 4 * i + 4) % len(store))
        cond = Conditioning(emb.text, emb.pooled)
        for name, split in (("plain", plain), ("trained", trained)):
            errors[name].append(velocity_error(split, step_two(split, cond, (16, 16, 16), [10**6 + 4 * i + j for j in range(4)])))
    before, after = (sum(v) / len(v) for v in (errors["plain"], errors["trained"]))
    print(f"\nstep two velocity error on held-out noise: plain reuse {before:.4f}, after 80 Eq. 8 steps {after:.4f} "
          f"({before / after:.2f}x lower)")
    assert after < before / 1.5


def test_pregenerated_real_images_in_two_shards_give_the_same_run_bit_for_bit(uninterrupted):
    full_dir, _ = uninterrupted
    run_dir, cache = full_dir.parent / "pregenerated", full_dir.parent / "real-cache"
    for shard in ("1/2", "0/2"):  # any order, any machine
        proc = _stage2(*TINY, "--set", f"run_dir={run_dir}", "--set", f"real_cache={cache}", "--pregenerate",
                       "--shard", shard)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert f"real images {shard}: 3 written, 0 already there" in proc.stdout
    # the discriminator steps (0-based 0, 1, 3, 4, 6, 7) and nothing else
    assert sorted(p.name for p in cache.iterdir()) == [f"step-{s:07d}.safetensors" for s in (0, 1, 3, 4, 6, 7)]
    again = _stage2(*TINY, "--set", f"run_dir={run_dir}", "--set", f"real_cache={cache}", "--pregenerate",
                    "--shard", "0/2")
    assert "0 written, 3 already there" in again.stdout
    proc = _stage2(*TINY, "--set", f"run_dir={run_dir}", "--set", f"real_cache={cache}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("student", "mlp", "discriminator"):
        a = _weights(full_dir / "checkpoints" / "step-000009", name)
        b = _weights(run_dir / "checkpoints" / "step-000009", name)
        assert all(torch.equal(a[k], b[k]) for k in a), name

    # a cache made for other settings is refused, not used
    other = _stage2(*TINY, "--set", f"run_dir={full_dir.parent / 'other'}", "--set", f"real_cache={cache}",
                    "--set", "real_steps=2")
    assert other.returncode == 2 and "was made for another run" in other.stderr


@pytest.mark.parametrize("args, message", [
    (["--pregenerate", "--shard", "2/2", "--set", "real_cache=x"], "i must lie in 0..1"),
    (["--pregenerate", "--shard", "half", "--set", "real_cache=x"], "is not i/n"),
    (["--pregenerate"], "real_cache, which is not set")])
def test_pregeneration_refuses_bad_shards_and_a_missing_cache(tmp_path, args, message):
    proc = _stage2(*TINY, "--set", f"run_dir={tmp_path / 'run'}", *args)
    assert proc.returncode == 2 and message in proc.stderr


def test_a_finished_run_run_again_prints_its_outputs_but_never_replaces_them(uninterrupted, tmp_path):
    import shutil

    full_dir, _ = uninterrupted
    run_dir = tmp_path / "again"
    shutil.copytree(full_dir, run_dir, ignore=shutil.ignore_patterns(".lock"))
    again = _stage2(*TINY, "--set", f"run_dir={run_dir}")  # resumes at step 9: nothing to train
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"build it:  onex-export build --model {run_dir / 'final' / 'student'}" in again.stdout
    before = (run_dir / "final" / "mlp.safetensors").read_bytes()
    longer = _stage2(*TINY, "--set", f"run_dir={run_dir}", "--set", "max_steps=12")  # trains on: new weights
    assert longer.returncode == 2 and "holds the outputs of another training" in longer.stderr
    assert "PASSED" not in longer.stdout
    assert (run_dir / "final" / "mlp.safetensors").read_bytes() == before
    assert (run_dir / "checkpoints" / "step-000012").is_dir()  # the training itself is kept


def test_no_resume_on_a_finished_run_is_refused_before_anything_is_written(uninterrupted, tmp_path):
    """It used to start over, overwrite the finished run's checkpoints and config, and only then stop on final/."""
    import shutil

    full_dir, _ = uninterrupted
    run_dir = tmp_path / "finished"
    shutil.copytree(full_dir, run_dir, ignore=shutil.ignore_patterns(".lock"))
    before = {p.relative_to(run_dir): p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}
    proc = _stage2(*TINY, "--set", f"run_dir={run_dir}", "--no-resume")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"{run_dir} holds a finished run ({run_dir / 'final'}): --no-resume would start over" in proc.stderr
    assert "move" in proc.stderr and "PASSED" not in proc.stdout
    after = {p.relative_to(run_dir): p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}
    assert after.keys() == before.keys() and all(after[k] == before[k] for k in before)  # not one byte changed


def test_a_checkpoint_with_non_finite_weights_is_refused_at_resume_not_called_good(tmp_path):
    """Resuming one used to fail at the first step with "the last good checkpoint ... stays latest"."""
    from train.checkpoint import DivergedError, check_finite_weights

    mlp = torch.nn.Linear(4, 4)
    check_finite_weights({"mlp": mlp}, tmp_path / "checkpoints" / "step-000003")  # finite: nothing to say
    with torch.no_grad():
        mlp.weight[1, 2] = float("nan")
    with pytest.raises(DivergedError, match="step-000003 holds non-finite weights \\(1 tensors, first mlp.weight\\)") as info:
        check_finite_weights({"mlp": mlp}, tmp_path / "checkpoints" / "step-000003")
    assert "resume from an earlier one" in info.value.hint and str(tmp_path / "checkpoints" / "latest") in info.value.hint


@pytest.mark.parametrize("module, config", [("train.stage1", "train/configs/tiny-cpu.yaml"),
                                            ("train.stage2", "train/configs/stage2-tiny-cpu.yaml")])
def test_a_resolution_past_the_models_position_embedding_is_refused_before_the_run_folder_is_touched(
        module, config, tmp_path):
    """It used to fail at the first step with diffusers' "Height (256) cannot be greater than pos_embed_max_size"."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", module, "--config", config, "--set", f"run_dir={tmp_path / 'run'}",
                           "--set", "resolution=4096"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "resolution 4096 is not one this model takes: a multiple of 16 up to 256 pixels" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "run").exists()
