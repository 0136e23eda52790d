"""CaM: merge the values of evicted tokens into the kept tokens that follow them.

Zhang et al., "CaM: Cache Merging for Memory-efficient LLMs Inference" (ICML 2024,
openreview LCTmppB165); kvpress `CAMPress` is the public reference. Per layer and KV head:

  1. Keep the `budget` highest-scoring slots (any scorer; the last `window` slots always).
  2. Each evicted token e with attention A_e gets a merge window: the m kept slots that follow
     it in token order (m = merge_budget; fewer near the end, n_e = how many exist). Its merge
     probability is p_e = clip(A_e / mean_{j in window} A_j, 0, 1) (paper Eq. 14, "avg").
  3. Merge: every window slot j gets v_j += p_e * v_e / n_e. Keys are never changed and the
     evicted key is dropped.

The paper draws a Bernoulli(p_e) mask per evicted token; kvjax merges the expectation
p_e * v_e / n_e (deterministic, so jit-pure and reproducible; kvpress samples). Because only
values change and no slot stands for several keys, CaM needs no attention compensation
(no `log_count`), unlike KVMerger/ZeroMerge/EMS.

Defaults: merge_budget 32 (kvpress), window 32, scores = `window_attention_scores`; the merge
probability uses the same scores, so they should be attention-like (>= 0).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from kvjax.cache import LayerCache
from kvjax.compress.base import Compressor, Observation, State, keep_topk, valid_slots
from kvjax.compress.kvmerger import (
    Scorer,
    check_budget,
    check_int,
    check_scorer,
    recent_mask,
    resolve_budget,
    window_attention_scores,
)

Array = jax.Array


def cam_merge(cache: LayerCache, scores: Array, keep: int, merge_budget: int = 32,
              window: int = 32) -> LayerCache:
    """Keeps `keep` slots per head by `scores` and merges evicted values into them (CaM).

    scores: float32[B, Hkv, C] (>= 0, attention-like). Returns a cache of capacity `keep`.
    """
    c = cache.capacity
    valid = valid_slots(cache)
    s = jnp.where(valid, scores.astype(jnp.float32), -jnp.inf)
    sel = jnp.where(recent_mask(cache, window), jnp.inf, s)
    kept_cache = keep_topk(cache.replace(slot_data={**cache.slot_data, "_slot": _slot_ids(cache)}),
                           sel, keep)
    kept_slot = kept_cache.slot_data["_slot"].astype(jnp.int32)  # [B, H, K] source slots
    kept_cache = kept_cache.replace(
        slot_data={n: a for n, a in kept_cache.slot_data.items() if n != "_slot"}
    )
    nk = kept_cache.lengths  # [B, H]
    kcap = kept_cache.capacity
    kept_valid = jnp.arange(kcap)[None, None, :] < nk[:, :, None]

    # which slots were kept, and for every slot the rank of the first kept slot after it
    is_kept = jnp.zeros(valid.shape, bool).at[
        jnp.arange(valid.shape[0])[:, None, None], jnp.arange(valid.shape[1])[None, :, None],
        jnp.where(kept_valid, kept_slot, c),
    ].set(True, mode="drop")
    first_after = jnp.cumsum(is_kept, axis=2) - is_kept  # kept slots strictly before t
    evicted = valid & ~is_kept
    n_after = jnp.clip(nk[:, :, None] - first_after, 0, merge_budget)  # [B, H, C]

    kept_scores = jnp.take_along_axis(jnp.where(valid, scores, 0.0), kept_slot, axis=2)
    kept_scores = jnp.where(kept_valid, kept_scores, 0.0)
    csum = jnp.concatenate(
        [jnp.zeros(kept_scores.shape[:2] + (1,)), jnp.cumsum(kept_scores, axis=2)], axis=2
    )  # [B, H, K + 1]
    lo = jnp.clip(first_after, 0, kcap)
    hi = jnp.clip(first_after + n_after, 0, kcap)
    win_sum = jnp.take_along_axis(csum, hi, axis=2) - jnp.take_along_axis(csum, lo, axis=2)
    win_mean = win_sum / jnp.maximum(n_after, 1)
    a_e = jnp.where(valid, scores.astype(jnp.float32), 0.0)
    prob = jnp.where(win_mean > 0, jnp.clip(a_e / jnp.where(win_mean > 0, win_mean, 1.0), 0, 1),
                     jnp.where(a_e > 0, 1.0, 0.0))
    coef = jnp.where(evicted & (n_after > 0), prob / jnp.maximum(n_after, 1), 0.0)  # [B, H, C]

    v = cache.values.astype(jnp.float32)
    contrib = coef[..., None] * v  # [B, H, C, Dv]
    # add to kept ranks first_after .. first_after + n_after - 1 (a windowed prefix-sum trick:
    # +contrib at rank lo, -contrib at rank hi, then cumsum over ranks)
    b, h = nk.shape
    bi, hi_ = jnp.arange(b)[:, None, None], jnp.arange(h)[None, :, None]
    delta = jnp.zeros((b, h, kcap + 1, v.shape[-1]), jnp.float32)
    delta = delta.at[bi, hi_, lo].add(contrib).at[bi, hi_, hi].add(-contrib)
    add = jnp.cumsum(delta, axis=2)[:, :, :kcap]
    new_v = kept_cache.values.astype(jnp.float32) + jnp.where(kept_valid[..., None], add, 0.0)
    return kept_cache.replace(values=new_v.astype(cache.values.dtype))


def _slot_ids(cache: LayerCache) -> Array:
    return jnp.broadcast_to(jnp.arange(cache.capacity, dtype=jnp.int32), cache.positions.shape)


@functools.cache
def cam(
    budget: int | None = None,
    compression_ratio: float | None = None,
    merge_budget: int = 32,
    window: int = 32,
    scores: Scorer | None = None,
) -> Compressor:
    """CaM at prefill: evict to the budget, merging evicted values into following kept slots.

    Args:
      budget / compression_ratio: exactly one (slots kept per head, or fraction removed).
      merge_budget: m >= 1 kept slots that share each evicted value.
      window: the last `window` slots (>= 0) are always kept.
      scores: `(cache, obs) -> float32[B, Hkv, C]`, attention-like (>= 0); default
        `window_attention_scores`.
    """
    check_budget(budget, compression_ratio)
    check_int("merge_budget", merge_budget, 1)
    check_int("window", window, 0)
    check_scorer(scores)
    scorer = scores or window_attention_scores

    def prefill(cache: LayerCache, obs: Observation, state: State):
        keep = resolve_budget(cache.capacity, budget, compression_ratio)
        return cam_merge(cache, scorer(cache, obs), keep, merge_budget, window), state

    return Compressor(init=lambda cache: (), prefill=prefill, decode=lambda c, o, s: (c, s))
