"""A skipped segment cut across graphs (a role past --max-graph-gib, as SD3.5-Large's 3-10) forms its cached deltas
as precisely as an uncut segment, and the skipping pass that consumes them loses nothing either.

The model is random, like the SD3.5-Large run that failed the gate: 12 blocks of width 128 with PyTorch's default
initialisation, weights halved, saved in fp16 the way releases are. Its skipped blocks 3-10 change the streams by
about 1% (deltas up to 0.04 on streams up to 4.4), so fp16's rounding of the streams (half an ulp: 1e-3) is a few
percent of the deltas. The MLP is trained-looking (fc2 weights of std 0.2): its LayerNorm rescales the deltas, so
their relative error reaches the skipping pass whole.
"""
import json
import shutil

import pytest
import torch
from diffusers import SD3Transformer2DModel

from onex_export import parity
from onex_export.config import SkipRange
from onex_export.contract import ManifestError
from onex_export.export.build import BuildConfig, build
from onex_export.export.graphs import module_bytes
from onex_export.export.shapes import DimRange
from onex_export.export.verify import verify
from onex_export.models import CompensationMLP, SplitSD3Transformer, load_compensation, save_compensation
from onex_export.models.weights import load_transformer, meta_transformer
from onex_export.runtime.graphs import PlanDenoiser, load_build_graphs

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


def worst(manifest: dict, outputs: tuple[str, ...], case: str) -> float:
    return max(r["max_rel"] for r in manifest["verifications"][-1]["rows"]
               if r["output"] in outputs and r["case"].startswith(case))


def test_a_cut_segment_forms_its_deltas_as_precisely_as_an_uncut_one(builds):
    """Measured: uncut 5.6e-4 (each graph) and 5.1e-4 (chained); cut 4.1e-4 and 5.1e-4. Before the pieces formed
    their own deltas, the last piece subtracted I_n from an O_m rounded to fp16 at every cut: 2.4e-2 and 3.4e-2."""
    uncut, cut = builds["uncut"], builds["cut"]
    assert [n for n in cut["graphs"] if n.startswith("segment")] == ["segment_1", "segment_2", "segment_3", "segment_4"]
    assert list(uncut["graphs"]) == ["head", "segment", "reuse", "tail"]
    for case in ("graph segment", "1.x-nfe step 1"):
        assert worst(uncut, ("delta_img", "delta_ctx"), case) < 1e-3
        assert worst(cut, ("delta_img", "delta_ctx"), case) <= 1.5 * worst(uncut, ("delta_img", "delta_ctx"), case)
    assert uncut["status"] == cut["status"] == "passed"


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
        plans = PlanDenoiser(load_build_graphs(folder / name, builds[name], "onnxruntime"), builds[name]["plans"])
        _, c_img, c_ctx = plans.full(*x, t1)
        assert c_img.dtype == torch.float16
        got = plans.skipping(*x, t2, c_img, c_ctx)
        errors[name] = float((got - want).abs().max() / want.abs().max())
    assert errors["uncut"] < 2e-3 and errors["cut"] <= 1.5 * errors["uncut"]
    blind = plans.skipping(*x, t2, torch.zeros_like(c_img), torch.zeros_like(c_ctx))
    assert float((blind - want).abs().max() / want.abs().max()) > 25 * TOL


def test_verify_refuses_a_build_whose_graphs_this_version_does_not_make(folder, builds, tmp_path):
    """A cut segment's last graph used to take I_n (img_in / ctx_in): such a build is refused with the fix, not run
    against graphs it does not have."""
    old = tmp_path / "old"
    shutil.copytree(folder / "cut", old)
    manifest = json.loads((old / "manifest.json").read_text())
    inputs = manifest["graphs"]["segment_4"]["inputs"]
    for t in inputs:
        t["name"] = {"delta_img_in": "img_in", "delta_ctx_in": "ctx_in"}.get(t["name"], t["name"])
    (old / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ManifestError, match="graph 'segment_4' of this build has inputs and outputs .*'img_in'") as exc:
        verify(old)
    assert "rebuild it" in exc.value.hint
