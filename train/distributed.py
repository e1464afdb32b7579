"""Scale-out: the same script runs single-process (CPU or one GPU) or under ``torchrun`` with FSDP2.

Under torchrun every transformer (student, fake and the frozen teacher) is sharded with
``fully_shard`` per joint block and once at the root; NCCL on GPUs, gloo on CPUs (FSDP2 runs on CPU
with gloo, which is what the tests use). Randomness is drawn for the global batch on every rank from
the same generator and each rank takes its rows, so a run gives the same numbers on any world size.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Callable, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from onex_export.errors import OnexError, UsageError

T = TypeVar("T")


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world: int
    local_rank: int
    device: torch.device
    mesh: object | None = None  # torch DeviceMesh under torchrun

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world > 1

    def rows(self, batch: int) -> slice:
        """This rank's rows of a global batch of ``batch``."""
        per_rank = batch // self.world
        return slice(self.rank * per_rank, (self.rank + 1) * per_rank)


def pick_device(preference: str, local_rank: int = 0) -> torch.device:
    if preference == "auto":
        preference = "cuda" if torch.cuda.is_available() else "cpu"
    if preference == "cuda":
        if not torch.cuda.is_available():
            raise UsageError("device cuda was asked for, but no CUDA GPU is visible", "use --set device=cpu")
        return torch.device("cuda", local_rank)
    if preference != "cpu":
        raise UsageError(f"unknown device {preference!r}", "use auto, cuda or cpu")
    return torch.device("cpu")


def init_distributed(device_preference: str) -> DistInfo:
    """Single-process unless launched by torchrun with WORLD_SIZE > 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return DistInfo(0, 1, 0, pick_device(device_preference))
    from torch.distributed.device_mesh import init_device_mesh

    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_preference, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30))
    mesh = init_device_mesh(device.type, (world,))
    return DistInfo(rank, world, local_rank, device, mesh)


def shard(model: nn.Module, info: DistInfo, root: bool = True) -> nn.Module:
    """FSDP2: one unit per joint block, the rest (embedders, output norm and projection) at the root.
    The module keeps its class, its parameter names and its forward; parameters become DTensors.
    ``root=False`` leaves the rest replicated: for callers that use those layers without the root's forward
    (whose hooks gather them), as the split model does."""
    if not info.is_distributed:
        return model
    from torch.distributed.fsdp import fully_shard

    for block in model.transformer_blocks:
        fully_shard(block, mesh=info.mesh)
    if root:
        fully_shard(model, mesh=info.mesh)
    return model


def mean_over_ranks(values: dict[str, float], info: DistInfo) -> dict[str, float]:
    """Average float metrics over the ranks (each rank's are over its equal share of the batch)."""
    if not info.is_distributed or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=info.device)
    dist.all_reduce(t)
    return {k: float(v) / info.world for k, v in zip(keys, t.tolist())}


def on_main(fn: Callable[[], T], info: DistInfo, failure: str) -> T | None:
    """``fn()`` on rank 0 only (a collective: every rank calls it). An exception there is raised on every
    rank, the others with ``failure`` as message, so no rank is left waiting in a collective."""
    result, error = None, None
    if info.is_main:
        try:
            result = fn()
        except Exception as exc:
            error = exc
    ok = error is None
    if info.is_distributed:
        t = torch.tensor([int(ok)], dtype=torch.int64, device=info.device)
        dist.broadcast(t, src=0)
        ok = bool(t.item())
    if not ok:
        raise error if error is not None else OnexError(failure, "see rank 0's message")
    return result


def barrier(info: DistInfo) -> None:
    if info.is_distributed:
        dist.barrier()


def shutdown(info: DistInfo) -> None:
    if info.is_distributed and dist.is_initialized():
        dist.destroy_process_group()
