"""`onex-export serve`: a real Triton Inference Server (PyTriton) in a real process, on loopback ports.

The load test sends 8 concurrent clients x 10 requests through tritonclient and compares every image with the
in-process pipeline's for the same prompt and seed; bad requests must get errors naming the problem while the
server keeps serving; SIGTERM must let queued requests finish and exit 0.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from bench.serve import free_ports
from onex_export.config import SkipRange
from onex_export.contract import Range
from onex_export.errors import UsageError
from onex_export.build import BuildConfig, build
from onex_export.export.shapes import DimRange
from onex_export.runtime.pipeline import BuildPipeline, Request
from onex_export.serving import BadRequest, OnexModel, ServeConfig

tritonclient_http = pytest.importorskip("tritonclient.http")

PROMPTS = ["a red cube", "a blue ball on grass", "x", "", "a city at night, rain"]
START_TIMEOUT = 120  # seconds for the server to report ready (about 10 s here)


@pytest.fixture(scope="module")
def build_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("serve") / "tiny"
    build(BuildConfig(model="tiny-sd3", skip=SkipRange(3, 10), out=out, trt="none", batch=DimRange(1, 1, 4)))
    return out


@pytest.fixture(scope="module")
def pipeline(build_dir):
    return BuildPipeline(build_dir)


class Server:
    """`onex-export serve` in its own process; its output goes to a file the test reads."""

    def __init__(self, build_dir, tmp_path, *extra: str):
        self.http, self.grpc, self.metrics = free_ports(3)
        self.log = tmp_path / "serve.log"
        args = [sys.executable, "-m", "onex_export.cli", "serve", "--build", str(build_dir), "--http-port", str(self.http),
                "--grpc-port", str(self.grpc), "--metrics-port", str(self.metrics), *extra]
        with open(self.log, "w") as out:
            # a session of its own, so that a failed test can take down tritonserver and its stubs with it
            self.process = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)

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

    def stop(self, sig=signal.SIGTERM, timeout: float = 90) -> int:
        self.process.send_signal(sig)
        return self.process.wait(timeout=timeout)

    def kill(self) -> None:
        """Whatever is left of the server's session (a test that passed has stopped it already)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=30)


def infer(client, prompts, seed=None, images_per_prompt=None, resolution=None, seed_dtype=np.int64):
    """One request; returns the response (tritonclient raises InferenceServerException on an error)."""
    text = np.array([[p.encode()] for p in prompts], dtype=object)
    inputs = [tritonclient_http.InferInput("prompt", list(text.shape), "BYTES")]
    inputs[0].set_data_from_numpy(text)
    for name, values, dtype in (("seed", seed, seed_dtype), ("images_per_prompt", images_per_prompt, np.int64),
                                ("resolution", resolution, np.int64)):
        if values is not None:
            array = np.array([[v] for v in values], dtype=dtype)
            tensor = tritonclient_http.InferInput(name, list(array.shape), "INT64" if dtype == np.int64 else "INT32")
            tensor.set_data_from_numpy(array)
            inputs.append(tensor)
    return client.infer("onex", inputs)


@pytest.fixture(scope="module")
def server(build_dir, tmp_path_factory):
    s = Server(build_dir, tmp_path_factory.mktemp("server"), "--max-queue-delay-us", "20000")
    try:
        s.wait_ready()
        yield s
    finally:
        s.kill()


def test_load_8_clients_x_10_requests_give_the_in_process_images(server, pipeline):
    """Requests of 1-2 prompts x 1-2 images each, from 8 threads with their own clients; every row's images must
    equal the in-process pipeline's for its prompt and seed, bit for bit (same graphs, same ONNX Runtime)."""
    def client_run(k):
        client, out = server.client(), []
        for i in range(10):
            rows = 1 + (k + i) % 2
            prompts = [PROMPTS[(k * 10 + i + j) % len(PROMPTS)] for j in range(rows)]
            seeds = [1000 * k + 10 * i + j for j in range(rows)]
            per_prompt = 1 + (i % 3 == 0)
            response = infer(client, prompts, seeds, [per_prompt] * rows)
            out.append((prompts, seeds, per_prompt, response.as_numpy("image"), response.as_numpy("seed"),
                        response.as_numpy("transformer_ms")))
        return out

    start = time.perf_counter()
    with ThreadPoolExecutor(8) as pool:
        results = [r for rs in pool.map(client_run, range(8)) for r in rs]
    seconds = time.perf_counter() - start
    assert len(results) == 80
    rows = [(p, s, n, image[j], seed[j, 0], ms[j, 0]) for prompts, seeds, n, image, seed, ms in results
            for j, (p, s) in enumerate(zip(prompts, seeds))]
    expected = pipeline.generate_batch([Request((p,), s, n) for p, s, n, *_ in rows])
    for (prompt, seed, n, image, returned_seed, ms), want in zip(rows, expected):
        assert returned_seed == seed
        assert image.shape == (n, 128, 128, 3) and image.dtype == np.uint8
        np.testing.assert_array_equal(image, want.pixels(), err_msg=f"{prompt!r} seed {seed}")
        assert 0 < ms < 60_000
    assert len({r[3].tobytes() for r in rows}) == len(rows)  # distinct seeds and prompts give distinct images
    assert server.client().is_server_ready()
    print(f"\n80 requests ({len(rows)} prompts) from 8 clients in {seconds:.1f} s")


def test_a_request_without_a_seed_gets_a_fresh_one_and_can_be_made_again(server, pipeline):
    client = server.client()
    first, second = infer(client, ["a red cube"]), infer(client, ["a red cube"])
    seeds = first.as_numpy("seed")[0, 0], second.as_numpy("seed")[0, 0]
    assert seeds[0] != seeds[1]
    again = infer(client, ["a red cube"], [int(seeds[0])])
    np.testing.assert_array_equal(again.as_numpy("image"), first.as_numpy("image"))
    np.testing.assert_array_equal(first.as_numpy("image")[0], pipeline.generate(["a red cube"], int(seeds[0])).pixels())


@pytest.mark.parametrize("case, message", [
    (dict(resolution=[64]), "resolution 64 is not one this build runs: a multiple of 16 in 128-128"),
    (dict(resolution=[136]), "resolution 136 is not one this build runs"),
    (dict(images_per_prompt=[9]), "9 images per call is outside this build's batch range 1-4"),
    (dict(resolution=[0]), "resolution 0 is not one this build runs"),
    (dict(images_per_prompt=[0]), "images_per_prompt must be at least 1, not 0"),
    (dict(prompts=["a"] * 5), "batch-size must be <= 4"),
    (dict(seed=[1], seed_dtype=np.int32), "data-type is 'INT32', but model 'onex' expects 'INT64'"),
    (dict(prompts=["a", "b"], images_per_prompt=[1, 2]), "images_per_prompt differs between the rows"),
])
def test_bad_requests_get_an_error_naming_the_problem_and_the_server_keeps_serving(server, case, message):
    client = server.client()
    case = {"prompts": ["a red cube"], **case}
    with pytest.raises(tritonclient_http.InferenceServerException) as info:
        infer(client, **case)
    assert message in str(info.value)
    assert infer(client, ["still serving"], [3]).as_numpy("image").shape == (1, 1, 128, 128, 3)


def test_a_request_without_a_prompt_is_refused_by_triton(server):
    seed = np.array([[1]], dtype=np.int64)
    tensor = tritonclient_http.InferInput("seed", [1, 1], "INT64")
    tensor.set_data_from_numpy(seed)
    with pytest.raises(tritonclient_http.InferenceServerException, match="prompt"):
        server.client().infer("onex", [tensor])
    assert server.client().is_model_ready("onex")


def test_model_config_batches_dynamically_up_to_the_builds_largest_batch(server):
    config = server.client().get_model_config("onex")
    assert config["max_batch_size"] == 4
    assert config["dynamic_batching"]["max_queue_delay_microseconds"] == 20000
    assert {i["name"]: i["data_type"] for i in config["input"]} == {
        "prompt": "TYPE_STRING", "seed": "TYPE_INT64", "images_per_prompt": "TYPE_INT64", "resolution": "TYPE_INT64"}
    assert {o["name"] for o in config["output"]} == {"image", "seed", "tokenize_ms", "text_ms", "transformer_ms",
                                                     "vae_ms"}


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


def test_sigterm_lets_queued_requests_finish_then_exits_0(build_dir, tmp_path):
    """16 requests of 2 prompts are sent at once; SIGTERM comes while most still wait in Triton's queue (a batch
    takes about 0.1 s here). All 16 must succeed, some after the signal, and the server must exit 0."""
    server = Server(build_dir, tmp_path)
    try:
        server.wait_ready()
        with flooded(server, 16, 2) as futures:
            signalled = time.monotonic()
            code = server.stop(signal.SIGTERM)
            stopped = time.monotonic()
            done = [f.result(timeout=60) for f in futures]  # the clients keep their connections open
        assert code == 0, server.output()[-3000:]
        assert all(image.shape == (2, 1, 128, 128, 3) for image, _ in done)
        assert sum(t > signalled for _, t in done) >= 1  # the drain was needed: work was left at the signal
        out = server.output()
        assert "stopping  finishing the requests in flight" in out and "PASSED serve: 32 image(s)" in out
        print(f"\nSIGTERM to exit 0: {stopped - signalled:.1f} s, {sum(t > signalled for _, t in done)} of 16 "
              "requests finished after the signal")
    finally:
        server.kill()


def test_a_second_sigterm_during_the_drain_stops_at_once_with_143(build_dir, tmp_path):
    """32 requests of 4 rows keep the drain busy for seconds (a call takes about 0.15 s here); a second SIGTERM
    0.5 s into it must stop the server without waiting, and say so."""
    server = Server(build_dir, tmp_path)
    try:
        server.wait_ready()
        with flooded(server, 32, 4) as futures:  # the requests cut off by the second signal fail: the point
            server.process.send_signal(signal.SIGTERM)
            time.sleep(0.5)
            start = time.monotonic()
            code = server.stop(signal.SIGTERM, timeout=60)
            seconds = time.monotonic() - start
        assert code == 143, server.output()[-3000:]
        assert sum(f.exception() is not None for f in futures) >= 1  # it did not wait for the queue to drain
        assert "interrupted (SIGTERM)" in server.output() and "PASSED serve" not in server.output()
        print(f"\nsecond SIGTERM to exit: {seconds:.1f} s")
    finally:
        server.kill()


def _server_pid(server) -> int:
    line = next(l for l in server.output().splitlines() if l.startswith("server    pid "))
    return int(line.split()[2])


def _group(pgid: int) -> list[str]:
    """Living processes of process group ``pgid`` (from /proc): what a server leaves behind."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                stat = open(f"/proc/{entry}/stat").read()
                state, _, pgrp = stat[stat.rindex(")") + 2:].split()[:3]
                if int(pgrp) == pgid and state != "Z":
                    found.append(stat[stat.index("(") + 1:stat.rindex(")")])
    return found


def _workspace(server) -> str:
    return next(l.split("|")[2].strip() for l in server.output().splitlines() if "model_repository_path[0]" in l)


def test_kill_9_of_the_server_with_requests_in_flight_leaves_nothing_running(build_dir, tmp_path):
    """What the OOM killer does. Before, Triton, its stub and two proxies kept running for 300 s and more and 18 of
    24 clients got no answer; now the guardian (the pid the user started) stops them, every client gets an answer
    or a closed connection, and the workspace is gone."""
    server = Server(build_dir, tmp_path)
    try:
        server.wait_ready()
        pid = _server_pid(server)
        assert "tritonserver" in _group(pid)  # what there is to leave behind
        workspace = _workspace(server)
        assert os.path.basename(os.path.dirname(os.path.dirname(workspace))).startswith("onex-serve-")
        with flooded(server, 24, 2) as futures:
            os.kill(pid, signal.SIGKILL)
            code = server.process.wait(timeout=60)
            outcomes = [f.exception(timeout=60) for f in futures]  # none hangs
        assert code == 137, server.output()[-3000:]
        assert f"the server (pid {pid}) was killed by SIGKILL: stopped the" in server.output()
        assert _group(pid) == [] and not os.path.exists(os.path.dirname(os.path.dirname(workspace)))
        failed = [e for e in outcomes if e is not None]
        assert failed and all("connection" in str(e).lower() or "closed" in str(e).lower() for e in failed), failed
        print(f"\nkill -9 with 24 requests in flight: {len(outcomes) - len(failed)} answered, {len(failed)} saw the "
              "connection close")
    finally:
        server.kill()


def test_kill_9_of_the_guardian_drains_and_stops_the_server(build_dir, tmp_path):
    server = Server(build_dir, tmp_path)
    try:
        server.wait_ready()
        pid = _server_pid(server)
        with flooded(server, 8, 2) as futures:
            server.process.kill()  # the guardian, as `kill -9` of the command the user started
            done = [f.result(timeout=60) for f in futures]  # the server drains: every request is answered
        deadline = time.monotonic() + 60
        while _group(pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _group(pid) == [], server.output()[-3000:]
        assert len(done) == 8 and "PASSED serve: 16 image(s)" in server.output()
    finally:
        server.kill()


def test_a_start_removes_the_workspaces_of_servers_killed_before_they_could(tmp_path):
    from onex_export.supervisor import PREFIX, stale_workspaces

    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = tmp_path / f"{PREFIX}{finished.stdout.strip()}-abc"
    alive = tmp_path / f"{PREFIX}{os.getpid()}-def"
    other = tmp_path / "onex-serve-notes"  # not ours by its name: left alone
    for folder in (dead, alive, other):
        folder.mkdir()
    assert stale_workspaces(tmp_path) == [dead]


def test_a_port_in_use_is_refused_before_loading(build_dir, tmp_path):
    with socket.socket() as busy:
        busy.bind(("0.0.0.0", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = subprocess.run([sys.executable, "-m", "onex_export.cli", "serve", "--build", str(build_dir),
                                 "--http-port", str(port)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert f"the HTTP port {port} is in use" in result.stderr and "Traceback" not in result.stderr


# --- the inference callable alone (no server): what it accepts and refuses ---

def test_each_row_is_one_request_with_its_own_seed(pipeline):
    model = OnexModel(pipeline)
    rows = model.parse({"prompt": np.array([[b"a"], [b"b"]], dtype=object), "seed": np.array([[5], [7]]),
                        "images_per_prompt": np.array([[2], [2]])})
    assert rows == [Request(("a",), 5, 2, None), Request(("b",), 7, 2, None)]
    [response] = model([{"prompt": np.array([[b"a"], [b"b"]], dtype=object), "seed": np.array([[5], [7]])}])
    assert response["image"].shape == (2, 1, 128, 128, 3)
    np.testing.assert_array_equal(response["image"][1], pipeline.generate(["b"], 7).pixels())


@pytest.mark.parametrize("request_, message", [
    ({"prompt": np.array([[b"\xff\xfe"]], dtype=object)}, "prompt 0 is not UTF-8 text"),
    ({"seed": np.array([[1]])}, "input 'prompt' is missing"),
    ({"prompt": np.array([[b"a"]], dtype=object), "seed": np.array([[1], [2]])}, "input 'seed' has shape [2, 1]"),
    ({"prompt": np.array([[b"a"]], dtype=object), "resolution": np.array([[4096]])}, "resolution 4096 is not one"),
])
def test_malformed_requests_raise_bad_request(pipeline, request_, message):
    with pytest.raises(BadRequest) as info:
        OnexModel(pipeline).parse(request_)
    # formatted as PyTriton formats a failed call for the client: the message alone, no stack and no chained cause
    text = "".join(traceback.format_exception(None, info.value, info.value.__traceback__))
    assert message in text and "Traceback" not in text and "cause" not in text


def test_a_bad_request_batched_with_good_ones_is_named(pipeline):
    good = {"prompt": np.array([[b"a"]], dtype=object)}
    bad = {"prompt": np.array([[b"a"]], dtype=object), "resolution": np.array([[64]])}
    with pytest.raises(BadRequest, match="request 2 of the 2 batched together: resolution 64"):
        OnexModel(pipeline)([good, bad])


@pytest.mark.parametrize("kwargs, message", [
    (dict(http_port=9000, grpc_port=9000), "ports must differ"),
    (dict(http_port=0), "ports must be 1-65535"),
    (dict(max_queue_delay_us=-1), "queue delay"),
    (dict(max_queue_size=0), "queue size"),
    (dict(backend="triton"), "unknown backend"),
])
def test_serve_config_refuses_bad_values(kwargs, message):
    with pytest.raises(UsageError, match=message):
        ServeConfig("somewhere", **kwargs)


def test_a_resolution_must_be_a_multiple_of_the_latent_patch_inside_the_range(build_dir):
    pipe = BuildPipeline(build_dir)
    shapes = pipe.manifest.shapes
    pipe.manifest = dataclasses.replace(pipe.manifest, shapes=dataclasses.replace(
        shapes, ranges=dataclasses.replace(shapes.ranges, resolution=Range(64, 128, 256))))
    assert pipe.check_request(Request(("a",), resolution=144)) == 144
    assert pipe.check_request(Request(("a",))) == 128  # the optimum when none is asked for
    for bad in (136, 48, 272):
        with pytest.raises(UsageError, match=f"resolution {bad} is not one this build runs: a multiple of 16 in 64-256"):
            pipe.check_request(Request(("a",), resolution=bad))


def test_a_closed_model_refuses_calls(pipeline):
    model = OnexModel(pipeline)
    assert model.close(timeout=1.0) is True  # nothing was running
    with pytest.raises(BadRequest, match="the server is stopping"):
        model([{"prompt": np.array([[b"a"]], dtype=object)}])
