"""`onex-export serve`: a real Triton Inference Server (PyTriton) in a real process, on loopback ports, and real
tritonclient clients (HTTP and gRPC).

The load test sends 8 concurrent clients x 10 requests and compares every image with the in-process pipeline's
for the same prompt and seed. A client's mistake must come back as HTTP 400 / gRPC INVALID_ARGUMENT naming the
problem, for that request alone: good requests batched with bad ones are answered. Prompts are bounded, and a
client is told what the encoders cut. The server listens on loopback unless told otherwise.
"""
from __future__ import annotations

import ipaddress
import socket
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from onex_export.runtime.pipeline import BuildPipeline, Request
from tests.serving import PROMPTS, Server, infer, tiny_build, tritonclient_http

@pytest.fixture(scope="module")
def build_dir(tmp_path_factory):
    return tiny_build(tmp_path_factory.mktemp("serve") / "tiny")


@pytest.fixture(scope="module")
def pipeline(build_dir):
    return BuildPipeline(build_dir)


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


BAD = [  # (what the request has, what the client must read); tiny-sd3: 128 px only, batch 1-4
    (dict(resolution=[4096]), "resolution 4096 is not one this build runs: a multiple of 16 in 128-128"),
    (dict(resolution=[130]), "resolution 130 is not one this build runs"),
    (dict(resolution=[0]), "resolution 0 is not one this build runs"),
    (dict(images_per_prompt=[0]), "images_per_prompt must be at least 1, not 0"),
    (dict(images_per_prompt=[-3]), "images_per_prompt must be at least 1, not -3"),
    (dict(images_per_prompt=[5]), "5 images per call is outside this build's batch range 1-4"),
    (dict(prompts=[b"caf\xe9"]), "prompt 0 is not UTF-8 text (unexpected end of data at byte 3)"),
    (dict(prompts=["x" * 2001]), "prompt 0 is 2001 characters; at most 2000 are accepted"),
    (dict(prompts=["x" * 1_000_000]), "prompt 0 is 1000000 bytes; at most 8000 bytes and 2000 characters"),
    (dict(prompts=["a", "b"], images_per_prompt=[1, 2]), "images_per_prompt differs between the rows"),
    (dict(prompts=None), "input 'prompt' is missing"),
]


@pytest.mark.parametrize("case, message", BAD)
@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_a_clients_mistake_is_400_or_invalid_argument_naming_it(server, protocol, case, message):
    client = server.client() if protocol == "http" else server.grpc_client()
    case = {"prompts": ["a red cube"], **case}
    with pytest.raises(Exception) as info:
        infer(client, **case)
    assert info.value.status() == ("400" if protocol == "http" else "StatusCode.INVALID_ARGUMENT"), info.value
    assert message in info.value.message() and "Traceback" not in info.value.message()
    assert infer(client, ["still serving"], [3]).as_numpy("image").shape == (1, 1, 128, 128, 3)


@pytest.mark.parametrize("case, message", [
    (dict(prompts=["a"] * 5), "batch-size must be <= 4"),
    (dict(seed=[1], seed_dtype=np.int32), "data-type is 'INT32', but model 'onex' expects 'INT64'"),
])
def test_what_triton_checks_itself_is_400_too(server, case, message):
    with pytest.raises(tritonclient_http.InferenceServerException) as info:
        infer(server.client(), **{"prompts": ["a red cube"], **case})
    assert info.value.status() == "400" and message in info.value.message()


def test_refusals_leave_no_traceback_in_the_servers_log(server):
    for case, _ in BAD:
        with pytest.raises(tritonclient_http.InferenceServerException):
            infer(server.client(), **{"prompts": ["a red cube"], **case})
    assert "Traceback" not in server.output() and "BadRequest" not in server.output()


def test_bad_requests_fail_alone_under_concurrency(server, pipeline):
    """48 good and 16 bad requests from 16 threads at once, batched together by Triton (20 ms queue delay): every
    bad one gets its 400 and every good one its image, equal to the in-process pipeline's. Before, a batch failed
    as a whole: 41 of 48 good requests got another client's error."""
    jobs = [(k, k % 4 == 3) for k in range(64)]

    def send(job):
        k, bad = job
        try:
            response = infer(server.client(), [PROMPTS[k % 3]], [k], resolution=[4096 if bad else 128])
            return k, bad, response.as_numpy("image")[0, 0], None
        except tritonclient_http.InferenceServerException as exc:
            return k, bad, None, exc

    def batches() -> tuple[float, float]:
        text = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics}/metrics").read().decode()
        value = {line.split("{")[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                 if line.startswith(("nv_inference_request_success{", "nv_inference_exec_count{"))}
        return value["nv_inference_request_success"], value["nv_inference_exec_count"]

    before = batches()
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(send, jobs))
    after = batches()
    good = [(k, image) for k, bad, image, exc in results if not bad]
    refused = [exc for _, bad, _, exc in results if bad]
    assert len(good) == 48 and all(image is not None for _, image in good), [r[3] for r in results if not r[1]]
    assert len(refused) == 16 and all(e is not None and e.status() == "400" for e in refused)
    expected = pipeline.generate_batch([Request((PROMPTS[k % 3],), k) for k, _ in good])
    for (k, image), want in zip(good, expected):
        np.testing.assert_array_equal(image, want.pixels()[0], err_msg=f"request {k}")
    executions = after[1] - before[1]
    assert executions < 64  # Triton did batch requests together, so bad and good ones shared calls
    print(f"\n48 good + 16 bad requests from 16 threads: {executions:.0f} model executions, all 48 answered")


def test_the_client_is_told_what_the_encoders_cut(server):
    """tiny-sd3's tokenizers keep 8 byte-tokens: "a blue ball on grass" loses " ball on grass"; "x" fits."""
    response = infer(server.client(), ["a blue ball on grass", "x"], [1, 2])
    cut, fit = (row[0].decode() for row in response.as_numpy("truncated"))
    assert "clip_l keeps 8 of 22 tokens of 'a blue ball on grass': dropped ' ball on grass'" in cut
    assert "t5 keeps 8 of 21 tokens" in cut and fit == ""


def _listening(port: int) -> set[str]:
    """The addresses a socket listens on at ``port`` (from /proc/net/tcp and tcp6: state 0A is LISTEN; an IPv6
    socket bound to an IPv4-mapped address, as gRPC binds, counts as that IPv4 address)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in open(table).read().splitlines()[1:]:
            local, _, state = line.split()[1:4]
            address, hex_port = local.split(":")
            if int(hex_port, 16) != port or state != "0A":
                continue
            raw = b"".join(bytes.fromhex(address[i:i + 8])[::-1] for i in range(0, len(address), 8))
            ip = ipaddress.ip_address(raw)
            found.add(str(getattr(ip, "ipv4_mapped", None) or ip))
    return found


def test_the_server_listens_on_loopback_only_by_default(server):
    for port in (server.http, server.grpc, server.metrics):
        assert _listening(port) == {"127.0.0.1"}, port


def test_exposed_inference_is_open_and_management_needs_the_token(build_dir, tmp_path):
    """--host 0.0.0.0 listens on every interface: inference, health and metadata need no token (a gateway must
    protect them); statistics, the model repository and logging answer 403 without the access token."""
    server = Server(build_dir, tmp_path, "--host", "0.0.0.0", env={"ONEX_SERVE_ACCESS_TOKEN": "s3cret"})
    try:
        server.wait_ready()
        for port in (server.http, server.grpc, server.metrics):
            assert _listening(port) & {"0.0.0.0", "::"}, port
        client = server.client()
        assert infer(client, ["a red cube"], [1]).as_numpy("image").shape == (1, 1, 128, 128, 3)
        for call in (lambda h: client.get_inference_statistics("onex", headers=h),
                     lambda h: client.get_model_repository_index(headers=h),
                     lambda h: client.get_log_settings(headers=h)):
            with pytest.raises(tritonclient_http.InferenceServerException, match="triton-access-token"):
                call(None)
            call({"triton-access-token": "s3cret"})
    finally:
        server.kill()


def test_model_config_batches_dynamically_up_to_the_builds_largest_batch(server):
    config = server.client().get_model_config("onex")
    assert config["max_batch_size"] == 4
    assert config["dynamic_batching"]["max_queue_delay_microseconds"] == 20000
    assert {i["name"]: i["data_type"] for i in config["input"]} == {
        "prompt": "TYPE_STRING", "seed": "TYPE_INT64", "images_per_prompt": "TYPE_INT64", "resolution": "TYPE_INT64"}
    assert {o["name"] for o in config["output"]} == {"image", "seed", "tokenize_ms", "text_ms", "transformer_ms",
                                                     "vae_ms", "truncated", "error"}


def test_a_port_in_use_is_refused_before_loading(build_dir, tmp_path):
    with socket.socket() as busy:
        busy.bind(("0.0.0.0", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = subprocess.run([sys.executable, "-m", "onex_export.cli", "serve", "--build", str(build_dir),
                                 "--http-port", str(port)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert f"the HTTP port {port} is in use" in result.stderr and "Traceback" not in result.stderr


