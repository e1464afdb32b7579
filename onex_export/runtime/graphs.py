"""Runners with one interface: a graph is a callable ``graph(**inputs) -> {output: tensor}``, and a
:class:`PlanDenoiser` chains graphs through the manifest's plans into the sampler's two calls.

Backends: :class:`TorchGraph` (the PyTorch reference), :class:`OrtGraph` (ONNX Runtime) and :class:`AotiGraph`
(AOTInductor packages).
"""
from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import OnexError
from ..contract import TORCH_DTYPES, GraphEntry, GraphSpec, Manifest, run_plan
_NUMPY_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64}


class TorchGraph:
    """A subgraph module run in PyTorch, returning named outputs."""

    def __init__(self, module: nn.Module, spec: GraphSpec):
        self.module, self.spec = module, spec

    @torch.no_grad()
    def __call__(self, **inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        args = [inputs[t.name].to(TORCH_DTYPES[t.dtype]) for t in self.spec.inputs]
        outs = self.module(*args)
        outs = outs if isinstance(outs, tuple) else (outs,)
        return {t.name: o for t, o in zip(self.spec.outputs, outs)}


_SHARED_ARENA = {"registered": False}  # ONNX Runtime has no call that unregisters it


def _use_shared_arena(options) -> None:
    """Make a session allocate from the process's shared CPU arena (registered on first use, growing by what is
    asked, like the sessions' own)."""
    import onnxruntime as ort

    if not _SHARED_ARENA["registered"]:
        info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
        ort.create_and_register_allocator(info, ort.OrtArenaCfg({"arena_extend_strategy": 1}))  # kSameAsRequested
        _SHARED_ARENA["registered"] = True
    options.add_session_config_entry("session.use_env_allocators", "1")


@functools.cache
def _identity_graph() -> bytes:
    from onnx import TensorProto, helper

    value = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "identity", [value],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9).SerializeToString()


def release_shared_arena() -> None:
    """Give the shared arena's free memory back to the system, once the ``low_memory`` sessions are dropped (ONNX
    Runtime frees each region of it with nothing left in it: shrinking is a run option, so a one-op graph runs)."""
    if not _SHARED_ARENA["registered"]:
        return
    import onnxruntime as ort

    options = ort.SessionOptions()
    _use_shared_arena(options)
    session = ort.InferenceSession(_identity_graph(), options, providers=["CPUExecutionProvider"])
    shrink = ort.RunOptions()
    shrink.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
    session.run(None, {"x": np.zeros(1, np.float32)}, shrink)


def _session(path: Path, providers: tuple[str, ...], low_memory: bool, spin: bool = True):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: shape-merge notices on dynamic graphs are noise
    if not spin:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if low_memory:
        # One-off runs (the gate), measured on SD3-Medium's fp16 graphs at 1024 px (2 cores, ONNX Runtime 1.31):
        # - no graph rewrites: they keep float32 copies of fp16 weights (segment: 7.1 GiB peak optimised, 6.0 not),
        #   and are not faster here (18.6-21.3 s a run either way);
        # - the memory arena on, growing by what is asked: without it each 24 x 4429^2 attention buffer is a fresh
        #   allocation, and the segment took 49-57 s a run;
        # - no memory pattern (one block for the whole plan, allocated beside the arena from the second run on):
        #   with it, the process grew from 12.4 to 16.2 GiB resident over the segment's second run;
        # - one arena for the process, shared by every such session: a session's own arena is new memory, and the
        #   kernel's page faults on it (zeroing each page) made a graph's first run up to 50% slower than its second
        #   (head 8.5 s a run with its own arena, 5.5 s in the shared one; segment's first run spent 14 of 43 CPU
        #   seconds in the kernel). The shared arena keeps its memory until :func:`release_shared_arena`.
        options.enable_mem_pattern = False
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        if "CPUExecutionProvider" in providers:
            _use_shared_arena(options)
    return ort.InferenceSession(str(path), options, providers=list(providers))


class OrtGraph:
    """An ONNX graph in an ONNX Runtime session (CPU unless other providers are given). ``low_memory`` drops ONNX
    Runtime's graph optimisations and memory pattern and allocates from one arena shared by such sessions (for
    one-off runs of one graph after another, as in the gate; see ``_session``; :func:`release_shared_arena`
    after). ``spin=False`` stops its worker threads from spinning between runs: slower for one caller alone,
    faster where other threads need the cores (a server's)."""

    def __init__(self, path: Path, providers: tuple[str, ...] = ("CPUExecutionProvider",), low_memory: bool = False,
                 spin: bool = True):
        try:
            try:
                self.session = _session(path, providers, low_memory, spin)
            except Exception:  # onnxruntime raises its own exception types
                if not low_memory:
                    raise
                # ONNX Runtime 1.30 refuses some fp16 graphs left unoptimised (a type error in the casts it inserts
                # for the CPU; 1.31 loads them): load those optimised, with more memory and the same results.
                self.session = _session(path, providers, False, spin)
        except Exception as exc:
            raise OnexError(f"ONNX Runtime cannot load {path}: {exc}", "rebuild with `onex-export build`") from exc
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.input_types = {i.name: i.type for i in self.session.get_inputs()}

    def __call__(self, **inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        feeds = {}
        for name in self.input_names:
            dtype = _NUMPY_TYPES[self.input_types[name]]
            feeds[name] = inputs[name].detach().cpu().numpy().astype(dtype, copy=False)
        outs = self.session.run(self.output_names, feeds)
        # Copies: an output ONNX Runtime hands back can live in its arena and keep all of it (gigabytes after an
        # attention at 1024 px) alive after the session is gone, for as long as the caller keeps the output.
        return {name: torch.from_numpy(np.array(o, copy=True)) for name, o in zip(self.output_names, outs)}


class AotiGraph:
    """An AOTInductor package (``.pt2``) loaded by torch alone, returning named outputs. It runs on the device it
    was compiled for, under the torch version that compiled it."""

    def __init__(self, path: Path, spec: GraphSpec, device: str = "cpu"):
        try:
            self.runner = torch._inductor.aoti_load_package(str(path))
        except Exception as exc:  # torch raises RuntimeError and friends from the loader
            raise OnexError(f"torch cannot load the AOTInductor package {path}: {exc}",
                            "rebuild with `onex-export build --aoti` under this torch") from exc
        self.spec, self.device = spec, device

    @torch.no_grad()
    def __call__(self, **inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        args = [inputs[t.name].to(self.device, TORCH_DTYPES[t.dtype]).contiguous() for t in self.spec.inputs]
        outs = self.runner(*args)
        outs = outs if isinstance(outs, (tuple, list)) else (outs,)
        return {t.name: o for t, o in zip(self.spec.outputs, outs)}


def check_aoti(folder: Path, manifest: Manifest) -> None:
    """Raise :class:`OnexError` unless every graph of the build has an AOTInductor package this torch can load."""
    missing = [n for n, g in manifest.graphs.items() if g.compiled is None]
    if missing:
        raise OnexError(f"{folder} has no AOTInductor package for {', '.join(missing)} (built without --aoti)",
                        "rebuild with --aoti, or run another backend")
    wanted = {g.compiled.extra.get("torch") for g in manifest.graphs.values()}
    if wanted != {torch.__version__}:
        raise OnexError(f"{folder}'s AOTInductor packages were compiled by torch {', '.join(sorted(map(str, wanted)))}, "
                        f"and this is torch {torch.__version__}: a package runs only under the torch that made it",
                        "install that torch, or rebuild with --aoti under this one")


def aoti_graph(folder: Path, name: str, entry: GraphEntry) -> AotiGraph:
    """Graph ``name``'s AOTInductor package in ``folder``, as its manifest ``entry`` lists it."""
    return AotiGraph(folder / entry.compiled.file, GraphSpec(name, entry.inputs, entry.outputs),
                     entry.compiled.extra["device"])


def _aoti_graphs(folder: Path, manifest: Manifest) -> dict:
    check_aoti(folder, manifest)
    return {n: aoti_graph(folder, n, g) for n, g in manifest.graphs.items()}


def load_build_graphs(folder: Path, manifest: Manifest, backend: str, spin: bool = True) -> dict:
    """A build folder's graphs as runners: its ONNX files in ONNX Runtime (``spin``: see :class:`OrtGraph`), its
    AOTInductor packages ("aoti"), or its engines ("tensorrt", GPU only)."""
    if backend == "onnxruntime":
        return {n: OrtGraph(folder / g.onnx.file, spin=spin) for n, g in manifest.graphs.items()}
    if backend == "aoti":
        return _aoti_graphs(folder, manifest)
    from .tensorrt_runner import TrtGraph, require_gpu

    require_gpu()
    if manifest.trt == "none":
        raise OnexError(f"{folder} has no engines (built with --trt none)",
                        "rebuild with --trt tensorrt or tensorrt-rtx, or use --backend onnxruntime")
    return {n: TrtGraph(folder / g.engine.file, manifest.trt) for n, g in manifest.graphs.items()}


class PlanDenoiser:
    """The sampler's :class:`~onex_export.runtime.sampler.Denoiser` over any backend's graphs.

    Velocities come back as float32, whatever the graphs' precision; deltas as the graphs made them.
    """

    def __init__(self, graphs: dict, plans: dict):
        self.graphs, self.plans = graphs, plans

    def full(self, x, text, pooled, timestep):
        out = run_plan(self.plans["full"], self.graphs, dict(
            hidden_states=x, encoder_hidden_states=text, pooled_projections=pooled, timestep=timestep))
        # the deltas stay where and as the graphs made them (on the GPU, in the build's precision) until the
        # skipping step feeds them back: no copy or cast in between
        return out["velocity"].float(), out["delta_img"], out["delta_ctx"]

    def skipping(self, x, text, pooled, timestep, delta_img, delta_ctx):
        out = run_plan(self.plans["skipping"], self.graphs, dict(
            hidden_states=x, encoder_hidden_states=text, pooled_projections=pooled, timestep=timestep,
            delta_img=delta_img, delta_ctx=delta_ctx))
        return out["velocity"].float()
