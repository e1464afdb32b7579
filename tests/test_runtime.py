"""The runtime over a build folder and `onex-export generate`: real ONNX Runtime sessions against the
PyTorch reference, on the embedded tiny-sd3 with its tiny text encoders and VAE."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from onex_export.cli import main
from onex_export.config import SkipRange
from onex_export.errors import OnexError, UsageError
from onex_export.contract.integrity import seal_of
from onex_export.export import manifest as mf
from onex_export.build import BuildConfig, build
from onex_export.export.shapes import DimRange
from onex_export.check.reference import open_pipeline
from onex_export.runtime.pipeline import BuildPipeline

ATOL = 1e-4  # fp32 graphs against the fp32 PyTorch reference


def run_cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def build_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("rt") / "tiny"
    build(BuildConfig(model="tiny-sd3", skip=SkipRange(3, 10), out=out, trt="none", batch=DimRange(1, 1, 3)))
    return out


@pytest.mark.parametrize("prompts, per_prompt", [(["a red cube"], 1), (["a red cube", "a blue ball", "x"], 1),
                                                 (["a red cube"], 3)])
def test_onnxruntime_and_torch_give_the_same_latents_and_images(build_dir, prompts, per_prompt):
    ort = BuildPipeline(build_dir, "onnxruntime").generate(prompts, seed=4, images_per_prompt=per_prompt)
    ref = open_pipeline(build_dir, "torch").generate(prompts, seed=4, images_per_prompt=per_prompt)
    n = len(prompts) * per_prompt
    assert ort.latents.shape == (n, 16, 16, 16) and ort.images.shape == (n, 3, 128, 128)
    assert torch.allclose(ort.latents, ref.latents, atol=ATOL)
    assert torch.allclose(ort.images, ref.images, atol=ATOL)
    assert set(ort.seconds) == {"tokenize", "text", "transformer", "vae"}


def test_prompts_and_seeds_change_the_result(build_dir):
    pipe = BuildPipeline(build_dir, "onnxruntime")
    a = pipe.generate(["a red cube"], seed=0)
    assert torch.equal(a.latents, pipe.generate(["a red cube"], seed=0).latents)
    assert (a.latents - pipe.generate(["a red cube"], seed=1).latents).abs().max() > 0.1
    assert (a.latents - pipe.generate(["a blue ball"], seed=0).latents).abs().max() > 1e-3


def test_generate_writes_pngs_of_the_requested_size(build_dir, tmp_path):
    out = tmp_path / "img.png"
    res = run_cli("generate", "--build", build_dir, "--prompt", "a cat", "--prompt", "a dog", "--seed", "0", "--out", out)
    assert res.exit_code == 0, res.output
    assert "PASSED generate: 2 image(s) of 128x128" in res.output and "noise by design" in res.output
    for path in (out, tmp_path / "img-1.png"):
        with Image.open(path) as im:
            assert im.format == "PNG" and im.size == (128, 128) and im.mode == "RGB"
            assert len(np.unique(np.asarray(im).reshape(-1, 3), axis=0)) > 100  # a real image, not a constant
    res = run_cli("generate", "--build", build_dir, "--prompt", "a cat", "--resolution", "64", "--out", out)
    assert res.exit_code == 2 and "is not one this build runs: a multiple of 16 in 128-128" in res.output


def test_long_prompt_truncation_is_reported(build_dir, tmp_path):
    res = run_cli("generate", "--build", build_dir, "--prompt", "a lighthouse on a cliff at dusk", "--out", tmp_path / "a.png")
    assert res.exit_code == 0
    assert "truncated: t5 keeps 8 of 32 tokens" in res.output and "dropped" in res.output


def test_missing_tampered_and_incomplete_builds(build_dir, tmp_path):
    with pytest.raises(mf.ManifestError, match="no manifest.json"):
        BuildPipeline(tmp_path)
    bad = tmp_path / "bad"
    shutil.copytree(build_dir, bad)
    tok = bad / "tokenizers" / "t5" / "tokenizer.json"
    tok.write_text(tok.read_text().replace("<eos>", "<EOS>"))
    with pytest.raises(mf.ManifestError, match="tokenizers/t5/tokenizer.json: sha256"):
        BuildPipeline(bad)
    res = run_cli("generate", "--build", bad, "--prompt", "x", "--out", tmp_path / "x.png")
    assert res.exit_code == 1 and "sha256" in res.output and not (tmp_path / "x.png").exists()
    bare = tmp_path / "bare"
    build(BuildConfig(model="tiny-sd3", skip=SkipRange(3, 10), out=bare, trt="none", batch=DimRange(1, 1, 1), components=()))
    with pytest.raises(OnexError, match="no text and no vae graph"):
        BuildPipeline(bare)


def test_backend_errors(build_dir):
    with pytest.raises(UsageError, match="unknown backend"):
        BuildPipeline(build_dir, "tvm")
    with pytest.raises(UsageError, match="the torch backend is the checks' float32 reference"):
        BuildPipeline(build_dir, "torch")  # the runtime alone carries no model code; open_pipeline hands it in
    res = run_cli("generate", "--build", build_dir, "--prompt", "x", "--backend", "tvm")
    assert res.exit_code == 2
    with pytest.raises(UsageError, match="batch range 1-3"):
        BuildPipeline(build_dir).generate(["a"] * 4)
    with pytest.raises(UsageError, match="no prompt"):
        BuildPipeline(build_dir).generate([])
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the TensorRT backend would run")
    with pytest.raises(OnexError, match="needs an NVIDIA GPU"):
        BuildPipeline(build_dir, "tensorrt")


def test_cuda_graph_errors(build_dir):
    with pytest.raises(UsageError, match="not available with the onnxruntime backend"):
        BuildPipeline(build_dir, "onnxruntime", cuda_graph=True)
    with pytest.raises(UsageError, match="with the torch backend needs a cuda device, not 'cpu'"):
        BuildPipeline(build_dir, "torch", "cpu", cuda_graph=True)
    res = run_cli("generate", "--build", build_dir, "--prompt", "x", "--backend", "torch", "--cuda-graph")
    assert res.exit_code == 2 and "--device cuda" in res.output
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: capture would run (tests/gpu covers it)")
    from onex_export.runtime.cuda_graph import CudaGraphDenoiser

    with pytest.raises(OnexError, match="CUDA-graph capture needs an NVIDIA GPU"):
        BuildPipeline(build_dir, "torch", "cuda", cuda_graph=True)
    with pytest.raises(OnexError, match="CUDA-graph capture needs an NVIDIA GPU"):
        CudaGraphDenoiser(object())
    res = run_cli("generate", "--build", build_dir, "--prompt", "x", "--backend", "torch", "--device", "cuda",
                  "--cuda-graph")
    assert res.exit_code == 1 and "drop --cuda-graph" in res.output


def test_a_graph_onnx_runtime_refuses_unoptimised_is_loaded_optimised(build_dir, monkeypatch, tmp_path):
    """ONNX Runtime 1.30 (seen on the GPU machine) refuses some fp16 graphs at ORT_DISABLE_ALL, the gate's lean
    setting; the pinned 1.31 does not, so that refusal is simulated here. The graph must still load, and
    compute the same."""
    from onex_export.runtime import graphs as rg

    real = rg._session
    lean = rg.OrtGraph(build_dir / "reuse.onnx", low_memory=True)

    def refusing(path, providers, low_memory, spin=True):
        if low_memory:
            raise RuntimeError("[ONNXRuntimeError] : 1 : FAIL : Type Error (as 1.30 says)")
        return real(path, providers, low_memory, spin)

    monkeypatch.setattr(rg, "_session", refusing)
    loaded = rg.OrtGraph(build_dir / "reuse.onnx", low_memory=True)
    g = torch.Generator().manual_seed(0)
    inputs = {n: torch.randn(1, 64 if "img" in n else 16, 32, generator=g) for n in ("img", "ctx", "delta_img", "delta_ctx")}
    assert all(torch.equal(a, b) for a, b in zip(loaded(**inputs).values(), lean(**inputs).values()))
    (tmp_path / "bad.onnx").write_bytes(b"not onnx")
    with pytest.raises(OnexError, match="ONNX Runtime cannot load"):
        rg.OrtGraph(tmp_path / "bad.onnx", low_memory=True)


def test_onnx_runtime_threads_do_not_spin_unless_asked(build_dir):
    """Spinning threads of idle sessions starve the one that runs: 6.7-10.8 images/s with, 40-52 without, here
    (BuildPipeline's docstring); spin=True is the knob for a machine where it pays."""
    key = "session.intra_op.allow_spinning"
    default, spinning = BuildPipeline(build_dir), BuildPipeline(build_dir, spin=True)
    assert {g.session.get_session_options().get_session_config_entry(key) for g in default.graphs.values()} == {"0"}
    with pytest.raises(RuntimeError, match="allow_spinning"):  # not set: ONNX Runtime's default (spin) applies
        spinning.graphs["vae"].session.get_session_options().get_session_config_entry(key)
    np.testing.assert_array_equal(spinning.generate(["a"], 3).pixels(), default.generate(["a"], 3).pixels())


def _edit_schedule(build_dir, to, edit):
    """A copy of the build whose manifest records another schedule, sealed as a build that wrote it would be (an
    edit left unsealed is refused before anything runs: tests/test_build_integrity.py)."""
    shutil.copytree(build_dir, to)
    path = to / mf.FILENAME
    manifest = json.loads(path.read_text())
    edit(manifest["schedule"])
    manifest["seal"] = seal_of({k: v for k, v in manifest.items() if k != "seal"})
    path.write_text(json.dumps(manifest))
    return to


def test_the_runtime_runs_the_schedule_its_manifest_records(build_dir, tmp_path):
    """Edited to the plain 2-step student (no skipping) and to other sigmas, the manifest changes what runs:
    the same images as the unedited build told to run that plan in code, and other images than its own."""
    from onex_export.schedule import SamplingPlan

    def two_step(schedule):
        for step in schedule["steps"]:
            step["plan"] = "full"
        schedule["name"] = "2-step"

    def sigmas(schedule):
        schedule["steps"][1]["sigma"] = schedule["steps"][0]["sigma_next"] = 0.5

    original = BuildPipeline(build_dir)
    base = original.generate(["a red cube"], seed=3).images
    for edit, plan in ((two_step, SamplingPlan.student(2)), (sigmas, SamplingPlan("1.x-nfe", (1.0, 0.5), (False, True)))):
        edited = BuildPipeline(_edit_schedule(build_dir, tmp_path / edit.__name__, edit))
        assert (edited.plan.sigmas, edited.plan.skips) == (plan.sigmas, plan.skips)
        images = edited.generate(["a red cube"], seed=3).images
        original.plan = plan
        assert torch.equal(images, original.generate(["a red cube"], seed=3).images)
        assert (images - base).abs().max() > 1e-3


@pytest.mark.parametrize("edit, message", [
    (lambda s: s["steps"][1].update(plan="half"), r"unknown step plan\(s\) \['half'\]"),
    (lambda s: s["steps"][0].update(sigma_next=0.6), "step 1 goes to sigma 0.6, but the next step starts at 0.75"),
    (lambda s: s["steps"][0].update(plan="skipping"), "the first step must be a full step"),
    (lambda s: s.pop("steps"), "cannot be run: 'steps'"),
])
def test_a_schedule_the_runtime_cannot_run_is_refused(build_dir, tmp_path, edit, message):
    with pytest.raises(mf.ManifestError, match=message):
        BuildPipeline(_edit_schedule(build_dir, tmp_path / "edited", edit))


def test_one_pipeline_serves_several_threads_with_the_results_of_sequential_calls(build_dir):
    from concurrent.futures import ThreadPoolExecutor

    import onex_export

    pipe = onex_export.BuildPipeline(build_dir)  # the package's public name
    assert pipe.warm_up() > 0
    requests = [(["a red cube"], seed) for seed in range(6)] + [(["a blue ball", "x"], 7), (["a red cube"] * 3, 8)]
    expected = [pipe.generate(prompts, seed).images for prompts, seed in requests]
    with ThreadPoolExecutor(max_workers=4) as pool:
        for _ in range(2):
            got = list(pool.map(lambda r: pipe.generate(*r).images, requests))
            assert all(torch.equal(a, b) for a, b in zip(got, expected))
    assert not torch.equal(expected[0], expected[1])  # distinct seeds, distinct images: the comparison has teeth


def test_batched_requests_give_each_request_its_own_images(build_dir):
    """Requests batched together (up to the build's batch of 3, so two batches here) with their own seeds get
    the images they get alone: the noise of each is drawn from its own seed."""
    from onex_export import Request

    pipe = BuildPipeline(build_dir)
    requests = [Request(("a red cube",), seed=1), Request(("a blue ball", "x"), seed=2),
                Request(("a red cube",), seed=3, images_per_prompt=2)]
    batched = pipe.generate_batch(requests)
    assert [g.images.shape[0] for g in batched] == [1, 2, 2]
    for request, got in zip(requests, batched):
        alone = pipe.generate(list(request.prompts), request.seed, request.images_per_prompt)
        assert (got.images - alone.images).abs().max() <= 1e-6 and (got.latents - alone.latents).abs().max() <= 1e-5
    assert (batched[0].images - batched[2].images[:1]).abs().max() > 1e-3  # same prompt, other seed
    with pytest.raises(UsageError, match="4 images per call is outside this build's batch range 1-3"):
        pipe.generate_batch([Request(("a",), images_per_prompt=4)])


def _faults() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _square_graph(folder: Path, n: int = 8192) -> Path:
    """x [n, 1] @ xt [1, n] summed: one n^2 float32 intermediate (256 MiB at 8192) in ONNX Runtime's arena, a
    4-byte output."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "xt"], ["big"]), helper.make_node("ReduceSum", ["big"], ["y"], keepdims=0)],
        "arena", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [n, 1]),
                  helper.make_tensor_value_info("xt", TensorProto.FLOAT, [1, n])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9), folder / "g.onnx")
    return folder / "g.onnx"


@pytest.mark.parametrize("low_memory", [False, True])
def test_an_output_kept_after_its_session_does_not_keep_the_sessions_memory(tmp_path, low_memory):
    """ONNX Runtime's outputs can live in its arena; kept by the caller (the gate keeps step 1's deltas and each
    check's outputs), they held every dropped session's arena alive: SD3-Medium's fp16 gate grew to 19.7 GiB and
    was killed. Here a 256 MiB intermediate is in the arena (the session's own, or with ``low_memory`` the shared
    one, given back by ``release_shared_arena``); the 4-byte output is kept and the session dropped: the process
    must give the intermediate back (it kept 272 MiB without the copy)."""
    import gc

    from onex_export.export.stages import rss_bytes
    from onex_export.models.weights import return_freed_memory
    from onex_export.runtime.graphs import OrtGraph, release_shared_arena

    path = _square_graph(tmp_path)
    x = torch.randn(8192, 1, generator=torch.Generator().manual_seed(0))
    release_shared_arena()
    before = rss_bytes()
    session = OrtGraph(path, low_memory=low_memory)
    out = session(x=x, xt=x.T.contiguous())
    del session
    gc.collect()
    release_shared_arena()
    return_freed_memory()
    kept = rss_bytes() - before
    assert out["y"].item() == pytest.approx(float(x.sum()) ** 2, rel=1e-4)  # the output is still right
    assert kept < 128 * 2**20, f"{kept / 2**20:.0f} MiB still resident after the session was dropped"


def test_lean_sessions_reuse_one_arena_until_it_is_released(tmp_path):
    """The gate loads graph after graph: a ``low_memory`` session's first run takes its working memory from the
    shared arena that the previous session filled, instead of fresh pages the kernel must fault in and zero (at
    4 KiB a page: 65536 faults for the 256 MiB intermediate here); after ``release_shared_arena`` they are fresh again."""
    import gc

    from onex_export.runtime.graphs import OrtGraph, release_shared_arena

    path = _square_graph(tmp_path)
    x = torch.randn(8192, 1, generator=torch.Generator().manual_seed(0))
    feeds = {"x": x, "xt": x.T.contiguous()}
    release_shared_arena()
    faults = []
    for release in (False, True, False):
        session = OrtGraph(path, low_memory=True)
        start = _faults()
        session(**feeds)
        faults.append(_faults() - start)
        del session
        gc.collect()
        if release:
            release_shared_arena()
    pages = 8192 * 8192 * 4 // 4096
    first, reused, after_release = faults
    assert first > pages // 2 and after_release > pages // 2, faults  # fresh memory: faulted in
    assert reused < pages // 8, faults  # the arena's: already resident
