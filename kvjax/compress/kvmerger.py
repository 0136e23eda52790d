"""KVMerger: merge runs of consecutive similar keys into their most-attended token.

Wang, Jin, Yu, Zhang, "Model Tells You Where to Merge: Adaptive KV Cache Merging for LLMs on
Long-Context Tasks" (arXiv:2407.08454, 2024). Per layer and KV head, over the valid slots in
slot order (= token order):

  1. Merging sets: maximal runs of consecutive slots whose adjacent keys have cosine similarity
     cos(k_t, k_{t-1}) >= threshold (the paper's observation: neighbouring keys are highly
     similar). The last `window` slots are never merged (each is its own set).
  2. Pivot p of a set: the slot with the highest score (attention; ties: the earlier slot).
  3. Gaussian-kernel weighted merge into the pivot, for keys and values alike:
        w_i = n_i exp(-||k_i - k_p||^2 / (2 sigma^2)),   k* = sum_i w_i k_i / sum_i w_i,
        v* = sum_i w_i v_i / sum_i w_i
     with n_i the number of tokens slot i already stands for (1 for ordinary tokens) and
     sigma the given constant, or by default (sigma=None) the set's mean distance
     mean_{i != p} ||k_i - k_p|| (scale-free; the paper leaves sigma as a hyper-parameter).
  4. The merged slot keeps the pivot's position and score and stands for N = sum_i n_i tokens
     (every member is merged, none evicted; the kernel weights only shape the mix, which the
     similarity threshold keeps close to every member).
  5. Budget: of the merged sets, the `budget` with the highest pivot scores are kept
     (`keep_topk`), so the output has a static capacity like any eviction method.

How merged slots enter attention (see docs/design_merging.md): a slot standing for N tokens
carries log N in `LayerCache.slot_data["log_count"]` and attention adds it to that slot's logit,
    softmax_i(q.k_i * scale + log N_i),
so N identical tokens merged into one slot give exactly the attention of the N originals; for
near-identical keys the error is the Jensen gap of exp over the set. Ordinary tokens have
log N = 0 (new slots written at decode get zeros), so caches without merges are unchanged.

Defaults (kvjax): threshold 0.8, window 32, scores = `window_attention_scores` (mean attention
of the last 32 queries, GQA group averaged); any `<name>_scores(cache, obs)` scorer plugs in.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from kvjax.cache import LayerCache
from kvjax.compress.base import Compressor, Observation, State, keep_topk, valid_slots
from kvjax.compress.scorer import (
    check_budget_args,
    check_int,
    n_kept,
    window_attention,
)

Array = jax.Array
Scorer = Callable[[LayerCache, Observation], Array]

LOG_COUNT = "log_count"  # slot_data key: log of the number of tokens a slot stands for


# --- shared helpers of the merging family --------------------------------------------------


def log_counts(cache: LayerCache) -> Array:
    """float32[B, Hkv, C]: log of the tokens each slot stands for (0 where never merged)."""
    lc = cache.slot_data.get(LOG_COUNT)
    if lc is None:
        return jnp.zeros(cache.positions.shape, jnp.float32)
    return lc.astype(jnp.float32)


def with_log_counts(cache: LayerCache, log_count: Array) -> LayerCache:
    """The cache with `slot_data["log_count"]` set (float32[B, Hkv, C])."""
    return cache.replace(slot_data={**cache.slot_data, LOG_COUNT: log_count.astype(jnp.float32)})


def window_attention_scores(cache: LayerCache, obs: Observation, window: int = 32) -> Array:
    """float32[B, Hkv, C]: mean attention each slot gets from the last `window` real queries.

    Averaged over the queries and the GQA group (SnapKV's statistic without pooling). Padding
    queries (position -1) are excluded from the mean.
    """
    probs = window_attention(cache, obs, window)  # [B, Hq, T, C]
    qpos = obs.query_positions[:, -window:]
    b, hq, t, _ = probs.shape
    h = cache.num_heads
    probs = probs.reshape(b, h, hq // h, t, cache.capacity)
    n = jnp.maximum(jnp.sum(qpos >= 0, axis=1), 1).astype(jnp.float32)  # [B]
    return jnp.sum(probs, axis=(2, 3)) / (hq // h) / n[:, None, None]


def recent_mask(cache: LayerCache, window: int) -> Array:
    """bool[B, Hkv, C]: the last `window` valid slots of each head."""
    slot = jnp.arange(cache.capacity)[None, None, :]
    return (slot >= cache.lengths[:, :, None] - window) & valid_slots(cache)


def check_budget(budget: Any, compression_ratio: Any) -> None:
    """Exactly one of an int budget >= 1 or a compression_ratio in [0, 1) (`check_budget_args`
    of score-based eviction)."""
    check_budget_args(compression_ratio, budget)


def resolve_budget(capacity: int, budget: int | None, compression_ratio: float | None,
                   extra: int = 0) -> int:
    """Static per-head slots: min(budget, C + extra) or max(1, int(C * (1 - ratio))).

    `extra` is room for slots a method adds (ZeroMerge's residual, EMS's zero class), so a
    budget larger than the prompt keeps every token.
    """
    if budget is not None:
        return int(min(budget, capacity + extra))
    return n_kept(capacity, compression_ratio)


def check_float(name: str, value: Any, low: float, high: float) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not low <= value <= high:
        raise ValueError(f"{name} must be a float in [{low}, {high}], got {value!r}")


def check_scorer(scores: Any) -> None:
    if scores is not None and not callable(scores):
        raise TypeError(f"scores must be a callable (cache, obs) -> [B, Hkv, C], got {scores!r}")


def _bh_index(cache: LayerCache) -> tuple[Array, Array]:
    b, h = cache.lengths.shape
    return jnp.arange(b)[:, None, None], jnp.arange(h)[None, :, None]


# --- KVMerger ------------------------------------------------------------------------------


def merging_sets(keys: Array, valid: Array, protect: Array, threshold: float) -> Array:
    """bool[B, Hkv, C]: where a new merging set starts (runs of adjacent cos >= threshold).

    keys [B, Hkv, C, D]; valid/protect bool[B, Hkv, C]. Invalid and protected slots start
    their own set and end the previous one.
    """
    k = keys.astype(jnp.float32)
    kn = k / jnp.maximum(jnp.linalg.norm(k, axis=-1, keepdims=True), 1e-12)
    sim = jnp.sum(kn[:, :, 1:] * kn[:, :, :-1], axis=-1)  # [B, H, C-1]
    alone = ~valid | protect
    joins = (sim >= threshold) & ~alone[:, :, 1:] & ~alone[:, :, :-1]
    first = jnp.ones(keys.shape[:2] + (1,), bool)
    return jnp.concatenate([first, ~joins], axis=2)


def kvmerger_merge(
    cache: LayerCache,
    scores: Array,
    threshold: float = 0.8,
    sigma: float | None = None,
    window: int = 32,
) -> tuple[LayerCache, Array]:
    """Merges every merging set into its pivot; returns (cache of sets, set scores).

    The result has the input's capacity; head h holds its number of sets in `lengths`, set j in
    slot j (in token order), with the merged key/value, the pivot's position and
    `slot_data["log_count"]`. Set scores are the pivot scores (+inf for the recent window).
    """
    b, h, c, d = cache.keys.shape
    bi, hi = _bh_index(cache)
    valid = valid_slots(cache)
    protect = recent_mask(cache, window)
    start = merging_sets(cache.keys, valid, protect, threshold)
    first = start & valid
    # set index of each valid slot; empty slots go to index C - 1, never a real set when any
    # slot is empty (they carry zero weight and -inf score)
    sid = jnp.where(valid, jnp.cumsum(first, axis=2) - 1, c - 1)
    nsets = jnp.sum(first, axis=2).astype(jnp.int32)
    s = jnp.where(valid, scores.astype(jnp.float32), -jnp.inf)
    s = jnp.where(protect, jnp.inf, s)

    # pivot = first slot reaching the set's max score
    set_max = jnp.full((b, h, c), -jnp.inf).at[bi, hi, sid].max(s)
    slot = jnp.broadcast_to(jnp.arange(c), (b, h, c))
    cand = jnp.where(s >= jnp.take_along_axis(set_max, sid, axis=2), slot, c)
    pivot = jnp.full((b, h, c), c, jnp.int32).at[bi, hi, sid].min(cand.astype(jnp.int32))
    pivot = jnp.minimum(pivot, c - 1)
    my_pivot = jnp.take_along_axis(pivot, sid, axis=2)  # [B, H, C]

    k = cache.keys.astype(jnp.float32)
    v = cache.values.astype(jnp.float32)
    kp = jnp.take_along_axis(k, my_pivot[..., None], axis=2)
    dist2 = jnp.sum((k - kp) ** 2, axis=-1)  # [B, H, C]
    if sigma is None:
        others = valid & (slot != my_pivot)
        dsum = jnp.zeros((b, h, c)).at[bi, hi, sid].add(jnp.where(others, jnp.sqrt(dist2), 0.0))
        dcnt = jnp.zeros((b, h, c)).at[bi, hi, sid].add(others.astype(jnp.float32))
        sig = jnp.take_along_axis(dsum / jnp.maximum(dcnt, 1.0), sid, axis=2)
        sig2 = jnp.maximum(sig, 1e-6) ** 2
    else:
        sig2 = jnp.float32(sigma) ** 2
    lc = log_counts(cache)
    w = jnp.where(valid, jnp.exp(lc - dist2 / (2.0 * sig2)), 0.0)  # pivot: exp(lc_p)
    wsum = jnp.zeros((b, h, c)).at[bi, hi, sid].add(w)
    ksum = jnp.zeros((b, h, c, d)).at[bi, hi, sid].add(w[..., None] * k)
    vsum = jnp.zeros((b, h, c, v.shape[-1])).at[bi, hi, sid].add(w[..., None] * v)
    count = jnp.zeros((b, h, c)).at[bi, hi, sid].add(jnp.where(valid, jnp.exp(lc), 0.0))
    den = jnp.maximum(wsum, 1e-30)[..., None]

    in_range = jnp.arange(c)[None, None, :] < nsets[:, :, None]

    def at_pivot(arr: Array) -> Array:
        ix = pivot.reshape(pivot.shape + (1,) * (arr.ndim - 3))
        return jnp.take_along_axis(arr, ix, axis=2)

    data = {n: at_pivot(a) for n, a in cache.slot_data.items() if n != LOG_COUNT}
    data[LOG_COUNT] = jnp.where(in_range, jnp.log(jnp.maximum(count, 1.0)), 0.0)
    merged = LayerCache(
        keys=jnp.where(in_range[..., None], ksum / den, 0.0).astype(cache.keys.dtype),
        values=jnp.where(in_range[..., None], vsum / den, 0.0).astype(cache.values.dtype),
        lengths=nsets,
        positions=jnp.where(in_range, at_pivot(cache.positions), -1),
        slot_data=data,
    )
    return merged, jnp.where(in_range, at_pivot(s), -jnp.inf)


@functools.cache
def kvmerger(
    budget: int | None = None,
    compression_ratio: float | None = None,
    threshold: float = 0.8,
    sigma: float | None = None,
    window: int = 32,
    scores: Scorer | None = None,
) -> Compressor:
    """KVMerger at prefill: merge similar runs, then keep the `budget` best merged slots.

    Args:
      budget / compression_ratio: exactly one; slots kept per head (static), or the fraction
        of the prompt's slots removed.
      threshold: cosine similarity in [-1, 1] for two adjacent keys to share a merging set.
      sigma: Gaussian kernel width (> 0), or None for the per-set mean distance to the pivot.
      window: the last `window` slots (>= 0) are never merged and always kept.
      scores: `(cache, obs) -> float32[B, Hkv, C]` pivot/selection scores (higher = more
        important); default `window_attention_scores`.
    """
    check_budget(budget, compression_ratio)
    check_float("threshold", threshold, -1.0, 1.0)
    if sigma is not None and not (isinstance(sigma, (int, float)) and sigma > 0):
        raise ValueError(f"sigma must be a float > 0 or None, got {sigma!r}")
    check_int("window", window, 0)
    check_scorer(scores)
    scorer = scores or window_attention_scores

    def prefill(cache: LayerCache, obs: Observation, state: State):
        keep = resolve_budget(cache.capacity, budget, compression_ratio)
        merged, set_scores = kvmerger_merge(cache, scorer(cache, obs), threshold, sigma, window)
        return keep_topk(merged, set_scores, keep), state

    return Compressor(init=lambda cache: (), prefill=prefill, decode=lambda c, o, s: (c, s))
