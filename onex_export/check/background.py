"""The gate's float32 reference made in a second process while the build exports and compiles.

Export (the TorchScript exporter, ONNX's checker and shape inference) and the TensorRT builds keep one core
busy: on SD3-Medium at 1024 px they take about 100 s, during which the reference, which needs no candidate,
can run on the other core. A process and not a thread: the exporter and ONNX's checks hold Python's lock
(a thread doing matrix products beside an export ran at 7% of its speed, beside the checks at 0.5%).

The child runs with one thread until the build reaches its gate (:meth:`BackgroundReference.result`), then
with as many as the build has. It rebuilds the reference from the same model name, MLP and skip range
(nothing big crosses between the processes), writes :class:`~.gate.ReferencePass` to a file in the build's
scratch folder, and the build reads it back. Its log lines are replayed then.
"""
from __future__ import annotations

import contextlib
import multiprocessing
import os
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ..config import SkipRange
from ..errors import OnexError
from ..export.graphs import GraphDef, module_bytes
from ..export.shapes import ShapeConfig
from ..export.stages import peak_rss_bytes
from ..models.split import SplitSD3Transformer
from ..models.weights import split_on_meta, top_level_prefixes, transformer_source
from .gate import GateConfig, ReferencePass, reference_pass
from .parity import tolerance_for

WORTH_IT_BYTES = 256 * 2**20  # below this many bytes of weights the reference takes less than starting a process


@dataclass(frozen=True)
class ReferenceJob:
    """What the child needs to rebuild the reference: the model (an embedded name or a folder), the MLP file,
    the skip range, the graphs and plans, the gate's shapes and settings, and the threads to use at the gate."""

    model: str
    mlp: str | None
    skip: SkipRange
    defs: tuple[GraphDef, ...]
    plans: dict
    shapes: ShapeConfig
    gate: GateConfig
    eta: float
    threads: int


def job_for_build(config, split: SplitSD3Transformer, defs: list[GraphDef], plans: dict,
                  shapes: ShapeConfig) -> ReferenceJob | None:
    """The gate's reference of a build (``config``: its ``BuildConfig``; ``split``, its model on ``meta``) as a
    job, where the gate will run and either ``config.reference_process`` asks for one or, left None, the
    transformer has :data:`WORTH_IT_BYTES` of weights or more."""
    wanted = config.reference_process
    if wanted is None:
        wanted = module_bytes(split, top_level_prefixes(split.transformer)) >= WORTH_IT_BYTES
    if not wanted or config.gate.mode == "none" or tolerance_for("onnxruntime", config.precision) is None:
        return None  # bf16: nothing on this machine runs the graphs, so no reference is wanted
    return ReferenceJob(config.model, str(config.mlp) if config.mlp else None, config.skip, tuple(defs), plans, shapes,
                        config.gate, config.eta, torch.get_num_threads())


def _work(job: ReferenceJob, out: str, full_speed) -> None:
    """The child: the reference pass, then ``out`` (written whole, then renamed) with it or the error."""
    torch.set_num_threads(1)
    lines, start, parent = [], time.perf_counter(), os.getppid()
    try:
        config, source = transformer_source(job.model)
        split = split_on_meta(config, Path(job.mlp) if job.mlp else None, job.skip)

        def speed(*_):  # between modules: all the threads once the build waits for this; none once it is gone
            if os.getppid() != parent:
                os._exit(1)  # the build was killed (no cleanup ran): its reference is nobody's
            if full_speed.is_set() and torch.get_num_threads() != job.threads:
                torch.set_num_threads(job.threads)

        for prefix in top_level_prefixes(split.transformer):
            split.transformer.get_submodule(prefix).register_forward_pre_hook(speed)
        result = reference_pass(split, source, list(job.defs), job.plans, job.shapes, job.gate, job.eta, lines.append)
        payload = {"points": result.points, "max_abs": result.max_abs, "times": result.times}
    except BaseException as exc:  # reported by the build, which raises it there
        payload = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
    payload.update(log=lines, seconds=time.perf_counter() - start, peak_rss_bytes=peak_rss_bytes())
    torch.save(payload, out + ".tmp")
    os.replace(out + ".tmp", out)


class BackgroundReference:
    """The reference pass of ``job`` in a child process, started now; :meth:`result` waits for it and
    :meth:`close` stops it (an interrupted or failed build leaves no process behind)."""

    def __init__(self, job: ReferenceJob, folder: Path):
        context = multiprocessing.get_context("spawn")  # not fork: the parent's thread pools do not survive one
        self.path = Path(folder) / ".gate-reference.pt"
        self.full_speed = context.Event()
        self.process = context.Process(target=_work, args=(job, str(self.path), self.full_speed),
                                       name="onex-gate-reference", daemon=True)
        self.process.start()

    def result(self, log: Callable[[str], None] = lambda _: None) -> ReferencePass:
        """Wait for the reference (with every thread from now on) and return it; raise what failed in the child."""
        self.full_speed.set()
        waiting = time.perf_counter()
        self.process.join()
        waited = time.perf_counter() - waiting
        if not self.path.is_file():
            raise OnexError(f"the gate's reference process ended (exit code {self.process.exitcode}) without a result",
                            "rebuild; if it persists, report it with the build's log")
        payload = torch.load(self.path, weights_only=True)
        self.path.unlink()
        for line in payload["log"]:
            log(line)
        if "error" in payload:
            raise OnexError(f"the gate's float32 reference failed: {payload['error']}",
                            "rebuild; if it persists, report it with this message") from RuntimeError(payload["traceback"])
        log(f"      reference made in a second process during export and engines: {payload['seconds']:.1f} s, "
            f"{waited:.1f} s of it after them; its peak resident memory {payload['peak_rss_bytes'] / 2**30:.2f} GiB")
        return ReferencePass(payload["points"], payload["max_abs"], payload["times"],
                             {"seconds": round(payload["seconds"], 3), "waited_seconds": round(waited, 3),
                              "peak_rss_bytes": payload["peak_rss_bytes"]})

    def close(self) -> None:
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(10)
            if self.process.is_alive():
                self.process.kill()
                self.process.join()
        for path in (self.path, self.path.with_name(self.path.name + ".tmp")):
            path.unlink(missing_ok=True)


@contextlib.contextmanager
def in_background(job: ReferenceJob | None, folder: Path):
    """:class:`BackgroundReference` of ``job`` for the ``with`` block, stopped at its end; None without a job."""
    if job is None:
        yield None
        return
    reference = BackgroundReference(job, folder)
    try:
        yield reference
    finally:
        reference.close()
