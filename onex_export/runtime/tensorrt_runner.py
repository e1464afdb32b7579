"""A TensorRT (or TensorRT-RTX) engine behind the runner interface. GPU only.

Inputs and outputs are torch CUDA tensors, so values stay on the device between engines; every engine
runs on torch's current CUDA stream, in order, so no synchronisation is needed until the host reads a
result. Not exercised in CI: this needs an NVIDIA GPU (and, for RTX engines, an RTX-class GPU).
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..errors import OnexError
from ..trt import load_trt

_TORCH = {"FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16, "INT64": torch.int64,
          "INT32": torch.int32}


def require_gpu(hint: str = "use --backend onnxruntime or --backend torch on this machine") -> None:
    if not torch.cuda.is_available():
        raise OnexError("the TensorRT backend needs an NVIDIA GPU with CUDA, and none is visible here", hint)


class TrtGraph:
    """One engine file; ``graph(**inputs) -> {output: tensor}`` on the GPU."""

    def __init__(self, path: Path, flavour: str):
        require_gpu()
        trt = load_trt(flavour)
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(Path(path).read_bytes())
        if self.engine is None:
            raise OnexError(f"{flavour} cannot load the engine {path} on this GPU",
                            "engines are specific to a TensorRT version and GPU family: rebuild here")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        is_input = {n: self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names}
        self.inputs = [n for n in names if is_input[n]]
        self.outputs = [n for n in names if not is_input[n]]
        self.dtypes = {n: _TORCH[self.engine.get_tensor_dtype(n).name] for n in names}

    def __call__(self, **inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        keep = []  # inputs converted here must live until the engine has run
        for name in self.inputs:
            t = inputs[name].to(device="cuda", dtype=self.dtypes[name]).contiguous()
            keep.append(t)
            self.context.set_input_shape(name, tuple(t.shape))
            self.context.set_tensor_address(name, t.data_ptr())
        outs = {}
        for name in self.outputs:
            outs[name] = torch.empty(tuple(self.context.get_tensor_shape(name)), dtype=self.dtypes[name], device="cuda")
            self.context.set_tensor_address(name, outs[name].data_ptr())
        if not self.context.execute_async_v3(torch.cuda.current_stream().cuda_stream):
            raise OnexError("TensorRT failed to run the engine", "check the input shapes against the manifest's profile")
        return outs
