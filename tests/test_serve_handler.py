"""The inference callable behind `onex-export serve`, without a server: what it accepts, what it refuses (alone, with
a status), the prompt bounds, the drain, and the model file that runs in Triton's stub (with a stand-in for the
stub's `triton_python_backend_utils`, which exists only inside Triton: the live path is tested in test_serve.py)."""
from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from onex_export.errors import UsageError
from onex_export.runtime.pipeline import BuildPipeline, Request
from onex_export.serving import BadRequest, OnexModel, PromptLimits, ServeConfig
from onex_export.serving.handler import ERROR_OUTPUT, refusal
from onex_export.serving.server import drain
from tests.serving import tiny_build


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    return BuildPipeline(tiny_build(tmp_path_factory.mktemp("handler") / "tiny"))


def _prompt(*texts) -> dict:
    return {"prompt": np.array([[t if isinstance(t, bytes) else t.encode()] for t in texts], dtype=object)}


def _status(response) -> tuple[str, str]:
    status, _, message = response[ERROR_OUTPUT][0, 0].decode().partition("\n")
    return status, message


def test_each_row_is_one_request_with_its_own_seed(pipeline):
    model = OnexModel(pipeline)
    rows = model.parse({**_prompt("a", "b"), "seed": np.array([[5], [7]]), "images_per_prompt": np.array([[2], [2]])})
    assert rows == [Request(("a",), 5, 2, None), Request(("b",), 7, 2, None)]
    [response] = model([{**_prompt("a", "b"), "seed": np.array([[5], [7]])}])
    assert response["image"].shape == (2, 1, 128, 128, 3) and ERROR_OUTPUT not in response
    np.testing.assert_array_equal(response["image"][1], pipeline.generate(["b"], 7).pixels())


@pytest.mark.parametrize("request_, message", [
    (_prompt(b"\xff\xfe"), "prompt 0 is not UTF-8 text"),
    ({"seed": np.array([[1]])}, "input 'prompt' is missing"),
    ({**_prompt("a"), "seed": np.array([[1], [2]])}, "input 'seed' has shape [2, 1]"),
    ({**_prompt("a"), "resolution": np.array([[4096]])}, "resolution 4096 is not one"),
    (_prompt("x" * 11), "prompt 0 is 11 characters; at most 10 are accepted"),
    (_prompt("é" * 21), "prompt 0 is 42 bytes; at most 40 bytes and 10 characters are accepted"),
])
def test_malformed_requests_raise_bad_request(pipeline, request_, message):
    with pytest.raises(BadRequest, match=message.replace("[", r"\[").replace("]", r"\]")):
        OnexModel(pipeline, PromptLimits(max_chars=10)).parse(request_)


def test_prompts_at_the_limit_pass_in_characters_and_bytes(pipeline):
    model = OnexModel(pipeline, PromptLimits(max_chars=10))
    assert model.parse(_prompt("x" * 10))[0].prompts == ("x" * 10,)
    assert model.parse(_prompt("é" * 10))[0].prompts == ("é" * 10,)  # 20 bytes: within 4 per character


def test_a_bad_request_batched_with_good_ones_fails_alone(pipeline):
    """Before, one bad request failed the whole batch; now it gets its own INVALID_ARG and the others their images."""
    model = OnexModel(pipeline)
    good_a, bad, good_b = ({**_prompt("a"), "seed": np.array([[1]])},
                           {**_prompt("a"), "resolution": np.array([[64]])},
                           {**_prompt("b"), "seed": np.array([[2]])})
    first, refused, second = model([good_a, bad, good_b])
    assert _status(refused) == ("INVALID_ARG", "resolution 64 is not one this build runs: a multiple of 16 in 128-128")
    np.testing.assert_array_equal(first["image"][0], pipeline.generate(["a"], 1).pixels())
    np.testing.assert_array_equal(second["image"][0], pipeline.generate(["b"], 2).pixels())
    assert model.images == 2


def test_a_batch_of_bad_requests_runs_nothing(pipeline):
    model = OnexModel(pipeline)
    responses = model([{"seed": np.array([[1]])}, _prompt(b"\xff")])
    assert [_status(r)[0] for r in responses] == ["INVALID_ARG", "INVALID_ARG"] and model.images == 0


def test_a_closed_model_refuses_calls_as_unavailable(pipeline):
    model = OnexModel(pipeline)
    assert model.close(timeout=1.0) is True  # nothing was running
    [response] = model([_prompt("a")])
    assert _status(response) == ("UNAVAILABLE", "the server is stopping: send the request again (to another replica)")
    assert model.refused == 1 and model.images == 0


def test_truncation_is_reported_per_row(pipeline):
    [response] = OnexModel(pipeline)([_prompt("a blue ball on grass", "x")])
    cut, fit = (row[0].decode() for row in response["truncated"])
    assert "dropped ' ball on grass'" in cut and fit == ""


class _Model:
    def __init__(self, in_flight=0, last_call=0.0):
        self.in_flight, self.last_call = in_flight, last_call


def test_the_drain_waits_for_the_queue_and_the_running_call():
    queue = iter([3, 2, 1, 0, 0, 0])
    assert drain(_Model(), lambda: next(queue), timeout=5, quiet=10, poll=0.001) is True
    assert next(queue) == 0  # it looked until two readings in a row were empty
    assert drain(_Model(in_flight=1), lambda: 0, timeout=0.05, quiet=10, poll=0.001) is False
    assert drain(_Model(), lambda: 1, timeout=0.05, quiet=10, poll=0.001) is False


def test_without_metrics_the_drain_waits_for_quiet():
    import time

    busy = _Model(last_call=time.monotonic())  # a call just ended: not quiet for 10 s
    assert drain(busy, lambda: None, timeout=0.05, quiet=10, poll=0.001) is False
    assert drain(_Model(last_call=time.monotonic() - 20), lambda: None, timeout=1, quiet=10, poll=0.001) is True


@pytest.mark.parametrize("kwargs, message", [
    (dict(http_port=9000, grpc_port=9000), "ports must differ"),
    (dict(http_port=0), "ports must be 1-65535"),
    (dict(max_queue_delay_us=-1), "queue delay"),
    (dict(max_queue_size=0), "queue size"),
    (dict(backend="triton"), "unknown backend"),
    (dict(host="localhost:8000"), "must be an IPv4 address, not 'localhost:8000'"),
    (dict(max_prompt_chars=0), "the prompt limit must be 1-1000000 characters, got 0"),
])
def test_serve_config_refuses_bad_values(kwargs, message):
    with pytest.raises(UsageError, match=message):
        ServeConfig("somewhere", **kwargs)


def test_serve_config_listens_on_loopback_unless_told():
    assert ServeConfig("somewhere").host == "127.0.0.1"
    assert ServeConfig("somewhere", host="0.0.0.0").host == "0.0.0.0"


def _stub_model(monkeypatch):
    """triton_model.py loaded as Triton loads it (``1.model``, PyTriton's proxy beside it as ``1.pytriton_model``),
    with stand-ins for the stub's utilities and for PyTriton's proxy (which imports them at its top)."""
    class TritonError:
        INVALID_ARG, UNAVAILABLE, INTERNAL = 3, 14, 13

        def __init__(self, message, code):
            self.message, self.code = message, code

    class InferenceResponse:
        def __init__(self, output_tensors=None, error=None):
            self.output_tensors, self.error = output_tensors, error

    utils = types.SimpleNamespace(InferenceResponse=InferenceResponse)
    proxy = types.ModuleType("1.pytriton_model")
    proxy._wrap_response = lambda response, names, outputs: InferenceResponse(output_tensors=sorted(response.data))
    proxy.TritonPythonModel = object
    package = types.ModuleType("1")
    package.__path__ = []
    for name, module in (("triton_python_backend_utils", utils), ("1", package), ("1.pytriton_model", proxy)):
        monkeypatch.setitem(sys.modules, name, module)
    path = Path(__file__).resolve().parents[1] / "onex_export" / "serving" / "triton_model.py"
    spec = importlib.util.spec_from_file_location("1.model", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    utils.TritonError = TritonError  # the stub sets it after the import, as Triton's does
    return proxy


def test_the_stub_model_turns_a_refusal_into_an_error_with_its_status(monkeypatch):
    proxy = _stub_model(monkeypatch)
    wrap = proxy._wrap_response  # triton_model.py replaced PyTriton's function with its own
    for status, code in (("INVALID_ARG", 3), ("UNAVAILABLE", 14), ("ELSE", 13)):
        response = wrap(types.SimpleNamespace(data=refusal(status, "what was wrong")), ["image"], {})
        assert response.error.code == code and response.error.message == "what was wrong"
    ok = wrap(types.SimpleNamespace(data={"image": np.zeros(1), "seed": np.zeros(1)}), ["image"], {})
    assert ok.error is None and ok.output_tensors == ["image", "seed"]  # handed to PyTriton's own
