"""`onex-export build` / `verify` end to end on the embedded tiny-sd3 with --skip 3-10.

Everything here is real: diffusers model, torch ONNX export, ONNX Runtime sessions, and TensorRT-RTX
engine builds on the CPU (skipped, saying why, where the RTX package is missing). Engines are not
executed: that needs a GPU (tests/gpu).
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
from onex_export.build import BuildConfig, build
from onex_export.check.gate import GateConfig
from onex_export.check.reference import open_pipeline
from onex_export.export.precision import Fp32Blocks
from onex_export.export.shapes import DimRange
from onex_export.export.tensorrt import RTX_DEFAULT_TARGETS
from onex_export.trt import flavour_version
from onex_export.check.verify import verify
from onex_export.models import CompensationMLP, SplitSD3Transformer, build_tiny, save_compensation
from onex_export.runtime.graphs import OrtGraph, PlanDenoiser
from onex_export.runtime.pipeline import BuildPipeline
from onex_export.runtime.sampler import Conditioning, TorchDenoiser, sample
from onex_export.schedule import SamplingPlan

HAS_RTX = flavour_version("tensorrt-rtx") is not None


def rtx_targets() -> tuple[str, ...]:
    """RTX's default targets; on a machine whose visible GPU RTX cannot target (an H100), an RTX card's, since a
    build for default targets that cannot run on the visible GPU is refused."""
    if torch.cuda.is_available() and "%d.%d" % torch.cuda.get_device_capability() not in RTX_DEFAULT_TARGETS:
        return ("8.6",)
    return ()


RTX = dict(trt="tensorrt-rtx", compute_capabilities=rtx_targets()) if HAS_RTX else dict(trt="none")
NO_RTX = "TensorRT-RTX not installed: pip install -e '.[tensorrt-rtx]' to build engines"
SKIP = SkipRange(3, 10)
FP32_ATOL = 1e-4
TRANSFORMER_GRAPHS = ("head", "segment", "reuse", "tail")


def run_cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def tree_digest(folder: Path) -> dict:
    return {p.name: mf.sha256_file(p) for p in sorted(folder.iterdir()) if p.is_file()}


def reference():
    return SplitSD3Transformer(build_tiny("tiny-sd3"), SKIP).eval()


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """One real build: RTX engines when installed, dynamic batch 1..3, resolution 64..128, text 8..16, gated at
    every corner of that profile."""
    out = tmp_path_factory.mktemp("engines") / "tiny"
    logs = []
    manifest = build(BuildConfig(model="tiny-sd3", skip=SKIP, out=out, **RTX,
                                 batch=DimRange(1, 1, 3), resolution=DimRange(64, 128, 128),
                                 text_len=DimRange(8, 16, 16), gate=GateConfig("full")), log=logs.append)
    return out, manifest, logs


def test_build_passes_with_fp32_parity_at_every_profile_corner(built):
    _, manifest, _ = built
    [v] = manifest.verifications
    assert manifest.status == "passed" and v["status"] == "passed"
    assert (v["artifact"], v["backend"], v["device"], v["reference_device"], v["mode"]) == (
        "onnx", "onnxruntime", "cpu", "cpu", "full")
    assert sorted(map(tuple, v["shapes"])) == sorted({(1, 128, 16), *((b, r, t) for b in (1, 3) for r in (64, 128)
                                                                    for t in (8, 16))})
    rows = v["rows"]
    assert all(r["max_abs"] <= FP32_ATOL and r["cosine"] > 0.99999 for r in rows)
    # per shape point (the optimum is also a corner: 8 points): each graph alone (head 3 outputs, segment 4,
    # reuse 2, tail 1), the chained schedule (step 1: 3, step 2: 1, latents 1); then the text (2) and VAE graphs once
    assert len(v["shapes"]) == 8 and len(rows) == 8 * (10 + 5) + 3
    cases = {r["case"] for r in rows}
    assert "graph segment b3 64px t8" in cases and "1.x-nfe schedule b1 128px t16" in cases
    assert v["range_check"]["limit"] is None  # fp32 has no narrower range to check


def test_ort_plans_match_pytorch_independently_of_the_gate(built):
    """Our own run of the manifest's plans at a size the gate did not use (batch 3, 96 px, 12 tokens)."""
    out, manifest, _ = built
    graphs = {n: OrtGraph(out / g.onnx.file) for n, g in manifest.graphs.items()}
    split = reference()
    g = torch.Generator().manual_seed(11)
    cond = Conditioning(torch.randn(3, 12, 48, generator=g), torch.randn(3, 40, generator=g))
    ref = sample(TorchDenoiser(split), SamplingPlan.one_x(), cond, (16, 12, 12), seed=5)
    got = sample(PlanDenoiser(graphs, manifest.plans), SamplingPlan.one_x(), cond, (16, 12, 12), seed=5)
    assert torch.allclose(got, ref, atol=FP32_ATOL)
    # negative: the skipping plan fed zero deltas is not the full result
    x = torch.randn(1, 16, 16, 16, generator=g)
    text, pooled, ts = torch.randn(1, 16, 48, generator=g), torch.randn(1, 40, generator=g), torch.full((1,), 750.0)
    den = PlanDenoiser(graphs, manifest.plans)
    v, d_img, d_ctx = den.full(x, text, pooled, ts)
    assert torch.allclose(den.skipping(x, text, pooled, ts, d_img, d_ctx), v, atol=FP32_ATOL)
    assert (den.skipping(x, text, pooled, ts, 0 * d_img, 0 * d_ctx) - v).abs().max() > 1e-3


def test_graphs_are_valid_onnx_with_every_symbolic_dimension_dynamic(built):
    out, manifest, _ = built
    for name, g in manifest.graphs.items():
        model = onnx.load(str(out / g.onnx.file))
        onnx.checker.check_model(model)
        assert model.opset_import[0].version >= 17
        dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input}
        assert all(shape[0] == "batch" for shape in dims.values()), (name, dims)
    head_dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim]
                 for i in onnx.load(str(out / "head.onnx")).graph.input}
    assert head_dims["hidden_states"] == ["batch", 16, "latent_height", "latent_width"]
    assert head_dims["encoder_hidden_states"] == ["batch", "text_len", 48]


def test_manifest_lists_every_file_with_its_hash_the_schedule_and_each_stage(built):
    out, manifest, _ = built
    on_disk = json.loads((out / "manifest.json").read_text())
    assert on_disk == json.loads(json.dumps(manifest.to_json()))
    assert on_disk["schema_version"] == 2 and mf.check_files(out, mf.read_manifest(out)) == []
    assert on_disk["skip"] == {"one_based": "3-10", "first": 3, "last": 10, "zero_based": list(range(2, 10)), "count": 8}
    assert on_disk["schedule"]["sigmas"] == [1.0, 0.75]
    assert [s["plan"] for s in on_disk["schedule"]["steps"]] == ["full", "skipping"]
    assert round(on_disk["schedule"]["effective_nfe"], 3) == 1.667
    assert on_disk["shapes"]["dims"]["img_tokens"] == [16, 64, 64]
    assert [s["graph"] for s in on_disk["plans"]["full"]["steps"]] == ["head", "segment", "tail"]
    assert [s["graph"] for s in on_disk["plans"]["skipping"]["steps"]] == ["head", "reuse", "tail"]
    assert {n: g["def"]["blocks"] for n, g in on_disk["graphs"].items() if g["def"]} == {
        "head": "1-2", "segment": "3-10", "reuse": "3-10", "tail": "11-24"}
    assert on_disk["precision_policy"] == {"precision": "fp32", "fp32_blocks": None, "layer_norms": "float32 (all)",
                                           "timestep": "float32"}
    stages = on_disk["stages"]
    assert set(stages) == {"per_stage_peak", "load", "export", "engines", "gate"}
    assert all(stages[s]["seconds"] > 0 and stages[s]["peak_rss_bytes"] > 100e6 for s in ("load", "export", "gate"))
    assert not list(out.parent.glob(f".{out.name}.*"))  # no temp folder left behind


@pytest.mark.skipif(not HAS_RTX, reason=NO_RTX)
def test_rtx_built_real_engines_for_every_graph(built):
    out, manifest, _ = built
    for name, g in manifest.graphs.items():
        engine = g.engine
        assert engine.extra["flavour"] == "tensorrt-rtx" and engine.file == f"{name}.plan"
        assert engine.extra["target"] == (list(rtx_targets()) or "default")
        assert (out / engine.file).stat().st_size > 100_000  # a real plan, not a stub
        first_input = g.inputs[0].name
        assert g.profile[first_input][0][0] == 1  # the profile's minimum batch
    assert manifest.tool["tensorrt-rtx"] == flavour_version("tensorrt-rtx")


def test_weight_duplication_ratio_within_bound(built):
    out, manifest, _ = built
    w = manifest.weights
    # the files themselves: weights plus the graph structure (a few hundred kB per graph at this tiny width)
    files = sum((out / manifest.graphs[n].onnx.file).stat().st_size for n in TRANSFORMER_GRAPHS)
    assert w["graph_bytes"] < files < w["graph_bytes"] + 4 * 500_000
    # the model's own count: every parameter and buffer of the transformer and the MLP, float32
    model = build_tiny("tiny-sd3")
    model_bytes = sum(t.numel() * 4 for t in (*model.parameters(), *model.buffers()))
    mlp = CompensationMLP.for_transformer(model)
    assert w["model_bytes"] == model_bytes + sum(t.numel() * 4 for t in mlp.parameters())
    assert 0.95 <= w["duplication_ratio"] <= 1.02


def test_verify_passes_records_itself_then_catches_tampering(built, tmp_path):
    out, manifest, _ = built
    good = tmp_path / "good"
    shutil.copytree(out, good)
    updated, verification = verify(good)
    assert verification["status"] == "passed"
    assert [v["artifact"] for v in updated.verifications] == ["onnx", "onnx"]
    assert mf.read_manifest(good).verifications[-1]["created"] == verification["created"]
    assert mf.check_files(good, updated) == []  # recording touched only manifest.json
    res = run_cli("verify", good, "--tolerance", "delta_img=0.05")  # an override is applied and recorded
    recorded = mf.read_manifest(good).verifications[-1]
    assert res.exit_code == 0 and "PASSED" in res.output, res.output
    assert recorded["tolerance_per_output"] == {"delta_img": {"max_abs": None, "max_rel": 0.05, "min_cosine": 0.99999}}
    assert "tolerance_per_output" not in verification
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
        assert all(g.engine.extra["tf32"] is False for g in manifest.graphs.values())
    with pytest.raises(UsageError, match="cannot run backend 'torch'"):
        verify(out, backend="torch")
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: tests/gpu runs the engines")
    with pytest.raises(OnexError, match="needs an NVIDIA GPU"):
        verify(out, backend="tensorrt")
    res = run_cli("verify", out, "--backend", "tensorrt")
    assert res.exit_code == 1 and "verify with --backend onnxruntime here" in res.output
    res = run_cli("verify", out, "--gate-device", "cuda")
    assert res.exit_code == 1 and "--gate-device cuda needs an NVIDIA GPU" in res.output


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
    config = dict(model="tiny-sd3", skip=SKIP, out=again, **RTX, batch=DimRange(1, 1, 3),
                  resolution=DimRange(64, 128, 128), text_len=DimRange(8, 16, 16))
    build(BuildConfig(**config), log=logs.append)
    assert sum("unchanged, reused" in line for line in logs) == (12 if HAS_RTX else 6)
    after = tree_digest(again)
    assert {k: v for k, v in after.items() if k != "manifest.json"} == {k: v for k, v in before.items() if k != "manifest.json"}
    # A trained MLP changes the reuse graph only.
    mlp = CompensationMLP.for_transformer(build_tiny("tiny-sd3"))
    torch.nn.init.normal_(mlp.img.fc2.weight, std=0.05)
    path = save_compensation(mlp, tmp_path / "mlp.safetensors")
    logs.clear()
    changed = build(BuildConfig(**config, mlp=path), log=logs.append)
    assert [line.split()[2] for line in logs if "export" in line and "reused" in line] == ["head", "segment", "tail", "text", "vae"]
    assert changed.status == "passed"
    assert tree_digest(again)["reuse.onnx"] != before["reuse.onnx"]
    assert tree_digest(again)["head.onnx"] == before["head.onnx"]


@pytest.mark.skipif(not HAS_RTX, reason=NO_RTX)
def test_one_changed_weight_in_external_data_rebuilds_that_graph_and_its_engine(tmp_path):
    """Every graph keeps its weights in <graph>.onnx.data (a 1-byte threshold forces it): changing one value in
    block 12 re-exports the tail and rebuilds its engine, and nothing else."""
    model = build_tiny("tiny-sd3")
    model.save_pretrained(str(tmp_path / "m"))
    config = dict(skip=SKIP, out=tmp_path / "b", model=str(tmp_path / "m"), **RTX, components=(),
                  batch=DimRange(1, 1, 1), external_data_threshold=1)
    first = build(BuildConfig(**config))
    assert all(g.onnx_data for g in first.graphs.values())
    with torch.no_grad():
        model.transformer_blocks[11].ff.net[2].bias[0] += 0.01
    model.save_pretrained(str(tmp_path / "m"))
    logs = []
    second = build(BuildConfig(**config), log=logs.append)
    rebuilt = sorted(line.split()[2] for line in logs if line.startswith(("[2/5]", "[3/5]")) and "reused" not in line)
    assert rebuilt == ["tail", "tail"]  # its export and its engine
    assert second.graphs["tail"].onnx_data.sha256 != first.graphs["tail"].onnx_data.sha256
    assert second.graphs["tail"].engine.sha256 != first.graphs["tail"].engine.sha256
    assert second.graphs["head"].engine == first.graphs["head"].engine


@pytest.mark.skipif(not HAS_RTX, reason=NO_RTX)
def test_a_second_static_resolution_reuses_the_onnx_and_rebuilds_the_engines(tmp_path):
    """The ONNX graphs do not depend on the size (they are traced small, every dimension symbolic), so a build
    at 64 px after one at 128 px keeps them, builds new engines for the new profile, and its gate passes at
    the new size."""
    config = dict(model="tiny-sd3", skip=SKIP, out=tmp_path / "b", **RTX, components=(), batch=DimRange(1, 1, 1))
    build(BuildConfig(**config, resolution=DimRange(128, 128, 128)))
    logs = []
    second = build(BuildConfig(**config, resolution=DimRange(64, 64, 64)), log=logs.append)
    assert sum("export" in line and "reused" in line for line in logs) == 4
    assert sum(line.startswith("[3/5] engine") and "reused" not in line for line in logs) == 4
    assert second.graphs["head"].profile["hidden_states"][1] == [1, 16, 8, 8]
    assert second.status == "passed" and second.verifications[0]["shapes"] == [[1, 64, 16]]


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
    # The next build into the same place removes the dead build's temp folder (and says so).
    logs = []
    build(BuildConfig(model="tiny-sd3", skip=SKIP, out=target, trt="none", batch=DimRange(1, 1, 1), components=()), log=logs.append)
    assert not list(tmp_path.glob(".victim.tmp-*"))
    assert any("left by a killed build" in line for line in logs)
    assert mf.check_files(target, mf.read_manifest(target)) == []


def test_an_install_killed_halfway_is_restored_by_the_next_verify(built, tmp_path):
    """The state a kill between the two renames of the fallback install leaves: the destination gone, the
    previous build at .NAME.old-PID of a dead process. verify (or the next build) puts it back."""
    out, _, _ = built
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = proc.stdout.strip()
    shutil.copytree(out, tmp_path / f".tiny.old-{dead_pid}")
    logs = []
    _, verification = verify(tmp_path / "tiny", log=logs.append)
    assert verification["status"] == "passed" and (tmp_path / "tiny" / "manifest.json").is_file()
    assert "restored the previous build" in logs[0] and not list(tmp_path.glob(".tiny.old-*"))


def test_a_folder_that_is_not_a_build_is_never_replaced(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    res = run_cli("build", "--out", mine, "--trt", "none")
    assert res.exit_code == 2 and "holds no onex-export build" in res.output
    assert (mine / "notes.txt").read_text() == "keep me" and sorted(p.name for p in mine.iterdir()) == ["notes.txt"]
    (tmp_path / "file").write_text("x")
    res = run_cli("build", "--out", tmp_path / "file", "--trt", "none")
    assert res.exit_code == 2 and "is not a folder" in res.output and (tmp_path / "file").read_text() == "x"


@pytest.fixture(scope="module")
def overflowing_model(tmp_path_factory):
    """A real diffusers folder whose image embedding reaches 1e6: fine in fp32, inf in fp16."""
    model = build_tiny("tiny-sd3")
    with torch.no_grad():
        model.pos_embed.proj.weight.mul_(1e5)
    folder = tmp_path_factory.mktemp("overflow") / "model"
    model.save_pretrained(str(folder))
    return folder


def test_parity_failure_exits_1_names_the_cause_keeps_artifacts_and_the_good_build(overflowing_model, tmp_path):
    out = tmp_path / "big"
    build(BuildConfig(skip=SKIP, out=out, model=str(overflowing_model), trt="none", batch=DimRange(1, 1, 1),
                      text_len=DimRange(16, 16, 16)))
    before = tree_digest(out)
    res = run_cli("build", "--model", overflowing_model, "--out", out, "--trt", "none", "--precision", "fp16",
                  "--batch", "1", "--text-len", "16")
    assert res.exit_code == 1
    assert "FAIL" in res.output and res.output.strip().endswith("FAILED")
    assert "pos_embed overflows fp16" in res.output and "--precision bf16" in res.output
    assert "Traceback" not in res.output
    assert tree_digest(out) == before
    failed = mf.read_manifest(tmp_path / "big.failed")
    assert failed.status == "failed" and failed.precision == "fp16"
    assert failed.verifications[0]["range_check"]["first_overflow"] == "pos_embed"
    res = run_cli("build", "--model", overflowing_model, "--out", out, "--trt", "none", "--precision", "fp16",
                  "--batch", "1", "--text-len", "16", "--allow-parity-failure")
    assert res.exit_code == 1 and "installed anyway" in res.output
    assert mf.read_manifest(out).status == "failed"
    with pytest.raises(mf.ManifestError, match="failed its parity gate"):
        BuildPipeline(out)


@pytest.fixture(scope="module")
def block_overflow_model(tmp_path_factory):
    """tiny-sd3 whose block 5 (1-based) overflows fp16 inside its feed-forward only: the hidden layer is scaled
    up 1e5x and the output layer down by the same, so float32 gives the same block output and fp16 gives inf."""
    model = build_tiny("tiny-sd3")
    ff = model.transformer_blocks[4].ff.net
    with torch.no_grad():
        ff[0].proj.weight.mul_(1e5)
        ff[0].proj.bias.mul_(1e5)
        ff[2].weight.mul_(1e-5)
    folder = tmp_path_factory.mktemp("block") / "model"
    model.save_pretrained(str(folder))
    return folder


def test_a_block_overflowing_fp16_is_named_and_fp32_blocks_fixes_it(block_overflow_model, tmp_path):
    common = ["--model", block_overflow_model, "--trt", "none", "--precision", "fp16", "--batch", "1",
              "--text-len", "16", "--components", "none"]
    res = run_cli("build", "--out", tmp_path / "a", *common)
    assert res.exit_code == 1 and "Traceback" not in res.output
    assert "block 5 (1-based) is the first whose values overflow fp16" in res.output
    assert "--fp32-blocks 5-5" in res.output
    res = run_cli("build", "--out", tmp_path / "b", *common, "--fp32-blocks", "5-5")
    assert res.exit_code == 0, res.output
    manifest = mf.read_manifest(tmp_path / "b")
    assert manifest.status == "passed" and manifest.precision_policy["fp32_blocks"] == "5-5"
    rc = manifest.verifications[0]["range_check"]
    assert rc["first_overflow"] is None and rc["max_abs"]["transformer_blocks.4"] > 65504  # measured, allowed
    # block 5 sits in the segment graph: its weights are float32 there, every other weight matrix is fp16
    def big_types(graph):
        model = onnx.load(str(tmp_path / "b" / f"{graph}.onnx"))
        return {t.data_type for t in model.graph.initializer if len(onnx.numpy_helper.to_array(t).flatten()) > 100}
    assert big_types("segment") == {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16}
    assert big_types("head") == big_types("tail") == {onnx.TensorProto.FLOAT16}


def test_fp32_blocks_ending_with_the_skip_range_give_float32_deltas_that_match(tmp_path):
    """Blocks 9-10 in float32 with --skip 3-10: the segment's last block is float32, its input (I_n) fp16, so the
    delta is formed across dtypes in the graph and the stream enters the tail in float32."""
    manifest = build(BuildConfig(model="tiny-sd3", skip=SKIP, out=tmp_path / "m", precision="fp16", trt="none", components=(),
                                 batch=DimRange(1, 1, 1), fp32_blocks=Fp32Blocks(9, 10)))
    assert manifest.status == "passed", manifest.verifications[0]["rows"]
    dtypes = {(n, t.name): t.dtype for n, g in manifest.graphs.items() for t in g.inputs + g.outputs}
    assert dtypes[("segment", "img")] == "float16" and dtypes[("segment", "img_out")] == "float32"
    assert dtypes[("segment", "delta_img")] == "float16" and dtypes[("tail", "img")] == "float32"


def test_bf16_on_a_cpu_is_installed_unverified_and_usable(tmp_path):
    res = run_cli("build", "--out", tmp_path / "bf", "--precision", "bf16", "--trt", "none", "--batch", "1")
    assert res.exit_code == 0 and "UNVERIFIED" in res.output and "cannot execute bf16" in res.output
    manifest = mf.read_manifest(tmp_path / "bf")
    assert manifest.status == "unverified" and manifest.verifications[0]["status"] == "not-run"
    head = onnx.load(str(tmp_path / "bf" / "head.onnx"))
    types = {i.name: i.type.tensor_type.elem_type for i in head.graph.input}
    assert types["hidden_states"] == onnx.TensorProto.BFLOAT16 and types["timestep"] == onnx.TensorProto.FLOAT
    pipe = open_pipeline(tmp_path / "bf", "torch")  # the runtime accepts it (and says it is unverified)
    assert pipe.verified is False
    with pytest.raises(OnexError, match="is a bf16 build, and ONNX Runtime cannot run bf16 graphs on a CPU") as info:
        BuildPipeline(tmp_path / "bf")  # it used to fail loading a graph, with the hint "rebuild"
    assert "--backend tensorrt" in info.value.hint and "rebuild" not in info.value.hint


def test_gate_none_is_recorded(tmp_path):
    manifest = build(BuildConfig(model="tiny-sd3", skip=SKIP, out=tmp_path / "n", trt="none", components=(), batch=DimRange(1, 1, 1),
                                 gate=GateConfig("none")))
    assert manifest.status == "unverified"
    assert manifest.verifications[0]["status"] == "skipped" and "--gate none" in manifest.verifications[0]["reason"]


@pytest.mark.parametrize("args, message", [
    (["--skip", "3-24"], "1-23"),
    (["--skip", "ten"], "malformed"),
    (["--resolution", "100"], "multiple of 16"),
    (["--batch", "4:2:1"], "MIN <= OPT <= MAX"),
    (["--components", "text,unet"], "unknown component(s) ['unet']"),
    (["--text-len", "8"], "does not include the text encoders' 16 tokens"),
    (["--fp32-blocks", "20-30", "--precision", "fp16"], "--fp32-blocks 20-30 does not fit this model"),
    (["--fp32-blocks", "3-4"], "only applies to --precision fp16 or bf16"),
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
