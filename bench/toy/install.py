"""Ship the toy chain's trained 1.x student as the package's embedded default model (``digits-sd3``).

The folder is an SD3 pipeline folder (transformer in fp16, as releases ship; the small VAE and text encoders in
fp32) plus the compensation MLP and ``MADE.json``: what it was made from, the command that makes it, and the sha256
and size of every file (the tests check the files against it). It is written beside the old one and swapped in
whole; only a folder that this tool made (it has a ``MADE.json``) is ever replaced.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from onex_export.fileio import atomic_folder, sha256_file
from onex_export.models import load_transformer
from onex_export.models.zoo import TRAINED_MODELS
from train.toy.pipeline import save_transformer

from .chain import ToyConfig
from .stages import stage2_runs

NAME = "digits-sd3"
MADE = "MADE.json"
COMMAND = "python -m bench.toy --install-default"
COPIED = ("vae", "text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer", "tokenizer_2", "tokenizer_3",
          "scheduler", "model_index.json")


def file_table(folder: Path) -> dict[str, dict]:
    """Every file under ``folder`` but MADE.json: relative path -> sha256 and bytes."""
    return {str(p.relative_to(folder)): {"sha256": sha256_file(p), "bytes": p.stat().st_size}
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MADE}


def install_default(cfg: ToyConfig, target: Path | None = None) -> Path:
    """Write the DCT + MLP student of seed 0 with the teacher pipeline's components to ``target`` (default: the
    embedded model's folder in the package). Returns the folder."""
    target = Path(target or TRAINED_MODELS[NAME].folder)
    if target.exists() and not (target / MADE).is_file():
        raise FileExistsError(f"{target} exists and was not made by bench.toy (no {MADE}): not replacing it")
    run = next(r for r in stage2_runs(cfg) if r.name == "dct-mlp-s0")
    pipeline = cfg.work / "teacher" / "pipeline"
    fresh = target.with_name(f"{target.name}.new")
    shutil.rmtree(fresh, ignore_errors=True)
    with atomic_folder(fresh) as tmp:
        save_transformer(load_transformer(str(run.student)), tmp / "transformer", torch.float16)
        for name in COPIED:
            source = pipeline / name
            (shutil.copytree if source.is_dir() else shutil.copy2)(source, tmp / name)
        shutil.copy2(run.mlp, tmp / "mlp.safetensors")
        files = file_table(tmp)
        made = {"model": NAME, "command": COMMAND, "skip": run.config["skip"],
                "made_from": {"student": f"stage2/{run.name} (DCT + MLP, seed 0)", "components": "teacher/pipeline",
                              "config": cfg.to_json()},
                "total_bytes": sum(f["bytes"] for f in files.values()), "files": files}
        (tmp / MADE).write_text(json.dumps(made, indent=1) + "\n")
    if target.exists():
        old = target.with_name(f"{target.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        target.rename(old)
        fresh.rename(target)
        shutil.rmtree(old)
    else:
        fresh.rename(target)
    return target
