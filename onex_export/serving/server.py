"""``onex-export serve``: a build folder behind a real Triton Inference Server, through PyTriton.

Model ``onex`` (one instance; Triton's dynamic batcher groups concurrent requests up to the build's largest
batch, waiting at most ``max_queue_delay_us`` for company). Per row of a request:

inputs   ``prompt`` BYTES (1,) UTF-8; optional ``seed`` INT64 (1,) (absent: a random one, returned),
         ``images_per_prompt`` INT64 (1,) and ``resolution`` INT64 (1,) (absent: 1 and the build's optimum;
         one value for all rows of a request, since a response's arrays have one shape)
outputs  ``image`` UINT8 (images_per_prompt, H, W, 3), ``seed`` INT64 (1,), ``truncated`` BYTES (1,) (what the
         text encoders cut from the prompt; empty when it fit), and the seconds of the batch the row ran in,
         per stage, in milliseconds: ``tokenize_ms``, ``text_ms``, ``transformer_ms``, ``vae_ms`` FP32 (1,)

A row's images are exactly the in-process :class:`~onex_export.runtime.pipeline.BuildPipeline`'s for the same
prompt and seed, whatever it was batched with. Triton itself refuses a wrong dtype and a batch over the build's
largest; the model checks each request on its own (:mod:`.handler`) and refuses a bad one alone, as
INVALID_ARG (HTTP 400). Triton listens on loopback unless ``host`` says otherwise.
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

from ..errors import OnexError, UsageError
from ..runtime.pipeline import BACKENDS, BuildPipeline, ReferenceGraphs
from .handler import ERROR_OUTPUT, STAGES, OnexModel, PromptLimits

MODEL_NAME = "onex"
EXIT_TIMEOUT = 6  # seconds Triton waits at exit for open HTTP connections (idle keep-alive ones too) and for
# the model to unload (2.0-2.6 s here), after the drain
LOOPBACK = "127.0.0.1"


@dataclass(frozen=True)
class ServeConfig:
    """What ``onex-export serve`` starts: ``build`` on ``backend`` / ``device``, Triton on three ports of ``host``
    (loopback unless exposed on purpose: inference needs no token)."""

    build: Path
    backend: str = "onnxruntime"
    device: str = "cpu"
    cuda_graph: bool = False
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    host: str = LOOPBACK  # the address Triton's HTTP, gRPC and metrics endpoints listen on; 0.0.0.0: all
    max_prompt_chars: int = 2000  # longer prompts are refused (the encoders keep 77 + 256 tokens anyway)
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

    @property
    def local_host(self) -> str:
        """The address this process reaches Triton on (its own metrics and management calls)."""
        return LOOPBACK if self.host == "0.0.0.0" else self.host

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise UsageError(f"unknown backend {self.backend!r}", f"choose one of {', '.join(BACKENDS)}")
        ports = (self.http_port, self.grpc_port, self.metrics_port)
        try:
            socket.inet_aton(self.host)
        except OSError:
            raise UsageError(f"the address to listen on must be an IPv4 address, not {self.host!r}",
                             "pass --host 127.0.0.1 (this machine only) or --host 0.0.0.0 (all interfaces)") from None
        PromptLimits(self.max_prompt_chars)  # checks it
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


def _check_port_free(host: str, port: int, what: str) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as Triton binds: TIME_WAIT leftovers are free
        try:
            s.bind((host, port))
        except OSError as exc:
            raise UsageError(f"the {what} port {port} is in use ({exc.strerror})",
                             f"stop what listens there, or pass another --{what.lower()}-port") from exc


def _pending_requests(config: ServeConfig) -> Callable[[], int | None]:
    """Reads Triton's gauge of requests waiting in model ``onex``'s queue (None when the metrics cannot be read)."""
    import urllib.request

    url = f"http://{config.local_host}:{config.metrics_port}/metrics"
    prefix = f'nv_inference_pending_request_count{{model="{MODEL_NAME}"'

    def pending() -> int | None:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                text = response.read().decode()
        except OSError:
            return None
        counts = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(prefix)]
        return int(sum(counts)) if counts else None

    return pending


def _stop_triton(config: ServeConfig, token: str) -> None:
    """Tell Triton to exit (SIGINT), unloading model ``onex`` right after when an HTTP client is connected.

    What Triton 2.51 does at exit, measured here: it waits for every open HTTP connection (an idle keep-alive
    client's too: a balancer's, a test's) for its whole exit timeout, then for the requests in flight, and only
    then unloads the models; with no time left the unload fails the stop ("failed to stop server", the stub
    killed, PyTriton's shared memory left to the resource tracker). Meanwhile new requests are answered
    UNAVAILABLE ("Server is stopping"). So with no HTTP connection open the signal alone stops cleanly; with one,
    the model is unloaded during that wait (over gRPC, with the management token), which keeps the stop clean but
    answers a request sent during the unload (2-2.6 s here) NOT_FOUND: after the drain a balancer should have
    stopped sending. PyTriton's own stop comes after (a second SIGINT changes nothing) and waits for the exit."""
    import tritonclient.grpc
    from tritonclient.utils import InferenceServerException

    servers = [pid for pid in _children() if _command(pid) == "tritonserver"]
    if len(servers) != 1:
        return  # not ours to find (PyTriton started it some other way): its own stop still stops it
    os.kill(servers[0], signal.SIGINT)
    if not _connections(config.http_port):
        return
    with contextlib.closing(tritonclient.grpc.InferenceServerClient(f"{config.local_host}:{config.grpc_port}")) as client, \
            contextlib.suppress(InferenceServerException):  # refused when Triton is past that point: it unloads
        client.unload_model(MODEL_NAME, headers={"triton-grpc-protocol-triton-access-token": token})


def _connections(port: int) -> int:
    """Established TCP connections to local ``port`` (IPv4 and IPv6, from /proc/net)."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                local, _, state = line.split()[1:4]
                count += int(local.rsplit(":", 1)[1], 16) == port and state == "01"
    return count


def _children() -> list[int]:
    pids = []
    for task in Path(f"/proc/{os.getpid()}/task").iterdir():
        with contextlib.suppress(OSError):
            pids += [int(p) for p in (task / "children").read_text().split()]
    return pids


def _command(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def drain(model: OnexModel, pending: Callable[[], int | None], timeout: float, quiet: float,
          poll: float = 0.05) -> bool:
    """Wait until Triton's queue is empty and no call runs, twice in a row ``poll`` seconds apart (a request
    leaving the queue reaches the model within milliseconds), or ``timeout`` passes; True when drained. Without
    Triton's metrics, "empty" is no call for ``quiet`` seconds.

    Triton keeps admitting requests meanwhile, so under steady load this runs to ``timeout``: a balancer should
    stop sending once its replica is told to stop. Whatever comes after is refused as UNAVAILABLE."""
    deadline = time.monotonic() + timeout
    calm = 0
    while time.monotonic() < deadline:
        waiting = pending()
        since = time.monotonic() - model.last_call
        idle = not model.in_flight and since > (quiet if waiting is None else poll)
        calm = calm + 1 if idle and not waiting else 0
        if calm >= 2:
            return True
        time.sleep(poll)
    return False


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
               Tensor(name="truncated", dtype=bytes, shape=(1,)),
               *(Tensor(name=f"{s}_ms", dtype=np.float32, shape=(1,)) for s in STAGES),
               Tensor(name=ERROR_OUTPUT, dtype=bytes, shape=(1,))]  # turned into an error by triton_model.py
    batcher = DynamicBatcher(max_queue_delay_microseconds=config.max_queue_delay_us,
                             default_queue_policy=QueuePolicy(max_queue_size=config.max_queue_size))
    triton.bind(model_name=MODEL_NAME, infer_func=model, inputs=inputs, outputs=outputs,
                config=ModelConfig(max_batch_size=max_batch, batcher=batcher), strict=True)
    install_triton_model(triton)


def install_triton_model(triton) -> None:
    """Ship :mod:`.triton_model` as the bound model's ``model.py`` (PyTriton's proxy model beside it), so that a
    refusal reaches its client as a Triton error with its status (INVALID_ARG: HTTP 400). PyTriton 0.7 sends the
    model's files with the load call; this wraps the one method that lists them."""
    ours = (Path(__file__).parent / "triton_model.py").read_bytes()
    models = getattr(getattr(triton, "_model_manager", None), "models", None)
    if not models:
        raise RuntimeError("cannot reach PyTriton's bound models to install onex's model file: this needs "
                           "nvidia-pytriton 0.7.0 (constraints.txt)")
    for bound in models:
        listed = bound.get_proxy_model_files

        def files(listed=listed, version=bound.model_version):
            found = dict(listed())
            proxy = found.pop(f"file:{version}/model.py", None)
            if proxy is None:
                raise RuntimeError("PyTriton's proxy model.py is not among the files it loads: this needs "
                                   "nvidia-pytriton 0.7.0 (constraints.txt)")
            return {**found, f"file:{version}/pytriton_model.py": proxy, f"file:{version}/model.py": ours}

        bound.get_proxy_model_files = files


def serve(config: ServeConfig, log: Callable[[str], None] = print, stop: threading.Event | None = None) -> int:
    """Load and warm up the build, start Triton, serve until ``stop`` is set (SIGTERM or SIGINT set it when this
    runs in the main thread), let in-flight requests finish, stop. Returns the number of images served."""
    from pytriton.triton import Triton, TritonConfig, TritonSecurityConfig

    for port, what in ((config.http_port, "HTTP"), (config.grpc_port, "gRPC"), (config.metrics_port, "metrics")):
        _check_port_free(config.host, port, what)
    start = time.perf_counter()
    # ONNX Runtime's threads do not spin (BuildPipeline's default): spinning ones would also take the CPU that Triton
    # and its proxy need between runs (tiny-sd3 on 2 cores: 7.7 images/s served with spinning, 21 without)
    pipeline = BuildPipeline(config.build, config.backend, config.device, cuda_graph=config.cuda_graph,
                             reference=config.reference)
    log(f"loaded    {config.build} ({config.backend} on {config.device}) in {time.perf_counter() - start:.1f} s")
    log(f"warm-up   {pipeline.warm_up():.1f} s (the server reports ready only after it)")
    stop = stop or threading.Event()
    previous = {}

    def graceful(*_):  # the first SIGTERM or Ctrl-C drains; a second one stops at once (exit 143 / 130)
        stop.set()
        for sig, handler in previous.items():
            signal.signal(sig, handler)

    model = OnexModel(pipeline, PromptLimits(config.max_prompt_chars))
    _python_libdir_first()
    logging.getLogger("pytriton").setLevel(logging.WARNING)
    triton_config = TritonConfig(http_address=config.host, http_port=config.http_port, grpc_address=config.host,
                                 grpc_port=config.grpc_port, metrics_address=config.host,
                                 metrics_port=config.metrics_port, log_verbose=0,
                                 # by the time Triton is told to exit, the drain below has let the requests
                                 # finish (EXIT_TIMEOUT and _stop_triton say what it still waits for)
                                 exit_timeout_secs=EXIT_TIMEOUT)
    try:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                if signal.getsignal(sig) is not signal.SIG_IGN:  # nohup, a shell's background job: left ignored
                    previous[sig] = signal.signal(sig, graceful)
        token = config.access_token or secrets.token_urlsafe(32)  # ours to unload the model with, at the stop
        security = TritonSecurityConfig(access_token=token)
        workspace = config.workspace / "triton" if config.workspace else None  # PyTriton makes it: it must not exist
        triton = Triton(config=triton_config, security_config=security, workspace=workspace)
        _bind(triton, model, config, pipeline.manifest.shapes.ranges.batch.max)  # before the start loads it
        with triton:
            triton.run()
            log(f"ready     model {MODEL_NAME!r}: HTTP {config.host}:{config.http_port}, gRPC {config.host}:"
                f"{config.grpc_port}, metrics {config.host}:{config.metrics_port} "
                f"({time.perf_counter() - start:.1f} s after start); SIGTERM or Ctrl-C stops it")
            try:
                while not stop.wait(timeout=1.0):
                    if not triton.is_alive():
                        raise OnexError("the Triton Inference Server stopped on its own", "see its log lines above")
                log("stopping  finishing the requests in flight and in Triton's queue")
                pending = _pending_requests(config)
                quiet = 2 * config.max_queue_delay_us / 1e6 + 0.2
                if not drain(model, pending, config.drain_seconds, quiet):
                    log(f"stopping  after {config.drain_seconds:.0f} s: {pending() or 0} request(s) still queued "
                        "are refused (UNAVAILABLE)")
                model.close(timeout=30)  # from here on every call is refused as UNAVAILABLE
                _stop_triton(config, token)
            except KeyboardInterrupt:  # a second signal: refuse the queue, but let the batch that runs end, for
                model.close(timeout=30)  # a native run cut off by the interpreter's exit aborts the process
                _stop_triton(config, token)
                raise
        log(f"stopped   after {model.images} image(s)"
            + (f"; {model.refused} request(s) refused while stopping" if model.refused else ""))
        return model.images
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
