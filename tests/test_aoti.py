"""AOTInductor packages as an engine flavour (`build --aoti`): real packages compiled on this CPU from tiny-sd3's
graphs and components, listed and hashed in the manifest, gated like the ONNX graphs, run by the runtime with torch
alone, checked again by `verify --backend aoti`, reused by a rebuild; refused when missing or made by another
torch."""
import dataclasses
import json
import re
import subprocess
from pathlib import Path

import jsonschema
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from onex_export.build import BuildConfig, build
from onex_export.cli import main
from onex_export.config import SkipRange
from onex_export.contract import H, W, B, T, N, GraphSpec, TensorSpec
from onex_export.contract.integrity import seal_of
from onex_export.errors import OnexError
from onex_export.export import manifest as mf
from onex_export.export.aoti import dynamic_shapes, example_dims
from onex_export.export.shapes import DimRange
from onex_export.runtime.pipeline import BuildPipeline
from onex_export.runtime.sampler import Conditioning, initial_noise, sample

GRAPHS = {"head", "segment", "reuse", "tail", "text", "vae"}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("aoti") / "tiny"
    lines = []
    manifest = build(BuildConfig(model="tiny-sd3", skip=SkipRange(3, 10), out=out, trt="none", aoti=True,
                                 batch=DimRange(1, 1, 2)), log=lines.append)
    return out, manifest, lines


def test_every_graph_has_a_hashed_package_for_this_torch_and_cpu(built):
    out, manifest, _ = built
    assert set(manifest.graphs) == GRAPHS
    for name, g in manifest.graphs.items():
        assert g.compiled.file == f"{name}.pt2" and (out / g.compiled.file).stat().st_size == g.compiled.bytes
        assert g.compiled.extra == {"flavour": "aoti", "torch": torch.__version__, "device": "cpu"}
        assert g.compiled_key and g.compile_seconds > 0
    assert mf.check_files(out, manifest) == []
    schema = jsonschema.Draft202012Validator(json.loads(mf.JSON_SCHEMA.read_text()))
    assert [e.message for e in schema.iter_errors(json.loads((out / mf.FILENAME).read_text()))] == []


def test_the_gate_checks_the_packages_like_the_onnx_graphs(built):
    _, manifest, _ = built
    onnx, compiled = manifest.verifications
    assert (onnx["artifact"], onnx["backend"]) == ("onnx", "onnxruntime")
    assert (compiled["artifact"], compiled["backend"], compiled["status"]) == ("compiled", "aoti", "passed")
    cases = {r["case"].split(" b1")[0] for r in compiled["rows"]}
    assert {"graph head", "graph segment", "graph reuse", "graph tail", "1.x-nfe schedule", "text", "vae"} <= cases
    assert max(r["max_rel"] for r in compiled["rows"]) < 1e-4  # measured: at most 4.5e-6
    assert manifest.status == "passed"


def test_the_runtime_runs_the_packages_with_torch_alone(built):
    out, _, _ = built
    aoti, ort = BuildPipeline(out, "aoti"), BuildPipeline(out)
    assert not any(type(g).__name__ != "AotiGraph" for g in aoti.graphs.values())
    a, o = aoti.generate(["a red cube", "x"], seed=3), ort.generate(["a red cube", "x"], seed=3)
    assert a.images.shape == (2, 3, 128, 128)
    assert (a.latents - o.latents).abs().max() < 1e-4 and (a.images - o.images).abs().max() < 1e-4


def _edited(out, tmp_path, edit):
    """A copy of the build whose manifest ``edit`` changed, resealed as a build that wrote it would be."""
    import shutil

    copy = tmp_path / "edited"
    shutil.copytree(out, copy)
    data = json.loads((copy / mf.FILENAME).read_text())
    edit(data)
    data["seal"] = seal_of(data)
    (copy / mf.FILENAME).write_text(json.dumps(data, indent=2))
    return copy


def test_packages_of_another_torch_are_refused_with_the_reason(built, tmp_path):
    def other_torch(data):
        for g in data["graphs"].values():
            g["compiled"]["torch"] = "2.0.0"

    with pytest.raises(OnexError, match=re.escape(f"compiled by torch 2.0.0, and this is torch {torch.__version__}")):
        BuildPipeline(_edited(built[0], tmp_path, other_torch), "aoti")


def test_a_build_without_packages_is_refused_for_the_aoti_backend(built, tmp_path):
    def drop(data):
        for g in data["graphs"].values():
            del g["compiled"], g["compiled_key"], g["compile_seconds"]

    with pytest.raises(OnexError, match="has no AOTInductor package for head, segment, reuse, tail, text, vae"):
        BuildPipeline(_edited(built[0], tmp_path, drop), "aoti")


def test_verify_runs_the_packages_and_records_it(built):
    out, _, _ = built
    result = CliRunner().invoke(main, ["verify", str(out), "--backend", "aoti"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "parity of the compiled graphs on aoti (cpu) against PyTorch float32: passed" in result.output
    assert mf.read_manifest(out).verifications[-1]["backend"] == "aoti"


def test_a_rebuild_reuses_unchanged_packages(built):
    out, first, _ = built
    lines = []
    again = build(BuildConfig(model="tiny-sd3", skip=SkipRange(3, 10), out=out, trt="none", aoti=True,
                              batch=DimRange(1, 1, 2)), log=lines.append)
    assert sum("unchanged, reused" in line and "aoti" in line for line in lines) == len(GRAPHS)
    for name, g in again.graphs.items():
        assert g.compiled.sha256 == first.graphs[name].compiled.sha256 and g.compile_seconds == 0.0


def test_dynamic_shapes_follow_the_build_ranges():
    spec = GraphSpec("g", (TensorSpec("x", (B, 16, H, W), "float32"), TensorSpec("t", (B, T, 8), "float32"),
                           TensorSpec("s", (B, N, 8), "float32")), (TensorSpec("y", (B,), "float32"),))
    ranges = {B: (1, 1, 4), T: (16, 16, 16), H: (8, 16, 32), W: (8, 16, 32), N: (16, 64, 256)}
    assert example_dims(ranges) == {B: 2, T: 16, H: 16, W: 16, N: 64}  # batch 1 would be specialised: 2
    x, t, s = dynamic_shapes(spec, ranges, patch_size=2)
    assert set(x) == {0, 2, 3} and set(t) == {0} and set(s) == {0, 1}  # the text length is static
    assert x[0] is t[0] is s[0]  # one batch dimension, shared
    assert str(x[2]) == "2*latent_height_patches" and (x[2].min, x[2].max) == (8, 32)  # multiples of the patch
    assert dynamic_shapes(dataclasses.replace(spec, inputs=spec.inputs[1:2]), {B: (1, 1, 1), T: (5, 5, 5)}, 2) \
        == (None,)


# --- the C++ runner (cpp/): built with CMake against the installed torch's libtorch, run on the same build ---

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def runner(tmp_path_factory):
    """cpp/onex_runner.cpp compiled as README's C++ section shows (about 30 s here)."""
    import nlohmann_json

    folder = tmp_path_factory.mktemp("cpp")
    torch_dir = Path(torch.__file__).parent
    json_include = Path(nlohmann_json.__file__).parent / "include"
    for args in (["cmake", "-S", str(ROOT / "cpp"), "-B", str(folder), "-DCMAKE_BUILD_TYPE=Release",
                  f"-DTORCH_DIR={torch_dir}", f"-DNLOHMANN_JSON_INCLUDE={json_include}"],
                 ["cmake", "--build", str(folder), "-j2"]):
        done = subprocess.run(args, capture_output=True, text=True)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return folder / "onex-runner"


def _inputs(out, tmp_path, prompts, seed):
    """Text embeddings, pooled projections and noise as the Python runtime makes them, written as raw float32;
    returns the runner's arguments and the runtime's own latents from the same inputs."""
    pipe = BuildPipeline(out, "aoti")
    tok = pipe.tokenizers(prompts)
    text = pipe.graphs["text"](ids_l=tok.ids_l, ids_g=tok.ids_g, ids_t5=tok.ids_t5)
    cond = Conditioning(text["encoder_hidden_states"].float(), text["pooled_projections"].float())
    channels, size = pipe.manifest.model.config["in_channels"], 128 // pipe.manifest.pipeline.vae_scale_factor
    expected = sample(pipe.denoiser, pipe.plan, cond, (channels, size, size), seed)
    noise = initial_noise((len(prompts), channels, size, size), torch.Generator().manual_seed(seed))
    files = {}
    for name, tensor in (("text", cond.text), ("pooled", cond.pooled), ("noise", noise)):
        files[name] = tmp_path / f"{name}.f32"
        tensor.contiguous().numpy().astype("<f4").tofile(files[name])
    args = ["--batch", str(len(prompts)), "--latent-size", str(size), "--text-len", str(cond.text.shape[1]),
            *(a for name, path in files.items() for a in (f"--{name}", str(path))), "--out", str(tmp_path / "latents.f32")]
    return args, expected


def test_the_cpp_runner_gives_the_python_runtimes_latents(built, runner, tmp_path):
    out = built[0]
    args, expected = _inputs(out, tmp_path, ["a red cube", "x"], seed=5)
    done = subprocess.run([str(runner), str(out), *args], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "PASSED onex-runner: latents (2, 16, 16, 16)" in done.stdout
    got = torch.from_numpy(np.fromfile(tmp_path / "latents.f32", dtype="<f4").reshape(expected.shape))
    assert (got - expected).abs().max() < 1e-4  # the fp32 tolerance (measured: 0, the same kernels)
    assert torch.isfinite(got).all() and got.abs().max() > 0.1  # real latents, not zeros
    print(f"\nC++ runner vs Python runtime (aoti): max abs {(got - expected).abs().max():.2e}")


def test_the_cpp_runner_refuses_bad_input_with_a_reason(built, runner, tmp_path):
    out = built[0]
    args, _ = _inputs(out, tmp_path, ["a red cube"], seed=1)
    short = tmp_path / "short.f32"
    short.write_bytes(b"\0" * 12)  # 3 floats, not (1, 16, 16, 16)
    bad = [str(short) if a.endswith("noise.f32") else a for a in args]
    done = subprocess.run([str(runner), str(out), *bad], capture_output=True, text=True, timeout=300)
    assert done.returncode == 1 and "short.f32 does not hold 4096 float32 values" in done.stderr
    assert not (tmp_path / "latents.f32").exists()
    usage = subprocess.run([str(runner), str(out), "--batch", "1"], capture_output=True, text=True, timeout=60)
    assert usage.returncode == 2 and "missing --latent-size" in usage.stderr

    def drop(data):
        for g in data["graphs"].values():
            del g["compiled"], g["compiled_key"], g["compile_seconds"]

    bare = subprocess.run([str(runner), str(_edited(out, tmp_path, drop)), *args], capture_output=True, text=True)
    assert bare.returncode == 1 and "has no AOTInductor package for graph head: build it with --aoti" in bare.stderr
