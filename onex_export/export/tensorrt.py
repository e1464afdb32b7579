"""Build TensorRT engines from ONNX files, with full TensorRT or TensorRT-RTX.

Both flavours share one API. TensorRT-RTX builds ahead of time on a CPU-only machine (by default for
compute capabilities 8.0, 8.6, 8.9, 12.0 and later); full TensorRT builds for the GPU it runs on and can
keep a persistent timing cache. Networks are always strongly typed: the ONNX file carries the precision,
so no fp16/bf16 builder flags are set. Running an engine needs a GPU; this module only builds.
"""
from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType, ModuleType
from typing import Callable, Mapping

from .. import interrupts
from ..errors import ModelLoadError, OnexError, UsageError
from ..fileio import atomic_path
from ..trt import LABELS, EngineOptionsError, check_flavour, flavour_version, load_trt

_DTYPES = {"FLOAT": "float32", "HALF": "float16", "BF16": "bfloat16", "FP8": "float8", "FP4": "float4"}
_CAPABILITY_RE = re.compile(r"\d{1,2}\.\d")

ShapeTriple = tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]


class ShapeProfileError(UsageError):
    """A shape profile is malformed or does not fit the network's inputs."""


class OnnxParseError(OnexError):
    """TensorRT's ONNX parser rejected the model."""


class EngineBuildError(OnexError):
    """TensorRT parsed the network but could not build an engine from it."""


# TensorRT-RTX targets (its ComputeCapability enum) and the ones it builds for when none are named.
RTX_DEFAULT_TARGETS = ("8.0", "8.6", "8.9", "12.0", "12.1")


def choose_trt(requested: str, compute_capabilities: tuple[str, ...] = (), log: Callable[[str], None] = lambda _: None
               ) -> str:
    """The engine flavour of a build. ``auto``: full TensorRT where it is installed and a GPU is visible, else
    TensorRT-RTX where installed, else none (ONNX only). An RTX build for its default targets stops when the
    visible GPU is not among them (an H100, SM 9.0, is no RTX target), with the fix."""
    import torch

    gpu = torch.cuda.get_device_capability() if torch.cuda.is_available() else None
    choice = requested
    if requested == "auto":
        if flavour_version("tensorrt") and gpu and not compute_capabilities:  # targets name RTX builds
            choice = "tensorrt"
        else:
            choice = "tensorrt-rtx" if flavour_version("tensorrt-rtx") else "none"
        why = {"tensorrt": "full TensorRT is installed and a GPU is visible",
               "tensorrt-rtx": "TensorRT-RTX is installed" + ("" if gpu else " (builds ahead of time on the CPU)"),
               "none": "no TensorRT flavour is installed: ONNX only"}[choice]
        log(f"      --trt auto: {choice} ({why})")
    if choice == "tensorrt-rtx" and gpu and not compute_capabilities:
        sm = f"{gpu[0]}.{gpu[1]}"
        if sm not in RTX_DEFAULT_TARGETS:
            name = torch.cuda.get_device_name()
            raise EngineOptionsError(
                f"TensorRT-RTX engines for its default targets ({', '.join(RTX_DEFAULT_TARGETS)}) cannot run on the "
                f"visible {name} (SM {sm})",
                "use --trt tensorrt (full TensorRT) on this GPU" if sm == "9.0" else
                f"add --compute-capability {sm}, or use --trt tensorrt")
    return choice


@dataclass(frozen=True)
class EngineBuildOptions:
    """How to build an engine. ``compute_capabilities`` ("8.6", "12.0", ...) is for TensorRT-RTX only
    (empty: its default targets); ``timing_cache`` is a file for full TensorRT only. ``tf32`` lets float32
    matrix products run as TF32 on Ampere and newer GPUs: faster, but about 1e-3 relative error, so it is
    off unless asked for and a float32 engine matches PyTorch's float32 (which also keeps TF32 off)."""

    flavour: str
    optimization_level: int = 3
    compute_capabilities: tuple[str, ...] = ()
    timing_cache: Path | None = None
    workspace_gib: float | None = None
    tf32: bool = False

    def __post_init__(self):
        check_flavour(self.flavour)
        level = self.optimization_level
        if isinstance(level, bool) or not isinstance(level, int) or not 0 <= level <= 5:
            raise EngineOptionsError(f"optimization level {level!r} is not an integer from 0 to 5",
                                     hint="3 is the default; higher builds slower and may run faster")
        caps = tuple(dict.fromkeys(self.compute_capabilities))  # deduplicated, order kept
        if caps and self.flavour != "tensorrt-rtx":
            raise EngineOptionsError("compute capabilities can only be chosen with TensorRT-RTX",
                                     hint="full TensorRT builds for the GPU it runs on; drop the capabilities")
        for cap in caps:
            if not isinstance(cap, str) or not _CAPABILITY_RE.fullmatch(cap):
                raise EngineOptionsError(f"compute capability {cap!r} is not of the form MAJOR.MINOR",
                                         hint='write it like "8.6" or "12.0"')
        object.__setattr__(self, "compute_capabilities", caps)
        if self.timing_cache is not None:
            if self.flavour == "tensorrt-rtx":
                raise EngineOptionsError(
                    "a timing cache is for full TensorRT only; TensorRT-RTX builds ahead of time on the CPU",
                    hint="drop the timing cache; TensorRT-RTX tunes at run time with its runtime cache")
            object.__setattr__(self, "timing_cache", Path(self.timing_cache))
        gib = self.workspace_gib
        if gib is not None and (isinstance(gib, bool) or not isinstance(gib, (int, float))
                                or not math.isfinite(gib) or gib <= 0):
            raise EngineOptionsError(f"workspace size {gib!r} GiB is not a positive number",
                                     hint="leave it unset to let TensorRT use the device's memory")


def _shape(value, what: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(d) for d in value)
    except (TypeError, ValueError):
        raise ShapeProfileError(f"{what} shape {value!r} is not a sequence of integers",
                                hint="write a shape like (1, 16, 128, 128)") from None
    if any(d < 0 for d in shape):
        raise ShapeProfileError(f"{what} shape {shape} has a negative dimension", hint="profile shapes are concrete")
    return shape


@dataclass(frozen=True)
class ShapeProfile:
    """Input name -> (min, opt, max) shapes of one optimization profile; min <= opt <= max elementwise."""

    shapes: Mapping[str, ShapeTriple] = field(default_factory=dict)

    def __post_init__(self):
        shapes = {}
        for name, triple in dict(self.shapes).items():
            if not isinstance(triple, (tuple, list)) or len(triple) != 3:
                raise ShapeProfileError(f"profile for input {name!r} is not a (min, opt, max) triple",
                                        hint="give three shapes: smallest, most common, largest")
            lo, opt, hi = (_shape(s, f"{kind} {name!r}") for s, kind in zip(triple, ("min", "opt", "max")))
            if not len(lo) == len(opt) == len(hi):
                raise ShapeProfileError(f"min/opt/max shapes of input {name!r} differ in rank: {lo}, {opt}, {hi}",
                                        hint="the three shapes need the same number of dimensions")
            if not all(a <= b <= c for a, b, c in zip(lo, opt, hi)):
                raise ShapeProfileError(f"input {name!r} needs min <= opt <= max per dimension: {lo}, {opt}, {hi}",
                                        hint="reorder the shapes or fix the dimension that is out of order")
            shapes[name] = (lo, opt, hi)
        object.__setattr__(self, "shapes", MappingProxyType(shapes))


@dataclass(frozen=True)
class EngineTensor:
    """A network input or output: its name, dtype ("float16", "int64", ...) and shape (-1: dynamic)."""

    name: str
    dtype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class EngineReport:
    """What :func:`build_engine` built. ``build_seconds`` covers parsing, building and writing; empty
    ``compute_capabilities`` means the flavour's default targets."""

    path: Path
    size_bytes: int
    build_seconds: float
    flavour: str
    version: str
    inputs: tuple[EngineTensor, ...]
    outputs: tuple[EngineTensor, ...]
    compute_capabilities: tuple[str, ...]


def _make_logger(trt: ModuleType, log: Callable[[str], None] | None):
    """A ``trt.ILogger`` that keeps warnings and errors in ``.messages`` and forwards them to ``log``."""

    class _Logger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.messages: list[str] = []

        def log(self, severity, msg):
            if severity in (trt.ILogger.INTERNAL_ERROR, trt.ILogger.ERROR, trt.ILogger.WARNING):
                line = f"[{severity.name}] {msg}"
                self.messages.append(line)
                if log is not None:
                    log(line)

    return _Logger()


def _make_progress_monitor(trt: ModuleType):
    """A ``trt.IProgressMonitor`` that cancels the build once a signal has arrived (see :mod:`..interrupts`):
    the builder calls it thousands of times per engine, so Ctrl-C stops a build within seconds."""

    class _Monitor(trt.IProgressMonitor):
        def __init__(self):
            trt.IProgressMonitor.__init__(self)

        def phase_start(self, phase_name, parent_phase, num_steps):
            pass

        def phase_finish(self, phase_name):
            pass

        def step_complete(self, phase_name, step):
            return not interrupts.requested()  # False cancels the build

    return _Monitor()


def _spec(tensor) -> EngineTensor:
    name = tensor.dtype.name
    return EngineTensor(tensor.name, _DTYPES.get(name, name.lower()), tuple(tensor.shape))


def _capability_enums(trt: ModuleType, caps: tuple[str, ...]) -> list:
    known = {f"{n[2:-1]}.{n[-1]}": m for n, m in trt.ComputeCapability.__members__.items() if n[2:].isdigit()}
    unknown = [c for c in caps if c not in known]
    if unknown:
        raise EngineOptionsError(f"TensorRT-RTX {trt.__version__} cannot target compute capability "
                                 f"{', '.join(unknown)}", hint=f"choose from {', '.join(known)}")
    return [known[c] for c in caps]


def _add_profile(builder, network, config, profile: ShapeProfile) -> None:
    opt_profile = builder.create_optimization_profile()
    inputs = {t.name: t for t in (network.get_input(i) for i in range(network.num_inputs))}
    extra = sorted(set(profile.shapes) - set(inputs))
    if extra:
        raise ShapeProfileError(f"the profile names {', '.join(extra)}, which the network has no input for",
                                hint=f"the network's inputs are {', '.join(inputs)}")
    for name, tensor in inputs.items():
        dims = tuple(tensor.shape)
        if name not in profile.shapes:
            if -1 in dims:
                raise ShapeProfileError(f"input {name!r} has dynamic shape {dims} but no entry in the shape profile",
                                        hint=f"add (min, opt, max) shapes for {name!r} to the profile")
            continue
        triple = profile.shapes[name]
        if len(triple[0]) != len(dims) or any(d != -1 and any(s[i] != d for s in triple) for i, d in enumerate(dims)):
            raise ShapeProfileError(f"profile shapes {triple} for input {name!r} do not fit its shape {dims}",
                                    hint="match the rank and keep the static dimensions (-1 marks dynamic ones)")
        opt_profile.set_shape(name, *triple)
    if profile.shapes:
        config.add_optimization_profile(opt_profile)


def _build_serialized(trt: ModuleType, onnx_path: Path, engine_path: Path, profile: ShapeProfile,
                      options: EngineBuildOptions, capabilities: list, log
                      ) -> tuple[tuple[EngineTensor, ...], tuple[EngineTensor, ...]] | None:
    """Parse, build and write the engine; return the network's (inputs, outputs), or None when a signal
    cancelled the build. Called with signals deferred: TensorRT swallows what its callbacks raise."""
    logger = _make_logger(trt, log)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "\n".join(f"  {parser.get_error(i)}" for i in range(parser.num_errors))
        raise OnnxParseError(f"{LABELS[options.flavour]} could not parse {onnx_path.name}:\n{errors}",
                             hint="check the file with onnx.checker.check_model and keep its external data "
                                  "files next to it; re-export it if it is damaged")

    config = builder.create_builder_config()
    _add_profile(builder, network, config, profile)
    config.builder_optimization_level = options.optimization_level
    if not options.tf32:  # both flavours enable TF32 by default
        config.clear_flag(trt.BuilderFlag.TF32)
    if options.workspace_gib is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(options.workspace_gib * 2**30))
    if capabilities:
        config.num_compute_capabilities = len(capabilities)
        for index, capability in enumerate(capabilities):
            if not config.set_compute_capability(capability, index):
                raise EngineOptionsError(f"TensorRT-RTX refused compute capability {capability.name}",
                                         hint="choose other compute capabilities")
    if options.timing_cache is not None:
        cached = options.timing_cache.read_bytes() if options.timing_cache.is_file() else b""
        cache = config.create_timing_cache(cached)
        if cache is None or not config.set_timing_cache(cache, False):
            raise EngineOptionsError(f"timing cache {options.timing_cache} cannot be used on this GPU",
                                     hint="delete it or choose another timing cache file")

    config.progress_monitor = monitor = _make_progress_monitor(trt)
    serialized = None if interrupts.requested() else builder.build_serialized_network(network, config)
    del monitor  # kept alive while the builder may call it
    if serialized is None and interrupts.requested():
        return None  # leaving the deferred block raises the interrupt
    if serialized is None:
        messages = "\n".join(f"  {m}" for m in logger.messages) or "  (TensorRT logged no warnings or errors)"
        raise EngineBuildError(f"{LABELS[options.flavour]} could not build an engine from {onnx_path.name}:\n"
                               f"{messages}", hint="see the TensorRT messages above; a lower optimization level "
                                                    "or other compute capabilities may help")
    with atomic_path(engine_path) as tmp, open(tmp, "wb") as f:
        f.write(serialized)
    if options.timing_cache is not None:
        with atomic_path(options.timing_cache) as tmp, open(tmp, "wb") as f:
            f.write(config.get_timing_cache().serialize())
    return (tuple(_spec(network.get_input(i)) for i in range(network.num_inputs)),
            tuple(_spec(network.get_output(i)) for i in range(network.num_outputs)))


def build_engine(onnx_path: Path, engine_path: Path, profile: dict[str, ShapeTriple] | ShapeProfile,
                 options: EngineBuildOptions, log: Callable[[str], None] | None = None) -> EngineReport:
    """Build a serialized engine from ``onnx_path`` and write it atomically to ``engine_path``.

    ``profile`` gives (min, opt, max) shapes for every input with a dynamic dimension. TensorRT's warnings
    and errors go to ``log``. On any failure an existing file at ``engine_path`` is left untouched.
    """
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    profile = profile if isinstance(profile, ShapeProfile) else ShapeProfile(profile)
    trt = load_trt(options.flavour)
    capabilities = _capability_enums(trt, options.compute_capabilities)
    if not onnx_path.is_file():
        raise ModelLoadError(f"ONNX file {onnx_path} does not exist", hint="export the ONNX model first")
    start = time.perf_counter()
    with interrupts.deferred():  # a signal cancels the build through the progress monitor, raised at the end
        tensors = _build_serialized(trt, onnx_path, engine_path, profile, options, capabilities, log)
    if tensors is None:  # cancelled, and the interrupt's handler did not raise
        raise EngineBuildError(f"the build of {onnx_path.name} was cancelled by a signal", "run it again")
    return EngineReport(
        path=engine_path,
        size_bytes=engine_path.stat().st_size,
        build_seconds=time.perf_counter() - start,
        flavour=options.flavour,
        version=trt.__version__,
        inputs=tensors[0],
        outputs=tensors[1],
        compute_capabilities=options.compute_capabilities,
    )
