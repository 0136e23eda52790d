"""Shared plumbing for learned eviction: per-slot scores and memory-bounded chunked prefill.

Learned scorers (retention gates, Locret heads) score each token once, when it is written, and
keep the score in `LayerCache.slot_data` so later evictions (the next chunk, the next decode
step) reuse it; gathers move it with the keys.

`prefill(model, tokens, compressor, budget=M, chunk_size=C)` is the memory-bounded prefill these
methods are designed for (Locret's chunked prefill; TRIM-KV's bounded cache): the cache never
holds more than M + C slots per head; after every chunk the compressor evicts back to M. The
compressor sees each chunk's observation (its queries and hidden states), so every token is
scored from its own layer inputs. `generate` adds a greedy decode loop on top.

`kvjax.generate(model, tokens, n, compressor=...)` works with the same compressors for a
one-shot eviction after a full (unchunked) prefill; with its `chunk_size` only the last chunk is
observed, so tokens of earlier chunks would keep neutral scores: use `prefill` here instead.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from kvjax import cache as kvcache
from kvjax.compress.base import Compressor, Observation, decode_capacity
from kvjax.generate import decode_step
from kvjax.models.llama import Llama

Array = jax.Array


def new_token_slots(layer: kvcache.LayerCache, query_positions: Array) -> tuple[Array, Array]:
    """Cache slots of the tokens an observation just wrote.

    The model writes a step's valid tokens, in order, at each head's length, so after the write
    the k-th valid query (query_positions >= 0, any padding layout) sits at slot
    `lengths - num_valid + k`. Returns int32[B, Hkv, T] slots (`capacity` for padding, which
    scatters with mode="drop" ignore) and bool[B, T] validity.
    """
    valid = query_positions >= 0
    n_new = jnp.sum(valid, axis=1).astype(jnp.int32)  # [B]
    rank = jnp.cumsum(valid, axis=1).astype(jnp.int32) - 1  # [B, T]
    slot = layer.lengths[:, :, None] - n_new[:, None, None] + rank[:, None, :]
    slot = jnp.where(valid[:, None, :], slot, layer.capacity)
    return slot.astype(jnp.int32), valid


def set_slot_data(layer: kvcache.LayerCache, name: str, values: Array, slot: Array,
                  fill: float = 0.0) -> kvcache.LayerCache:
    """Writes per-token values [B, Hkv, T] into `slot_data[name]` at slots [B, Hkv, T].

    A missing entry is created as float32[B, Hkv, C] filled with `fill`.
    """
    b, h, c = layer.positions.shape
    data = layer.slot_data.get(name)
    if data is None:
        data = jnp.full((b, h, c), fill, jnp.float32)
    bi = jnp.arange(b)[:, None, None]
    hi = jnp.arange(h)[None, :, None]
    data = data.at[bi, hi, slot].set(values.astype(data.dtype), mode="drop")
    return layer.replace(slot_data={**layer.slot_data, name: data})


def newest_position(query_positions: Array) -> Array:
    """int32[B]: the position of each row's newest token (the current time)."""
    return jnp.max(query_positions, axis=1).astype(jnp.int32)


def _check_tokens(model: Llama, tokens: Any) -> None:
    shape = np.shape(tokens)
    if len(shape) != 2 or shape[0] < 1 or shape[1] < 1:
        raise ValueError(f"tokens must have shape [batch, time] with both >= 1, got {shape}")
    t = np.asarray(tokens)
    if not np.issubdtype(t.dtype, np.integer):
        raise TypeError(f"tokens must be an integer array, got dtype {t.dtype}")
    if t.min() < 0 or t.max() >= model.config.vocab_size:
        raise ValueError(
            f"token ids must be in [0, {model.config.vocab_size}), got [{t.min()}, {t.max()}]"
        )


def _check_budget(budget: Any, chunk_size: Any) -> None:
    for name, v in (("budget", budget), ("chunk_size", chunk_size)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")


def _run_prefill(model, tokens, compressor, budget, chunk_size, length):
    b = tokens.shape[0]
    cs = chunk_size
    n = tokens.shape[1] // cs
    capacity = budget + cs

    def hook(layer: int, lc: kvcache.LayerCache, obs: Observation):
        lc, _ = compressor.prefill(lc, obs, compressor.init(lc))
        if lc.capacity > budget:
            raise ValueError(
                f"the compressor kept {lc.capacity} slots, more than budget={budget}; pass the "
                "compressor's own budget"
            )
        return kvcache.grow(lc, capacity)

    def run_chunk(cache, start):
        toks = jax.lax.dynamic_slice_in_dim(tokens, start, cs, axis=1)
        pos = jnp.broadcast_to(start + jnp.arange(cs, dtype=jnp.int32), (b, cs))
        num_valid = jnp.full((b,), jnp.clip(length - start, 0, cs), jnp.int32)
        h, cache = model(toks, pos, cache, num_valid, hook)
        last = jnp.clip(length - 1 - start, 0, cs - 1)
        return cache, model.logits(h[:, last])

    cache, logits = run_chunk(model.init_cache(b, capacity), jnp.int32(0))
    if n > 1:  # the first chunk fixed the cache structure (slot_data entries) for the scan

        def body(carry, start):
            cache, _ = carry
            return run_chunk(cache, start), None

        starts = jnp.arange(1, n, dtype=jnp.int32) * cs
        (cache, logits), _ = jax.lax.scan(body, (cache, logits), starts)
    return cache.replace(next_position=jnp.full((b,), length, jnp.int32)), logits


@functools.partial(jax.jit, static_argnames=("compressor", "budget", "chunk_size", "length"))
def _prefill_jit(model, tokens, compressor, budget, chunk_size, length):
    return _run_prefill(model, tokens, compressor, budget, chunk_size, length)


def _pad(tokens: Any, chunk_size: int) -> tuple[Array, int, int]:
    t = np.shape(tokens)[1]
    cs = min(chunk_size, t)
    padded = -(-t // cs) * cs
    return jnp.pad(jnp.asarray(tokens, jnp.int32), ((0, 0), (0, padded - t))), cs, t


def prefill(model: Llama, tokens: Any, compressor: Compressor, *, budget: int,
            chunk_size: int) -> tuple[kvcache.KVCache, Array]:
    """Memory-bounded chunked prefill: returns the cache (<= budget tokens per head, capacity
    budget + chunk) and float32[B, V] logits of the last prompt token.

    tokens: int[B, T] prompts of equal length (no padding). compressor: an eviction compressor
    whose prefill keeps at most `budget` slots (e.g. `locret.locret(heads, budget=budget)`).
    """
    if not isinstance(compressor, Compressor):
        raise TypeError(f"compressor must be a kvjax Compressor, got {type(compressor).__name__}")
    _check_tokens(model, tokens)
    _check_budget(budget, chunk_size)
    padded, cs, t = _pad(tokens, chunk_size)
    return _prefill_jit(model, padded, compressor, int(budget), cs, t)


@functools.partial(
    jax.jit,
    static_argnames=("compressor", "budget", "chunk_size", "length", "max_new_tokens", "eos_id",
                     "pad_id"),
)
def _generate_jit(model, tokens, compressor, budget, chunk_size, length, max_new_tokens, eos_id,
                  pad_id):
    cache, logits = _run_prefill(model, tokens, compressor, budget, chunk_size, length)
    b = tokens.shape[0]
    keep = min(budget, length)
    idx = jnp.broadcast_to(jnp.arange(keep, dtype=jnp.int32), (b, cache.layers[0].num_heads, keep))
    layers = []
    for lc in cache.layers:  # drop the chunk's headroom, then size for decoding
        lc = kvcache.gather(lc, idx, lc.lengths)
        layers.append(kvcache.grow(lc, decode_capacity(compressor, keep, max_new_tokens)))
    cache = cache.replace(layers=tuple(layers))
    tok = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    out = jnp.full((b, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(tok)
    done = tok == eos_id

    def body(i, carry):
        tok, cache, states, out, done = carry
        logits, cache, states = decode_step(model, cache, tok, compressor, states)
        nxt = jnp.where(done, pad_id, jnp.argmax(logits, axis=-1).astype(jnp.int32))
        out = jax.lax.dynamic_update_slice_in_dim(out, nxt[:, None], i, axis=1)
        return nxt, cache, states, out, done | (nxt == eos_id)

    states = tuple(compressor.init(lc) for lc in cache.layers)
    carry = jax.lax.fori_loop(1, max_new_tokens, body, (tok, cache, states, out, done))
    return jnp.concatenate([tokens[:, :length], carry[3]], axis=1), carry[1]


def generate(model: Llama, tokens: Any, max_new_tokens: int, compressor: Compressor, *,
             budget: int, chunk_size: int, eos_id: int | None = None,
             pad_id: int | None = None, return_cache: bool = False):
    """Greedy generation after a memory-bounded chunked `prefill`: int32[B, T + max_new_tokens].

    The compressor's `decode` runs after every generated token (a retention-gate compressor keeps
    the cache at its budget; Locret's lets it grow, as in the paper). Rows stop after `eos_id`
    (default: the model config's) and are padded with `pad_id` (default eos, else 0).
    """
    if not isinstance(compressor, Compressor):
        raise TypeError(f"compressor must be a kvjax Compressor, got {type(compressor).__name__}")
    _check_tokens(model, tokens)
    _check_budget(budget, chunk_size)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) \
            or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    if eos_id is None:
        eos_id = model.config.eos_token_id
    eos_id = -1 if eos_id is None else int(eos_id)
    pad_id = (eos_id if eos_id >= 0 else 0) if pad_id is None else int(pad_id)
    padded, cs, t = _pad(tokens, chunk_size)
    out, cache = _generate_jit(model, padded, compressor, int(budget), cs, t, int(max_new_tokens),
                               eos_id, pad_id)
    return (out, cache) if return_cache else out
