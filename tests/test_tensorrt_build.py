"""Engine builds with TensorRT-RTX on the CPU (no GPU needed), from tiny ONNX graphs made here."""
from __future__ import annotations

import importlib.util
import math
import sys
import warnings

import numpy as np
import pytest

from onex_export.errors import ModelLoadError, OnexError
from onex_export.export import tensorrt as trt_export
from onex_export.export.tensorrt import (
    EngineBuildError, EngineBuildOptions, EngineOptionsError, OnnxParseError, ShapeProfile, ShapeProfileError,
    EngineTensor, build_engine,
)
from onex_export.trt import FLAVOURS, FlavourNotInstalledError, flavour_version, load_trt

HAS_RTX = importlib.util.find_spec("tensorrt_rtx_bindings") is not None
HAS_TRT = importlib.util.find_spec("tensorrt") is not None
requires_rtx = pytest.mark.skipif(not HAS_RTX, reason="TensorRT-RTX not installed: pip install -e '.[tensorrt-rtx]'")

RTX = EngineBuildOptions("tensorrt-rtx")
PROFILE = {"x": ((1, 16), (2, 16), (8, 16))}
PROFILE_FP16 = {"x": ((1, 16), (2, 16), (8, 16)), "step": ((1,), (2,), (8,))}


def _block_graph(onnx, dtype: type, with_step: bool):
    """y = GELU(LayerNorm(x @ W + b)) on x of shape (batch, 16); optionally + float(step) (int64, (batch,))."""
    helper, numpy_helper = onnx.helper, onnx.numpy_helper
    rng = np.random.default_rng(0)
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    init = [numpy_helper.from_array(a.astype(dtype), n) for n, a in [
        ("W", rng.standard_normal((16, 32)) * 0.25), ("b", rng.standard_normal(32)), ("gamma", np.ones(32)),
        ("beta", np.zeros(32)), ("inv_sqrt2", np.array(1 / math.sqrt(2))), ("half", np.array(0.5)),
        ("one", np.array(1.0))]]
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["mm"]), helper.make_node("Add", ["mm", "b"], ["lin"]),
        helper.make_node("LayerNormalization", ["lin", "gamma", "beta"], ["ln"], axis=-1, epsilon=1e-5),
        helper.make_node("Mul", ["ln", "inv_sqrt2"], ["s"]), helper.make_node("Erf", ["s"], ["e"]),
        helper.make_node("Add", ["e", "one"], ["e1"]), helper.make_node("Mul", ["ln", "e1"], ["g"]),
        helper.make_node("Mul", ["g", "half"], ["gelu" if with_step else "y"]),
    ]
    inputs = [helper.make_tensor_value_info("x", elem, ["batch", 16])]
    if with_step:
        init.append(numpy_helper.from_array(np.array([1], dtype=np.int64), "axis1"))
        nodes += [helper.make_node("Cast", ["step"], ["stepf"], to=elem),
                  helper.make_node("Unsqueeze", ["stepf", "axis1"], ["step2"]),
                  helper.make_node("Add", ["gelu", "step2"], ["y"])]
        inputs.append(helper.make_tensor_value_info("step", onnx.TensorProto.INT64, ["batch"]))
    graph = helper.make_graph(nodes, "block", inputs, [helper.make_tensor_value_info("y", elem, ["batch", 32])], init)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    return model


@pytest.fixture(scope="module")
def onnx_files(tmp_path_factory):
    """fp32 (weights in an external-data file), fp16 with an int64 input, and a corrupted file."""
    onnx = pytest.importorskip("onnx", reason="onnx not installed (the ONNX export needs it)")
    folder = tmp_path_factory.mktemp("onnx")
    onnx.save(_block_graph(onnx, np.float32, False), folder / "fp32.onnx", save_as_external_data=True,
              location="fp32.onnx.data", size_threshold=0)
    onnx.save(_block_graph(onnx, np.float16, True), folder / "fp16.onnx")
    (folder / "corrupt.onnx").write_bytes(np.random.default_rng(1).bytes(4096))
    return folder


def _leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if ".tmp-" in p.name)


@requires_rtx
def test_rtx_builds_dynamic_batch_engine_twice(onnx_files, tmp_path, monkeypatch):
    import tensorrt_rtx_bindings

    assert (onnx_files / "fp32.onnx.data").stat().st_size > 2000  # the weights really are external
    monkeypatch.chdir(tmp_path)  # external data must load relative to the model, not the working folder
    engine = tmp_path / "engines" / "block.plan"
    first = build_engine(onnx_files / "fp32.onnx", engine, PROFILE, RTX)
    assert first.path == engine and engine.is_file()
    assert first.size_bytes == engine.stat().st_size > 10_000
    assert first.flavour == "tensorrt-rtx" and first.version == tensorrt_rtx_bindings.__version__
    assert first.inputs == (EngineTensor("x", "float32", (-1, 16)),)
    assert first.outputs == (EngineTensor("y", "float32", (-1, 32)),)
    assert first.compute_capabilities == ()
    assert first.build_seconds > 0  # recorded; how fast is bench.build's to report
    second = build_engine(onnx_files / "fp32.onnx", engine, ShapeProfile(PROFILE), RTX)
    assert second.size_bytes == engine.stat().st_size > 10_000
    assert sorted(p.name for p in engine.parent.iterdir()) == ["block.plan"]


@requires_rtx
def test_tf32_is_off_unless_asked_for(onnx_files, tmp_path):
    """Builds are deterministic, so the flag reaching the builder shows as different engine bytes. (Whether
    the GPU then runs TF32 kernels can only be seen on a GPU.)"""
    def engine_bytes(name, **kwargs):
        build_engine(onnx_files / "fp32.onnx", tmp_path / name, PROFILE, EngineBuildOptions("tensorrt-rtx", **kwargs))
        return (tmp_path / name).read_bytes()

    default, again = engine_bytes("a.plan"), engine_bytes("b.plan", tf32=False)
    assert default == again
    assert engine_bytes("c.plan", tf32=True) != default


@requires_rtx
@pytest.mark.parametrize("caps", [("7.5",), ("8.6", "12.0")])
def test_rtx_fp16_engine_for_chosen_compute_capabilities(onnx_files, tmp_path, caps):
    options = EngineBuildOptions("tensorrt-rtx", optimization_level=2, compute_capabilities=caps, workspace_gib=0.5)
    report = build_engine(onnx_files / "fp16.onnx", tmp_path / "fp16.plan", PROFILE_FP16, options)
    assert report.compute_capabilities == caps
    assert report.inputs == (EngineTensor("x", "float16", (-1, 16)), EngineTensor("step", "int64", (-1,)))
    assert report.outputs == (EngineTensor("y", "float16", (-1, 32)),)
    assert report.size_bytes == (tmp_path / "fp16.plan").stat().st_size > 10_000


@requires_rtx
def test_failed_build_reports_trt_errors_and_keeps_old_engine(onnx_files, tmp_path):
    engine = tmp_path / "block.plan"
    build_engine(onnx_files / "fp32.onnx", engine, PROFILE, RTX)
    good = engine.read_bytes()
    logged = []
    turing = EngineBuildOptions("tensorrt-rtx", compute_capabilities=("7.5",))  # Turing has no fp32 GEMM
    with pytest.raises(EngineBuildError) as info:
        build_engine(onnx_files / "fp32.onnx", engine, PROFILE, turing, log=logged.append)
    assert "fp32.onnx" in info.value.message and "SM75" in info.value.message
    assert any(line.startswith("[ERROR]") and "SM75" in line for line in logged)
    assert engine.read_bytes() == good and _leftovers(tmp_path) == []


@requires_rtx
def test_corrupt_onnx_raises_parse_error_and_keeps_old_engine(onnx_files, tmp_path):
    engine = tmp_path / "block.plan"
    build_engine(onnx_files / "fp32.onnx", engine, PROFILE, RTX)
    good = engine.read_bytes()
    with pytest.raises(OnnxParseError) as info:
        build_engine(onnx_files / "corrupt.onnx", engine, PROFILE, RTX)
    assert "corrupt.onnx" in info.value.message
    assert "Failed to parse the ONNX model" in info.value.message  # the parser's own message
    assert "check_model" in info.value.hint
    assert engine.read_bytes() == good and _leftovers(tmp_path) == []


@requires_rtx
def test_missing_onnx_file_is_a_load_error(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        build_engine(tmp_path / "nope.onnx", tmp_path / "x.plan", PROFILE, RTX)
    assert list(tmp_path.iterdir()) == []


@requires_rtx
@pytest.mark.parametrize("profile, match", [
    ({}, "input 'x' has dynamic shape"),
    ({**PROFILE, "y": ((1,), (1,), (1,))}, "no input for"),
    ({"x": ((1, 16, 1), (2, 16, 1), (8, 16, 1))}, "do not fit its shape"),
    ({"x": ((1, 8), (2, 8), (8, 8))}, "do not fit its shape"),
])
def test_profile_must_fit_network_inputs(onnx_files, tmp_path, profile, match):
    with pytest.raises(ShapeProfileError, match=match) as info:
        build_engine(onnx_files / "fp32.onnx", tmp_path / "x.plan", profile, RTX)
    assert info.value.hint and not (tmp_path / "x.plan").exists()


@requires_rtx
def test_unknown_compute_capability_for_this_rtx_version(onnx_files, tmp_path):
    options = EngineBuildOptions("tensorrt-rtx", compute_capabilities=("9.0",))  # well formed, SM90 not offered
    with pytest.raises(EngineOptionsError, match="9.0") as info:
        build_engine(onnx_files / "fp32.onnx", tmp_path / "x.plan", PROFILE, options)
    assert "8.6" in info.value.hint and "12.0" in info.value.hint


@requires_rtx
def test_timing_cache_code_path_with_rtx_standing_in(onnx_files, tmp_path, monkeypatch):
    """Full TensorRT is not installable here; its timing-cache path runs against the RTX module (where
    timing-cache calls are deprecated no-ops) to check the cache file is written, then read back."""
    rtx = load_trt("tensorrt-rtx")
    monkeypatch.setattr(trt_export, "load_trt", lambda flavour: rtx)
    cache = tmp_path / "cache" / "timing.cache"
    options = EngineBuildOptions("tensorrt", timing_cache=cache)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        for _ in range(2):
            report = build_engine(onnx_files / "fp32.onnx", tmp_path / "x.plan", PROFILE, options)
            assert report.flavour == "tensorrt" and cache.stat().st_size > 0
    assert _leftovers(cache.parent) == []


def test_full_tensorrt_not_installed_names_the_pip_extra(tmp_path):
    if HAS_TRT:
        pytest.skip("full TensorRT is installed here")
    with pytest.raises(FlavourNotInstalledError) as info:
        load_trt("tensorrt")
    assert "TensorRT is not installed" in info.value.message
    assert "pip install -e '.[tensorrt]'" in info.value.hint and "tensorrt-cu13-libs==11.4.0.106" in info.value.hint
    assert "--trt none" in info.value.hint
    with pytest.raises(FlavourNotInstalledError):
        build_engine(tmp_path / "block.onnx", tmp_path / "x.plan", PROFILE, EngineBuildOptions("tensorrt"))
    assert flavour_version("tensorrt") is None and not (tmp_path / "x.plan").exists()


def test_missing_rtx_names_its_pip_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt_rtx_bindings", None)  # makes the import fail
    with pytest.raises(FlavourNotInstalledError) as info:
        load_trt("tensorrt-rtx")
    assert "TensorRT-RTX is not installed" in info.value.message
    assert "pip install -e '.[tensorrt-rtx]'" in info.value.hint and "1.7.1.116" in info.value.hint
    assert flavour_version("tensorrt-rtx") is None


@requires_rtx
def test_rtx_version():
    import tensorrt_rtx_bindings

    assert flavour_version("tensorrt-rtx") == tensorrt_rtx_bindings.__version__


@pytest.mark.parametrize("kwargs, match", [
    ({"flavour": "tensorrt-llm"}, "unknown TensorRT flavour"),
    ({"flavour": "tensorrt-rtx", "optimization_level": 6}, "0 to 5"),
    ({"flavour": "tensorrt-rtx", "optimization_level": True}, "0 to 5"),
    ({"flavour": "tensorrt-rtx", "compute_capabilities": ("sm_86",)}, "MAJOR.MINOR"),
    ({"flavour": "tensorrt-rtx", "compute_capabilities": ("8",)}, "MAJOR.MINOR"),
    ({"flavour": "tensorrt-rtx", "compute_capabilities": ("8.6.1",)}, "MAJOR.MINOR"),
    ({"flavour": "tensorrt-rtx", "compute_capabilities": (8.6,)}, "MAJOR.MINOR"),
    ({"flavour": "tensorrt", "compute_capabilities": ("8.6",)}, "only be chosen with TensorRT-RTX"),
    ({"flavour": "tensorrt-rtx", "timing_cache": "t.cache"}, "full TensorRT only"),
    ({"flavour": "tensorrt", "workspace_gib": 0}, "positive"),
    ({"flavour": "tensorrt", "workspace_gib": float("nan")}, "positive"),
])
def test_invalid_options(kwargs, match):
    with pytest.raises(EngineOptionsError, match=match) as info:
        EngineBuildOptions(**kwargs)
    assert isinstance(info.value, OnexError) and not isinstance(info.value, ValueError) and info.value.hint


def test_valid_options_are_normalised(tmp_path):
    options = EngineBuildOptions("tensorrt-rtx", 5, ("8.6", "12.0", "8.6"), workspace_gib=2)
    assert options.compute_capabilities == ("8.6", "12.0") and options.optimization_level == 5
    assert EngineBuildOptions("tensorrt", timing_cache=str(tmp_path / "t")).timing_cache == tmp_path / "t"
    assert FLAVOURS == ("tensorrt", "tensorrt-rtx")


@pytest.mark.parametrize("shapes, match", [
    ({"x": ((1, 16), (2, 16))}, "triple"),
    ({"x": ((1, 16), (2, 16), (8, 16, 1))}, "rank"),
    ({"x": ((2, 16), (1, 16), (8, 16))}, "min <= opt <= max"),
    ({"x": ((1, 16), (2, 16), (8, 15))}, "min <= opt <= max"),
    ({"x": ((1, "a"), (2, 16), (8, 16))}, "integers"),
    ({"x": ((-1, 16), (2, 16), (8, 16))}, "negative"),
])
def test_invalid_shape_profiles(shapes, match):
    with pytest.raises(ShapeProfileError, match=match):
        ShapeProfile(shapes)


def test_shape_profile_is_normalised_and_read_only():
    profile = ShapeProfile({"x": ([1, 16], [2, 16], [8, 16])})
    assert profile.shapes["x"] == ((1, 16), (2, 16), (8, 16))
    with pytest.raises(TypeError):
        profile.shapes["y"] = ((1,), (1,), (1,))


def test_trt_auto_picks_what_can_run_and_says_why(monkeypatch):
    import torch

    lines = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    expected = "tensorrt-rtx" if HAS_RTX else "none"  # full TensorRT needs a visible GPU as well
    assert trt_export.choose_trt("auto", (), lines.append) == expected
    assert lines and lines[0].startswith(f"      --trt auto: {expected} (")
    assert trt_export.choose_trt("none") == "none" and trt_export.choose_trt("tensorrt-rtx") == "tensorrt-rtx"


@pytest.mark.parametrize("capability, fix", [((9, 0), "--trt tensorrt"), ((7, 5), "--compute-capability 7.5")])
def test_rtx_engines_that_cannot_run_on_the_visible_gpu_stop_with_the_fix(monkeypatch, capability, fix):
    """No GPU here, so torch's view of one is mocked: an H100 (SM 9.0, no RTX target) and a Turing card (SM 7.5,
    an RTX target but not a default one). The check itself is the real code path."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "the GPU here")
    with pytest.raises(EngineOptionsError, match=f"cannot run on the visible the GPU here \\(SM {capability[0]}.{capability[1]}\\)") as info:
        trt_export.choose_trt("tensorrt-rtx")
    assert fix in info.value.hint
    # naming targets on purpose (building for another machine) is allowed
    assert trt_export.choose_trt("tensorrt-rtx", ("8.6",)) == "tensorrt-rtx"
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (8, 9))  # an RTX 4090 runs the defaults
    assert trt_export.choose_trt("tensorrt-rtx") == "tensorrt-rtx"
