"""AOTInductor packages: a graph compiled ahead of time by torch into one ``.pt2`` file (shared library and
weights inside), which a runtime loads with torch alone: no diffusers, no model code, no ONNX.

The package is compiled from the same module the ONNX file is exported from, with the precision policy already
applied to it, for one device (``cpu`` here; ``cuda`` on a GPU), and runs only under the torch version that
compiled it (its C++ ABI), which the manifest records. Every symbolic dimension of the graph is dynamic over the
build's ranges; a latent side is a multiple of the patch size.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..contract import GraphSpec, H, W
from ..errors import OnexError
from .onnx_export import trace_inputs

FLAVOUR = "aoti"


@dataclass(frozen=True)
class CompiledArtifact:
    path: Path
    compile_seconds: float


def example_dims(ranges: dict[str, tuple[int, int, int]]) -> dict[str, int]:
    """A size per dimension to compile at: the optimum, but at least 2 where the range allows (torch.export
    specialises a dimension it sees at 1 or 0 to that value)."""
    return {name: lo if lo == hi else min(hi, max(opt, 2)) for name, (lo, opt, hi) in ranges.items()}


def dynamic_shapes(spec: GraphSpec, ranges: dict[str, tuple[int, int, int]], patch_size: int) -> tuple:
    """torch.export's dynamic shapes of ``spec``'s inputs: one :class:`torch.export.Dim` per symbolic dimension
    (shared between inputs), static where the range is one value; latent sides as multiples of the patch."""
    from torch.export import Dim

    dims = {}
    for name, (lo, _, hi) in ranges.items():
        if lo == hi:
            continue
        if name in (H, W):
            dims[name] = patch_size * Dim(f"{name}_patches", min=lo // patch_size, max=hi // patch_size)
        else:
            dims[name] = Dim(name, min=lo, max=hi)
    return tuple({i: dims[d] for i, d in enumerate(t.shape) if isinstance(d, str) and d in dims} or None
                 for t in spec.inputs)


class _Positional(nn.Module):
    """``module`` called with its inputs as positional arguments (subgraphs take ``*args``, components name them),
    so that one form of dynamic shapes fits every graph."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, *args: torch.Tensor):
        return self.module(*args)


def compile_package(module: nn.Module, spec: GraphSpec, ranges: dict[str, tuple[int, int, int]], patch_size: int,
                    path: Path, device: str = "cpu") -> CompiledArtifact:
    """Compile ``module`` (inputs and outputs as ``spec`` names them) into the package ``path``, for ``device``.

    ``ranges`` are the build's (min, opt, max) per symbolic dimension (:meth:`ShapeConfig.dim_ranges`)."""
    start = time.perf_counter()
    inputs = tuple(x.to(device) for x in trace_inputs(spec, patch_size, dims=example_dims(ranges)))
    scratch = path.with_name(f".partial-{path.name}")  # AOTInductor wants the .pt2 suffix
    try:
        with torch.no_grad():
            # the module is not moved: the weights of the graph are where they were loaded (the rest of the model
            # stays on the meta device, which a move would refuse)
            program = torch.export.export(_Positional(module), inputs,
                                          dynamic_shapes={"args": dynamic_shapes(spec, ranges, patch_size)},
                                          strict=False)
            torch._inductor.aoti_compile_and_package(program, package_path=str(scratch))
    except OnexError:
        raise
    except Exception as exc:  # torch.export and Inductor raise many types; the message is what helps
        scratch.unlink(missing_ok=True)
        raise OnexError(f"AOTInductor could not compile graph {spec.name}: {type(exc).__name__}: {exc}"[:2000],
                        "build without --aoti (the ONNX graphs and engines do not need it), and report this") from exc
    os.replace(scratch, path)
    return CompiledArtifact(path, time.perf_counter() - start)
