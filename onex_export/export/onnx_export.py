"""ONNX export of one subgraph: legacy (TorchScript) exporter, opset >= 17, dynamic batch and
optionally dynamic latent size and text length, external data past 2 GB, checker and shape inference."""
from __future__ import annotations

import hashlib
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import onnx
import torch
from torch import nn

from ..errors import OnexError
from .graphs import GraphSpec

PROTOBUF_LIMIT = 2 * 1024**3  # a single ONNX protobuf cannot exceed 2 GiB
MIN_OPSET = 17


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@dataclass(frozen=True)
class OnnxArtifact:
    """An exported graph: its files (the .onnx and, past 2 GB, its external .data) and figures."""

    name: str
    path: Path
    data_path: Path | None
    weight_bytes: int  # bytes of all initializers (the weights an engine carries)
    export_seconds: float


def initializer_bytes(model: onnx.ModelProto) -> int:
    """Bytes of the initializers of ``model``, inline or in external data."""
    total = 0
    for init in model.graph.initializer:
        if init.data_location == onnx.TensorProto.EXTERNAL:
            total += int({e.key: e.value for e in init.external_data}["length"])
        else:
            total += len(init.raw_data) or onnx.numpy_helper.to_array(init).nbytes
    return total


def export_graph(
    module: nn.Module,
    spec: GraphSpec,
    example_inputs: tuple[torch.Tensor, ...],
    out_dir: Path,
    dynamic_dims: frozenset[str],
    weight_bytes: int,
    opset: int = MIN_OPSET,
    external_data_threshold: int = PROTOBUF_LIMIT,
) -> OnnxArtifact:
    """Export ``module`` to ``out_dir/<spec.name>.onnx`` with the names and dynamic axes of ``spec``.

    Dimensions named in ``dynamic_dims`` (symbolic names from :mod:`graphs`) become dynamic axes.
    ``weight_bytes`` is the size of the weights the graph carries; past ``external_data_threshold``
    they go to one ``<name>.onnx.data`` file beside the graph (torch does not check the 2 GiB limit).
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
        dims = {i: d for i, d in enumerate(tensor.shape) if isinstance(d, str) and d in dynamic_dims}
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
        # Re-save from the scratch folder: one .onnx, plus one .data file past the protobuf limit
        # (the exporter may spill big models into one file per tensor).
        model = onnx.load(str(scratch / path.name), load_external_data=True)
        data_path = None
        if weight_bytes > external_data_threshold:
            data_path = path.with_name(path.name + ".data")
            onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=data_path.name, size_threshold=0)
        else:
            onnx.save_model(model, str(path))
        onnx.checker.check_model(str(path))
        # Strict shape inference on its own: check_model(full_check=True) would also reject bf16 Conv at
        # opset 17, which TensorRT and ONNX Runtime accept.
        onnx.shape_inference.infer_shapes_path(str(path), str(scratch / "inferred.onnx"), strict_mode=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return OnnxArtifact(spec.name, path, data_path, initializer_bytes(model), time.perf_counter() - start)
