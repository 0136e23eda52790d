"""SnapKV: the observation window's attention picks the prefix tokens to keep.

Li et al. 2024, "SnapKV: LLM Knows What You Are Looking For Before Generation",
arXiv:2404.14469. Scores, as kvpress SnapKVPress (the parity reference):

    A = softmax(Q_w K^T / sqrt(d))            the last `window` queries over the whole cache
    s = mean over the window queries of A, prefix columns only (window columns set to 0)
    s = pool1d(s, kernel, stride 1, padding kernel // 2)   per query head, zero padding
    s = mean over each KV head's query group
    window tokens get max(s) + 1 so they are always kept

Defaults are kvpress's: window 64, average pooling with kernel 5. The paper uses a 32-token
observation window and max pooling with kernel 7: `from kvjax.compress.snapkv import PAPER`,
then `snapkv(budget=1024, **PAPER)`.

Pooling runs over cache slots, which are in position order after prefill (see
`kvjax.compress.scorer`). Cost: one [B, Hq, window, C] attention; memory-bound top-k.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from kvjax.cache import LayerCache
from kvjax.compress.base import Compressor, Observation, valid_slots
from kvjax.compress.scorer import (
    check_budget_args,
    check_int,
    check_window,
    from_scorer,
    group_mean,
    protect,
    recent_mask,
    window_attention,
)

Array = jax.Array

POOLINGS = ("avg", "max")
PAPER = {"window": 32, "kernel": 7, "pooling": "max"}


def pool1d(x: Array, kernel: int, pooling: str) -> Array:
    """Stride-1 pooling over the last axis with `kernel // 2` padding on both sides.

    "avg" counts the zero padding (torch avg_pool1d's default); "max" pads with -inf.
    """
    if kernel == 1:
        return x
    pad = kernel // 2
    widths = ((0, 0),) * (x.ndim - 1) + ((pad, pad),)
    dims = (1,) * (x.ndim - 1) + (kernel,)
    if pooling == "avg":
        s = jax.lax.reduce_window(x, 0.0, jax.lax.add, dims, (1,) * x.ndim, widths)
        return s / kernel
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, dims, (1,) * x.ndim, widths)


def check_pooling_args(window: int, kernel: int, pooling: str) -> tuple[int, int, str]:
    window = check_int("window", window, 1)
    kernel = check_int("kernel", kernel, 1)
    if kernel % 2 == 0:
        raise ValueError(f"kernel must be an odd int >= 1 (same-length pooling), got {kernel}")
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    return window, kernel, pooling


def snapkv_scores(
    cache: LayerCache,
    obs: Observation,
    *,
    window: int = 64,
    kernel: int = 5,
    pooling: str = "avg",
) -> Array:
    """float32[B, Hkv, C] SnapKV scores (module docstring); window tokens score max + 1.

    Raises ValueError at trace time when `window` is not smaller than the observed prompt.
    """
    window, kernel, pooling = check_pooling_args(window, kernel, pooling)
    check_window(window, obs)
    probs = window_attention(cache, obs, window)  # [B, Hq, w, C]
    real = jnp.sum(obs.query_positions[:, -window:] >= 0, axis=1).astype(jnp.float32)
    in_window = recent_mask(cache, obs, window)  # [B, Hkv, C]
    valid = valid_slots(cache)
    prefix = valid & ~in_window
    g = obs.queries.shape[1] // cache.num_heads
    prefix_q = jnp.repeat(prefix, g, axis=1)  # [B, Hq, C]
    s = jnp.sum(probs, axis=2) / jnp.maximum(real, 1.0)[:, None, None]
    s = jnp.where(prefix_q, s, 0.0)
    s = pool1d(s, kernel, pooling)
    s = group_mean(s, cache.num_heads)
    return protect(s, in_window, valid)


def snapkv(
    compression_ratio: float | None = None,
    budget: int | None = None,
    *,
    window: int = 64,
    kernel: int = 5,
    pooling: str = "avg",
    rerotate: bool = False,
) -> Compressor:
    """SnapKV eviction at prefill: keep the top tokens by `snapkv_scores` plus the window.

    Args:
      compression_ratio / budget: exactly one (fraction removed in [0, 1) / tokens kept per
        head); see `kvjax.compress.scorer`. The budget must hold the window.
      window: observation window (kvpress 64; paper 32). kernel: odd pooling size (kvpress 5).
      pooling: "avg" (kvpress) or "max" (paper).
      rerotate: re-rotate kept keys to contiguous positions (kvpress KeyRerotationPress).
    """
    compression_ratio, budget = check_budget_args(compression_ratio, budget)
    window, kernel, pooling = check_pooling_args(window, kernel, pooling)
    return _snapkv(compression_ratio, budget, window, kernel, pooling, bool(rerotate))


@functools.cache
def _snapkv(compression_ratio, budget, window, kernel, pooling, rerotate) -> Compressor:
    scorer = functools.partial(snapkv_scores, window=window, kernel=kernel, pooling=pooling)
    return from_scorer(scorer, compression_ratio, budget, keep_window=window, rerotate=rerotate)
