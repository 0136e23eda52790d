"""WindowKV: keep whole windows of consecutive tokens chosen by window-attention scores.

Zuo et al., "WindowKV: Task-Adaptive Group-Wise KV Cache Window Selection for Efficient LLM
Inference" (2025; reference code github.com/optim996/WindowKV). Per layer and row:

  A      = softmax attention of the last w queries (the observation window) over the cache
  a[t]   = sum over the w queries of A[., t], for the review tokens t (those before the window)
  review windows: consecutive slots [i * r, (i + 1) * r) of the review region (r = review_size;
           the last one may be partial)
  score_i = "average": mean of a over the window's tokens and all query heads
            "max":     mean over query heads of the mean of the window's top (r // 2) values
  keep   = the floor((budget - w) / r) best-scoring review windows + the observation window.

The selection is shared by all heads of the layer (the reference scores a window over all
heads), so the result is a dense LayerCache of static capacity `budget` with the same kept
positions in every head. The task-adaptive part of the paper (a classifier picks "max" for
localisation tasks and "average" for aggregation tasks) is the caller's choice of `strategy`;
defaults follow the reference scripts: r = 8, w = 32 for "max" and 16 for "average".

Differences from the reference: the reference drops ceil((n_review - budget) / r) windows,
which can keep up to r - 1 tokens more than its budget when the partial last window is not
among the dropped; here whole windows are kept only while they fit, so lengths <= budget.
`budget` (or `compression_ratio`) counts every kept token, the observation window included.

Index sharing across layers (`shared_layers`, reference 8): layers are grouped in runs of
`shared_layers`; the first layer of a group selects, the others reuse its selection. Per-layer
compressor calls see the previous layer's returned state through `Observation.previous`
(`kvjax.generate` threads it through prefill), and the state of a WindowKV layer is its
selection mask over slots; a layer without it (layer 0, a direct call) selects on its own.
Optional group budgets (`beta`): the reference's arithmetic schedule, decreasing by group,
first = 2 * budget - last, last = budget * shared_layers // beta (reference beta = 14).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from kvjax.cache import LayerCache
from kvjax.compress.base import Compressor, Observation, State, valid_slots
from kvjax.compress.scorer import check_budget_args, check_int, resolve_budget, window_attention
from kvjax.headwise import dense_from_mask

Array = jax.Array

STRATEGIES = ("max", "average")


def window_attention_sum(cache: LayerCache, obs: Observation, window_size: int) -> Array:
    """float32[B, Hq, C]: attention of the last `window_size` queries, summed over them."""
    return jnp.sum(window_attention(cache, obs, window_size), axis=2)


def review_mask(cache: LayerCache, obs: Observation, window_size: int) -> Array:
    """bool[B, C]: valid slots (of head 0) before the observation window of each row."""
    qpos = obs.query_positions[:, -window_size:]
    first = jnp.min(jnp.where(qpos >= 0, qpos, jnp.iinfo(jnp.int32).max), axis=1)
    return valid_slots(cache)[:, 0] & (cache.positions[:, 0] < first[:, None])


def windowkv_window_scores(
    cache: LayerCache,
    obs: Observation,
    window_size: int = 32,
    review_size: int = 8,
    strategy: str = "max",
) -> Array:
    """float32[B, ceil(C / review_size)]: score of each review window; -inf if not eligible."""
    b, hq, c = obs.queries.shape[0], obs.queries.shape[1], cache.capacity
    n = -(-c // review_size)
    a = window_attention_sum(cache, obs, window_size)  # [B, Hq, C]
    review = review_mask(cache, obs, window_size)  # [B, C]
    pad = n * review_size - c
    a = jnp.pad(a, ((0, 0), (0, 0), (0, pad))).reshape(b, hq, n, review_size)
    inside = jnp.pad(review, ((0, 0), (0, pad))).reshape(b, 1, n, review_size)
    count = jnp.sum(inside[:, 0], axis=-1)  # [B, n]
    if strategy == "average":
        total = jnp.sum(jnp.where(inside, a, 0.0), axis=(1, 3))
        score = total / jnp.maximum(count * hq, 1)
    else:
        top = max(review_size // 2, 1)
        vals = jnp.sort(jnp.where(inside, a, -jnp.inf), axis=-1)[..., ::-1][..., :top]
        k = jnp.minimum(count, top)[:, None, :]  # [B, 1, n]
        used = jnp.arange(top)[None, None, None, :] < k[..., None]
        per_head = jnp.sum(jnp.where(used, vals, 0.0), axis=-1) / jnp.maximum(k, 1)
        score = jnp.mean(per_head, axis=1)
    return jnp.where(count > 0, score, -jnp.inf)


def windowkv_keep_mask(
    cache: LayerCache,
    obs: Observation,
    budget: int,
    window_size: int = 32,
    review_size: int = 8,
    strategy: str = "max",
) -> Array:
    """bool[B, C]: kept slots (shared by the heads): the best review windows + the window."""
    c = cache.capacity
    scores = windowkv_window_scores(cache, obs, window_size, review_size, strategy)
    n = scores.shape[1]
    n_keep = min(max(budget - window_size, 0) // review_size, n)
    chosen = jnp.zeros(scores.shape, bool)
    if n_keep > 0:
        _, best = jax.lax.top_k(scores, n_keep)
        chosen = chosen.at[jnp.arange(scores.shape[0])[:, None], best].set(True)
        chosen = chosen & jnp.isfinite(scores)
    per_slot = jnp.repeat(chosen, review_size, axis=1)[:, :c]
    review = review_mask(cache, obs, window_size)
    observed = valid_slots(cache)[:, 0] & ~review
    return (per_slot & review) | observed


def layer_budget(
    budget: int, layer: int, num_layers: int, shared_layers: int, beta: int | None
) -> int:
    """The reference's arithmetic group schedule (uniform `budget` when beta is None)."""
    groups = num_layers // shared_layers
    if beta is None or groups < 2:
        return budget
    last = budget * shared_layers // beta
    first = 2 * budget - last
    step = (first - last) // (groups - 1)
    g = min(layer // shared_layers, groups - 1)
    return last if g == groups - 1 else first - g * step


def windowkv(
    compression_ratio: float | None = None,
    *,
    budget: int | None = None,
    strategy: str = "max",
    window_size: int | None = None,
    review_size: int = 8,
    shared_layers: int = 1,
    beta: int | None = None,
) -> Compressor:
    """WindowKV (see the module docstring).

    Args:
      compression_ratio: fraction of the prompt removed (kvpress semantics); or
      budget: tokens kept per head, the observation window included (static capacity).
      strategy: "max" (localisation tasks) or "average" (aggregation tasks).
      window_size: observation window w (default 32 for "max", 16 for "average").
      review_size: tokens per review window r (8).
      shared_layers: layers per index-sharing group (1: every layer selects; reference 8).
      beta: arithmetic group-budget slope (None: the same budget in every layer).
    """
    compression_ratio, budget = check_budget_args(compression_ratio, budget)
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if window_size is None:
        window_size = 32 if strategy == "max" else 16
    window_size = check_int("window_size", window_size, 1)
    review_size = check_int("review_size", review_size, 1)
    shared_layers = check_int("shared_layers", shared_layers, 1)
    beta = None if beta is None else check_int("beta", beta, 1)
    return _windowkv(
        compression_ratio, budget, strategy, window_size, review_size, shared_layers, beta
    )


@functools.cache
def _windowkv(
    compression_ratio: float | None,
    budget: int | None,
    strategy: str,
    window_size: int,
    review_size: int,
    shared_layers: int,
    beta: int | None,
) -> Compressor:
    def init(cache: Any) -> State:
        return None

    def prefill(cache: LayerCache, obs: Observation, state: State):
        if not isinstance(cache, LayerCache):
            raise TypeError(f"windowkv needs a dense LayerCache, got {type(cache).__name__}")
        c = cache.capacity
        n = resolve_budget(c, compression_ratio, budget, allow_larger=True)
        n = layer_budget(n, obs.layer, obs.num_layers, shared_layers, beta)
        if n < window_size:
            raise ValueError(
                f"windowkv: the per-layer budget ({n} tokens from budget={budget}, "
                f"compression_ratio={compression_ratio}) must be >= window_size ({window_size})"
            )
        prev = obs.previous
        reuse = (
            obs.layer % shared_layers != 0
            and isinstance(prev, jax.Array)
            and prev.shape == (cache.batch, c)
        )
        if reuse:
            keep = prev
        else:
            keep = windowkv_keep_mask(cache, obs, n, window_size, review_size, strategy)
        mask = jnp.broadcast_to(keep[:, None, :], cache.positions.shape)
        return dense_from_mask(cache, mask, min(n, c)), keep

    def decode(cache: LayerCache, obs: Observation, state: State):
        return cache, state

    return Compressor(init=init, prefill=prefill, decode=decode)
