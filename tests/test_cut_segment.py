"""A skipped segment cut across graphs (a role past --max-graph-gib, as SD3.5-Large's 3-10) forms its cached deltas
as precisely as an uncut segment, and the skipping pass that consumes them loses nothing either; a gate that fails
names the likely cause and a failed build still prints its figures.

The model is random, like the SD3.5-Large run that failed the gate: 12 blocks of width 128 with PyTorch's default
initialisation, weights halved, saved in fp16 the way releases are. Its skipped blocks 3-10 change the streams by
about 1% (deltas up to 0.04 on streams up to 4.4), so fp16's rounding of the streams (half an ulp: 1e-3) is a few
percent of the deltas. The MLP is trained-looking (fc2 weights of std 0.2): its LayerNorm rescales the deltas, so
their relative error reaches the skipping pass whole.
"""
import json
import re
import shutil

import pytest
import torch
from click.testing import CliRunner
from diffusers import SD3Transformer2DModel

from onex_export.check import parity
from onex_export.cli import main
from onex_export.config import SkipRange
from onex_export.contract import ManifestError
from onex_export.build import BuildConfig, build
from onex_export.check.gate import GateConfig, failure_summary, run_gate
from onex_export.export.graphs import SubgraphModule, build_plans, module_bytes, transformer_graphs
from onex_export.export.precision import Fp32Blocks, PrecisionPolicy, apply_precision
from onex_export.export.shapes import DimRange, ShapeConfig
from onex_export.check.verify import verify
from onex_export.models import CompensationMLP, SplitSD3Transformer, load_compensation, save_compensation
from onex_export.models.weights import load_transformer, meta_transformer, transformer_source
from onex_export.runtime.graphs import PlanDenoiser, TorchGraph, load_build_graphs

CONFIG = dict(sample_size=16, patch_size=2, in_channels=16, num_layers=12, attention_head_dim=64, num_attention_heads=2,
              joint_attention_dim=128, caption_projection_dim=128, pooled_projection_dim=128, out_channels=16,
              pos_embed_max_size=16)
SKIP = SkipRange(3, 10)
TOL = parity.tolerance_for("onnxruntime", "fp16").max_rel  # 2e-2, the gate's


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("cut")
    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(**CONFIG)
    with torch.no_grad():
        for p in transformer.parameters():
            if p.dim() > 1:
                p.mul_(0.5)
    transformer.half().save_pretrained(root / "model")
    mlp = CompensationMLP.for_transformer(transformer)
    torch.manual_seed(1)
    for f in (mlp.img, mlp.ctx):
        torch.nn.init.normal_(f.fc2.weight, std=0.2)
    save_compensation(mlp, root / "mlp.safetensors")
    return root


def block_budget(folder, blocks: float) -> int:
    """A --max-graph-gib (in bytes) that holds ``blocks`` of the model's fp16 blocks."""
    split = SplitSD3Transformer(meta_transformer(CONFIG).half(), SKIP)
    return int(blocks * module_bytes(split, ["transformer_blocks.0"]))


@pytest.fixture(scope="module")
def builds(folder):
    """The same model built uncut (4 graphs) and with every role within 2.5 blocks (the segment in 4 graphs)."""
    out = {}
    for name, budget in (("uncut", 2 * 1024**3), ("cut", block_budget(folder, 2.5))):
        out[name] = build(BuildConfig(
            skip=SKIP, out=folder / name, model=str(folder / "model"), mlp=folder / "mlp.safetensors", precision="fp16",
            trt="none", components=(), batch=DimRange(1, 1, 1), resolution=DimRange(128, 128, 128),
            text_len=DimRange(16, 16, 16), max_graph_bytes=budget, allow_parity_failure=True))
    return out


def worst(verification: dict, outputs: tuple[str, ...], case: str) -> float:
    return max(r["max_rel"] for r in verification["rows"]
               if r["output"] in outputs and r["case"].startswith(case))


def test_a_cut_segment_forms_its_deltas_as_precisely_as_an_uncut_one(builds):
    """Measured: uncut 5.6e-4 (each graph) and 5.1e-4 (chained); cut 4.1e-4 and 5.1e-4. Before the pieces formed
    their own deltas, the last piece subtracted I_n from an O_m rounded to fp16 at every cut: 2.4e-2 and 3.4e-2."""
    uncut, cut = builds["uncut"], builds["cut"]
    assert [n for n in cut.graphs if n.startswith("segment")] == ["segment_1", "segment_2", "segment_3", "segment_4"]
    assert list(uncut.graphs) == ["head", "segment", "reuse", "tail"]
    uncut_v, cut_v = uncut.verifications[-1], cut.verifications[-1]
    for case in ("graph segment", "1.x-nfe step 1"):
        assert worst(uncut_v, ("delta_img", "delta_ctx"), case) < 1e-3
        assert worst(cut_v, ("delta_img", "delta_ctx"), case) <= 1.5 * worst(uncut_v, ("delta_img", "delta_ctx"), case)
    assert uncut.status == cut.status == "passed"


def test_the_skipping_pass_loses_nothing_on_a_cut_segment_s_deltas(folder, builds):
    """The skipping plan run on the deltas the full plan made (ONNX Runtime, fp16) against the float32 model run on
    its own deltas. Measured: 7.1e-4 relative with the cut segment's deltas, 6.8e-4 with the uncut one's; 3.5e-2
    (past the gate's 2e-2) before the pieces formed their own deltas. Zero deltas are 1.04 off: the deltas matter."""
    transformer = load_transformer(str(folder / "model"), torch.float32)
    ref = SplitSD3Transformer(transformer, SKIP, load_compensation(folder / "mlp.safetensors", transformer)).eval()
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(1, 16, 16, 16, generator=g), torch.randn(1, 16, 128, generator=g), torch.randn(1, 128, generator=g))
    t1, t2 = torch.full((1,), 1000.0), torch.full((1,), 750.0)
    with torch.no_grad():
        _, d_img, d_ctx = ref.full(*x, t1)
        want = ref.skipping(*x, t2, d_img, d_ctx)
    errors = {}
    for name in ("uncut", "cut"):
        plans = PlanDenoiser(load_build_graphs(folder / name, builds[name], "onnxruntime"), builds[name].plans)
        _, c_img, c_ctx = plans.full(*x, t1)
        assert c_img.dtype == torch.float16
        got = plans.skipping(*x, t2, c_img, c_ctx)
        errors[name] = float((got - want).abs().max() / want.abs().max())
    assert errors["uncut"] < 2e-3 and errors["cut"] <= 1.5 * errors["uncut"]
    blind = plans.skipping(*x, t2, torch.zeros_like(c_img), torch.zeros_like(c_ctx))
    assert float((blind - want).abs().max() / want.abs().max()) > 25 * TOL


def fp16_torch_gate(folder, policy: PrecisionPolicy, budget: int) -> tuple[dict, list]:
    """The gate on PyTorch fp16 graphs of the cut model: every op rounds to fp16, as in TensorRT's strongly typed
    engines (judged by their tolerance), where ONNX Runtime's CPU provider computes inside a graph in float32."""
    config, source = transformer_source(str(folder / "model"))
    transformer = load_transformer(str(folder / "model"), torch.float16)
    candidate = apply_precision(SplitSD3Transformer(
        transformer, SKIP, load_compensation(folder / "mlp.safetensors", transformer)).eval(), policy)
    defs, specs = transformer_graphs(candidate, policy, budget)
    reference = SplitSD3Transformer(meta := meta_transformer(config), SKIP, load_compensation(folder / "mlp.safetensors", meta))
    verification = run_gate(
        reference, source, defs, build_plans(defs),
        lambda n: TorchGraph(SubgraphModule(candidate, next(d for d in defs if d.name == n), specs[n]), specs[n]),
        artifact="torch-fp16", backend="tensorrt", candidate_device="cpu", policy=policy,
        shapes=ShapeConfig(DimRange(1, 1, 1), DimRange(64, 64, 64), DimRange(16, 16, 16), 8), gate=GateConfig())
    return verification, defs


def test_a_gate_failing_on_fp16_rounding_of_the_deltas_names_the_cut_segment_and_the_fix(folder):
    """Where every op rounds to fp16, the deltas (differences of streams 100x larger) carry the streams' rounding,
    cut or not: 8.0e-2 relative for segment_1 alone, 8.2e-2 chained, and step two's velocity, through the MLP, 6.9e-2,
    while every graph's streams pass (9.9e-4 at worst). The hint says so and gives --fp32-blocks 3-10; with those
    blocks in float32 the same gate passes (deltas 5.1e-4, step two 1.3e-3)."""
    verification, defs = fp16_torch_gate(folder, PrecisionPolicy("fp16"), block_budget(folder, 2.5))
    failing = [r for r in verification["rows"] if not r["passed"]]
    assert verification["status"] == "failed"
    assert {r["output"] for r in failing if r["case"].startswith("graph ")} == {"delta_img", "delta_ctx"}
    assert max(r["max_rel"] for r in failing) > 2 * TOL
    assert worst(verification, ("velocity",), "1.x-nfe step 2") > TOL
    what, hint = failure_summary(verification, defs)
    assert "first graph segment_1 b1 64px t16 / delta_img" in what
    assert "every graph's streams pass, but the deltas fail, first in graph segment_1 (blocks 3-4)" in hint
    assert "cut into 4 graphs (segment_1, segment_2, segment_3, segment_4" in hint
    assert "a few fp16 roundings of the streams" in hint and "--fp32-blocks 3-10" in hint
    kept, _ = fp16_torch_gate(folder, PrecisionPolicy("fp16", Fp32Blocks(3, 10)), block_budget(folder, 2.5))
    assert kept["status"] == "passed", failure_summary(kept, defs)
    assert worst(kept, ("delta_img", "delta_ctx"), "1.x-nfe step 1") < 2e-3


def test_a_failed_build_prints_its_figures_and_the_graph_where_the_error_starts(folder, builds, monkeypatch):
    """A gate made to fail (fp16 tolerance 1e-4, where the graphs reach 5e-4) exits 1 after the per-graph table, the
    stages and the parity table, with a hint naming the first graph that fails on its own inputs."""
    monkeypatch.setitem(parity.TOLERANCES, ("onnxruntime", "fp16"), parity.Tolerance(None, 1e-4, 0.999))
    result = CliRunner().invoke(main, [
        "build", "--model", str(folder / "model"), "--mlp", str(folder / "mlp.safetensors"), "--skip", "3-10",
        "--precision", "fp16", "--trt", "none", "--components", "none", "--batch", "1", "--resolution", "128",
        "--text-len", "16", "--max-graph-gib", str(block_budget(folder, 2.5) / 2**30), "--out", str(folder / "cut")])
    out = result.output
    assert result.exit_code == 1, out
    assert "export segment_1 (2/7): unchanged, reused" in out  # the ONNX of the passing build, the gate again
    table = out[out.index("weights MB  export s"):]
    assert re.search(r"\nsegment_4 +9-10 +2\.4 ", table) and re.search(r"stages: .* gate [0-9.]+ s \(peak", table)
    assert "graph head b1 128px t16" in table and "FAIL" in table
    assert "hint: graph head (blocks 1-2) already differs on the reference's own inputs" in out
    assert out.rstrip().endswith("FAILED")
    assert json.loads((folder / "cut" / "manifest.json").read_text())["status"] == "passed"  # the good build stays


def test_verify_refuses_a_build_whose_graphs_this_version_does_not_make(folder, builds, tmp_path):
    """A cut segment's last graph used to take I_n (img_in / ctx_in): such a build is refused with the fix, not run
    against graphs it does not have."""
    old = tmp_path / "old"
    shutil.copytree(folder / "cut", old)
    manifest = json.loads((old / "manifest.json").read_text())
    inputs = manifest["graphs"]["segment_4"]["inputs"]
    for t in inputs:
        t["name"] = {"delta_img_in": "img_in", "delta_ctx_in": "ctx_in"}.get(t["name"], t["name"])
    del manifest["seal"]  # that version sealed nothing
    (old / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ManifestError, match="graph 'segment_4' of this build has inputs and outputs .*'img_in'") as exc:
        verify(old)
    assert "rebuild it" in exc.value.hint
