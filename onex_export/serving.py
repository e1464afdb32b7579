"""``onex-export serve``: a build folder behind a real Triton Inference Server, through PyTriton.

Model ``onex`` (one instance; Triton's dynamic batcher groups concurrent requests up to the build's largest
batch, waiting at most ``max_queue_delay_us`` for company). Per row of a request:

inputs   ``prompt`` BYTES (1,) UTF-8; optional ``seed`` INT64 (1,) (absent: a random one, returned),
         ``images_per_prompt`` INT64 (1,) and ``resolution`` INT64 (1,) (absent: 1 and the build's optimum;
         one value for all rows of a request, since a response's arrays have one shape)
outputs  ``image`` UINT8 (images_per_prompt, H, W, 3), ``seed`` INT64 (1,), and the seconds of the batch the
         row ran in, per stage, in milliseconds: ``tokenize_ms``, ``text_ms``, ``transformer_ms``, ``vae_ms``
         FP32 (1,)

A row's images are exactly the in-process :class:`~onex_export.runtime.pipeline.BuildPipeline`'s for the same
prompt and seed, whatever it was batched with. Triton itself refuses a missing input, a wrong dtype and a
batch over the build's largest; the model refuses what Triton cannot see (a resolution or an image count the
build cannot run, text that is not UTF-8). PyTriton answers a failed call with one error for all the requests
Triton batched into it, so the error names the request at fault.
"""
from __future__ import annotations

import contextlib
import logging
import os
import secrets
import signal
import socket
import sysconfig
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from .errors import OnexError, UsageError
from .runtime.pipeline import BACKENDS, BuildPipeline, ReferenceGraphs, Request

MODEL_NAME = "onex"
STAGES = ("tokenize", "text", "transformer", "vae")
EXIT_TIMEOUT = 3  # seconds Triton waits at exit, after the drain


class BadRequest(ValueError):
    """A request the build cannot serve; its message goes back to the client.

    PyTriton sends a failed call's formatted traceback as the error text. A client's mistake is no bug of the
    server, so this exception shows no traceback: the client reads ``BadRequest: <what was wrong>``.
    """

    @property
    def __traceback__(self):
        return None

    @__traceback__.setter
    def __traceback__(self, _tb):
        pass


@dataclass(frozen=True)
class ServeConfig:
    """What ``onex-export serve`` starts: ``build`` on ``backend`` / ``device``, Triton on three ports."""

    build: Path
    backend: str = "onnxruntime"
    device: str = "cpu"
    cuda_graph: bool = False
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    max_queue_delay_us: int = 2000  # how long a request may wait for others to batch with
    max_queue_size: int = 256  # requests waiting beyond this are refused at once, not queued without bound
    drain_seconds: float = 60.0  # on SIGTERM, how long in-flight requests may take before the server stops
    # the token Triton's management endpoints (statistics, model repository, logging, trace, shared memory) ask
    # for in a `triton-access-token` header; None: a random one, so that they stay closed (inference, health,
    # metadata and model configuration are open to all, as PyTriton leaves them)
    access_token: str | None = field(default=None, repr=False)
    # the torch backend's graphs, handed in by the caller that has the checks (the CLI): the server itself imports
    # only the runtime
    reference: ReferenceGraphs | None = field(default=None, repr=False)
    # a folder for Triton's model store and sockets, which the caller removes (the CLI's guardian, even after a
    # kill -9); None: PyTriton's own under ~/.cache/pytriton, removed only by a clean stop
    workspace: Path | None = None

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise UsageError(f"unknown backend {self.backend!r}", f"choose one of {', '.join(BACKENDS)}")
        ports = (self.http_port, self.grpc_port, self.metrics_port)
        if not all(1 <= p <= 65535 for p in ports):
            raise UsageError(f"ports must be 1-65535, got {ports}")
        if len(set(ports)) != 3:
            raise UsageError(f"the HTTP, gRPC and metrics ports must differ, got {ports}",
                             "pass distinct --http-port, --grpc-port and --metrics-port")
        if not 0 <= self.max_queue_delay_us <= 10_000_000:
            raise UsageError(f"the queue delay must be 0-10000000 us, got {self.max_queue_delay_us}")
        if self.max_queue_size < 1:
            raise UsageError(f"the queue size must be at least 1, got {self.max_queue_size}")
        if self.drain_seconds < 0:
            raise UsageError(f"the drain time must be 0 or more seconds, got {self.drain_seconds}")


def _column(request, name: str, dtype, rows: int) -> np.ndarray | None:
    """Input ``name`` of a request as a (rows,) array, or None when the client left it out."""
    if name not in request:
        return None
    array = np.asarray(request[name])
    if array.shape != (rows, 1):
        raise BadRequest(f"input {name!r} has shape {list(array.shape)}; it needs [{rows}, 1] (one value per prompt)")
    return array[:, 0].astype(dtype) if dtype is not None else array[:, 0]


def _one(values: np.ndarray | None, name: str) -> int | None:
    if values is None:
        return None
    if len(set(values.tolist())) > 1:
        raise BadRequest(f"{name} differs between the rows of one request ({sorted(set(values.tolist()))}); a "
                         "response's images have one shape: send one request per value")
    return int(values[0])


class OnexModel:
    """The inference callable: a batch of Triton requests -> one response each, through ``pipeline``."""

    def __init__(self, pipeline: BuildPipeline):
        self.pipeline = pipeline
        self._busy = threading.Condition()
        self._in_flight = 0
        self.images = 0  # served so far
        self.closing = False  # set by close(): calls are refused

    def parse(self, request) -> list[Request]:
        """One request's rows as pipeline requests (one per prompt, each with its seed); raises BadRequest."""
        if "prompt" not in request:
            raise BadRequest("input 'prompt' is missing")
        rows = np.asarray(request["prompt"]).shape[0]
        prompts = []
        for i, raw in enumerate(_column(request, "prompt", None, rows)):
            try:
                prompts.append(raw.decode("utf-8") if isinstance(raw, bytes) else str(raw))
            except UnicodeDecodeError as exc:
                raise BadRequest(f"prompt {i} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
        seeds = _column(request, "seed", np.int64, rows)
        if seeds is None:  # a fresh seed per row; the response carries it so the image can be made again
            seeds = np.array([secrets.randbits(63) for _ in range(rows)], dtype=np.int64)
        per_prompt = _one(_column(request, "images_per_prompt", np.int64, rows), "images_per_prompt")
        per_prompt = 1 if per_prompt is None else per_prompt
        resolution = _one(_column(request, "resolution", np.int64, rows), "resolution")
        out = [Request((p,), int(s), per_prompt, resolution) for p, s in zip(prompts, seeds)]
        try:
            self.pipeline.check_request(out[0])
        except UsageError as exc:
            raise BadRequest(exc.message) from None  # no chained traceback for the client either
        return out

    def __call__(self, requests: list) -> list[dict[str, np.ndarray]]:
        if self.closing:
            raise BadRequest("the server is stopping: send the request again (to another replica)")
        with self._counted():
            parsed, problems = [], []
            for i, request in enumerate(requests):
                try:
                    parsed.append(self.parse(request))
                except BadRequest as exc:
                    problems.append(f"request {i + 1} of the {len(requests)} batched together: {exc}"
                                    if len(requests) > 1 else str(exc))
            if problems:
                raise BadRequest("; ".join(problems))
            flat = [row for rows in parsed for row in rows]
            generations = iter(self.pipeline.generate_batch(flat))
            responses = []
            for rows in parsed:
                done = [next(generations) for _ in rows]
                responses.append({
                    "image": np.stack([g.pixels() for g in done]),
                    "seed": np.array([[r.seed] for r in rows], dtype=np.int64),
                    **{f"{s}_ms": np.array([[g.seconds[s] * 1000] for g in done], dtype=np.float32) for s in STAGES},
                })
            self.images += sum(r.rows for r in flat)
            return responses

    @contextlib.contextmanager
    def _counted(self):
        with self._busy:
            self._in_flight += 1
        try:
            yield
        finally:
            with self._busy:
                self._in_flight -= 1
                self._busy.notify_all()

    def close(self, timeout: float) -> bool:
        """Refuse further calls and wait up to ``timeout`` seconds for the running one; True when none runs."""
        self.closing = True
        with self._busy:
            return self._busy.wait_for(lambda: not self._in_flight, timeout=timeout)

    def drain(self, quiet: float, timeout: float) -> bool:
        """Wait until no call has run for ``quiet`` seconds (requests still in Triton's queue arrive within its
        delay) or ``timeout`` passes; True when drained. Triton keeps admitting requests meanwhile, so under steady
        load this runs to ``timeout``: a balancer should stop sending once its replica is told to stop."""
        deadline = time.monotonic() + timeout
        with self._busy:
            while True:
                while self._in_flight:
                    if not self._busy.wait(timeout=max(0.0, deadline - time.monotonic())):
                        return False
                left = deadline - time.monotonic()
                if not self._busy.wait(timeout=max(0.0, min(quiet, left))) and not self._in_flight:
                    return True
                if time.monotonic() >= deadline:
                    return not self._in_flight


def _check_port_free(port: int, what: str) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as Triton binds: TIME_WAIT leftovers are free
        try:
            s.bind(("0.0.0.0", port))
        except OSError as exc:
            raise UsageError(f"the {what} port {port} is in use ({exc.strerror})",
                             f"stop what listens there, or pass another --{what.lower()}-port") from exc


def _python_libdir_first() -> None:
    """Triton's Python-backend stub links ``libpython3.x.so``; the one that matches this interpreter is the one
    in its own LIBDIR (another build of the same version fails inside the stub), so that goes first."""
    libdir = sysconfig.get_config_var("LIBDIR")
    if libdir:
        rest = [p for p in os.environ.get("LD_LIBRARY_PATH", "").split(os.pathsep) if p and p != libdir]
        os.environ["LD_LIBRARY_PATH"] = os.pathsep.join([libdir, *rest])


def _bind(triton, model: OnexModel, config: ServeConfig, max_batch: int) -> None:
    from pytriton.model_config import DynamicBatcher, ModelConfig, QueuePolicy, Tensor

    inputs = [Tensor(name="prompt", dtype=bytes, shape=(1,)),
              *(Tensor(name=n, dtype=np.int64, shape=(1,), optional=True)
                for n in ("seed", "images_per_prompt", "resolution"))]
    outputs = [Tensor(name="image", dtype=np.uint8, shape=(-1, -1, -1, 3)), Tensor(name="seed", dtype=np.int64, shape=(1,)),
               *(Tensor(name=f"{s}_ms", dtype=np.float32, shape=(1,)) for s in STAGES)]
    batcher = DynamicBatcher(max_queue_delay_microseconds=config.max_queue_delay_us,
                             default_queue_policy=QueuePolicy(max_queue_size=config.max_queue_size))
    triton.bind(model_name=MODEL_NAME, infer_func=model, inputs=inputs, outputs=outputs,
                config=ModelConfig(max_batch_size=max_batch, batcher=batcher), strict=True)


def serve(config: ServeConfig, log: Callable[[str], None] = print, stop: threading.Event | None = None) -> int:
    """Load and warm up the build, start Triton, serve until ``stop`` is set (SIGTERM or SIGINT set it when this
    runs in the main thread), let in-flight requests finish, stop. Returns the number of images served."""
    from pytriton.triton import Triton, TritonConfig, TritonSecurityConfig

    for port, what in ((config.http_port, "HTTP"), (config.grpc_port, "gRPC"), (config.metrics_port, "metrics")):
        _check_port_free(port, what)
    start = time.perf_counter()
    # ONNX Runtime's spinning threads would take the CPU that Triton and its proxy need between runs: on 2 cores,
    # tiny-sd3 served 7.7 images/s with spinning and 21 without (in-process alone: 45 and 33)
    pipeline = BuildPipeline(config.build, config.backend, config.device, cuda_graph=config.cuda_graph, spin=False,
                             reference=config.reference)
    log(f"loaded    {config.build} ({config.backend} on {config.device}) in {time.perf_counter() - start:.1f} s")
    log(f"warm-up   {pipeline.warm_up():.1f} s (the server reports ready only after it)")
    stop = stop or threading.Event()
    previous = {}

    def graceful(*_):  # the first SIGTERM or Ctrl-C drains; a second one stops at once (exit 143 / 130)
        stop.set()
        for sig, handler in previous.items():
            signal.signal(sig, handler)

    model = OnexModel(pipeline)
    _python_libdir_first()
    logging.getLogger("pytriton").setLevel(logging.WARNING)
    triton_config = TritonConfig(http_port=config.http_port, grpc_port=config.grpc_port,
                                 metrics_port=config.metrics_port, log_verbose=0,
                                 # by the time Triton is told to exit, the drain below has let the requests
                                 # finish; what Triton would still wait for is clients' idle keep-alive
                                 # connections (up to 30 s by default)
                                 exit_timeout_secs=EXIT_TIMEOUT)
    try:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                if signal.getsignal(sig) is not signal.SIG_IGN:  # nohup, a shell's background job: left ignored
                    previous[sig] = signal.signal(sig, graceful)
        security = TritonSecurityConfig(access_token=config.access_token)
        workspace = config.workspace / "triton" if config.workspace else None  # PyTriton makes it: it must not exist
        with Triton(config=triton_config, security_config=security, workspace=workspace) as triton:
            _bind(triton, model, config, pipeline.manifest.shapes.ranges.batch.max)
            triton.run()
            log(f"ready     model {MODEL_NAME!r}: HTTP :{config.http_port}, gRPC :{config.grpc_port}, "
                f"metrics :{config.metrics_port} ({time.perf_counter() - start:.1f} s after start); "
                "SIGTERM or Ctrl-C stops it")
            try:
                while not stop.wait(timeout=1.0):
                    if not triton.is_alive():
                        raise OnexError("the Triton Inference Server stopped on its own", "see its log lines above")
                log("stopping  finishing the requests in flight")
                quiet = 2 * config.max_queue_delay_us / 1e6 + 0.2
                if not model.drain(quiet, config.drain_seconds):
                    log(f"stopping  requests still running after {config.drain_seconds:.0f} s are cut off")
            except KeyboardInterrupt:  # a second signal: refuse the queue, but let the batch that runs end, for
                model.close(timeout=30)  # a native run cut off by the interpreter's exit aborts the process
                raise
        log(f"stopped   after {model.images} image(s)")
        return model.images
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
