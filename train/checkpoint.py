"""Checkpoints that resume exactly.

``<run_dir>/checkpoints/step-NNNNNN/`` holds
- one folder per trained model (Stage I: ``student/`` and ``fake/``; Stage II: ``student/``, ``mlp/``,
  ``discriminator/``), each a ``diffusion_pytorch_model.safetensors`` of fp32 weights, with a ``config.json``
  where the model is a plain diffusers transformer: Stage I's ``student/`` loads with
  ``onex-export build --model <it>`` and ``from_pretrained`` (Stage II's LoRA-wrapped student does not: its
  build input is ``final/``);
- ``trainer.pt``: both optimizers and LR schedulers, the step, and the RNG states;
- ``config.yaml``: the run's resolved config.
- ``checksums.json``: the sha256 of every other file, checked before a run resumes from it.
``<run_dir>/checkpoints/latest`` names the newest complete one. A checkpoint is written to a hidden
temporary folder and renamed into place, so a run killed while saving leaves the previous one intact
(and its temporary folder is removed by the next save). Weights that are not finite are never saved.

Model and optimizer state are kept "full" (unsharded, keyed by parameter name), so a checkpoint
written under torchrun with W ranks resumes on any other number, or on one process.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers.utils import SAFETENSORS_WEIGHTS_NAME
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions, get_model_state_dict, get_optimizer_state_dict, set_optimizer_state_dict)

from onex_export.errors import OnexError, UsageError
from onex_export.export.install import owner_alive
from onex_export.fileio import atomic_path, save_tensors_atomic, sha256_file, writing
from onex_export.locks import exclusive

from .config import YamlConfig
from .distributed import DistInfo, on_main

WEIGHTS = SAFETENSORS_WEIGHTS_NAME  # diffusers' own file name, so from_pretrained finds it
CHECKSUMS = "checksums.json"


class CheckpointError(OnexError):
    """A checkpoint that is missing, incomplete or does not fit this run."""


@dataclass
class TrainerState:
    """What besides the weights a resumed run needs."""

    step: int
    optimizers: dict  # name -> full optimizer state dict
    schedulers: dict  # name -> LR scheduler state dict
    rng: dict  # "train": the training generator's state, "torch"/"cuda": the global ones
    world_size: int = 1  # processes that wrote it (any number may resume it)


def checkpoints_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def latest(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of ``run_dir``, or None."""
    pointer = checkpoints_dir(run_dir) / "latest"
    if not pointer.is_file():
        return None
    path = checkpoints_dir(run_dir) / pointer.read_text().strip()
    if not (path / "trainer.pt").is_file():
        raise CheckpointError(f"{pointer} names {path.name}, which is missing or incomplete",
                              f"delete {pointer} to start over, or restore {path}")
    return path


def _full_model_state(model: nn.Module, info: DistInfo) -> dict[str, torch.Tensor]:
    if info.is_distributed:  # collective: every rank calls it, rank 0 receives the tensors
        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def _full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, info: DistInfo) -> dict:
    options = StateDictOptions(full_state_dict=True, cpu_offload=True) if info.is_distributed else None
    return get_optimizer_state_dict(model, optimizer, options=options)


def write_diffusers(folder: Path, state: dict[str, torch.Tensor], config_json: str | None) -> None:
    """A diffusers model folder, as ``save_pretrained`` writes it, from a full state dict (without a config for
    a module that has none: the MLP, the discriminator's heads)."""
    folder.mkdir(parents=True, exist_ok=True)
    if config_json is not None:
        (folder / "config.json").write_text(config_json)
    save_tensors_atomic(state, folder / WEIGHTS, {"format": "pt"})


def save(cfg: YamlConfig, step: int, models: dict[str, nn.Module], optimizers: dict[str, torch.optim.Optimizer],
         schedulers: dict, rng: torch.Generator, config_json: str | dict[str, str], info: DistInfo) -> Path | None:
    """Write ``step-NNNNNN`` (collective under torchrun; rank 0 writes). Returns its path on rank 0.

    ``models``/``optimizers``/``schedulers`` are keyed by name (Stage I: "student" and "fake"); optimizer i
    belongs to model i. ``config_json``: every model's diffusers config, or one per name (None for none).
    """
    weights = {name: _full_model_state(m, info) for name, m in models.items()}
    optim = {name: _full_optimizer_state(models[name], opt, info) for name, opt in optimizers.items()}
    def write() -> Path:
        rng_state = {"train": rng.get_state(), "torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng_state["cuda"] = torch.cuda.get_rng_state_all()
        state = TrainerState(step, optim, {k: s.state_dict() for k, s in schedulers.items()}, rng_state, info.world)
        path = checkpoints_dir(cfg.run_dir) / f"step-{step:06d}"
        _check_finite(weights, step)
        _write(cfg, path, weights, state, config_json)
        return path

    return on_main(write, info, f"rank 0 could not save the checkpoint of step {step}")


def _write(cfg: YamlConfig, path: Path, weights: dict, state: TrainerState, config_json: str | dict[str, str]
           ) -> None:
    """Write checkpoint ``path`` through a temporary folder, then point ``latest`` at it."""
    root = path.parent
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".{path.name}.tmp-{os.getpid()}"
    try:
        with writing(path):
            for name, sd in weights.items():
                write_diffusers(tmp / name, sd, config_json if isinstance(config_json, str) else config_json.get(name))
            torch.save(state.__dict__, tmp / "trainer.pt")
            (tmp / "config.yaml").write_text(cfg.to_yaml())
            sums = {str(f.relative_to(tmp)): sha256_file(f) for f in sorted(tmp.rglob("*")) if f.is_file()}
            (tmp / CHECKSUMS).write_text(json.dumps(sums, indent=1) + "\n")
            if path.exists():  # a re-run of the same step: replace it
                shutil.rmtree(path)
            os.replace(tmp, path)
            with atomic_path(root / "latest") as pointer:
                pointer.write_text(path.name + "\n")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _prune(root, cfg.keep_checkpoints)


def run_lock(run_dir: Path, info: DistInfo):
    """One run at a time per run folder (rank 0 holds the lock for all ranks)."""
    if not info.is_main:
        return contextlib.nullcontext()
    run_dir.mkdir(parents=True, exist_ok=True)
    return exclusive(run_dir / ".lock", f"run folder {run_dir}",
                     "wait for that run to finish, or give this one another run_dir (--set run_dir=...)")


def open_run(cfg: YamlConfig, info: DistInfo, resume: bool) -> Path | None:
    """Start or resume a run in ``cfg.run_dir`` (under its lock): the checkpoint to resume from, checked
    (checksums first: a damaged config.yaml is damage, not another config), or None; stale temporary folders
    of killed saves removed, and the config written."""
    run_dir = Path(cfg.run_dir)
    ckpt = latest(run_dir) if resume else None
    if ckpt is None and (run_dir / "final").exists():
        # Checked before anything is written: starting over would replace the finished run's checkpoints and config,
        # then find final/ holding that run's outputs and stop.
        raise UsageError(f"{run_dir} holds a finished run ({run_dir / 'final'}): "
                         + ("--no-resume" if resume is False else "a run without checkpoints")
                         + " would start over in it and overwrite its checkpoints",
                         f"move {run_dir / 'final'} (that run's result) and {checkpoints_dir(run_dir)} away, or give "
                         "this run another run_dir")
    if ckpt is not None:
        on_main(lambda: verify_checksums(ckpt), info, f"{ckpt} does not match its checksums")
        check_resumable(ckpt, cfg)
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        clean_stale(run_dir)  # under the run lock: no other run's save is in progress
        (run_dir / "config.yaml").write_text(cfg.to_yaml())
    return ckpt


def clean_stale(run_dir: str | Path) -> list[str]:
    """Remove the temporary folders of saves that were killed before their rename (their process is gone)."""
    done = []
    for stale in checkpoints_dir(run_dir).glob(".step-*.tmp-*"):
        if not owner_alive(stale):
            shutil.rmtree(stale, ignore_errors=True)
            done.append(stale.name)
    return done


class DivergedError(OnexError):
    """The run produced non-finite losses or weights: it stops, and its last good checkpoint stays ``latest``."""


def check_finite(record: dict, last_checkpoint: Path | None, hint: str) -> None:
    """Stop a run at the first non-finite loss or gradient norm of its log ``record``, before anything is saved
    from it; ``hint``: what to change (the stage's learning rates)."""
    bad = {k: v for k, v in record.items() if isinstance(v, float) and not math.isfinite(v)}
    if bad:
        kept = f"the last good checkpoint, {last_checkpoint.name}, stays latest" if last_checkpoint else \
            "no checkpoint was written"
        raise DivergedError(
            f"step {record['step']}: {', '.join(f'{k} = {v}' for k, v in bad.items())}; the run stopped and {kept}",
            f"{hint}; resuming repeats the same steps")


def _check_finite(weights: dict[str, dict[str, torch.Tensor]], step: int) -> None:
    for model, state in weights.items():
        bad = [k for k, t in state.items() if t.is_floating_point() and not torch.isfinite(t).all()]
        if bad:
            raise DivergedError(f"step {step}: {len(bad)} {model} weight tensors are not finite (e.g. {bad[0]}); "
                                "nothing was saved", "lower the learning rates, or resume from an earlier checkpoint")


def verify_checksums(path: Path) -> None:
    """Check every file of checkpoint ``path`` against its ``checksums.json``."""
    try:
        sums = json.loads((path / CHECKSUMS).read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path} has no readable {CHECKSUMS} ({exc}): it is damaged, or was written by an "
                              "older version of this trainer, which wrote none", "resume from another checkpoint "
                              f"(write its name into {path.parent / 'latest'}), or start over with --no-resume") from exc
    bad = [name for name, digest in sums.items()
           if not (path / name).is_file() or sha256_file(path / name) != digest]
    if bad:
        raise CheckpointError(f"{path} is damaged: {', '.join(bad)} no longer match(es) the checksum written with it",
                              "resume from an earlier checkpoint (write its name into "
                              f"{path.parent / 'latest'}), or start over with --no-resume")


def _prune(root: Path, keep: int) -> None:
    if keep <= 0:
        return
    steps = sorted(p for p in root.glob("step-*") if p.is_dir())
    for old in steps[:-keep]:
        shutil.rmtree(old)


def check_resumable(path: Path, cfg: YamlConfig) -> None:
    """The checkpoint's config must equal ``cfg`` except for keys that do not change the computation."""
    saved = type(cfg).load(path / "config.yaml")
    diffs = saved.differences(cfg)
    if diffs:
        raise CheckpointError(f"{path} was written with another config:\n    " + "\n    ".join(diffs),
                              "resume with the same settings, or start a new run_dir")


def load_trainer_state(path: Path) -> TrainerState:
    try:
        # mmap: ranks other than 0 never touch the (large) optimizer tensors
        raw = torch.load(path / "trainer.pt", map_location="cpu", weights_only=True, mmap=True)
    except (OSError, RuntimeError) as exc:
        raise CheckpointError(f"cannot read {path / 'trainer.pt'}: {exc}") from exc
    return TrainerState(**raw)


def check_finite_weights(models: dict[str, nn.Module], ckpt: Path) -> None:
    """Refuse to resume from ``ckpt`` when the weights it gave ``models`` are not finite (saved by an older version,
    or damaged in a way its checksums were made after): the first step would diverge and blame no one."""
    bad = []
    for name, model in models.items():
        for key, tensor in [*model.named_parameters(), *model.named_buffers()]:
            local = tensor.to_local() if hasattr(tensor, "to_local") else tensor  # this rank's shard under FSDP2
            if local.is_floating_point() and not bool(torch.isfinite(local.detach()).all()):
                bad.append(f"{name}.{key}")
    if bad:
        raise DivergedError(f"{ckpt} holds non-finite weights ({len(bad)} tensors, first {', '.join(bad[:3])}): it is "
                            "no good checkpoint to resume from",
                            f"resume from an earlier one (write its name into {ckpt.parent / 'latest'}), or start over "
                            "with --no-resume")


def restore(state: TrainerState, models: dict[str, nn.Module], optimizers: dict[str, torch.optim.Optimizer],
            schedulers: dict, rng: torch.Generator, info: DistInfo) -> None:
    """Load optimizer, scheduler and RNG state (the weights were loaded with the models)."""
    for name, opt in optimizers.items():
        if info.is_distributed:
            options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
            set_optimizer_state_dict(models[name], opt, state.optimizers[name] if info.is_main else {}, options=options)
        else:
            set_optimizer_state_dict(models[name], opt, state.optimizers[name])
    for name, sched in schedulers.items():
        sched.load_state_dict(state.schedulers[name])
    rng.set_state(state.rng["train"])
    torch.set_rng_state(state.rng["torch"])
    if "cuda" in state.rng and torch.cuda.is_available() and len(state.rng["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state.rng["cuda"])
