"""ZeroMerge: evicted tokens fold into one residual slot per head with a compensated logit.

Liu et al., "ZeroMerge: Parameter-Free KV Cache Compression for Memory-Efficient Long-Context
LLMs" (arXiv:2503.10714, 2025). Per layer and KV head, with a static budget of M slots:

  slot 0          the residual slot: the count-weighted mean of every evicted key and value,
                      k_r = sum_e n_e k_e / N,   v_r = sum_e n_e v_e / N,   N = sum_e n_e,
                  standing for N tokens: its attention logit is compensated by + log N
                  (`slot_data["log_count"]`, see docs/design_merging.md), so the residual gets
                  the attention mass N exp(q.k_r) that the N evicted tokens would have had if
                  their keys were equal; its position is the newest merged token's.
  slots 1..M-1    the M - 1 highest-scoring tokens (the last `window` always kept).

Prefill compresses the prompt this way. Decoding keeps the head at M slots (decode capacity
M + 1): after each appended token the head's running importance (accumulated attention the slot
has received: the prefill score plus every decode query's attention, GQA-averaged, kept in
`slot_data["zeromerge_score"]`) picks the least important slot outside the window, which folds
into the residual (counts add, means are re-weighted) and is removed.

Simplification (documented): the paper's head-level memory allocation from multi-dimensional
importance is replaced by a uniform per-head budget with any pluggable scorer; chain with a
budget allocator for head-adaptive budgets. Defaults: window 32, scores =
`window_attention_scores`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from kvjax.attention import attention_probs
from kvjax.cache import LayerCache, gather
from kvjax.compress.base import Compressor, Observation, State, keep_topk, valid_slots
from kvjax.compress.kvmerger import (
    LOG_COUNT,
    Scorer,
    check_budget,
    check_int,
    check_scorer,
    log_counts,
    recent_mask,
    resolve_budget,
    window_attention_scores,
)

Array = jax.Array

SCORE = "zeromerge_score"


def residual_of(cache: LayerCache, drop: Array) -> tuple[Array, Array, Array, Array]:
    """Count-weighted merge of the slots `drop` (bool[B, Hkv, C]).

    Returns (key [B, H, D], value [B, H, Dv], log count [B, H], position [B, H]); heads with
    nothing to merge get zeros, log count 0 and position -1.
    """
    n = jnp.where(drop, jnp.exp(log_counts(cache)), 0.0)  # [B, H, C]
    tot = jnp.sum(n, axis=2)
    den = jnp.maximum(tot, 1e-30)[..., None]
    k = jnp.einsum("bhc,bhcd->bhd", n, cache.keys.astype(jnp.float32)) / den
    v = jnp.einsum("bhc,bhcd->bhd", n, cache.values.astype(jnp.float32)) / den
    pos = jnp.max(jnp.where(drop, cache.positions, -1), axis=2)
    return k, v, jnp.log(jnp.maximum(tot, 1.0)), pos


def _prepend(cache: LayerCache, k, v, lc, pos, score) -> LayerCache:
    """Puts a residual slot in front of every head's slots (capacity + 1)."""
    def cat(first, arr):
        return jnp.concatenate([first[:, :, None].astype(arr.dtype), arr], axis=2)

    data = {n: cat(jnp.zeros(a.shape[:2] + a.shape[3:], a.dtype), a)
            for n, a in cache.slot_data.items() if n not in (LOG_COUNT, SCORE)}
    data[LOG_COUNT] = cat(lc, log_counts(cache))
    data[SCORE] = cat(score, cache.slot_data[SCORE])
    return LayerCache(
        keys=cat(k, cache.keys), values=cat(v, cache.values),
        lengths=cache.lengths + 1, positions=cat(pos, cache.positions), slot_data=data,
    )


def zeromerge_prefill(cache: LayerCache, scores: Array, keep: int, window: int) -> LayerCache:
    """Residual slot + the keep - 1 best slots (see module docstring). Capacity `keep`."""
    if keep < 2:
        raise ValueError(f"ZeroMerge needs a budget >= 2 (residual + 1 token), got {keep}")
    valid = valid_slots(cache)
    s = jnp.where(valid, scores.astype(jnp.float32), -jnp.inf)
    sel = jnp.where(recent_mask(cache, window), jnp.inf, s)
    ids = jnp.broadcast_to(jnp.arange(cache.capacity, dtype=jnp.int32), cache.positions.shape)
    tagged = cache.replace(slot_data={**cache.slot_data, SCORE: s, "_slot": ids})
    kept = keep_topk(tagged, sel, keep - 1)
    kept_ix = jnp.where(valid_slots(kept), kept.slot_data["_slot"], cache.capacity)
    is_kept = jnp.zeros(valid.shape, bool).at[
        jnp.arange(valid.shape[0])[:, None, None], jnp.arange(valid.shape[1])[None, :, None],
        kept_ix,
    ].set(True, mode="drop")
    k, v, lc, pos = residual_of(cache, valid & ~is_kept)
    kept = kept.replace(slot_data={n: a for n, a in kept.slot_data.items() if n != "_slot"})
    score = jnp.zeros(lc.shape, jnp.float32)
    return _prepend(kept, k, v, lc, pos, score)


def zeromerge_decode(cache: LayerCache, obs: Observation, window: int) -> LayerCache:
    """Accumulates the new query's attention; full heads fold their least important slot."""
    b, hq = obs.queries.shape[:2]
    h, c = cache.num_heads, cache.capacity
    probs = attention_probs(obs.queries, obs.query_positions, cache, obs.scale,
                            obs.sliding_window)
    probs = jnp.sum(probs.reshape(b, h, hq // h, -1, c), axis=3).mean(axis=2)
    score = cache.slot_data[SCORE] + probs
    valid = valid_slots(cache)
    slot = jnp.arange(c)[None, None, :]
    evictable = valid & (slot > 0) & ~recent_mask(cache, window)
    victim = jnp.argmin(jnp.where(evictable, score, jnp.inf), axis=2)  # [B, H]
    full = (cache.lengths >= c) & jnp.any(evictable, axis=2)
    drop = full[:, :, None] & (slot == victim[:, :, None])
    res = (slot == 0) & valid
    k, v, lc, pos = residual_of(cache, drop | (res & full[:, :, None]))
    # fold: rewrite slot 0 where full, then remove the victim (shift the rest left)
    def put0(arr, new):
        new = new.astype(arr.dtype)
        first = jnp.where(full.reshape(full.shape + (1,) * (new.ndim - 2)), new, arr[:, :, 0])
        return arr.at[:, :, 0].set(first)

    folded = cache.replace(
        keys=put0(cache.keys, k), values=put0(cache.values, v),
        positions=put0(cache.positions, pos),
        slot_data={**cache.slot_data, LOG_COUNT: put0(log_counts(cache), lc), SCORE: score},
    )
    idx = slot + (full[:, :, None] & (slot >= victim[:, :, None]))
    idx = jnp.minimum(idx, c - 1).astype(jnp.int32)
    out = gather(folded, jnp.broadcast_to(idx, (b, h, c)), cache.lengths - full)
    return out


@functools.cache
def zeromerge(
    budget: int | None = None,
    compression_ratio: float | None = None,
    window: int = 32,
    scores: Scorer | None = None,
    decode_merge: bool = True,
) -> Compressor:
    """ZeroMerge: residual slot + top tokens at prefill, kept at the budget while decoding.

    Args:
      budget / compression_ratio: exactly one; slots per head including the residual (>= 2).
      window: the last `window` slots (>= 0, < budget - 1) are never merged.
      scores: `(cache, obs) -> float32[B, Hkv, C]` importance at prefill (default
        `window_attention_scores`); decode accumulates attention on top of it.
      decode_merge: keep the budget while decoding (needs a dense LayerCache, so ZeroMerge must
        be the last member of a chain); False compresses the prompt only.
    """
    check_budget(budget, compression_ratio)
    check_int("window", window, 0)
    check_scorer(scores)
    if decode_merge is True and budget is not None and window >= budget - 1:
        raise ValueError(f"window ({window}) must be < budget - 1 ({budget - 1})")

    if not isinstance(decode_merge, bool):
        raise TypeError(f"decode_merge must be a bool, got {decode_merge!r}")
    scorer = scores or window_attention_scores

    def prefill(cache: LayerCache, obs: Observation, state: State):
        keep = max(resolve_budget(cache.capacity, budget, compression_ratio, extra=1), 2)
        if decode_merge and window >= keep - 1:
            raise ValueError(f"window ({window}) must be < budget - 1 ({keep - 1})")
        return zeromerge_prefill(cache, scorer(cache, obs), keep, window), state

    def decode(cache: LayerCache, obs: Observation, state: State):
        if not decode_merge:
            return cache, state
        if not isinstance(cache, LayerCache) or SCORE not in cache.slot_data:
            raise TypeError(
                "zeromerge decode-time merging needs the dense LayerCache its prefill returned; "
                "put zeromerge last in a chain or pass decode_merge=False"
            )
        return zeromerge_decode(cache, obs, window), state

    if not decode_merge:
        return Compressor(init=lambda cache: (), prefill=prefill, decode=decode)
    return Compressor(
        init=lambda cache: (), prefill=prefill, decode=decode,
        decode_capacity=lambda capacity, max_new_tokens: capacity + 1,
    )
