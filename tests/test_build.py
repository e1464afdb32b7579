"""`onex-export build` / `verify` end to end on the embedded tiny-sd3 with --skip 3-10.

Everything here is real: diffusers model, torch ONNX export, ONNX Runtime sessions, and TensorRT-RTX
engine builds on the CPU (skipped, saying why, where the RTX package is missing). Engines are not
executed: that needs a GPU.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import onnx
import pytest
import torch
from click.testing import CliRunner

from onex_export.cli import main
from onex_export.config import SkipRange
from onex_export.errors import OnexError, UsageError
from onex_export.export import manifest as mf
from onex_export.export.build import BuildConfig, ParityFailedError, build, load_reference
from onex_export.export.graphs import PLANS
from onex_export.export.shapes import DimRange
from onex_export.export.tensorrt import flavour_version
from onex_export.export.verify import verify
from onex_export.models import CompensationMLP, save_compensation
from onex_export.runtime.graphs import OrtGraph, PlanDenoiser
from onex_export.runtime.sampler import Conditioning, TorchDenoiser, sample
from onex_export.schedule import SamplingPlan

HAS_RTX = flavour_version("tensorrt-rtx") is not None
NO_RTX = "TensorRT-RTX not installed: pip install -e '.[tensorrt-rtx]' to build engines"
SKIP = SkipRange(3, 10)
FP32_ATOL = 1e-4


def run_cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def tree_digest(folder: Path) -> dict:
    return {p.name: mf.sha256_file(p) for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """One real build: RTX engines when installed, dynamic batch 1..3, resolution 64..128, text 8..16."""
    out = tmp_path_factory.mktemp("engines") / "tiny"
    logs = []
    manifest = build(BuildConfig(skip=SKIP, out=out, trt="tensorrt-rtx" if HAS_RTX else "none",
                                 batch=DimRange(1, 1, 3), resolution=DimRange(64, 128, 128),
                                 text_len=DimRange(8, 16, 16)), log=logs.append)
    return out, manifest, logs


def test_build_passes_with_fp32_parity_at_batch_1_and_3_and_two_resolutions(built):
    _, manifest, _ = built
    rows = manifest["parity"]["rows"]
    assert manifest["status"] == "passed" and manifest["parity"]["status"] == "passed"
    assert {r["case"].split(" ", 1)[0] for r in rows} == {"full", "skipping", "1.x-nfe", "text", "vae"}
    cases = {r["case"] for r in rows}
    assert any("b1 128px t16" in c for c in cases) and any("b3 64px t8" in c for c in cases)
    assert all(r["max_abs"] <= FP32_ATOL and r["cosine"] > 0.99999 for r in rows)
    # two shape points x (3 full outputs + skipping + schedule), then the text (2 outputs) and VAE graphs
    assert len(rows) == 2 * 5 + 3


def test_ort_plans_match_pytorch_independently_of_the_gate(built):
    """Our own run of the manifest's plans at a size the gate did not use (batch 3, 96 px, 12 tokens)."""
    out, manifest, _ = built
    graphs = {n: OrtGraph(out / g["onnx"]["file"]) for n, g in manifest["graphs"].items()}
    split = load_reference("tiny-sd3", None, SKIP)
    g = torch.Generator().manual_seed(11)
    cond = Conditioning(torch.randn(3, 12, 48, generator=g), torch.randn(3, 40, generator=g))
    ref = sample(TorchDenoiser(split), SamplingPlan.one_x(), cond, (16, 12, 12), seed=5)
    got = sample(PlanDenoiser(graphs, manifest["plans"]), SamplingPlan.one_x(), cond, (16, 12, 12), seed=5)
    assert torch.allclose(got, ref, atol=FP32_ATOL)
    # negative: the skipping plan fed zero deltas is not the full result
    x = torch.randn(1, 16, 16, 16, generator=g)
    text, pooled, ts = torch.randn(1, 16, 48, generator=g), torch.randn(1, 40, generator=g), torch.full((1,), 750.0)
    den = PlanDenoiser(graphs, PLANS)
    v, d_img, d_ctx = den.full(x, text, pooled, ts)
    assert torch.allclose(den.skipping(x, text, pooled, ts, d_img, d_ctx), v, atol=FP32_ATOL)
    assert (den.skipping(x, text, pooled, ts, 0 * d_img, 0 * d_ctx) - v).abs().max() > 1e-3


def test_graphs_are_valid_onnx_with_dynamic_axes(built):
    out, manifest, _ = built
    for name, g in manifest["graphs"].items():
        model = onnx.load(str(out / g["onnx"]["file"]))
        onnx.checker.check_model(model)
        assert model.opset_import[0].version >= 17
        dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input}
        assert all(shape[0] == "batch" for shape in dims.values()), (name, dims)
    head_dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim]
                 for i in onnx.load(str(out / "head.onnx")).graph.input}
    assert head_dims["hidden_states"] == ["batch", 16, "latent_height", "latent_width"]
    assert head_dims["encoder_hidden_states"] == ["batch", "text_len", 48]


def test_manifest_lists_every_file_with_its_hash_and_the_schedule(built):
    out, manifest, _ = built
    on_disk = json.loads((out / "manifest.json").read_text())
    assert on_disk == json.loads(json.dumps(manifest))
    assert mf.check_files(out, on_disk) == []
    for entry in mf.artifact_entries(on_disk):
        assert mf.sha256_file(out / entry["file"]) == entry["sha256"]
    assert on_disk["skip"] == {"one_based": "3-10", "first": 3, "last": 10, "zero_based": list(range(2, 10)), "count": 8}
    assert on_disk["schedule"]["sigmas"] == [1.0, 0.75]
    assert [s["plan"] for s in on_disk["schedule"]["steps"]] == ["full", "skipping"]
    assert round(on_disk["schedule"]["effective_nfe"], 3) == 1.667
    assert on_disk["shapes"]["dims"]["img_tokens"] == [16, 64, 64]
    assert set(on_disk["plans"]) == {"full", "skipping"}
    assert not list(out.parent.glob(f".{out.name}.*"))  # no temp folder left behind


@pytest.mark.skipif(not HAS_RTX, reason=NO_RTX)
def test_rtx_built_real_engines_for_every_graph(built):
    out, manifest, _ = built
    for name, g in manifest["graphs"].items():
        engine = g["engine"]
        assert engine["flavour"] == "tensorrt-rtx" and engine["file"] == f"{name}.plan"
        assert (out / engine["file"]).stat().st_size > 100_000  # a real plan, not a stub
        first_input = g["inputs"][0]["name"]
        assert g["profile"][first_input][0][0] == 1  # the profile's minimum batch
    assert manifest["tool"]["tensorrt-rtx"] == flavour_version("tensorrt-rtx")


def test_weight_duplication_ratio_within_bound(built):
    out, manifest, _ = built
    graph_bytes = 0
    for g in (manifest["graphs"][n] for n in ("head", "segment", "reuse", "tail")):
        model = onnx.load(str(out / g["onnx"]["file"]))
        graph_bytes += sum(onnx.numpy_helper.to_array(t).nbytes for t in model.graph.initializer)
    w = manifest["weights"]
    assert graph_bytes == w["graph_bytes"]
    assert 0.95 <= w["duplication_ratio"] <= 1.02


def test_verify_passes_then_catches_tampering(built, tmp_path):
    out, manifest, _ = built
    good = tmp_path / "good"
    shutil.copytree(out, good)
    _, parity = verify(good)
    assert parity["status"] == "passed"
    victim = "segment.plan" if HAS_RTX else "segment.onnx"
    data = bytearray((good / victim).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (good / victim).write_bytes(bytes(data))
    with pytest.raises(mf.ManifestError, match=f"{victim}: sha256 does not match"):
        verify(good)
    res = run_cli("verify", good)
    assert res.exit_code == 1 and "sha256 does not match" in res.output and "FAILED" in res.output


def test_verify_on_engines_needs_a_gpu_and_engines(built, tmp_path):
    out, manifest, _ = built
    if HAS_RTX:
        assert all(g["engine"]["tf32"] is False for g in manifest["graphs"].values())
    with pytest.raises(UsageError, match="cannot run backend 'torch'"):
        verify(out, backend="torch")
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: tests/gpu runs the engines")
    with pytest.raises(OnexError, match="needs an NVIDIA GPU"):
        verify(out, backend="tensorrt")
    res = run_cli("verify", out, "--backend", "tensorrt")
    assert res.exit_code == 1 and "verify with --backend onnxruntime here" in res.output


def test_verify_catches_a_corrupted_onnx_and_a_missing_file(built, tmp_path):
    out, _, _ = built
    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    (bad / "tail.onnx").write_bytes(b"\x00" * 128)
    (bad / "head.onnx").unlink()
    with pytest.raises(mf.ManifestError) as info:
        verify(bad)
    assert "head.onnx: missing" in str(info.value) and "tail.onnx: sha256" in str(info.value)
    with pytest.raises(mf.ManifestError, match="no manifest.json"):
        verify(tmp_path)


def test_rebuild_reuses_unchanged_graphs_and_rebuilds_only_what_changed(built, tmp_path):
    out, manifest, _ = built
    again = tmp_path / "again"
    shutil.copytree(out, again)
    before = tree_digest(again)
    logs = []
    config = dict(skip=SKIP, out=again, trt="tensorrt-rtx" if HAS_RTX else "none", batch=DimRange(1, 1, 3),
                  resolution=DimRange(64, 128, 128), text_len=DimRange(8, 16, 16))
    build(BuildConfig(**config), log=logs.append)
    assert sum("unchanged, reused" in line for line in logs) == (12 if HAS_RTX else 6)
    after = tree_digest(again)
    assert {k: v for k, v in after.items() if k != "manifest.json"} == {k: v for k, v in before.items() if k != "manifest.json"}
    # A trained MLP changes the reuse graph only.
    mlp = CompensationMLP.for_transformer(load_reference("tiny-sd3", None, SKIP).transformer)
    torch.nn.init.normal_(mlp.img.fc2.weight, std=0.05)
    path = save_compensation(mlp, tmp_path / "mlp.safetensors")
    logs.clear()
    changed = build(BuildConfig(**config, mlp=path), log=logs.append)
    assert [line.split()[2] for line in logs if "export" in line and "reused" in line] == ["head", "segment", "tail", "text", "vae"]
    assert changed["status"] == "passed"
    assert tree_digest(again)["reuse.onnx"] != before["reuse.onnx"]
    assert tree_digest(again)["head.onnx"] == before["head.onnx"]


def test_external_data_for_large_graphs(tmp_path):
    """The 2 GiB rule, exercised with a 1-byte threshold: weights go to <graph>.onnx.data."""
    out = tmp_path / "ext"
    manifest = build(BuildConfig(skip=SKIP, out=out, trt="none", batch=DimRange(1, 1, 1),
                                 external_data_threshold=1))
    assert manifest["status"] == "passed"
    for name, g in manifest["graphs"].items():
        assert g["onnx_data"]["file"] == f"{name}.onnx.data"
        model = onnx.load(str(out / f"{name}.onnx"), load_external_data=False)
        assert all(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)
        assert (out / f"{name}.onnx.data").stat().st_size >= g["weight_bytes"] > 0
    assert mf.check_files(out, manifest) == []


def test_failed_engine_build_leaves_previous_build_intact(built, tmp_path):
    if not HAS_RTX:
        pytest.skip(NO_RTX)
    out, _, _ = built
    target = tmp_path / "keep"
    shutil.copytree(out, target)
    before = tree_digest(target)
    res = run_cli("build", "--out", target, "--trt", "tensorrt-rtx", "--compute-capability", "9.0", "--batch", "1")
    assert res.exit_code in (1, 2) and "9.0" in res.output
    assert tree_digest(target) == before
    assert not list(tmp_path.glob(".keep.*"))


def test_killed_build_leaves_previous_build_intact(built, tmp_path):
    out, _, _ = built
    target = tmp_path / "victim"
    shutil.copytree(out, target)
    before = tree_digest(target)
    proc = subprocess.Popen([sys.executable, "-m", "onex_export.cli", "build", "--out", str(target), "--trt", "none",
                             "--precision", "fp16"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not list(tmp_path.glob(".victim.tmp-*/head.onnx")):
        time.sleep(0.05)
    assert list(tmp_path.glob(".victim.tmp-*")), "the build never started writing"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert tree_digest(target) == before  # the good build is untouched
    # The next build removes the dead build's temp folder.
    build(BuildConfig(skip=SKIP, out=tmp_path / "other", trt="none", batch=DimRange(1, 1, 1)))
    assert not list(tmp_path.glob(".victim.tmp-*"))
    assert mf.check_files(target, mf.read_manifest(target)) == []


@pytest.fixture(scope="module")
def overflowing_model(tmp_path_factory):
    """A real diffusers folder whose image embedding reaches 1e6: fine in fp32, inf in fp16."""
    split = load_reference("tiny-sd3", None, SKIP)
    with torch.no_grad():
        split.transformer.pos_embed.proj.weight.mul_(1e5)
    folder = tmp_path_factory.mktemp("overflow") / "model"
    split.transformer.save_pretrained(str(folder))
    return folder


def test_parity_failure_exits_1_keeps_artifacts_and_the_good_build(overflowing_model, tmp_path):
    out = tmp_path / "big"
    build(BuildConfig(skip=SKIP, out=out, model=str(overflowing_model), trt="none", batch=DimRange(1, 1, 1),
                      text_len=DimRange(16, 16, 16)))
    before = tree_digest(out)
    res = run_cli("build", "--model", overflowing_model, "--out", out, "--trt", "none", "--precision", "fp16",
                  "--batch", "1", "--text-len", "16")
    assert res.exit_code == 1
    assert "FAIL" in res.output and res.output.strip().endswith("FAILED")
    assert tree_digest(out) == before
    failed = mf.read_manifest(tmp_path / "big.failed")
    assert failed["status"] == "failed" and failed["precision"] == "fp16"
    res = run_cli("build", "--model", overflowing_model, "--out", out, "--trt", "none", "--precision", "fp16",
                  "--batch", "1", "--text-len", "16", "--allow-parity-failure")
    assert res.exit_code == 1 and "installed anyway" in res.output
    assert mf.read_manifest(out)["status"] == "failed"


def test_bf16_cannot_be_checked_by_onnxruntime_on_cpu(tmp_path):
    with pytest.raises(ParityFailedError, match="cannot execute bf16"):
        build(BuildConfig(skip=SKIP, out=tmp_path / "bf", precision="bf16", trt="none", batch=DimRange(1, 1, 1)))
    failed = mf.read_manifest(tmp_path / "bf.failed")
    assert failed["parity"]["status"] == "not-run"
    head = onnx.load(str(tmp_path / "bf.failed" / "head.onnx"))
    types = {i.name: i.type.tensor_type.elem_type for i in head.graph.input}
    assert types["hidden_states"] == onnx.TensorProto.BFLOAT16 and types["timestep"] == onnx.TensorProto.FLOAT


@pytest.mark.parametrize("args, message", [
    (["--skip", "3-24"], "1-23"),
    (["--skip", "ten"], "malformed"),
    (["--resolution", "100"], "multiple of 16"),
    (["--batch", "4:2:1"], "MIN <= OPT <= MAX"),
    (["--components", "text,unet"], "unknown component(s) ['unet']"),
    (["--text-len", "8"], "does not include the text encoders' 16 tokens"),
])
def test_bad_build_options_exit_2(args, message, tmp_path):
    res = run_cli("build", "--out", tmp_path / "x", "--trt", "none", *args)
    assert res.exit_code == 2 and message in res.output
    assert not (tmp_path / "x").exists()


def test_full_tensorrt_not_installed_is_a_clear_error(tmp_path):
    if flavour_version("tensorrt"):
        pytest.skip("full TensorRT is installed here")
    res = run_cli("build", "--out", tmp_path / "x", "--trt", "tensorrt")
    assert res.exit_code == 1 and "pip install" in res.output and "--trt none" in res.output
    assert not (tmp_path / "x").exists() and not list(tmp_path.glob(".x.*"))
