"""Decoding-time compression: keep the cache within a budget while generating, with any scorer.

As kvpress DecodingPress: every `interval` generated tokens, each head keeps its `budget`
top-scoring tokens (prompt and generated alike) by `scorer(cache, obs)`, where `obs` holds the
last min(interval, buffer_size) generated tokens' queries (a rolling buffer in the compressor
state; kvpress buffers hidden states). No compression at prefill: combine with a prefill method
via `chain(snapkv(...), decoding(...))` (kvpress PrefillDecodingPress).

Static shapes: the layer is sized max(prompt, budget) + interval (`decode_capacity`) and a
compression compacts the kept slots to the front in slot (= position) order without changing
the capacity. `interval=1` compresses at every step.

Differences from kvpress, which rebuilds the buffered queries from hidden states with the
*current* token's RoPE angle and treats the last cache slots as the newest tokens after its
top-k reorders them: here every buffered query keeps its own position and tokens are identified
by position, so SnapKV-like window scorers see the true last tokens. Scorers that use only the
keys (Knorm) or the newest query (TOVA) agree exactly with kvpress.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from kvjax.cache import LayerCache
from kvjax.compress.base import Compressor, Observation, State
from kvjax.compress.scorer import Scorer, check_int, compact, resolve_scorer


def _push(buf: jax.Array, new: jax.Array, axis: int) -> jax.Array:
    """Drops the oldest entry along `axis` and appends `new` (size 1 along `axis`)."""
    n = buf.shape[axis]
    kept = jax.lax.slice_in_dim(buf, 1, n, axis=axis)
    return jnp.concatenate([kept, new.astype(buf.dtype)], axis=axis)


def decoding(
    scorer: Scorer | str,
    budget: int,
    *,
    interval: int = 512,
    buffer_size: int = 256,
) -> Compressor:
    """A compressor that keeps every head within `budget` tokens during generation.

    Args:
      scorer: `scorer(cache, obs) -> float32[B, Hkv, C]`, e.g. `knorm_scores`, `tova_scores`,
        `functools.partial(snapkv_scores, window=16)` (hashable, for memoisation), or a name
        ("knorm", "tova", ...: that method's scorer with its defaults).
      budget: tokens kept per head after each compression, >= 1 (kvpress `target_size`, 2048).
      interval: generated tokens between compressions, >= 1 (kvpress 512).
      buffer_size: generated queries the scorer sees, >= 0 (kvpress 256; 0 = the newest only).
    """
    scorer = resolve_scorer(scorer)
    budget = check_int("budget", budget, 1)
    interval = check_int("interval", interval, 1)
    buffer_size = check_int("buffer_size", buffer_size, 0)
    return _decoding(scorer, budget, interval, max(1, min(interval, buffer_size)))


@functools.cache
def _decoding(scorer, budget: int, interval: int, nb: int) -> Compressor:
    def prefill(cache: LayerCache, obs: Observation, state: State):
        b, hq, _, d = obs.queries.shape
        state = {
            "step": jnp.zeros((), jnp.int32),
            "queries": jnp.zeros((b, hq, nb, d), obs.queries.dtype),
            "raw_queries": jnp.zeros((b, hq, nb, d), obs.raw_queries.dtype),
            "positions": jnp.full((b, nb), -1, jnp.int32),
            "hidden": jnp.zeros((b, nb, obs.hidden.shape[-1]), obs.hidden.dtype),
        }
        return cache, state

    def decode(cache: LayerCache, obs: Observation, state: State):
        state = {
            "step": state["step"] + 1,
            "queries": _push(state["queries"], obs.queries[:, :, -1:], 2),
            "raw_queries": _push(state["raw_queries"], obs.raw_queries[:, :, -1:], 2),
            "positions": _push(state["positions"], obs.query_positions[:, -1:], 1),
            "hidden": _push(state["hidden"], obs.hidden[:, -1:], 1),
        }
        buffered = obs._replace(
            queries=state["queries"],
            raw_queries=state["raw_queries"],
            query_positions=state["positions"],
            hidden=state["hidden"],
        )
        due = state["step"] >= interval
        cache = jax.lax.cond(
            due, lambda c: compact(c, scorer(c, buffered), budget), lambda c: c, cache
        )
        return cache, {**state, "step": jnp.where(due, 0, state["step"])}

    def capacity(c: int, max_new_tokens: int) -> int:
        return min(c + max_new_tokens, max(c, budget) + interval)

    return Compressor(init=lambda cache: {}, prefill=prefill, decode=decode,
                      decode_capacity=capacity)
