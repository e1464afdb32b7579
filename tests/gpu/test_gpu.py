"""Checks that need an NVIDIA GPU; every test here is skipped on a machine without CUDA (CI has none).

Run them on a GPU machine with ``python -m pytest -q tests/gpu``:
- CUDA-graph replay gives what eager execution gives, and new inputs flow through the captured graphs;
- the PyTorch runtime in fp16/bf16 on the GPU stays within the parity tolerances of those precisions;
- TensorRT engines (full TensorRT, or TensorRT-RTX where it supports this GPU) pass the parity gate
  when executed, also under CUDA-graph capture;
- the latency benchmark runs end to end on those engines.
"""
import copy
import importlib.util
import json

import pytest
import torch

from onex_export.config import SkipRange
from onex_export.build import BuildConfig, build
from onex_export.export.precision import PrecisionPolicy, apply_precision
from onex_export.export.shapes import DimRange
from onex_export.check.verify import verify
from onex_export.models import SplitSD3Transformer, build_tiny
from onex_export.check.parity import compare, tolerance_for
from onex_export.runtime.cuda_graph import CudaGraphDenoiser
from onex_export.check.reference import open_pipeline
from onex_export.runtime.pipeline import BuildPipeline
from onex_export.runtime.sampler import Conditioning, TorchDenoiser, sample
from onex_export.schedule import SamplingPlan

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU with CUDA")
SKIP = SkipRange(3, 10)
LATENT = (16, 16, 16)


@pytest.fixture(scope="module")
def split():
    torch.manual_seed(0)
    model = SplitSD3Transformer(build_tiny("tiny-sd3"), SKIP)
    torch.nn.init.normal_(model.mlp.img.fc2.weight, std=0.05)  # a non-zero f(delta), as after training
    torch.nn.init.normal_(model.mlp.ctx.fc2.weight, std=0.05)
    return model.eval().to("cuda")


def conditioning(split, batch, device="cuda"):
    cfg = split.transformer.config
    g = torch.Generator().manual_seed(batch)
    return Conditioning(torch.randn(batch, 16, cfg.joint_attention_dim, generator=g).to(device),
                        torch.randn(batch, cfg.pooled_projection_dim, generator=g).to(device))


@pytest.mark.parametrize("batch", [1, 3])
def test_cuda_graph_replay_matches_eager(split, batch):
    eager, graphed = TorchDenoiser(split), CudaGraphDenoiser(TorchDenoiser(split))
    cond, plan = conditioning(split, batch), SamplingPlan.one_x()
    results = []
    for seed in (0, 1):
        want = sample(eager, plan, cond, LATENT, seed, device="cuda")
        got = sample(graphed, plan, cond, LATENT, seed, device="cuda")
        assert (got - want).abs().max().item() <= 1e-5
        results.append(got)
    assert graphed.captures == 2  # full and skipping, captured once, replayed for the second seed
    assert (results[0] - results[1]).abs().max().item() > 1e-2  # new noise really flowed through the graphs


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_torch_half_precision_on_the_gpu_is_within_tolerance(split, precision):
    half = apply_precision(copy.deepcopy(split), PrecisionPolicy(precision))  # a copy: the fixture stays float32
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    cond, plan = conditioning(split, 2), SamplingPlan.one_x()
    want = sample(TorchDenoiser(split), plan, cond, LATENT, 0, device="cuda")
    got = sample(TorchDenoiser(half), plan, cond, LATENT, 0, dtype=dtype, device="cuda")
    rows = compare(f"1.x schedule {precision}", {"latents": want}, {"latents": got.float()},
                   tolerance_for("tensorrt", precision))
    assert all(r.passed for r in rows), rows


def _engine_flavour() -> str | None:
    """A TensorRT flavour that can build and run engines on this GPU, or None."""
    if importlib.util.find_spec("tensorrt") is not None:
        return "tensorrt"
    if importlib.util.find_spec("tensorrt_rtx_bindings") is not None:
        from onex_export.export.tensorrt import load_trt

        major, minor = torch.cuda.get_device_capability()
        if f"SM{major}{minor}" in load_trt("tensorrt-rtx").ComputeCapability.__members__:
            return "tensorrt-rtx"
    return None


def test_tensorrt_engines_pass_the_gate_and_generate(tmp_path):
    flavour = _engine_flavour()
    if flavour is None:
        pytest.skip(f"no TensorRT flavour here runs on {torch.cuda.get_device_name()} "
                    "(TensorRT-RTX skips SM 9.0; install '.[tensorrt]')")
    out = tmp_path / "engines"
    manifest = build(BuildConfig(model="tiny-sd3", skip=SKIP, out=out, trt=flavour, batch=DimRange(1, 1, 2)))
    assert manifest.status == "passed"
    manifest, verification = verify(out, backend="tensorrt")
    assert verification["status"] == "passed", verification["rows"]
    assert [v["artifact"] for v in manifest.verifications] == ["onnx", "engine"]  # the engine row is recorded
    eager = BuildPipeline(out, "tensorrt").generate(["a red cube", "a blue ball"], seed=0)
    graphed = BuildPipeline(out, "tensorrt", cuda_graph=True).generate(["a red cube", "a blue ball"], seed=0)
    reference = open_pipeline(out, "torch").generate(["a red cube", "a blue ball"], seed=0)
    assert (graphed.latents - eager.latents).abs().max().item() <= 1e-5
    tol = tolerance_for(flavour, "fp32")
    assert all(r.passed for r in compare("engines vs torch", {"latents": reference.latents},
                                         {"latents": eager.latents}, tol))


def test_tensorrt_benchmark_runs_end_to_end(tmp_path):
    flavour = _engine_flavour()
    if flavour is None:
        pytest.skip(f"no TensorRT flavour here runs on {torch.cuda.get_device_name()}")
    from bench.latency import main

    assert main(["--backend", "tensorrt", "--trt", flavour, "--device", "cuda", "--repeats", "1", "--warmup", "1",
                 "--batch", "1", "--batch", "2", "--cuda-graph", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "latency.json").read_text())
    assert report["backend"] == flavour and report["versions"][flavour]
    assert [r["batch"] for r in report["results"]] == [1, 2]
    assert {"text encoding", "VAE decode", "MLP (both streams)"} <= set(report["results"][0]["stages"])


def test_gate_with_the_reference_on_the_gpu(tmp_path):
    """--gate-device cuda: the float32 reference streams its modules onto the GPU; the ONNX graphs still run in
    ONNX Runtime. Its verdict and figures match the CPU reference's."""
    from onex_export.check.gate import GateConfig

    rows = {}
    for device in ("cpu", "cuda"):
        manifest = build(BuildConfig(model="tiny-sd3", skip=SKIP, out=tmp_path / device, trt="none", precision="fp16", components=(),
                                     batch=DimRange(1, 1, 1), gate=GateConfig("opt", device)))
        v = manifest.verifications[0]
        assert v["status"] == "passed" and v["reference_device"] == device
        rows[device] = {(r["case"], r["output"]): r["max_rel"] for r in v["rows"]}
    assert rows["cpu"].keys() == rows["cuda"].keys()
    # the candidate is the same fp16 graph on the same CPU; only the reference moved (float32, TF32 off)
    assert all(abs(rows["cpu"][k] - rows["cuda"][k]) < 1e-4 for k in rows["cpu"])
