"""The SD3 transformer split around a skip range: a full pass that emits the cached deltas, and a
skipping pass that reuses them through the compensation MLP.

Both passes reuse the modules of a diffusers ``SD3Transformer2DModel`` (embedders, joint blocks, output
norm and projection); nothing of diffusers is patched and no state is kept between calls: deltas go in
and out as tensors, so each pass traces and exports as one graph.

With ``I_n`` the input of the first skipped block and ``O_m`` the output of the last (DESIGN.md 2):
- full pass: ``delta_img = O_m^img - I_n^img`` and ``delta_ctx = O_m^ctx - I_n^ctx``;
- skipping pass: ``h = I_n + f(delta)`` per stream, then the blocks after the range.

Modules may hold different dtypes (a half-precision model with float32 blocks, see
:mod:`onex_export.export.precision`): each piece casts its inputs into the dtype of its own weights, so
a run of float32 blocks carries the residual streams in float32. With one dtype throughout (and under
autocast, where the weights are float32) no cast is ever made.
"""
from __future__ import annotations

import torch
from diffusers import SD3Transformer2DModel
from torch import nn

from ..config import SkipRange
from .compensation import CompensationMLP


def weight_dtype(module: nn.Module) -> torch.dtype:
    """The dtype of ``module``'s first floating-point parameter (the dtype it computes in)."""
    return next(p.dtype for p in module.parameters() if p.is_floating_point())


def _to(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x`` in ``dtype``; no cast (and no node in an exported graph) when it already is."""
    return x if x.dtype == dtype else x.to(dtype)


class SplitSD3Transformer(nn.Module):
    """A diffusers SD3 transformer with a full and a cache-skipping forward.

    Args:
        transformer: the diffusers model (SD3-Medium, SD3.5-Medium, SD3.5-Large topologies).
        skip: the skipped block range (1-based, inclusive), or None for no range (then the full pass
            returns zero deltas and the skipping pass is unavailable).
        mlp: the compensation MLP; an untrained (identity) one by default.
    """

    def __init__(
        self,
        transformer: SD3Transformer2DModel,
        skip: SkipRange | None,
        mlp: CompensationMLP | None = None,
    ):
        super().__init__()
        self.transformer = transformer
        self.skip = skip.validate_for(self.num_layers) if skip is not None else None
        self.mlp = mlp if mlp is not None else CompensationMLP.for_transformer(transformer)
        self.mlp.check_fits(transformer)

    @property
    def num_layers(self) -> int:
        return len(self.transformer.transformer_blocks)

    # -- pieces, shared by both passes and by the exported subgraphs ---------------------------------

    def embed(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        pooled_projections: torch.Tensor,
        timestep: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Patchify and embed. Returns ``img`` (B, N, D), ``ctx`` (B, T, D_ctx), ``temb`` (B, D)."""
        t = self.transformer
        img = t.pos_embed(_to(hidden_states, weight_dtype(t.pos_embed))).contiguous()
        temb = t.time_text_embed(timestep, _to(pooled_projections, weight_dtype(t.time_text_embed)))
        ctx = t.context_embedder(_to(encoder_hidden_states, weight_dtype(t.context_embedder)))
        return img, ctx, temb

    def run_blocks(
        self, img: torch.Tensor, ctx: torch.Tensor, temb: torch.Tensor, start: int, stop: int
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Run diffusers blocks ``start..stop-1`` (0-based). ``ctx`` is None after the last block."""
        t = self.transformer
        for block in t.transformer_blocks[start:stop]:
            dtype = weight_dtype(block)
            img, ctx, temb = _to(img, dtype), _to(ctx, dtype), _to(temb, dtype)
            if torch.is_grad_enabled() and t.gradient_checkpointing:
                ctx, img = t._gradient_checkpointing_func(block, img, ctx, temb, None)
            else:
                ctx, img = block(hidden_states=img, encoder_hidden_states=ctx, temb=temb)
        return img, ctx

    def project_out(self, img: torch.Tensor, temb: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Final norm, projection and unpatchify to the velocity (B, C_out, height, width)."""
        t = self.transformer
        p = t.config.patch_size
        dtype = weight_dtype(t.norm_out)
        out = t.proj_out(t.norm_out(_to(img, dtype), _to(temb, dtype)))
        out = out.reshape(out.shape[0], height // p, width // p, p, p, t.out_channels)
        out = torch.einsum("nhwpqc->nchpwq", out)
        return out.reshape(out.shape[0], t.out_channels, height, width)

    def reuse(
        self, img: torch.Tensor, ctx: torch.Tensor, delta_img: torch.Tensor, delta_ctx: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``I_n + f(delta)`` for both streams, in the streams' dtypes."""
        dtype = weight_dtype(self.mlp)
        f_img, f_ctx = self.mlp(_to(delta_img, dtype), _to(delta_ctx, dtype))
        return img + _to(f_img, img.dtype), ctx + _to(f_ctx, ctx.dtype)

    # -- the two passes -----------------------------------------------------------------------------

    def full(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        pooled_projections: torch.Tensor,
        timestep: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Full pass.

        Args:
            hidden_states: latents (B, C, H, W).
            encoder_hidden_states: text embeddings (B, T, joint_attention_dim).
            pooled_projections: pooled text embeddings (B, pooled_projection_dim).
            timestep: ``1000 * sigma``, shape (B,).

        Returns:
            ``velocity`` (B, C, H, W), ``delta_img`` (B, N, D) and ``delta_ctx`` (B, T, D_ctx), the skip
            range's contribution to each stream (zeros when there is no range).
        """
        height, width = hidden_states.shape[-2:]
        img, ctx, temb = self.embed(hidden_states, encoder_hidden_states, pooled_projections, timestep)
        if self.skip is None:
            delta_img, delta_ctx = torch.zeros_like(img), torch.zeros_like(ctx)
            img, _ = self.run_blocks(img, ctx, temb, 0, self.num_layers)
        else:
            img, ctx = self.run_blocks(img, ctx, temb, 0, self.skip.start0)
            in_img, in_ctx = img, ctx
            img, ctx = self.run_blocks(img, ctx, temb, self.skip.start0, self.skip.stop0)
            delta_img, delta_ctx = img - in_img, ctx - in_ctx
            img, _ = self.run_blocks(img, ctx, temb, self.skip.stop0, self.num_layers)
        return self.project_out(img, temb, height, width), delta_img, delta_ctx

    def skipping(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        pooled_projections: torch.Tensor,
        timestep: torch.Tensor,
        delta_img: torch.Tensor,
        delta_ctx: torch.Tensor,
    ) -> torch.Tensor:
        """Skipping pass: the full pass's inputs plus its two deltas -> ``velocity`` (B, C, H, W)."""
        if self.skip is None:
            raise ValueError("the skipping pass needs a skip range; this split model was built without one")
        height, width = hidden_states.shape[-2:]
        img, ctx, temb = self.embed(hidden_states, encoder_hidden_states, pooled_projections, timestep)
        img, ctx = self.run_blocks(img, ctx, temb, 0, self.skip.start0)
        img, ctx = self.reuse(img, ctx, delta_img, delta_ctx)
        img, _ = self.run_blocks(img, ctx, temb, self.skip.stop0, self.num_layers)
        return self.project_out(img, temb, height, width)
