"""ONNX export of one subgraph: legacy (TorchScript) exporter, opset >= 17, external data past 2 GB,
checker and shape inference.

Every symbolic dimension (batch, latent size, text length) is exported as a dynamic axis, and the graph
is traced at a small size (:data:`TRACE_DIMS`): tracing runs the module once, and at SD3's real sizes
that forward alone took minutes on a CPU. The graph does not depend on the size it was traced at (SD3's
code computes every shape from its inputs; a test checks that graphs traced at two sizes agree at a
third), so the engine's optimization profile fixes the real shapes and one ONNX file serves any profile.
"""
from __future__ import annotations

import os
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import onnx
import torch
from torch import nn

from ..errors import OnexError
from ..contract import IH, IW, TORCH_DTYPES, B, GraphSpec, H, N, T, W

PROTOBUF_LIMIT = 2 * 1024**3  # a single ONNX protobuf cannot exceed 2 GiB
MIN_OPSET = 17
EXPORTER = "torch.onnx legacy (TorchScript) exporter, traced at TRACE_DIMS, all symbolic dims dynamic"
# The size graphs are traced at: small, non-square (so height and width cannot be confused), batch > 1.
TRACE_DIMS = {B: 2, H: 8, W: 6, T: 7, IH: 64, IW: 48}


def trace_inputs(spec: GraphSpec, patch_size: int, seed: int = 0, dims: dict | None = None) -> tuple[torch.Tensor, ...]:
    """Random inputs for ``spec`` at :data:`TRACE_DIMS` (or ``dims``; ``img_tokens`` follows from the latent size)."""
    dims = dict(TRACE_DIMS, **(dims or {}))
    dims[N] = (dims[H] // patch_size) * (dims[W] // patch_size)
    g = torch.Generator().manual_seed(seed)
    out = []
    for t in spec.inputs:
        shape = tuple(dims[d] if isinstance(d, str) else d for d in t.shape)
        if t.dtype == "int64":
            out.append(torch.randint(0, 3, shape, generator=g))
        elif t.name == "timestep":
            out.append(torch.full(shape, 500.0))
        else:
            out.append(torch.randn(shape, generator=g).to(TORCH_DTYPES[t.dtype]))
    return tuple(out)


@dataclass(frozen=True)
class OnnxArtifact:
    """An exported graph: its files (the .onnx and, past 2 GB, its external .data) and figures."""

    name: str
    path: Path
    data_path: Path | None
    weight_bytes: int  # bytes of all initializers (the weights an engine carries)
    export_seconds: float


def initializer_bytes(model: onnx.ModelProto, folder: Path | None = None) -> int:
    """Bytes of the initializers of ``model``, inline or in external data (loaded without it)."""
    total = 0
    for init in model.graph.initializer:
        if init.data_location == onnx.TensorProto.EXTERNAL:
            info = {e.key: e.value for e in init.external_data}
            total += int(info["length"]) if "length" in info else (Path(folder) / info["location"]).stat().st_size
        else:
            total += len(init.raw_data) or onnx.numpy_helper.to_array(init).nbytes
    return total


def export_graph(
    module: nn.Module,
    spec: GraphSpec,
    example_inputs: tuple[torch.Tensor, ...],
    out_dir: Path,
    weight_bytes: int,
    opset: int = MIN_OPSET,
    external_data_threshold: int = PROTOBUF_LIMIT,
    release_weights: Callable[[], None] | None = None,
) -> OnnxArtifact:
    """Export ``module`` to ``out_dir/<spec.name>.onnx`` with the names of ``spec``, every symbolic dimension
    dynamic, traced on ``example_inputs`` (see :func:`trace_inputs`).

    ``weight_bytes`` is the size of the weights the graph carries; past ``external_data_threshold``
    they go to one ``<name>.onnx.data`` file beside the graph (torch does not check the 2 GiB limit).
    ``release_weights`` is called once the exporter is done with ``module``, before the file is checked, so
    that the weights are not held twice.
    """
    if opset < MIN_OPSET:
        raise OnexError(f"opset {opset} is too old", f"use --opset {MIN_OPSET} or newer")
    out_dir = Path(out_dir)
    path = out_dir / f"{spec.name}.onnx"
    scratch = out_dir / f".scratch-{spec.name}"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    axes = {}
    for tensor in (*spec.inputs, *spec.outputs):
        dims = {i: d for i, d in enumerate(tensor.shape) if isinstance(d, str)}
        if dims:
            axes[tensor.name] = dims
    start = time.perf_counter()
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # tracer warnings on shape arithmetic are expected and harmless
            torch.onnx.export(
                module, example_inputs, str(scratch / path.name), input_names=[t.name for t in spec.inputs],
                output_names=[t.name for t in spec.outputs], dynamic_axes=axes, opset_version=opset,
                do_constant_folding=True, dynamo=False,
            )
        if release_weights is not None:
            release_weights()  # the ONNX file holds them now: do not keep a second copy while checking it
        spilled = len(list(scratch.iterdir())) > 1  # past 2 GiB the exporter writes one file per tensor
        external = spilled or weight_bytes > external_data_threshold  # a spilled graph cannot be one protobuf
        data_path = path.with_name(path.name + ".data") if external else None
        if data_path is None and not spilled:
            os.replace(scratch / path.name, path)  # already one self-contained file: no second copy in memory
        else:
            # One .onnx plus one .data file.
            model = onnx.load(str(scratch / path.name), load_external_data=True)
            if data_path is None:
                onnx.save_model(model, str(path))
            else:
                onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                                location=data_path.name, size_threshold=0)
            del model
        onnx.checker.check_model(str(path))
        # Strict shape inference on its own: check_model(full_check=True) would also reject bf16 Conv at
        # opset 17, which TensorRT and ONNX Runtime accept. Only its verdict matters: the inferred copy goes to
        # the null device (writing it cost 4.6 of the 8.6 s this check took on SD3-Medium's 2 GB tail graph).
        onnx.shape_inference.infer_shapes_path(str(path), os.devnull, strict_mode=True)
        weights = initializer_bytes(onnx.load(str(path), load_external_data=False), path.parent)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return OnnxArtifact(spec.name, path, data_path, weights, time.perf_counter() - start)
