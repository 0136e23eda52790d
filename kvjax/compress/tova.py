"""TOVA: the last query's attention, averaged over all heads, decides.

Oren et al. 2024, "Transformers are Multi-State RNNs", arXiv:2401.06104. Score of a token =
softmax attention the last query pays it, averaged over every query head of the layer (one
selection shared by the layer's KV heads); the last token itself gets max + 1 (kvpress
TOVAPress, a slight difference from the paper, which does not force it).

The paper evicts at every decode step: `tova(..., decode=True)` drops the lowest-scoring token
(by the new token's attention) whenever a head exceeds the budget (capacity budget + 1).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from kvjax.cache import LayerCache
from kvjax.compress.base import Compressor, Observation, valid_slots
from kvjax.compress.scorer import (
    check_budget_args,
    from_scorer,
    protect,
    recent_mask,
    window_attention,
)

Array = jax.Array


def tova_scores(cache: LayerCache, obs: Observation) -> Array:
    """float32[B, Hkv, C]: the last query's attention averaged over all query heads."""
    probs = window_attention(cache, obs, 1)[:, :, 0]  # [B, Hq, C]
    s = jnp.mean(probs, axis=1, keepdims=True)
    s = jnp.broadcast_to(s, (s.shape[0], cache.num_heads, s.shape[2]))
    return protect(s, recent_mask(cache, obs, 1), valid_slots(cache))


def tova(
    compression_ratio: float | None = None,
    budget: int | None = None,
    *,
    rerotate: bool = False,
    decode: bool = False,
) -> Compressor:
    """TOVA eviction at prefill; with `decode`, also at every generated token (the paper)."""
    compression_ratio, budget = check_budget_args(compression_ratio, budget)
    return _tova(compression_ratio, budget, bool(rerotate), bool(decode))


@functools.cache
def _tova(compression_ratio, budget, rerotate, decode) -> Compressor:
    return from_scorer(tova_scores, compression_ratio, budget, keep_window=1, rerotate=rerotate,
                       decode=decode)
