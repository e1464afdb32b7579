"""The subgraphs of a build and the two execution plans that chain them.

Four roles, each weight in exactly one graph:
- ``head``: embedders and the blocks before the skip range -> ``img_out``, ``ctx_out``, ``temb``
- ``segment``: the skipped blocks, also emitting ``delta_img`` / ``delta_ctx`` (``O_m - I_n``)
- ``reuse``: the compensation MLP, ``I_n + f(delta)`` for both streams
- ``tail``: the blocks after the range, final norm, projection and unpatchify -> ``velocity``

full = head, segment, tail; skipping = head, reuse, tail. A role whose weights exceed the build's
per-graph budget is cut at block boundaries into several graphs (``tail_1``, ``tail_2``, ...), so that no
engine build has to hold more than the budget: the plans are data and simply list more steps. The
projecting graph reads ``hidden_states`` only for its height and width (the token count alone cannot tell
a non-square latent's shape).

A cut segment forms its deltas piece by piece: each piece subtracts its own input streams from its output
streams inside its graph and adds the sum of the pieces before (inputs ``delta_img_in`` / ``delta_ctx_in``,
float32 between pieces), so the last piece emits ``O_m - I_n``, rounded once to the working precision,
without ever subtracting two streams that crossed a graph boundary. A backend may carry the streams more
precisely inside a graph than between graphs: ONNX Runtime's CPU provider has no fp16 kernels for the
element-wise ops and runs an fp16 graph's residual stream in float32 from its inputs to its outputs.
Subtracting ``I_n`` from an ``O_m`` rounded to fp16 at every cut gave the deltas the streams' rounding error
(half an fp16 ulp of streams about 100x larger than the deltas): 4e-2 relative error instead of 5e-4 on a
random 24-block fp16 model whose segment was cut in four. Where every op rounds (TensorRT's strongly typed
fp16, PyTorch fp16) a cut changes nothing either way.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..contract import TORCH_DTYPES, B, GraphSpec, H, N, T, TensorSpec, W
from ..models.split import SplitSD3Transformer
from ..models.weights import WeightSource, module_nbytes
from .precision import PrecisionPolicy

ROLES = ("head", "segment", "reuse", "tail")
EMBED_MODULES = ("pos_embed", "time_text_embed", "context_embedder")
OUTPUT_MODULES = ("norm_out", "proj_out")
DEFAULT_GRAPH_BYTES = 2 * 1024**3  # an engine build needs about 3x its graph's weights in memory


@dataclass(frozen=True)
class GraphDef:
    """One transformer subgraph: diffusers blocks ``start..stop-1`` (0-based) of ``role``, plus the embedders
    (``embed``), the output projection (``project``), the deltas (``delta``: every segment graph, with the
    deltas of the segment graphs before it as extra inputs when ``delta_inputs``) or the MLP (role ``reuse``)."""

    name: str
    role: str
    start: int
    stop: int
    embed: bool = False
    project: bool = False
    delta: bool = False
    delta_inputs: bool = False

    @property
    def blocks(self) -> range:
        return range(self.start, self.stop)

    def module_names(self) -> list[str]:
        """The transformer modules (checkpoint prefixes) whose weights this graph carries; ``mlp`` for reuse."""
        if self.role == "reuse":
            return ["mlp"]
        names = list(EMBED_MODULES) if self.embed else []
        names += [f"transformer_blocks.{i}" for i in self.blocks]
        return names + (list(OUTPUT_MODULES) if self.project else [])

    def to_json(self) -> dict:
        """The manifest's ``graphs.<name>.def``: ``blocks`` 1-based inclusive (for people), ``start``/``stop``
        0-based half-open (diffusers' indices)."""
        one_based = f"{self.start + 1}-{self.stop}" if self.stop > self.start else None
        return {"role": self.role, "blocks": one_based, "start": self.start, "stop": self.stop, "embed": self.embed,
                "project": self.project, "delta": self.delta, "delta_inputs": self.delta_inputs}

    @classmethod
    def from_json(cls, name: str, data: dict) -> "GraphDef":
        return cls(name, data["role"], data["start"], data["stop"], data["embed"], data["project"], data["delta"],
                   data["delta_inputs"])


def weights_digest(d: GraphDef, mlp_digest: str, source: WeightSource) -> str:
    """The identity of the weights graph ``d`` carries: the MLP's digest for the reuse graph, else the digest of its
    transformer modules in ``source`` (what the build keys its artifacts on and records as ``weights_sha256``)."""
    return mlp_digest if d.role == "reuse" else source.digest(tuple(n for n in d.module_names() if n != "mlp"))


def module_bytes(split: SplitSD3Transformer, names: list[str]) -> int:
    """Bytes of the parameters and buffers of the named modules (``mlp`` or transformer modules), at their
    current dtypes: works on a model still on the ``meta`` device."""
    total = 0
    for name in names:
        module = split.mlp if name == "mlp" else split.transformer.get_submodule(name)
        total += module_nbytes(module)
    return total


def _chunks(start: int, stop: int, cost, budget: int, fixed: int = 0) -> list[tuple[int, int]]:
    """Cut blocks ``start..stop-1`` into consecutive runs whose cost stays within ``budget`` (a block larger
    than the budget gets a run of its own). ``fixed`` is added to the first run (the embedders), which may then
    hold no block at all."""
    runs, first, used = [], start, fixed
    for i in range(start, stop):
        if used > 0 and used + cost(i) > budget:  # with ``fixed`` the first run may end before its first block
            runs.append((first, i))
            first, used = i, 0
        used += cost(i)
    runs.append((first, stop))
    return runs


def plan_graphs(split: SplitSD3Transformer, max_graph_bytes: int = DEFAULT_GRAPH_BYTES) -> list[GraphDef]:
    """The graphs of a build, in plan order (head..., segment..., reuse, tail...), each within the budget
    where single blocks allow. ``split`` may be on ``meta``: only sizes and dtypes are read."""
    if split.skip is None:
        raise ValueError("a build needs a skip range")
    if max_graph_bytes <= 0:
        raise ValueError(f"max_graph_bytes must be positive, got {max_graph_bytes}")
    s, L = split.skip, split.num_layers

    def cost(i: int) -> int:
        return module_bytes(split, [f"transformer_blocks.{i}"])

    def names(role: str, runs: list) -> list[str]:
        return [role] if len(runs) == 1 else [f"{role}_{k}" for k in range(1, len(runs) + 1)]

    head = _chunks(0, s.start0, cost, max_graph_bytes, module_bytes(split, list(EMBED_MODULES)))
    segment = _chunks(s.start0, s.stop0, cost, max_graph_bytes)
    # the output modules ride on the last tail run: cut the tail as if they sat on its last block
    out_bytes = module_bytes(split, list(OUTPUT_MODULES))
    tail = _chunks(s.stop0, L, lambda i: cost(i) + (out_bytes if i == L - 1 else 0), max_graph_bytes)
    defs = [GraphDef(n, "head", a, b, embed=k == 0) for k, (n, (a, b)) in enumerate(zip(names("head", head), head))]
    defs += [GraphDef(n, "segment", a, b, delta=True, delta_inputs=k > 0)
             for k, (n, (a, b)) in enumerate(zip(names("segment", segment), segment))]
    defs.append(GraphDef("reuse", "reuse", s.start0, s.stop0))
    last = len(tail) - 1
    defs += [GraphDef(n, "tail", a, b, project=k == last) for k, (n, (a, b)) in enumerate(zip(names("tail", tail), tail))]
    return defs


def stream_dtype(policy: PrecisionPolicy, boundary: int) -> str:
    """The ONNX dtype of ``img``/``ctx`` entering block ``boundary`` (0-based): the dtype of the block that
    produced them, so that a run of float32 blocks stays float32 across a graph boundary."""
    dtype = policy.block_dtype(boundary - 1) if boundary > 0 else policy.dtype
    return str(dtype).removeprefix("torch.")


def graph_spec(split: SplitSD3Transformer, d: GraphDef, policy: PrecisionPolicy) -> GraphSpec:
    """The inputs and outputs of graph ``d``. ``timestep`` stays float32 at every precision (fp16 cannot hold
    teacher timesteps such as 987.38 exactly, and diffusers embeds it in float32 anyway); ``temb`` and the
    deltas are in the working precision, except the deltas' partial sums between segment graphs (float32:
    the sum is rounded once, as in an uncut segment); the streams take :func:`stream_dtype` at each boundary."""
    cfg = split.transformer.config
    D, Dc, work = split.transformer.inner_dim, cfg.caption_projection_dim, policy.onnx_dtype
    lat = (B, cfg.in_channels, H, W)

    def streams(boundary: int, suffix: str = "") -> tuple[TensorSpec, TensorSpec]:
        dt = stream_dtype(policy, boundary)
        return TensorSpec(f"img{suffix}", (B, N, D), dt), TensorSpec(f"ctx{suffix}", (B, T, Dc), dt)

    temb, hidden = TensorSpec("temb", (B, D), work), TensorSpec("hidden_states", lat, work)

    def deltas(suffix: str = "", dtype: str = work) -> tuple[TensorSpec, TensorSpec]:
        return TensorSpec(f"delta_img{suffix}", (B, N, D), dtype), TensorSpec(f"delta_ctx{suffix}", (B, T, Dc), dtype)

    if d.role == "reuse":
        return GraphSpec(d.name, (*streams(d.start), *deltas()), streams(d.stop, "_out"))
    if d.embed:
        inputs = (hidden, TensorSpec("encoder_hidden_states", (B, T, cfg.joint_attention_dim), work),
                  TensorSpec("pooled_projections", (B, cfg.pooled_projection_dim), work),
                  TensorSpec("timestep", (B,), "float32"))
    else:
        inputs = (*streams(d.start), temb)
    if d.delta_inputs:
        inputs += deltas("_in", "float32")
    if d.project:
        velocity = TensorSpec("velocity", lat, stream_dtype(policy, split.num_layers))
        return GraphSpec(d.name, (*inputs, hidden), (velocity,))
    outputs = streams(d.stop, "_out") + ((temb,) if d.embed else ())
    if d.delta:
        outputs += deltas(dtype=work if d.stop == split.skip.stop0 else "float32")
    return GraphSpec(d.name, inputs, outputs)


class SubgraphModule(nn.Module):
    """The PyTorch computation of one graph over ``split``'s modules (shared, not copied): positional inputs
    and outputs in the order of ``spec``, outputs cast to the spec's dtypes."""

    def __init__(self, split: SplitSD3Transformer, d: GraphDef, spec: GraphSpec):
        super().__init__()
        self.split, self.d, self.spec = split, d, spec

    def forward(self, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x = dict(zip((t.name for t in self.spec.inputs), args))
        s, d = self.split, self.d
        if d.role == "reuse":
            img, ctx = s.reuse(x["img"], x["ctx"], x["delta_img"], x["delta_ctx"])
            out = {"img_out": img, "ctx_out": ctx}
        else:
            if d.embed:
                img, ctx, temb = s.embed(x["hidden_states"], x["encoder_hidden_states"], x["pooled_projections"],
                                         x["timestep"])
            else:
                img, ctx, temb = x["img"], x["ctx"], x["temb"]
            img_in, ctx_in = img, ctx  # a segment graph's deltas start from its own inputs
            img, ctx = s.run_blocks(img, ctx, temb, d.start, d.stop)
            if d.project:
                out = {"velocity": s.project_out(img, temb, x["hidden_states"].shape[-2], x["hidden_states"].shape[-1])}
            else:
                out = {"img_out": img, "ctx_out": ctx, "temb": temb}
                if d.delta:  # this graph's part of O_m - I_n, formed inside the graph (see the module's notes)
                    out["delta_img"], out["delta_ctx"] = img - img_in, ctx - ctx_in
                if d.delta_inputs:
                    out["delta_img"] = out["delta_img"] + x["delta_img_in"]
                    out["delta_ctx"] = out["delta_ctx"] + x["delta_ctx_in"]
        return tuple(_cast(out[t.name], TORCH_DTYPES[t.dtype]) for t in self.spec.outputs)


def _cast(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return x if x.dtype == dtype else x.to(dtype)


def build_plans(defs: list[GraphDef]) -> dict:
    """The ``full`` and ``skipping`` plans over ``defs``: each step names a graph and binds each of its inputs
    to ``"inputs.<name>"`` (the plan's inputs) or ``"<graph>.<output>"``; ``outputs`` binds the plan's results."""
    by_role = {r: [d for d in defs if d.role == r] for r in ROLES}
    transformer_inputs = ["hidden_states", "encoder_hidden_states", "pooled_projections", "timestep"]
    temb = f"{by_role['head'][0].name}.temb"

    def chain(graphs: list[GraphDef], prev: str | None, extra=lambda d, prev: {}) -> tuple[list[dict], str]:
        steps = []
        for d in graphs:
            if d.embed:
                bind = {k: f"inputs.{k}" for k in transformer_inputs}
            else:
                bind = {"img": f"{prev}.img_out", "ctx": f"{prev}.ctx_out", "temb": temb}
            if d.project:
                bind["hidden_states"] = "inputs.hidden_states"
            steps.append({"graph": d.name, "bind": {**bind, **extra(d, prev)}})
            prev = d.name
        return steps, prev

    last_head = by_role["head"][-1].name
    head, prev = chain(by_role["head"], None)
    segment, last_segment = chain(by_role["segment"], prev, lambda d, prev: (  # the deltas of the pieces before
        {"delta_img_in": f"{prev}.delta_img", "delta_ctx_in": f"{prev}.delta_ctx"} if d.delta_inputs else {}))
    tail_full, last_tail = chain(by_role["tail"], last_segment)
    reuse = {"graph": "reuse", "bind": {"img": f"{last_head}.img_out", "ctx": f"{last_head}.ctx_out",
                                        "delta_img": "inputs.delta_img", "delta_ctx": "inputs.delta_ctx"}}
    tail_skip, _ = chain(by_role["tail"], "reuse")
    return {
        "full": {"inputs": transformer_inputs, "steps": head + segment + tail_full,
                 "outputs": {"velocity": f"{last_tail}.velocity", "delta_img": f"{last_segment}.delta_img",
                             "delta_ctx": f"{last_segment}.delta_ctx"}},
        "skipping": {"inputs": transformer_inputs + ["delta_img", "delta_ctx"], "steps": head + [reuse] + tail_skip,
                     "outputs": {"velocity": f"{last_tail}.velocity"}},
    }


def transformer_graphs(split: SplitSD3Transformer, policy: PrecisionPolicy,
                       max_graph_bytes: int = DEFAULT_GRAPH_BYTES) -> tuple[list[GraphDef], dict[str, GraphSpec]]:
    """The graph definitions of a build of ``split`` and their specs."""
    defs = plan_graphs(split, max_graph_bytes)
    return defs, {d.name: graph_spec(split, d, policy) for d in defs}
