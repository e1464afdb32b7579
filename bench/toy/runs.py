"""The toy world's Stage I and Stage II runs: their configs (the project's own trainers, `python -m train.stage1` /
`train.stage2`, with toy settings) and running several at once.

Each run is a subprocess with one CPU thread (the toy model's tensors are small: two runs on two cores go about
twice as fast as one run on both), its output in ``<run_dir>.log``. A run resumes from its latest checkpoint, so
a chain that was stopped continues its runs where they were; a run that has reached ``max_steps`` is skipped.
"""
from __future__ import annotations

import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import yaml

from train import checkpoint

# Stage I variants (paper Sec. 3.2-3.3): the full method, and each claim's ablation
STAGE1_VARIANTS: dict[str, dict] = {
    "sfd": {},  # importance sampling (curve c) + guidance control (alpha 0.94): the paper's Stage I
    "uniform": {"timestep_curve": "uniform"},  # Table 4: uniform DMD timesteps
    "cfg-all": {"guidance_alpha": 1.0},  # Sec. 3.2: CFG at every sigma
    "4-step": {"num_steps": 4},  # the 4-step student: a reference row and Stage II's "real" model
}
# Stage II variants (paper Table 5): Distill-Cache co-Training with and without the MLP
STAGE2_VARIANTS: dict[str, dict] = {
    "dct": {"train_mlp": False},
    "dct-mlp": {},
}


@dataclass(frozen=True)
class Run:
    """One training run: ``stage`` 1 or 2, its name (``<variant>-s<seed>``) and its resolved config."""

    stage: int
    name: str
    config: dict = field(hash=False)

    @property
    def run_dir(self) -> Path:
        return Path(self.config["run_dir"])

    @property
    def finished(self) -> bool:
        ckpt = checkpoint.latest(self.run_dir)
        return ckpt is not None and ckpt.name == f"step-{self.config['max_steps']:06d}"

    @property
    def student(self) -> Path:
        """The trained student as a diffusers transformer folder (Stage II: LoRA merged or full fine-tuning)."""
        if self.stage == 2:
            return self.run_dir / "final" / "student"
        return checkpoint.latest(self.run_dir) / "student"

    @property
    def mlp(self) -> Path | None:
        return self.run_dir / "final" / "mlp.safetensors" if self.stage == 2 else None


def stage1_run(work: Path, teacher: Path, variant: str, seed: int, steps: int, guidance: float) -> Run:
    name = f"{variant}-s{seed}"
    config = dict(
        run_dir=str(work / "stage1" / name), model=str(teacher), num_steps=2, resolution=64, precision="fp32",
        prompts=str(work / "prompts.txt"), embedding_cache=str(work / "embeddings"), embedding_dtype="float32",
        batch_size=32, max_steps=steps, objective="dmd2", timestep_curve="c", guidance_scale=guidance,
        guidance_alpha=0.94,
        # the paper's ratio (fake 8x the generator), larger: a small model from scratch-like weights moves in
        # hundreds of steps, not its 1000 at 2 B parameters
        lr_generator=5e-5, lr_fake=4e-4, warmup_steps=20, sample_every=max(1, steps // 4), sample_count=8,
        checkpoint_every=max(1, steps // 4), keep_checkpoints=1, device="cpu", cpu_threads=1, seed=seed)
    config.update(STAGE1_VARIANTS[variant])
    return Run(1, name, config)


def stage2_run(work: Path, teacher: Path, student: Path, real: Path, tower: Path, variant: str, seed: int,
               steps: int) -> Run:
    name = f"{variant}-s{seed}"
    config = dict(
        run_dir=str(work / "stage2" / name), model=str(student), pipeline=str(teacher), real_model=str(real),
        real_steps=4, real_guidance=1.0, skip="3-10", resolution=64, precision="fp32", lora_rank=0,
        discriminator="tiny", discriminator_weights=str(tower), prompts=str(work / "prompts.txt"),
        embedding_cache=str(work / "embeddings"),
        embedding_dtype="float32", batch_size=16, max_steps=steps, d_warmup=max(1, steps // 10), g_every=3,
        mlp_warmup=max(1, steps // 4), lr_generator=1e-5, lr_mlp=1e-3, lr_discriminator=2e-4,
        sample_every=max(1, steps // 4), checkpoint_every=max(1, steps // 4), keep_checkpoints=1, device="cpu",
        cpu_threads=1, seed=seed)
    config.update(STAGE2_VARIANTS[variant])
    return Run(2, name, config)


def run_all(runs: list[Run], jobs: int, on_done: Callable[[Run, float], None] = lambda run, seconds: None) -> None:
    """Run the unfinished ``runs``, ``jobs`` at a time; raises ``RuntimeError`` naming the first that failed (the
    others still running are let finish, so their work is kept)."""
    pending = [r for r in runs if not r.finished]
    active: list[tuple[Run, subprocess.Popen, float]] = []
    failed: list[str] = []
    while pending or active:
        while pending and len(active) < jobs and not failed:
            active.append(_start(pending.pop(0)))
        time.sleep(1.0)
        for item in list(active):
            run, proc, started = item
            if proc.poll() is None:
                continue
            active.remove(item)
            if proc.returncode != 0 or not run.finished:
                failed.append(f"{run.name} (exit {proc.returncode}; see {run.run_dir}.log)")
            else:
                on_done(run, time.perf_counter() - started)
        if failed and not active:
            break
    if failed:
        raise RuntimeError(f"stage {runs[0].stage} run(s) failed: {', '.join(failed)}")


def _start(run: Run) -> tuple[Run, subprocess.Popen, float]:
    run.run_dir.parent.mkdir(parents=True, exist_ok=True)
    config_file = run.run_dir.parent / f"{run.name}.yaml"
    config_file.write_text(yaml.safe_dump(run.config, sort_keys=False))
    log = open(f"{run.run_dir}.log", "a")
    proc = subprocess.Popen([sys.executable, "-m", f"train.stage{run.stage}", "--config", str(config_file)],
                            stdout=log, stderr=subprocess.STDOUT, env=_env())
    log.close()  # the child holds its own descriptor
    return run, proc, time.perf_counter()


def _env() -> dict:
    import os

    env = dict(os.environ, OMP_NUM_THREADS="1", TQDM_MININTERVAL="30")
    root = str(Path(__file__).resolve().parents[2])  # the checkout: `train` and `bench` are importable
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env
