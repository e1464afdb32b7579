"""The four subgraphs of a build and the two execution plans that chain them.

Weights are never duplicated: every block lives in exactly one graph.
- ``head``: embedders and the blocks before the skip range -> ``img``, ``ctx``, ``temb``
- ``segment``: the skipped blocks; also emits ``delta_img`` / ``delta_ctx`` (``O_m - I_n``)
- ``reuse``: the compensation MLP, ``I_n + f(delta)`` for both streams
- ``tail``: the blocks after the range, final norm, projection and unpatchify -> ``velocity``

full = head, segment, tail; skipping = head, reuse, tail. The tail reads the latents input only for
its height and width (the token count alone cannot tell a non-square latent's shape).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..models.split import SplitSD3Transformer

# Symbolic dimension names shared by all graphs (and by the manifest's shape ranges).
B, T, N, H, W = "batch", "text_len", "img_tokens", "latent_height", "latent_width"
IH, IW = "image_height", "image_width"  # 8x the latent size (the VAE decoder's output)
TRANSFORMER_GRAPHS = ("head", "segment", "reuse", "tail")


@dataclass(frozen=True)
class TensorSpec:
    """A graph input or output: name and symbolic shape (ints are static, strings symbolic)."""

    name: str
    shape: tuple[int | str, ...]
    dtype: str  # "float32" | "float16" | "bfloat16"


@dataclass(frozen=True)
class GraphSpec:
    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]


class _Head(nn.Module):
    def __init__(self, split: SplitSD3Transformer):
        super().__init__()
        self.split = split

    def forward(self, hidden_states, encoder_hidden_states, pooled_projections, timestep):
        img, ctx, temb = self.split.embed(hidden_states, encoder_hidden_states, pooled_projections, timestep)
        img, ctx = self.split.run_blocks(img, ctx, temb, 0, self.split.skip.start0)
        return img, ctx, temb


class _Segment(_Head):
    def forward(self, img, ctx, temb):
        s = self.split.skip
        out_img, out_ctx = self.split.run_blocks(img, ctx, temb, s.start0, s.stop0)
        return out_img, out_ctx, out_img - img, out_ctx - ctx


class _Reuse(_Head):
    def forward(self, img, ctx, delta_img, delta_ctx):
        return self.split.reuse(img, ctx, delta_img, delta_ctx)


class _Tail(_Head):
    def forward(self, img, ctx, temb, hidden_states):
        img, _ = self.split.run_blocks(img, ctx, temb, self.split.skip.stop0, self.split.num_layers)
        return self.split.project_out(img, temb, hidden_states.shape[-2], hidden_states.shape[-1])


GRAPH_MODULES = {"head": _Head, "segment": _Segment, "reuse": _Reuse, "tail": _Tail}

# The plans: each step names a graph and binds each of its inputs to "inputs.<name>" (the plan's
# inputs) or "<graph>.<output>"; "outputs" binds the plan's outputs the same way.
PLANS = {
    "full": {
        "inputs": ["hidden_states", "encoder_hidden_states", "pooled_projections", "timestep"],
        "steps": [
            {"graph": "head", "bind": {"hidden_states": "inputs.hidden_states",
                                       "encoder_hidden_states": "inputs.encoder_hidden_states",
                                       "pooled_projections": "inputs.pooled_projections",
                                       "timestep": "inputs.timestep"}},
            {"graph": "segment", "bind": {"img": "head.img", "ctx": "head.ctx", "temb": "head.temb"}},
            {"graph": "tail", "bind": {"img": "segment.img_out", "ctx": "segment.ctx_out", "temb": "head.temb",
                                       "hidden_states": "inputs.hidden_states"}},
        ],
        "outputs": {"velocity": "tail.velocity", "delta_img": "segment.delta_img", "delta_ctx": "segment.delta_ctx"},
    },
    "skipping": {
        "inputs": ["hidden_states", "encoder_hidden_states", "pooled_projections", "timestep", "delta_img", "delta_ctx"],
        "steps": [
            {"graph": "head", "bind": {"hidden_states": "inputs.hidden_states",
                                       "encoder_hidden_states": "inputs.encoder_hidden_states",
                                       "pooled_projections": "inputs.pooled_projections",
                                       "timestep": "inputs.timestep"}},
            {"graph": "reuse", "bind": {"img": "head.img", "ctx": "head.ctx",
                                        "delta_img": "inputs.delta_img", "delta_ctx": "inputs.delta_ctx"}},
            {"graph": "tail", "bind": {"img": "reuse.img_out", "ctx": "reuse.ctx_out", "temb": "head.temb",
                                       "hidden_states": "inputs.hidden_states"}},
        ],
        "outputs": {"velocity": "tail.velocity"},
    },
}


def graph_specs(split: SplitSD3Transformer, dtype: str) -> dict[str, GraphSpec]:
    """The I/O of the four graphs. ``timestep`` stays float32 at every precision: fp16 cannot hold
    teacher timesteps such as 987.38 exactly, and diffusers embeds it in float32 anyway."""
    cfg = split.transformer.config
    D, Dc = split.transformer.inner_dim, cfg.caption_projection_dim
    lat = (B, cfg.in_channels, H, W)
    img, ctx, temb = TensorSpec("img", (B, N, D), dtype), TensorSpec("ctx", (B, T, Dc), dtype), TensorSpec("temb", (B, D), dtype)
    d_img, d_ctx = TensorSpec("delta_img", (B, N, D), dtype), TensorSpec("delta_ctx", (B, T, Dc), dtype)
    img_out, ctx_out = TensorSpec("img_out", (B, N, D), dtype), TensorSpec("ctx_out", (B, T, Dc), dtype)
    hidden = TensorSpec("hidden_states", lat, dtype)
    return {
        "head": GraphSpec("head", (
            hidden,
            TensorSpec("encoder_hidden_states", (B, T, cfg.joint_attention_dim), dtype),
            TensorSpec("pooled_projections", (B, cfg.pooled_projection_dim), dtype),
            TensorSpec("timestep", (B,), "float32"),
        ), (img, ctx, temb)),
        "segment": GraphSpec("segment", (img, ctx, temb), (img_out, ctx_out, d_img, d_ctx)),
        "reuse": GraphSpec("reuse", (img, ctx, d_img, d_ctx), (img_out, ctx_out)),
        "tail": GraphSpec("tail", (img, ctx, temb, hidden), (TensorSpec("velocity", lat, dtype),)),
    }


def graph_modules(split: SplitSD3Transformer) -> dict[str, nn.Module]:
    """The PyTorch module behind each graph (sharing ``split``'s weights)."""
    if split.skip is None:
        raise ValueError("a build needs a skip range")
    return {name: cls(split).eval() for name, cls in GRAPH_MODULES.items()}


def run_plan(plan: dict, graphs: dict, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Execute a plan over callables ``graphs[name](**inputs) -> {output: tensor}``.

    This is the whole contract a service implements from the manifest; the ONNX Runtime and
    TensorRT runners and the parity gate all go through it.
    """
    values = {f"inputs.{k}": v for k, v in feeds.items()}
    for step in plan["steps"]:
        outs = graphs[step["graph"]](**{name: values[src] for name, src in step["bind"].items()})
        values.update({f"{step['graph']}.{k}": v for k, v in outs.items()})
    return {name: values[src] for name, src in plan["outputs"].items()}


def graph_weights(split: SplitSD3Transformer, name: str) -> list[nn.Module]:
    """The modules whose weights graph ``name`` carries (each weight belongs to exactly one graph)."""
    t, s = split.transformer, split.skip
    blocks = list(t.transformer_blocks)
    return {
        "head": [t.pos_embed, t.time_text_embed, t.context_embedder, *blocks[: s.start0]],
        "segment": blocks[s.start0 : s.stop0],
        "reuse": [split.mlp],
        "tail": [*blocks[s.stop0 :], t.norm_out, t.proj_out],
    }[name]


def weight_bytes(modules: list[nn.Module]) -> int:
    """Bytes of the parameters and buffers of ``modules``."""
    return sum(t.numel() * t.element_size() for m in modules for t in (*m.parameters(), *m.buffers()))
