"""CUDA-graph capture of the sampler's two calls, for static shapes. GPU only.

A denoising step launches hundreds of kernels (PyTorch) or several engines plus glue (TensorRT); at
batch 1 the launch overhead is a visible share of a step. :class:`CudaGraphDenoiser` captures each call
for its input signature (shapes and dtypes) and replays it afterwards: one graph launch per step. The
capture costs a few eager runs, so it pays off where one pipeline object serves many requests.

Capture follows PyTorch's recipe: a few warm-up runs on a side stream (cuBLAS/cuDNN workspaces,
TensorRT's shape-dependent setup happen there, not inside the capture), then one run under
``torch.cuda.graph`` into static input buffers. A call copies its inputs into those buffers, replays,
and returns copies of the outputs, so that a later replay cannot overwrite a result still in use (the
full step's deltas are consumed by the next, skipping call). Everything runs on torch's current
stream, which the TensorRT runner also uses, so engines and glue stay in order without host syncs.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import OnexError, UsageError
from .sampler import Denoiser


def require_cuda() -> None:
    if not torch.cuda.is_available():
        raise OnexError("CUDA-graph capture needs an NVIDIA GPU with CUDA, and none is visible here",
                        "drop --cuda-graph on this machine")


@dataclass(frozen=True)
class _Captured:
    signature: tuple  # the (shape, dtype) of each input it was captured for
    graph: torch.cuda.CUDAGraph
    inputs: tuple[torch.Tensor, ...]
    outputs: tuple[torch.Tensor, ...]


class CudaGraphDenoiser:
    """Wraps any :class:`~onex_export.runtime.sampler.Denoiser` whose calls are capturable (the PyTorch
    backend on CUDA, the TensorRT backend) and replays captured graphs. Shapes as in the wrapped one.

    Shapes are static: each call keeps one graph (a 1.x schedule holds two, full and skipping), and an
    input signature other than the captured one costs ``warmup`` eager runs and a new capture that
    replaces the old graph. Replacing rather than keeping one graph per shape is what TensorRT asks
    for: an execution context's graphs are recaptured when its input shapes change.
    """

    def __init__(self, inner: Denoiser, warmup: int = 2):
        require_cuda()
        if warmup < 1:
            raise ValueError(f"warmup must be >= 1 (the runs before capture), got {warmup}")
        self.inner, self.warmup = inner, warmup
        self._graphs: dict[str, _Captured] = {}  # call name -> its graph
        self.captures = 0  # how many graphs were captured (recaptures included)

    def full(self, x, text, pooled, timestep):
        return self._call("full", (x, text, pooled, timestep))

    def skipping(self, x, text, pooled, timestep, delta_img, delta_ctx):
        return self._call("skipping", (x, text, pooled, timestep, delta_img, delta_ctx))[0]

    def _call(self, name: str, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        if any(a.device.type != "cuda" for a in args):
            raise UsageError("CUDA-graph capture needs every input on the GPU", "sample with device='cuda'")
        signature = tuple((tuple(a.shape), a.dtype) for a in args)
        if name in self._graphs and self._graphs[name].signature != signature:
            del self._graphs[name]  # free the old graph and its memory pool before capturing anew
        captured = self._graphs.get(name) or self._capture(name, signature, args)
        for static, a in zip(captured.inputs, args):
            static.copy_(a)
        captured.graph.replay()
        return tuple(o.clone() for o in captured.outputs)

    @torch.no_grad()
    def _capture(self, name: str, signature: tuple, args: tuple[torch.Tensor, ...]) -> _Captured:
        fn = getattr(self.inner, name)
        static = tuple(a.clone() for a in args)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                fn(*static)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = fn(*static)
        outputs = out if isinstance(out, tuple) else (out,)
        captured = self._graphs[name] = _Captured(signature, graph, static, outputs)
        self.captures += 1
        return captured
