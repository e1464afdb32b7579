"""Training-free peers of the 1.x schedule, on the same model and schedule (PyTorch only).

Each is a :class:`~onex_export.runtime.sampler.Denoiser`, so the benchmark times it through the same
sampler as our own backends:

- :class:`SkipLayersPeer`: diffusers' ``skip_layers`` drops the block range in the second step.
- :class:`CacheDitPeer`: cache-dit's DBCache caches the residual of the block range in the first step
  and adds it back in the second: the 1.x schedule with the raw delta (an untrained, identity MLP).
"""
from __future__ import annotations

import copy
import importlib.util
import os

from diffusers import SD3Transformer2DModel

from onex_export.config import SkipRange
from onex_export.models import SplitSD3Transformer


def cache_dit_installed() -> bool:
    return importlib.util.find_spec("cache_dit") is not None


class SkipLayersPeer:
    """diffusers' own ``skip_layers``: the second step runs without the range (no cache, no MLP)."""

    def __init__(self, split: SplitSD3Transformer):
        self.split = split

    def full(self, x, text, pooled, timestep):
        return self.split.full(x, text, pooled, timestep)

    def skipping(self, x, text, pooled, timestep, delta_img, delta_ctx):
        return self.split.transformer(x, text, pooled, timestep, skip_layers=list(self.split.skip.indices0),
                                      return_dict=False)[0]


class CacheDitPeer:
    """cache-dit's DBCache with the same block range as a 1.x skip range.

    DBCache always computes the first ``F_n`` and the last ``B_n`` blocks and may serve the middle ones
    from the residual cached at the previous step. For skip range ``first..last`` (1-based, inclusive)
    of ``L`` blocks that is ``F_n = first - 1`` and ``B_n = L - last``. The static step mask ``[1, 0]``
    makes step 1 compute everything and step 2 use the cache without a threshold test, so the second
    step is ``I_n + (O_m - I_n)`` from step 1: our skipping pass with an untrained MLP (the identity). cache-dit patches the model in place, so the peer works on its own copy.

    The cache context is refreshed at every ``full`` call: one sampling run is one 2-step inference.
    Shapes as in :class:`SplitSD3Transformer`; ``full`` returns no deltas (the cache holds them).
    """

    def __init__(self, transformer: SD3Transformer2DModel, skip: SkipRange):
        skip.validate_for(transformer.config.num_layers)
        if skip.first == 1:
            raise ValueError(f"skip range {skip} starts at block 1; DBCache needs at least one computed first block")
        os.environ.setdefault("CACHE_DIT_LOG_LEVEL", "warning")  # cache-dit logs every hook at info level
        import cache_dit

        self._cache_dit = cache_dit
        self.model = copy.deepcopy(transformer)
        config = cache_dit.DBCacheConfig(
            Fn_compute_blocks=skip.first - 1,
            Bn_compute_blocks=transformer.config.num_layers - skip.last,
            max_warmup_steps=1,
            num_inference_steps=2,
            steps_computation_mask=[1, 0],
            steps_computation_policy="static",
            enable_separate_cfg=False,
        )
        adapter = cache_dit.BlockAdapter(transformer=self.model, blocks=self.model.transformer_blocks,
                                         forward_pattern=cache_dit.ForwardPattern.Pattern_1)
        cache_dit.enable_cache(adapter, cache_config=config)

    def full(self, x, text, pooled, timestep):
        self._cache_dit.refresh_context(self.model, num_inference_steps=2)
        return self.model(x, text, pooled, timestep, return_dict=False)[0], None, None

    def skipping(self, x, text, pooled, timestep, delta_img, delta_ctx):
        return self.model(x, text, pooled, timestep, return_dict=False)[0]
