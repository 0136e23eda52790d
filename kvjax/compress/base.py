"""The compressor contract (optax style): pure functions over one layer's cache.

    comp = kvjax.compress.identity()
    state = comp.init(layer_cache)                       # before the first prefill call
    layer_cache, state = comp.prefill(layer_cache, obs, state)
    layer_cache, state = comp.decode(layer_cache, obs, state)   # after every decode append

`prefill` runs once per layer after the prompt has been written to the cache (with chunked
prefill: after the last chunk); it may return a cache of a smaller static capacity. `decode`
runs after each generated token is appended and must keep shapes unchanged (it runs inside
`lax.while_loop`). Per-slot data a method keeps across steps (e.g. H2O's accumulated scores)
belongs in `LayerCache.slot_data`, so gathers and capacity changes move it along.

Compressor factories are memoised (`functools.cache`): equal arguments give the same object, so
jit caches keyed on the compressor are reused and only a budget change recompiles.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from kvjax.cache import LayerCache, gather

Array = jax.Array
State = Any


class Observation(NamedTuple):
    """What a layer exposes to compressors after its attention ran.

    queries: [B, Hq, Tq, D] post-RoPE queries of the tokens just processed (the whole prompt,
      the last chunk with chunked prefill, or the one new token at decode).
    raw_queries: [B, Hq, Tq, D] the same queries before RoPE (after QK-norm where the model has it).
    query_positions: int32[B, Tq] their positions; -1 marks padding.
    hidden: [B, Tq, E] the attention block's input (after the input RMSNorm).
    inv_freq: float32[D // 2] the layer's RoPE inverse frequencies.
    layer: static layer index; num_layers: static layer count.
    scale: static softmax scale; sliding_window: static window of the model or None.
    previous: during prefill (`kvjax.generate`), the state this compressor returned for the
      previous layer in the same pass (None for layer 0 and at decode); lets methods share a
      selection across layers (WindowKV, ChunkKV index reuse) without leaving the contract.
    """

    queries: Array
    raw_queries: Array
    query_positions: Array
    hidden: Array
    inv_freq: Array
    layer: int
    num_layers: int
    scale: float
    sliding_window: int | None = None
    previous: Any = None


class Compressor(NamedTuple):
    """init/prefill/decode as in the module docstring.

    decode_capacity: optional `(capacity after prefill, max_new_tokens) -> capacity` used by
    `generate` to size each layer for decoding (default: capacity + max_new_tokens). A method
    that keeps the cache within a budget while generating returns e.g. `budget + 1`.
    finalize: optional whole-cache step `KVCache -> KVCache`, run once by `prefill`/`generate`
    after every layer's `prefill` (for methods that act across layers, e.g. MiniCache).
    """

    init: Callable[[LayerCache], State]
    prefill: Callable[[LayerCache, Observation, State], tuple[LayerCache, State]]
    decode: Callable[[LayerCache, Observation, State], tuple[LayerCache, State]]
    decode_capacity: Callable[[int, int], int] | None = None
    finalize: Callable[[Any], Any] | None = None


def _keep(cache: LayerCache, obs: Observation, state: State) -> tuple[LayerCache, State]:
    return cache, state


@functools.cache
def identity() -> Compressor:
    """Keeps everything."""
    return Compressor(init=lambda cache: (), prefill=_keep, decode=_keep)


def chain(*compressors: Compressor) -> Compressor:
    """Applies compressors in order (e.g. evict, then quantize).

    Each member's state is initialised from the cache its predecessor returned.
    """
    if not compressors:
        raise ValueError("chain needs at least one compressor")
    for i, c in enumerate(compressors):
        if not isinstance(c, Compressor):
            raise TypeError(f"chain argument {i} is {type(c).__name__}, not a Compressor")
    return _chain(tuple(compressors))


@functools.cache
def _chain(compressors: tuple[Compressor, ...]) -> Compressor:
    def init(cache: LayerCache) -> State:
        return (compressors[0].init(cache),) + (None,) * (len(compressors) - 1)

    def prefill(cache: LayerCache, obs: Observation, state: State):
        states = []
        for i, (c, s) in enumerate(zip(compressors, state)):
            if i > 0:
                s = c.init(cache)
            prev = None if obs.previous is None else obs.previous[i]
            cache, s = c.prefill(cache, obs._replace(previous=prev), s)
            states.append(s)
        return cache, tuple(states)

    def decode(cache: LayerCache, obs: Observation, state: State):
        states = []
        for c, s in zip(compressors, state):
            cache, s = c.decode(cache, obs, s)
            states.append(s)
        return cache, tuple(states)

    def decode_capacity(capacity: int, max_new_tokens: int) -> int:
        sized = [c.decode_capacity for c in compressors if c.decode_capacity is not None]
        if not sized:
            return capacity + max_new_tokens
        return sized[-1](capacity, max_new_tokens)

    finals = [c.finalize for c in compressors if c.finalize is not None]

    def finalize(cache):
        for f in finals:
            cache = f(cache)
        return cache

    return Compressor(init=init, prefill=prefill, decode=decode, decode_capacity=decode_capacity,
                      finalize=finalize if finals else None)


def decode_capacity(compressor: Compressor, capacity: int, max_new_tokens: int) -> int:
    """Capacity a layer needs for decoding `max_new_tokens` after prefill."""
    if compressor.decode_capacity is None:
        return capacity + max_new_tokens
    return int(compressor.decode_capacity(capacity, max_new_tokens))


def valid_slots(cache: LayerCache) -> Array:
    """bool[B, Hkv, C]: slots holding a token."""
    slot = jnp.arange(cache.capacity)[None, None, :]
    return (slot < cache.lengths[:, :, None]) & (cache.positions >= 0)


def keep_topk(cache: LayerCache, scores: Array, budget: int) -> LayerCache:
    """Keeps the `budget` highest-scoring valid slots per head, in their original order.

    scores: [B, Hkv, C] (higher is kept; use +inf to force-keep, e.g. a recent window).
    The result has static capacity `budget`; heads with fewer valid slots keep all of them.
    Ties go to the lower slot index.
    """
    if not isinstance(budget, (int, np.integer)) or budget < 1:
        raise ValueError(f"budget must be a positive int, got {budget!r}")
    budget = int(min(budget, cache.capacity))
    valid = valid_slots(cache)
    masked = jnp.where(valid, scores.astype(jnp.float32), -jnp.inf)
    # A stable argsort rather than lax.top_k: same indices and tie order, and XLA partitions
    # it per head (top_k made it gather the scores of every head onto each device).
    idx = jnp.argsort(-masked, axis=2, stable=True)[:, :, :budget]
    # Invalid slots (score -inf) have larger indices than every valid one after sorting only if
    # they are also at the tail; sort by (invalid, index) so valid slots come first in order.
    picked_valid = jnp.take_along_axis(valid, idx, axis=2)
    order_key = jnp.where(picked_valid, idx, idx + cache.capacity)
    idx = jnp.take_along_axis(idx, jnp.argsort(order_key, axis=2), axis=2)
    new_len = jnp.minimum(jnp.sum(valid, axis=2), budget).astype(jnp.int32)
    return gather(cache, idx.astype(jnp.int32), new_len)
