"""H2O: heavy hitters (accumulated attention) plus a recent window.

Zhang et al. 2023, "H2O: Heavy-Hitter Oracle for Efficient Generative Inference of Large
Language Models", arXiv:2306.14048. Score of a key = attention it has received from every query
so far, summed. kvpress ObservedAttentionPress (the parity reference, eager attention) divides
the sum by the number of queries that could attend to the key (T - t at prefill) and averages
each KV head's query group:

    S[t] = mean_group( sum_q A[q, t] ) / (last position - t + 1)        (normalize=True)

Defaults are kvpress's (normalised, no recent window). The paper sums without normalising and
splits the budget half/half between heavy hitters and recent tokens (`PAPER`:
`h2o(budget=..., **PAPER)` after `from kvjax.compress.h2o import PAPER`).

Decode (`decode=True`, the paper's algorithm): the running sums live in
`LayerCache.slot_data["h2o"]` (float32[B, Hkv, C], moved with every gather); after each new token
its attention row is added and a head over budget evicts its minimum (capacity budget + 1).

The [T, C] attention of the prompt is computed QUERY_BLOCK queries at a time (`lax.scan`), so
memory stays [B, Hq, QUERY_BLOCK, C]. With chunked prefill the scores cover the last chunk's
queries only.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from kvjax.attention import attention_probs
from kvjax.cache import LayerCache
from kvjax.compress.base import Compressor, Observation, State, keep_topk, valid_slots
from kvjax.compress.scorer import (
    check_budget_args,
    evict_one,
    last_position,
    recent_mask,
    rerotate_contiguous,
    resolve_budget,
)

Array = jax.Array

PAPER = {"recent_fraction": 0.5, "normalize": False}
QUERY_BLOCK = 256
SLOT = "h2o"


def accumulated_attention(cache: LayerCache, obs: Observation) -> Array:
    """float32[B, Hkv, C]: attention each slot received from all observed queries, group-mean."""
    b, hq, t, d = obs.queries.shape
    blk = min(QUERY_BLOCK, t)
    n = -(-t // blk)
    pad = n * blk - t
    q = jnp.pad(obs.queries, ((0, 0), (0, 0), (0, pad), (0, 0)))
    q = q.reshape(b, hq, n, blk, d).transpose(2, 0, 1, 3, 4)
    pos = jnp.pad(obs.query_positions, ((0, 0), (0, pad)), constant_values=-1)
    pos = pos.reshape(b, n, blk).transpose(1, 0, 2)

    def body(acc, xs):
        probs = attention_probs(xs[0], xs[1], cache, obs.scale, obs.sliding_window)
        return acc + jnp.sum(probs, axis=2), None

    acc, _ = jax.lax.scan(body, jnp.zeros((b, hq, cache.capacity), jnp.float32), (q, pos))
    g = hq // cache.num_heads
    return acc.reshape(b, cache.num_heads, g, cache.capacity).mean(axis=2)


def _normalised(cache: LayerCache, sums: Array, obs: Observation) -> Array:
    count = last_position(obs)[:, None, None] - cache.positions + 1
    return sums / jnp.maximum(count, 1).astype(jnp.float32)


def h2o_scores(cache: LayerCache, obs: Observation, *, normalize: bool = True) -> Array:
    """float32[B, Hkv, C]: accumulated attention of the observed queries (module docstring)."""
    sums = accumulated_attention(cache, obs)
    return _normalised(cache, sums, obs) if normalize else sums


def h2o(
    compression_ratio: float | None = None,
    budget: int | None = None,
    *,
    recent_fraction: float = 0.0,
    normalize: bool = True,
    decode: bool = False,
    rerotate: bool = False,
) -> Compressor:
    """H2O eviction (kvpress ObservedAttentionPress by default).

    Args:
      compression_ratio / budget: exactly one (kvpress semantics, `kvjax.compress.scorer`).
        With `decode`, the budget may exceed the prompt.
      recent_fraction: share of the budget reserved for the most recent tokens, in [0, 1]
        (kvpress 0; paper 0.5).
      normalize: divide by the number of queries that saw each key (kvpress) or not (paper).
      decode: keep the running scores and evict at every generated token (the paper).
      rerotate: contiguous re-rotation of the kept keys after prefill.
    """
    compression_ratio, budget = check_budget_args(compression_ratio, budget)
    if not isinstance(recent_fraction, (int, float)) or not 0.0 <= recent_fraction <= 1.0:
        raise ValueError(f"recent_fraction must be in [0, 1], got {recent_fraction!r}")
    return _h2o(compression_ratio, budget, float(recent_fraction), bool(normalize), bool(decode),
                bool(rerotate))


@functools.cache
def _h2o(compression_ratio, budget, recent_fraction, normalize, decode, rerotate) -> Compressor:
    def scores_of(cache: LayerCache, sums: Array, obs: Observation, n: int) -> Array:
        s = _normalised(cache, sums, obs) if normalize else sums
        recent = recent_mask(cache, obs, int(n * recent_fraction))
        return jnp.where(recent, jnp.inf, s)

    def init(cache: LayerCache) -> State:
        return ()

    def prefill(cache: LayerCache, obs: Observation, state: State):
        n = resolve_budget(cache.capacity, compression_ratio, budget, allow_larger=decode)
        if n >= cache.capacity and not decode:
            return cache, state
        sums = accumulated_attention(cache, obs)
        if decode:
            cache = cache.replace(slot_data={**cache.slot_data, SLOT: sums})
        if n < cache.capacity:
            cache = keep_topk(cache, scores_of(cache, sums, obs, n), n)
            if rerotate:
                cache = rerotate_contiguous(cache, last_position(obs), obs.inv_freq)
        return cache, state

    def decode_fn(cache: LayerCache, obs: Observation, state: State):
        n = budget if budget is not None else cache.capacity - 1
        probs = attention_probs(obs.queries, obs.query_positions, cache, obs.scale,
                                obs.sliding_window)  # [B, Hq, 1, C]
        g = probs.shape[1] // cache.num_heads
        row = probs[:, :, 0].reshape(probs.shape[0], cache.num_heads, g, -1).mean(axis=2)
        sums = jnp.where(valid_slots(cache), cache.slot_data[SLOT] + row, 0.0)
        cache = cache.replace(slot_data={**cache.slot_data, SLOT: sums})
        return evict_one(cache, scores_of(cache, sums, obs, n), n), state

    if not decode:
        return Compressor(init=init, prefill=prefill, decode=lambda c, o, s: (c, s))

    def capacity(c: int, max_new_tokens: int) -> int:
        return min(c + max_new_tokens, max(c, budget or 0) + 1)

    return Compressor(init=init, prefill=prefill, decode=decode_fn, decode_capacity=capacity)
