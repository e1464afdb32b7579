"""The graphs of a build: cut within a weight budget, chained by the plans, and traced once for every size."""
import onnxruntime as ort
import pytest
import torch

from onex_export.config import SkipRange
from onex_export.contract import run_plan
from onex_export.export.graphs import SubgraphModule, build_plans, module_bytes, stream_dtype, transformer_graphs
from onex_export.export.onnx_export import export_graph, trace_inputs
from onex_export.export.precision import Fp32Blocks, PrecisionPolicy, apply_precision
from onex_export.models import SplitSD3Transformer, build_tiny
from onex_export.models.weights import meta_transformer
from onex_export.models.zoo import TINY_MODELS

@pytest.fixture(scope="module")
def split():
    torch.manual_seed(0)
    model = SplitSD3Transformer(build_tiny("tiny-sd3"), SkipRange(3, 10)).eval()
    torch.nn.init.normal_(model.mlp.img.fc2.weight, std=0.05)  # a trained-looking MLP
    return model


def runners(split, defs, specs):
    def runner(d):
        module = SubgraphModule(split, d, specs[d.name])

        def call(**inputs):
            return dict(zip((t.name for t in specs[d.name].outputs), module(*(inputs[t.name] for t in specs[d.name].inputs))))
        return call
    return {d.name: runner(d) for d in defs}


def feeds(batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(batch, 16, 12, 8, generator=g),
                encoder_hidden_states=torch.randn(batch, 9, 48, generator=g),
                pooled_projections=torch.randn(batch, 40, generator=g), timestep=torch.full((batch,), 600.0))


@pytest.mark.parametrize("budget_blocks", [1, 3, 100])
def test_graphs_within_the_budget_carry_every_weight_once_and_compute_the_same(split, budget_blocks):
    block = module_bytes(split, ["transformer_blocks.5"])
    defs, specs = transformer_graphs(split, PrecisionPolicy("fp32"), budget_blocks * block + 1)
    roles = [d.role for d in defs]
    assert roles == sorted(roles, key=["head", "segment", "reuse", "tail"].index)
    names = [n for d in defs for n in d.module_names()]
    assert sorted(names) == sorted(["pos_embed", "time_text_embed", "context_embedder", "norm_out", "proj_out", "mlp",
                                    *(f"transformer_blocks.{i}" for i in range(24))])  # each exactly once
    for d in defs:
        if d.role != "reuse" and d.stop - d.start > 1:  # only a single block may exceed the budget
            assert module_bytes(split, d.module_names()) <= budget_blocks * block + 1
    # the embedders weigh 1.3 blocks: alone over a 1-block budget, with one block within a 3-block one
    expected = {1: 3 + 8 + 1 + 14, 3: 2 + 3 + 1 + 5, 100: 4}[budget_blocks]
    assert len(defs) == expected, [d.name for d in defs]
    plans = build_plans(defs)
    f = feeds()
    with torch.no_grad():
        v, d_img, d_ctx = split.full(*f.values())
        out = run_plan(plans["full"], runners(split, defs, specs), f)
        v2 = split.skipping(*f.values(), d_img, d_ctx)
        out2 = run_plan(plans["skipping"], runners(split, defs, specs), dict(f, delta_img=d_img, delta_ctx=d_ctx))
    # the same modules in the same order: bit-identical velocities, however the chain is cut
    assert torch.equal(out["velocity"], v) and torch.equal(out2["velocity"], v2)
    # a cut segment sums its pieces' deltas: float32 rounding of the sum only (deltas reach 0.3 here)
    for got, want in ((out["delta_img"], d_img), (out["delta_ctx"], d_ctx)):
        assert (got - want).abs().max() <= (0 if budget_blocks == 100 else 1e-6) * want.abs().max()
    assert (v2 - v).abs().max() > 1e-3  # and the skipping plan is really another computation


def test_a_cut_segment_sums_the_deltas_of_its_pieces(split):
    """Each piece forms its own part of the deltas inside its graph and adds the parts before it (carried in
    float32); only the last emits them in the working precision."""
    block = module_bytes(split, ["transformer_blocks.5"])
    policy = PrecisionPolicy("fp16")
    defs, specs = transformer_graphs(split, policy, 3 * block + 1)
    segments = [d for d in defs if d.role == "segment"]
    assert [(d.start, d.stop) for d in segments] == [(2, 5), (5, 8), (8, 10)]
    assert [(d.delta, d.delta_inputs) for d in segments] == [(True, False), (True, True), (True, True)]
    io = {d.name: ({t.name: t.dtype for t in specs[d.name].inputs}, {t.name: t.dtype for t in specs[d.name].outputs})
          for d in segments}
    assert list(io["segment_1"][0]) == ["img", "ctx", "temb"]
    assert list(io["segment_2"][0]) == ["img", "ctx", "temb", "delta_img_in", "delta_ctx_in"]
    assert io["segment_2"][0]["delta_img_in"] == io["segment_1"][1]["delta_img"] == "float32"
    assert io["segment_3"][1]["delta_img"] == io["segment_3"][1]["delta_ctx"] == "float16"
    plans = build_plans(defs)
    steps = {s["graph"]: s["bind"] for s in plans["full"]["steps"]}
    assert steps["segment_2"]["delta_img_in"] == "segment_1.delta_img" and steps["segment_3"]["temb"] == "head_1.temb"
    assert steps["segment_3"]["delta_ctx_in"] == "segment_2.delta_ctx"
    assert plans["full"]["outputs"]["delta_img"] == "segment_3.delta_img"
    # an uncut segment's graph is what it always was: no delta inputs, deltas in the working precision
    (whole,) = [d for d in transformer_graphs(split, policy)[0] if d.role == "segment"]
    assert (whole.delta, whole.delta_inputs) == (True, False)


def test_fp32_blocks_keep_float32_across_a_graph_boundary():
    split = SplitSD3Transformer(meta_transformer(TINY_MODELS["tiny-sd3"].config), SkipRange(3, 10))
    policy = PrecisionPolicy("fp16", Fp32Blocks(9, 12))
    apply_precision(split, policy)
    assert split.transformer.transformer_blocks[8].attn.to_q.weight.dtype == torch.float32
    assert split.transformer.transformer_blocks[12].attn.to_q.weight.dtype == torch.float16
    defs, specs = transformer_graphs(split, policy)
    by_name = {n: {t.name: t.dtype for t in (*s.inputs, *s.outputs)} for n, s in specs.items()}
    # block 10 (the segment's last) is float32, so the stream leaves the segment, and enters the tail, in float32
    assert by_name["segment"]["img"] == "float16" and by_name["segment"]["img_out"] == "float32"
    assert by_name["tail"]["img"] == "float32" and by_name["tail"]["velocity"] == "float16"
    assert by_name["segment"]["delta_img"] == "float16" and by_name["reuse"]["img_out"] == "float32"
    assert stream_dtype(policy, 0) == "float16" and stream_dtype(PrecisionPolicy("fp16", Fp32Blocks(20, 24)), 24) == "float32"


def _export(split, d, spec, folder, dims):
    inputs = trace_inputs(spec, split.transformer.config.patch_size, dims=dims)
    folder.mkdir()
    export_graph(SubgraphModule(split, d, spec), spec, inputs, folder, 0)
    return ort.InferenceSession(str(folder / f"{d.name}.onnx"))


def test_a_graph_traced_at_one_size_runs_at_every_size(split, tmp_path):
    """Tracing is done small, where it costs nothing; the graph must not remember that size. The head (position
    table crop, patchify) and the tail (unpatchify) traced at two different sizes agree with PyTorch at a third,
    non-square one, and with each other."""
    defs, specs = transformer_graphs(split, PrecisionPolicy("fp32"))
    head, tail = defs[0], defs[-1]
    sessions = {size: {d.name: _export(split, d, specs[d.name], tmp_path / f"{d.name}{size}", dims)
                       for d in (head, tail)}
                for size, dims in {"a": {}, "b": {"batch": 3, "latent_height": 4, "latent_width": 10, "text_len": 5}}.items()}
    f = feeds(batch=1, seed=3)  # 12 x 8 latents, 9 text tokens: neither traced size
    with torch.no_grad():
        ref_head = SubgraphModule(split, head, specs[head.name])(*f.values())
        ref = SubgraphModule(split, tail, specs[tail.name])(ref_head[0], ref_head[1], ref_head[2], f["hidden_states"])[0]
    outs = []
    for s in sessions.values():
        h = s["head"].run(None, {k: v.numpy() for k, v in f.items()})
        v = s["tail"].run(None, {"img": h[0], "ctx": h[1], "temb": h[2], "hidden_states": f["hidden_states"].numpy()})[0]
        assert abs(torch.from_numpy(h[0]) - ref_head[0]).max() < 1e-5
        outs.append(torch.from_numpy(v))
        assert (outs[-1] - ref).abs().max() < 1e-5
    assert (outs[0] - outs[1]).abs().max() < 1e-5
    assert tuple(outs[0].shape) == (1, 16, 12, 8)


def test_an_exported_file_whose_shapes_do_not_agree_is_refused(tmp_path, monkeypatch):
    """The exporter is replaced (mock) by one that writes a file ONNX's checker accepts but whose shapes contradict
    each other (a MatMul of 2x3 by 4x5): strict shape inference, run with its output thrown away, must still
    refuse it."""
    import onnx
    from onnx import TensorProto, helper

    from onex_export.contract import GraphSpec, TensorSpec

    def bad_export(module, args, f, **kwargs):
        graph = helper.make_graph(
            [helper.make_node("MatMul", ["x", "w"], ["y"])], "bad", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 5])],
            [helper.make_tensor("w", TensorProto.FLOAT, [4, 5], [0.0] * 20)])
        onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), f)

    monkeypatch.setattr(torch.onnx, "export", bad_export)
    spec = GraphSpec("bad", (TensorSpec("x", (2, 3), "float32"),), (TensorSpec("y", (2, 5), "float32"),))
    bad_export(None, None, str(tmp_path / "plain.onnx"))
    onnx.checker.check_model(str(tmp_path / "plain.onnx"))  # the checker alone lets it through
    with pytest.raises(onnx.shape_inference.InferenceError, match="MatMul"):
        export_graph(torch.nn.Identity(), spec, (torch.zeros(2, 3),), tmp_path, 80)
