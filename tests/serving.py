"""What the serve tests share: `onex-export serve` in a process of its own on free loopback ports, one request
through tritonclient, and a flood of concurrent ones."""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from bench.serve import free_ports
from onex_export.build import BuildConfig, build
from onex_export.config import SkipRange
from onex_export.export.shapes import DimRange

tritonclient_http = pytest.importorskip("tritonclient.http")
tritonclient_grpc = pytest.importorskip("tritonclient.grpc")

PROMPTS = ["a red cube", "a blue ball on grass", "x", "", "a city at night, rain"]
START_TIMEOUT = 120  # seconds for the server to report ready (about 10 s here)


def tiny_build(out):
    """tiny-sd3 (random weights, 128 px, batch 1-4), ONNX only: the build every serve test serves."""
    build(BuildConfig(model="tiny-sd3", skip=SkipRange(3, 10), out=out, trt="none", batch=DimRange(1, 1, 4)))
    return out


class Server:
    """`onex-export serve` in its own process; its output goes to a file the test reads."""

    def __init__(self, build_dir, tmp_path, *extra: str, env: dict[str, str] | None = None):
        self.http, self.grpc, self.metrics = free_ports(3)
        self.log = tmp_path / "serve.log"
        args = [sys.executable, "-m", "onex_export.cli", "serve", "--build", str(build_dir), "--http-port", str(self.http),
                "--grpc-port", str(self.grpc), "--metrics-port", str(self.metrics), *extra]
        with open(self.log, "w") as out:
            # a session of its own, so that a failed test can take down tritonserver and its stubs with it
            self.process = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                            env={**os.environ, **(env or {})})

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while "ready     model 'onex'" not in self.output():
            assert self.process.poll() is None, f"the server exited {self.process.returncode}:\n{self.output()[-3000:]}"
            assert time.monotonic() < deadline, f"not ready after {START_TIMEOUT} s:\n{self.output()[-3000:]}"
            time.sleep(0.2)

    def client(self):
        return tritonclient_http.InferenceServerClient(f"127.0.0.1:{self.http}", network_timeout=120)

    def grpc_client(self):
        return tritonclient_grpc.InferenceServerClient(f"127.0.0.1:{self.grpc}")

    def stop(self, sig=signal.SIGTERM, timeout: float = 90) -> int:
        self.process.send_signal(sig)
        return self.process.wait(timeout=timeout)

    def kill(self) -> None:
        """Whatever is left of the server's session (a test that passed has stopped it already)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=30)


def infer(client, prompts, seed=None, images_per_prompt=None, resolution=None, seed_dtype=np.int64):
    """One request through ``client`` (tritonclient's HTTP or gRPC); ``prompts`` str or raw bytes, or None to leave
    the input out. Returns the response (tritonclient raises InferenceServerException on an error)."""
    module = tritonclient_grpc if isinstance(client, tritonclient_grpc.InferenceServerClient) else tritonclient_http
    inputs = []
    for name, values, dtype in (("prompt", prompts, object), ("seed", seed, seed_dtype),
                                ("images_per_prompt", images_per_prompt, np.int64), ("resolution", resolution, np.int64)):
        if values is not None:
            array = np.array([[v.encode() if isinstance(v, str) else v] for v in values], dtype=dtype)
            kind = {object: "BYTES", np.int64: "INT64", np.int32: "INT32"}[dtype]
            inputs.append(module.InferInput(name, list(array.shape), kind))
            inputs[-1].set_data_from_numpy(array)
    if prompts is None:  # a request needs some input: the seed stands in
        inputs.append(module.InferInput("seed", [1, 1], "INT64"))
        inputs[-1].set_data_from_numpy(np.array([[1]], dtype=np.int64))
    return client.infer("onex", inputs)


@contextlib.contextmanager
def flooded(server, count: int, rows: int):
    """``count`` requests of ``rows`` prompts sent at once from as many threads; yields their futures (image,
    time done) 0.3 s after the last was sent (loopback: each arrives in well under a millisecond)."""
    clients = [server.client() for _ in range(count)]
    all_sending = threading.Barrier(count + 1)

    def request(k):
        all_sending.wait(timeout=30)
        seeds = [k * rows + j for j in range(rows)]
        return infer(clients[k], PROMPTS[:rows], seeds).as_numpy("image"), time.monotonic()

    with ThreadPoolExecutor(count) as pool:
        futures = [pool.submit(request, k) for k in range(count)]
        all_sending.wait(timeout=30)
        time.sleep(0.3)
        yield futures
