"""Knorm: keep the keys of smallest L2 norm.

Devoto et al. 2024, "A Simple and Effective L2 Norm-Based Strategy for KV Cache Compression",
arXiv:2406.11430: keys with a low norm draw high attention, so score = -||K[t]||_2 (computed in
float32, as kvpress KnormPress). No queries are needed, so it also runs at every decode step
(`decode=True`) or inside `kvjax.compress.decoding`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from kvjax.cache import LayerCache
from kvjax.compress.base import Compressor, Observation
from kvjax.compress.scorer import check_budget_args, from_scorer

Array = jax.Array


def knorm_scores(cache: LayerCache, obs: Observation | None = None) -> Array:
    """float32[B, Hkv, C]: minus the L2 norm of each stored (post-RoPE) key."""
    del obs
    k = cache.keys.astype(jnp.float32)
    return -jnp.sqrt(jnp.sum(k * k, axis=-1))


def knorm(
    compression_ratio: float | None = None,
    budget: int | None = None,
    *,
    rerotate: bool = False,
    decode: bool = False,
) -> Compressor:
    """Knorm eviction: keep each head's `budget` (or 1 - ratio) lowest-norm keys.

    decode: also evict the largest-norm key whenever a head exceeds the budget while
    generating (the layer then needs budget + 1 slots).
    """
    compression_ratio, budget = check_budget_args(compression_ratio, budget)
    return _knorm(compression_ratio, budget, bool(rerotate), bool(decode))


@functools.cache
def _knorm(compression_ratio, budget, rerotate, decode) -> Compressor:
    return from_scorer(knorm_scores, compression_ratio, budget, rerotate=rerotate, decode=decode)
