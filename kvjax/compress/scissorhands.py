"""Scissorhands: evict the tokens that were most often unimportant over a history window.

Liu et al., "Scissorhands: Exploiting the Persistence of Importance Hypothesis for LLM KV Cache
Compression at Test Time" (NeurIPS 2023, arXiv:2305.17118). Per KV head, with a static memory
budget B (the capacity), a history window of w attention steps, a recent window r and a drop
amount m:

  unimportant(t, step) = token t was visible to that step's query and received less than the
                         average attention, p < 1 / (number of tokens the query sees)
  count[t]             = number of unimportant steps among the last w (steps where t was not
                         yet present do not count)
  when the head holds B tokens: keep the B - m with the lowest counts, the r most recent
  tokens always kept (positions > p_now - r); ties keep the older slot.

With GQA a KV head's attention is the mean over its query heads. Prefill seeds the history
with the last min(w, T) prompt queries and compresses a prompt of >= B tokens to B - m; each
decode step (the contract's `decode`, after the append) shifts in the new query's flags and
compresses heads that became full, so the cache never exceeds B slots and every step has room.

Storage: the last w flags of every slot are bits in `LayerCache.slot_data["scissorhands_history"]`
(uint32[B, Hkv, C, ceil(w / 32)], bit 0 = newest step), so counts over a sliding window are
exact and move with the slots when they are compacted. Defaults (kvjax; the paper tunes them
per model): w = 32, r = 8, m = 1.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from kvjax.attention import attention_mask, attention_probs
from kvjax.cache import LayerCache
from kvjax.compress.base import Compressor, Observation, State, valid_slots
from kvjax.compress.scorer import check_budget_args, check_int, group_mean, resolve_budget
from kvjax.headwise import dense_from_mask

Array = jax.Array

HISTORY = "scissorhands_history"


def unimportant_flags(cache: LayerCache, queries: Array, q_positions: Array, scale: float,
                      sliding_window: int | None = None) -> Array:
    """bool[B, Hkv, Tq, C]: slots a query saw and gave below-average attention (group mean)."""
    probs = attention_probs(queries, q_positions, cache, scale, sliding_window)
    p = group_mean(probs, cache.num_heads)
    seen = attention_mask(q_positions, cache, sliding_window)  # [B, H, Tq, C]
    n = jnp.sum(seen, axis=-1, keepdims=True)
    return seen & (p * n < 1.0)


def _words(history_window: int) -> int:
    return -(-history_window // 32)


def _window_bits(history_window: int) -> Array:
    """uint32[words]: the mask of the w valid history bits."""
    bits = [min(max(history_window - 32 * k, 0), 32) for k in range(_words(history_window))]
    return jnp.asarray([(1 << n) - 1 for n in bits], jnp.uint32)


def seed_history(flags: Array, history_window: int) -> Array:
    """uint32[B, H, C, words] history from flags bool[B, H, T, C] (oldest step first)."""
    w = history_window
    nw = _words(w)
    recent = flags[:, :, ::-1][:, :, :w]  # newest first
    pad = nw * 32 - recent.shape[2]
    recent = jnp.pad(recent, ((0, 0), (0, 0), (0, pad), (0, 0)))
    b, h, _, c = recent.shape
    bits = recent.reshape(b, h, nw, 32, c).astype(jnp.uint32)
    shifts = jnp.arange(32, dtype=jnp.uint32)[None, None, None, :, None]
    words = jnp.sum(bits << shifts, axis=3, dtype=jnp.uint32)  # distinct bits: sum == or
    return jnp.moveaxis(words, 2, 3) & _window_bits(w)


def push_history(history: Array, flag: Array, history_window: int) -> Array:
    """Shifts the newest step's flags (bool[B, H, C]) into the history (uint32[..., words])."""
    carry = history >> 31
    shifted = history << 1
    shifted = shifted.at[..., 1:].set(shifted[..., 1:] | carry[..., :-1])
    shifted = shifted.at[..., 0].set(shifted[..., 0] | flag.astype(jnp.uint32))
    return shifted & _window_bits(history_window)


def unimportance_counts(history: Array) -> Array:
    """int32[B, H, C]: unimportant steps recorded in the history window."""
    return jnp.sum(jax.lax.population_count(history).astype(jnp.int32), axis=-1)


def scissorhands_keep_mask(
    cache: LayerCache, counts: Array, now: Array, keep: int, recent_window: int
) -> Array:
    """bool[B, H, C]: the `keep` valid slots with the lowest counts, recent ones forced."""
    valid = valid_slots(cache)
    recent = cache.positions > (now[:, None, None] - recent_window)
    score = jnp.where(recent, jnp.inf, -counts.astype(jnp.float32))
    score = jnp.where(valid, score, -jnp.inf)
    _, idx = jax.lax.top_k(score, min(keep, cache.capacity))
    b, h = counts.shape[:2]
    chosen = jnp.zeros(valid.shape, bool).at[
        jnp.arange(b)[:, None, None], jnp.arange(h)[None, :, None], idx
    ].set(True)
    return chosen & valid


def scissorhands(
    compression_ratio: float | None = None,
    *,
    budget: int | None = None,
    history_window: int = 32,
    recent_window: int = 8,
    drop_amount: int = 1,
) -> Compressor:
    """Scissorhands with a fixed per-head memory budget (see the module docstring).

    Args:
      compression_ratio: fraction of the prompt removed (budget = kvpress n_kept); or
      budget: tokens each head may hold (the static capacity, also during decoding).
      history_window: attention steps over which unimportance is counted (w >= 1).
      recent_window: most recent tokens that are never evicted (r >= 0).
      drop_amount: tokens dropped per head when it is full (m >= 1).
    """
    compression_ratio, budget = check_budget_args(compression_ratio, budget)
    history_window = check_int("history_window", history_window, 1)
    recent_window = check_int("recent_window", recent_window, 0)
    drop_amount = check_int("drop_amount", drop_amount, 1)
    if budget is not None and budget < recent_window + drop_amount:
        raise ValueError(
            f"budget ({budget}) must be >= recent_window + drop_amount "
            f"({recent_window} + {drop_amount})"
        )
    return _scissorhands(compression_ratio, budget, history_window, recent_window, drop_amount)


@functools.cache
def _scissorhands(
    compression_ratio: float | None,
    budget: int | None,
    history_window: int,
    recent_window: int,
    drop_amount: int,
) -> Compressor:
    def init(cache: Any) -> State:
        return ()

    def compress_full(cache: LayerCache, now: Array, cap: int) -> LayerCache:
        counts = unimportance_counts(cache.slot_data[HISTORY])
        chosen = scissorhands_keep_mask(cache, counts, now, cap - drop_amount, recent_window)
        full = (cache.lengths >= cap)[:, :, None]
        return dense_from_mask(cache, jnp.where(full, chosen, valid_slots(cache)), cap)

    def prefill(cache: LayerCache, obs: Observation, state: State):
        if not isinstance(cache, LayerCache):
            raise TypeError(f"scissorhands needs a dense LayerCache, got {type(cache).__name__}")
        cap = resolve_budget(cache.capacity, compression_ratio, budget, allow_larger=True)
        if budget is None and cap < recent_window + drop_amount:
            raise ValueError(
                f"scissorhands: compression_ratio={compression_ratio} leaves {cap} tokens per "
                f"head, fewer than recent_window + drop_amount ({recent_window} + {drop_amount})"
            )
        w = min(history_window, obs.queries.shape[2])
        q = obs.queries[:, :, -w:]
        qpos = obs.query_positions[:, -w:]
        flags = unimportant_flags(cache, q, qpos, obs.scale, obs.sliding_window)
        hist = seed_history(flags, history_window)
        cache = cache.replace(slot_data={**cache.slot_data, HISTORY: hist})
        if cache.capacity < cap:
            cache = dense_from_mask(cache, valid_slots(cache), cap)
        now = jnp.max(obs.query_positions, axis=1)
        return compress_full(cache, now, cap), state

    def decode(cache: LayerCache, obs: Observation, state: State):
        if HISTORY not in cache.slot_data:
            raise ValueError("scissorhands.decode needs a cache prefilled by scissorhands")
        flags = unimportant_flags(
            cache, obs.queries, obs.query_positions, obs.scale, obs.sliding_window
        )[:, :, -1]
        hist = push_history(cache.slot_data[HISTORY], flags, history_window)
        cache = cache.replace(slot_data={**cache.slot_data, HISTORY: hist})
        now = jnp.max(obs.query_positions, axis=1)
        return compress_full(cache, now, cache.capacity), state

    def decode_capacity(capacity: int, max_new_tokens: int) -> int:
        return capacity

    return Compressor(init=init, prefill=prefill, decode=decode, decode_capacity=decode_capacity)
