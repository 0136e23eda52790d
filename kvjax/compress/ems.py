"""EMS: evict-then-merge with a global-local importance score, per KV head.

Li et al., "EMS: Adaptive Evict-then-Merge Strategy for Head-wise KV Cache Compression Based on
Global-Local Importance" (arXiv:2412.08521, 2024). Per layer and KV head, budget M slots:

  Score (global-local): s_glo = attention each slot received from all observed queries, s_loc
    = from the last `local_window` queries (GQA-averaged sums). The global score is rescaled to
    the local one's mean and the two are combined elementwise:
        s = max(s_glo * mean(s_loc) / mean(s_glo), s_loc)
    (means over the head's valid slots), countering the bias of accumulated attention towards
    early tokens while keeping what the local window needs.
  Evict-then-merge:
    1. the M - 1 highest-scoring slots are kept as class centers (last `window` always kept);
    2. of the rest, the lowest-scoring (1 - merge_ratio) fraction is evicted outright;
    3. each remaining token joins the center its key is most cosine-similar to when that
       similarity is >= threshold, otherwise the head's "zero class" slot (slot 0).
  Every class (center or zero class) becomes the count-weighted mean of its members' keys and
  values and stands for the sum of their counts (`slot_data["log_count"]`, added to the
  attention logit, see docs/design_merging.md); centers keep their position, the zero class
  takes its newest member's position.

Differences from the paper (documented): the head-wise adaptive evict/merge ratios are one
static `merge_ratio` per compressor, and the custom Global-Local kernel is plain jnp.
Defaults (kvjax): local_window 32, window 32, merge_ratio 0.5, threshold 0.5.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from kvjax.attention import attention_probs
from kvjax.cache import LayerCache
from kvjax.compress.base import Compressor, Observation, State, keep_topk, valid_slots
from kvjax.compress.kvmerger import (
    LOG_COUNT,
    Scorer,
    check_budget,
    check_float,
    check_int,
    check_scorer,
    log_counts,
    recent_mask,
    resolve_budget,
)

Array = jax.Array

QUERY_BLOCK = 256


def _attention_sums(cache: LayerCache, obs: Observation, queries: Array, qpos: Array) -> Array:
    """float32[B, Hkv, C]: attention summed over queries (blocks of QUERY_BLOCK), group mean."""
    b, hq, t, d = queries.shape
    h = cache.num_heads
    blk = min(t, QUERY_BLOCK)
    n = -(-t // blk)
    pad = n * blk - t
    qb = jnp.pad(queries, ((0, 0), (0, 0), (0, pad), (0, 0)))
    qb = jnp.moveaxis(qb.reshape(b, hq, n, blk, d), 2, 0)
    pb = jnp.pad(qpos, ((0, 0), (0, pad)), constant_values=-1)
    pb = jnp.moveaxis(pb.reshape(b, n, -1), 1, 0)

    def block(xs):
        p = attention_probs(xs[0], xs[1], cache, obs.scale, obs.sliding_window)
        return jnp.sum(p.reshape(b, h, hq // h, -1, cache.capacity), axis=3).mean(axis=2)

    return jnp.sum(jax.lax.map(block, (qb, pb)), axis=0)


def global_local_scores(cache: LayerCache, obs: Observation, local_window: int = 32) -> Array:
    """float32[B, Hkv, C]: EMS's global-local importance (module docstring)."""
    glo = _attention_sums(cache, obs, obs.queries, obs.query_positions)
    loc = _attention_sums(
        cache, obs, obs.queries[:, :, -local_window:], obs.query_positions[:, -local_window:]
    )
    valid = valid_slots(cache)
    n = jnp.maximum(jnp.sum(valid, axis=2), 1)

    def mean(x):
        return jnp.sum(jnp.where(valid, x, 0.0), axis=2) / n

    ratio = mean(loc) / jnp.maximum(mean(glo), 1e-30)
    return jnp.where(valid, jnp.maximum(glo * ratio[:, :, None], loc), 0.0)


def ems_merge(cache: LayerCache, scores: Array, keep: int, merge_ratio: float = 0.5,
              threshold: float = 0.5, window: int = 32) -> LayerCache:
    """Zero class + keep - 1 centers with merged members (module docstring). Capacity `keep`."""
    if keep < 2:
        raise ValueError(f"EMS needs a budget >= 2 (zero class + 1 center), got {keep}")
    b, h, c, d = cache.keys.shape
    bi, hi = jnp.arange(b)[:, None, None], jnp.arange(h)[None, :, None]
    valid = valid_slots(cache)
    s = jnp.where(valid, scores.astype(jnp.float32), -jnp.inf)
    sel = jnp.where(recent_mask(cache, window), jnp.inf, s)
    ids = jnp.broadcast_to(jnp.arange(c, dtype=jnp.int32), (b, h, c))
    kept = keep_topk(cache.replace(slot_data={**cache.slot_data, "_slot": ids}), sel, keep - 1)
    kvalid = valid_slots(kept)
    src = jnp.where(kvalid, kept.slot_data["_slot"], c)  # [B, H, K] source slot of each center
    kept = kept.replace(slot_data={n: a for n, a in kept.slot_data.items() if n != "_slot"})
    center_of = jnp.full((b, h, c), -1, jnp.int32).at[bi, hi, src].set(
        jnp.broadcast_to(jnp.arange(keep - 1, dtype=jnp.int32), src.shape), mode="drop"
    )  # [B, H, C] center index of kept slots, -1 otherwise
    rest = valid & (center_of < 0)

    # evict the lowest (1 - merge_ratio) of the rest: rank the rest by score, best first
    n_rest = jnp.sum(rest, axis=2)
    n_merge = jnp.floor(n_rest * merge_ratio).astype(jnp.int32)
    order = jnp.argsort(jnp.where(rest, -s, jnp.inf), axis=2, stable=True)
    rank = jnp.zeros((b, h, c), jnp.int32).at[bi, hi, order].set(
        jnp.broadcast_to(jnp.arange(c, dtype=jnp.int32), (b, h, c))
    )
    merging = rest & (rank < n_merge[:, :, None])

    # most similar center (cosine of keys)
    def unit(x):
        x = x.astype(jnp.float32)
        return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)

    sim = jnp.einsum("bhcd,bhkd->bhck", unit(cache.keys), unit(kept.keys))
    sim = jnp.where(kvalid[:, :, None, :], sim, -jnp.inf)
    best = jnp.argmax(sim, axis=3).astype(jnp.int32)
    best_sim = jnp.max(sim, axis=3)
    # class of every slot: 0 zero class, j + 1 center j, keep (out of range) dropped
    cls = jnp.where(center_of >= 0, center_of + 1, keep)
    cls = jnp.where(merging, jnp.where(best_sim >= threshold, best + 1, 0), cls)

    n = jnp.where(cls < keep, jnp.exp(log_counts(cache)), 0.0)
    tot = jnp.zeros((b, h, keep)).at[bi, hi, cls].add(n, mode="drop")
    ksum = jnp.zeros((b, h, keep, d)).at[bi, hi, cls].add(
        n[..., None] * cache.keys.astype(jnp.float32), mode="drop")
    vsum = jnp.zeros((b, h, keep, cache.values.shape[-1])).at[bi, hi, cls].add(
        n[..., None] * cache.values.astype(jnp.float32), mode="drop")
    den = jnp.maximum(tot, 1e-30)[..., None]
    zpos = jnp.max(jnp.where(cls == 0, cache.positions, -1), axis=2)  # [B, H]
    has = tot > 0

    def cat(first, arr):
        return jnp.concatenate([first[:, :, None].astype(arr.dtype), arr], axis=2)

    data = {n_: cat(jnp.zeros(a.shape[:2] + a.shape[3:], a.dtype), a)
            for n_, a in kept.slot_data.items() if n_ != LOG_COUNT}
    data[LOG_COUNT] = jnp.where(has, jnp.log(jnp.maximum(tot, 1.0)), 0.0)
    keys = jnp.where(has[..., None], ksum / den, 0.0)
    values = jnp.where(has[..., None], vsum / den, 0.0)
    return LayerCache(
        keys=keys.astype(cache.keys.dtype),
        values=values.astype(cache.values.dtype),
        lengths=kept.lengths + 1,
        positions=cat(zpos, kept.positions),
        slot_data=data,
    )


@functools.cache
def ems(
    budget: int | None = None,
    compression_ratio: float | None = None,
    merge_ratio: float = 0.5,
    threshold: float = 0.5,
    window: int = 32,
    local_window: int = 32,
    scores: Scorer | None = None,
) -> Compressor:
    """EMS at prefill (module docstring).

    Args:
      budget / compression_ratio: exactly one; slots per head including the zero class (>= 2).
      merge_ratio: fraction in [0, 1] of the non-kept tokens that are merged (the most
        important ones); the rest are evicted.
      threshold: cosine similarity in [-1, 1] needed to join a center instead of the zero class.
      window: the last `window` slots (>= 0) are always kept as centers.
      local_window: queries (>= 1) of the local score.
      scores: optional `(cache, obs) -> float32[B, Hkv, C]` replacing the global-local score.
    """
    check_budget(budget, compression_ratio)
    check_float("merge_ratio", merge_ratio, 0.0, 1.0)
    check_float("threshold", threshold, -1.0, 1.0)
    check_int("window", window, 0)
    check_int("local_window", local_window, 1)
    check_scorer(scores)
    scorer = scores or functools.partial(global_local_scores, local_window=local_window)

    def prefill(cache: LayerCache, obs: Observation, state: State):
        keep = max(resolve_budget(cache.capacity, budget, compression_ratio, extra=1), 2)
        return ems_merge(cache, scorer(cache, obs), keep, merge_ratio, threshold, window), state

    return Compressor(init=lambda cache: (), prefill=prefill, decode=lambda c, o, s: (c, s))
