"""Prefill and generation with optional compression, jit-compiled end to end.

Batches: `tokens` is int[B, T]. Rows of different lengths are left-padded (real tokens at the
end of the row, as transformers does) and `lengths` int[B] gives each row's real token count.
Inside the cache every row starts at slot 0 and its first real token has position 0.

Positions: a generated token gets position = number of tokens the row has seen so far
(`cache.next_position`), never the compressed cache length.

Compression: `compressor.prefill` runs once per layer after the prompt is in the cache; with
`chunk_size` the prompt is prefilled chunk by chunk (a `lax.scan`) and the compressor sees the
last chunk's queries. The observation is right-aligned per row (the row's last real token is
the last query; padding has position -1), so "the last w queries" is `obs.queries[..., -w:, :]`.
During generation `compressor.decode` runs after every appended token.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from kvjax import cache as kvcache
from kvjax import sharding as kvsharding
from kvjax.compress.base import Compressor, Observation, decode_capacity, identity
from kvjax.models.llama import Llama

Array = jax.Array


# --- input checks -------------------------------------------------------------------------


def _check_tokens(model: Llama, tokens: Any) -> None:
    shape = np.shape(tokens)
    dtype = tokens.dtype if hasattr(tokens, "dtype") else np.asarray(tokens).dtype
    if len(shape) != 2:
        raise ValueError(f"tokens must have rank 2 [batch, time], got shape {shape}")
    if not jnp.issubdtype(dtype, jnp.integer):
        raise TypeError(f"tokens must be an integer array, got dtype {dtype}")
    if shape[0] < 1 or shape[1] < 1:
        raise ValueError(f"tokens must be non-empty, got shape {shape}")
    if not isinstance(tokens, jax.core.Tracer):
        t = np.asarray(tokens)
        if t.min() < 0 or t.max() >= model.config.vocab_size:
            raise ValueError(
                f"token ids must be in [0, {model.config.vocab_size}), got [{t.min()}, {t.max()}]"
            )


def _check_lengths(lengths: Any, batch: int, time: int) -> Array:
    if lengths is None:
        return jnp.full((batch,), time, jnp.int32)
    if np.shape(lengths) != (batch,):
        raise ValueError(f"lengths must have shape ({batch},), got {np.shape(lengths)}")
    if not isinstance(lengths, jax.core.Tracer):
        arr = np.asarray(lengths)
        if arr.min() < 1 or arr.max() > time:
            raise ValueError(f"lengths must be in [1, {time}], got [{arr.min()}, {arr.max()}]")
    return jnp.asarray(lengths, jnp.int32)


def _check_compressor(compressor: Any) -> Compressor:
    if compressor is None:
        return identity()
    if not isinstance(compressor, Compressor):
        raise TypeError(f"compressor must be a kvjax Compressor, got {type(compressor).__name__}")
    return compressor


def _check_positive(name: str, value: Any, allow_none: bool = True) -> None:
    if value is None and allow_none:
        return
    if not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def _place(model: Llama, tokens: Any, lengths: Array, mesh: Any):
    """int32 tokens; with a mesh: checks it, shards params (no-op if done) and the batch."""
    tokens = jnp.asarray(tokens, jnp.int32)
    if mesh is None:
        return model, tokens, lengths
    kvsharding.check_mesh(mesh, model.config, tokens.shape[0])
    model = kvsharding.shard_params(model, mesh)
    tokens, lengths = kvsharding.shard_batch((tokens, lengths), mesh)
    return model, tokens, lengths


# --- helpers -----------------------------------------------------------------------------


def _left_align(tokens: Array, lengths: Array) -> Array:
    """Moves each row's real tokens (right-aligned) to the start of the row."""
    t = tokens.shape[1]
    shift = t - lengths
    idx = (jnp.arange(t)[None, :] + shift[:, None]) % t
    return jnp.take_along_axis(tokens, idx, axis=1)


def _right_align(x: Array, num_valid: Array, axis: int) -> Array:
    """Rolls each row so its `num_valid` leading entries end at the last index of `axis`."""
    t = x.shape[axis]
    idx = (jnp.arange(t)[None, :] - (t - num_valid)[:, None]) % t  # [B, T]
    shape = [1] * x.ndim
    shape[0], shape[axis] = x.shape[0], t
    return jnp.take_along_axis(x, idx.reshape(shape), axis=axis)


def _right_aligned_obs(obs: Observation, num_valid: Array) -> Observation:
    pos = _right_align(obs.query_positions, num_valid, 1)
    t = pos.shape[1]
    pos = jnp.where(jnp.arange(t)[None, :] >= (t - num_valid)[:, None], pos, -1)
    return obs._replace(
        queries=_right_align(obs.queries, num_valid, 2),
        raw_queries=_right_align(obs.raw_queries, num_valid, 2),
        hidden=_right_align(obs.hidden, num_valid, 1),
        query_positions=pos,
    )


def _prefill_hook(compressor: Compressor, num_valid: Array, states: list, mesh=None):
    def hook(layer: int, layer_cache: kvcache.LayerCache, obs: Observation):
        state = compressor.init(layer_cache)
        obs = _right_aligned_obs(obs, num_valid)._replace(
            previous=states[layer - 1] if layer > 0 else None
        )
        layer_cache, state = compressor.prefill(layer_cache, obs, state)
        states[layer] = state
        return kvsharding.constrain_cache(layer_cache, mesh)

    return hook


def _run_prefill(
    model: Llama,
    tokens: Array,
    lengths: Array,
    compressor: Compressor,
    chunk_size: int | None,
    capacity: int,
    return_all_logits: bool,
    mesh=None,
):
    """Left-aligned tokens -> (cache, compressor states, last logits [B, V], all logits)."""
    b, t = tokens.shape
    cache = kvsharding.constrain_cache(model.init_cache(b, capacity), mesh)
    states: list = [None] * model.config.num_hidden_layers
    cs = t if chunk_size is None else min(chunk_size, t)
    n = -(-t // cs)
    tokens = jnp.pad(tokens, ((0, 0), (0, n * cs - t)))

    def run_chunk(cache, start, hook):
        toks = jax.lax.dynamic_slice_in_dim(tokens, start, cs, axis=1)
        pos = jnp.broadcast_to(start + jnp.arange(cs, dtype=jnp.int32), (b, cs))
        num_valid = jnp.clip(lengths - start, 0, cs).astype(jnp.int32)
        h, cache = model(toks, pos, cache, num_valid, hook)
        last = lengths - 1 - start
        inside = (last >= 0) & (last < cs)
        h_last = jnp.take_along_axis(h, jnp.clip(last, 0, cs - 1)[:, None, None], axis=1)[:, 0]
        logits = model.logits(h_last)
        all_logits = model.logits(h) if return_all_logits else None
        return cache, logits, inside, all_logits

    last_logits = jnp.zeros((b, model.config.vocab_size), jnp.float32)
    chunk_logits = []
    if n > 1:

        def body(carry, start):
            cache, last_logits = carry
            cache, logits, inside, all_logits = run_chunk(cache, start, None)
            cache = kvsharding.constrain_cache(cache, mesh)
            last_logits = jnp.where(inside[:, None], logits, last_logits)
            return (cache, last_logits), all_logits

        starts = jnp.arange(n - 1, dtype=jnp.int32) * cs
        (cache, last_logits), scanned = jax.lax.scan(body, (cache, last_logits), starts)
        if return_all_logits:
            chunk_logits.append(jnp.moveaxis(scanned, 0, 1).reshape(b, (n - 1) * cs, -1))
    start = (n - 1) * cs
    num_valid_last = jnp.clip(lengths - start, 0, cs).astype(jnp.int32)
    hook = _prefill_hook(compressor, num_valid_last, states, mesh)
    cache, logits, inside, all_logits = run_chunk(cache, jnp.int32(start), hook)
    last_logits = jnp.where(inside[:, None], logits, last_logits)
    if return_all_logits:
        chunk_logits.append(all_logits)
    cache = cache.replace(next_position=lengths.astype(jnp.int32))
    if compressor.finalize is not None:  # whole-cache step (e.g. MiniCache's layer merging)
        cache = compressor.finalize(cache)
    cache = kvsharding.constrain_cache(cache, mesh)
    full = jnp.concatenate(chunk_logits, axis=1)[:, :t] if return_all_logits else None
    return cache, tuple(states), last_logits, full


@functools.partial(
    jax.jit, static_argnames=("compressor", "chunk_size", "capacity", "return_all_logits", "mesh")
)
def _prefill_jit(model, tokens, lengths, compressor, chunk_size, capacity, return_all_logits,
                 mesh=None):
    aligned = _left_align(tokens, lengths)
    cache, states, last, full = _run_prefill(
        model, aligned, lengths, compressor, chunk_size, capacity, return_all_logits, mesh
    )
    if full is not None:  # back to the caller's (left-padded) layout
        full = _right_align(full, lengths, 1)
    return cache, states, last, full


def prefill(
    model: Llama,
    tokens: Any,
    compressor: Compressor | None = None,
    chunk_size: int | None = None,
    *,
    lengths: Any = None,
    capacity: int | None = None,
    return_all_logits: bool = False,
    return_state: bool = False,
    mesh: Any = None,
):
    """Runs the prompt through the model and returns `(cache, logits)`.

    Args:
      model: a kvjax Llama.
      tokens: int[B, T] prompt, left-padded when rows differ in length.
      compressor: applied once per layer after the prompt is cached (default: keep all).
      chunk_size: prefill in chunks of this many tokens (bounded activation memory).
      lengths: int[B] real tokens per row (default T).
      capacity: cache slots per head before compression (default T; must be >= T).
      return_all_logits: return float32[B, T, V] logits for every position (in the input's
        layout) instead of float32[B, V] for each row's last token.
      return_state: also return the compressor's per-layer states (for `decode_step`).
      mesh: a `kvjax.sharding.make_mesh` mesh: rows over "data", heads over "model"; the cache
        comes back sharded the same way (see `kvjax.sharding`).
    """
    _check_tokens(model, tokens)
    b, t = np.shape(tokens)
    lengths = _check_lengths(lengths, b, t)
    compressor = _check_compressor(compressor)
    _check_positive("chunk_size", chunk_size)
    capacity = t if capacity is None else capacity
    _check_positive("capacity", capacity, allow_none=False)
    if capacity < t:
        raise ValueError(f"capacity ({capacity}) is smaller than the prompt length ({t})")
    model, tokens, lengths = _place(model, tokens, lengths, mesh)
    cache, states, last, full = _prefill_jit(
        model, tokens, lengths, compressor, chunk_size, capacity, return_all_logits, mesh
    )
    logits = full if return_all_logits else last
    return (cache, logits, states) if return_state else (cache, logits)


def decode_step(
    model: Llama,
    cache: kvcache.KVCache,
    token: Array,
    compressor: Compressor | None = None,
    states: tuple = (),
) -> tuple[Array, kvcache.KVCache, tuple]:
    """Appends one token per row (int32[B]) at `cache.next_position`.

    Returns float32[B, V] next-token logits, the cache, and the compressor states.
    Every head of every layer needs a free slot (see `kvjax.cache.grow`).
    """
    compressor = _check_compressor(compressor)
    if not states:
        states = (None,) * model.config.num_hidden_layers
    new_states = list(states)

    def hook(layer: int, layer_cache: kvcache.LayerCache, obs: Observation):
        layer_cache, new_states[layer] = compressor.decode(layer_cache, obs, states[layer])
        return layer_cache

    pos = cache.next_position
    h, cache = model(token[:, None].astype(jnp.int32), pos[:, None], cache, None, hook)
    cache = cache.replace(next_position=pos + 1)
    return model.logits(h[:, 0]), cache, tuple(new_states)


def sample(logits: Array, rng: Array | None, temperature: float, top_p: float) -> Array:
    """int32[B] next tokens: greedy when temperature == 0, else temperature + nucleus sampling."""
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    if top_p < 1.0:
        order = jnp.argsort(-logits, axis=-1)
        sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        cum = jnp.cumsum(probs, axis=-1)
        drop_sorted = (cum - probs) >= top_p  # keep the smallest prefix reaching top_p
        drop = jnp.zeros_like(drop_sorted).at[
            jnp.arange(logits.shape[0])[:, None], order
        ].set(drop_sorted)
        logits = jnp.where(drop, -jnp.inf, logits)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


@functools.partial(
    jax.jit,
    static_argnames=("max_new_tokens", "compressor", "chunk_size", "temperature", "top_p",
                     "eos_id", "pad_id", "mesh"),
)
def _generate_jit(model, tokens, lengths, rng, max_new_tokens, compressor, chunk_size,
                  temperature, top_p, eos_id, pad_id, mesh=None):
    b, t = tokens.shape
    aligned = _left_align(tokens, lengths)
    cache, states, logits, _ = _run_prefill(
        model, aligned, lengths, compressor, chunk_size, t, False, mesh
    )
    cache = cache.replace(
        layers=tuple(
            kvcache.grow(lc, decode_capacity(compressor, lc.capacity, max_new_tokens))
            for lc in cache.layers
        )
    )
    cache = kvsharding.constrain_cache(cache, mesh)
    rng, key = jax.random.split(rng)
    tok = sample(logits, key, temperature, top_p)
    out = jnp.full((b, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(tok)
    eos = -1 if eos_id is None else eos_id
    done = tok == eos

    def cond(carry):
        step, _, _, _, _, done, _ = carry
        return (step < max_new_tokens) & ~jnp.all(done)

    def body(carry):
        step, tok, cache, states, out, done, rng = carry
        logits, cache, states = decode_step(model, cache, tok, compressor, states)
        cache = kvsharding.constrain_cache(cache, mesh)
        rng, key = jax.random.split(rng)
        nxt = jnp.where(done, pad_id, sample(logits, key, temperature, top_p))
        out = jax.lax.dynamic_update_slice_in_dim(out, nxt[:, None], step, axis=1)
        return step + 1, nxt, cache, states, out, done | (nxt == eos), rng

    carry = (jnp.int32(1), tok, cache, states, out, done, rng)
    carry = jax.lax.while_loop(cond, body, carry)
    return jnp.concatenate([tokens, carry[4]], axis=1), carry[2]


def generate(
    model: Llama,
    tokens: Any,
    max_new_tokens: int,
    compressor: Compressor | None = None,
    *,
    lengths: Any = None,
    chunk_size: int | None = None,
    temperature: float = 0.0,
    top_p: float = 1.0,
    rng: Array | None = None,
    eos_id: int | None = None,
    pad_id: int | None = None,
    return_cache: bool = False,
    mesh: Any = None,
):
    """Generates `max_new_tokens` tokens per row; returns int32[B, T + max_new_tokens].

    Greedy by default; `temperature > 0` samples (with nucleus `top_p`) and needs `rng`, an
    explicit `jax.random` key. Rows stop after emitting `eos_id` (default: the model config's
    `eos_token_id`; -1 never stops) and are padded with `pad_id` (default `eos_id`, else 0).
    The decode loop is a `lax.while_loop` inside one jit. With `mesh` (see `prefill`) rows run
    data parallel over "data" and heads tensor parallel over "model".
    """
    _check_tokens(model, tokens)
    b, t = np.shape(tokens)
    lengths = _check_lengths(lengths, b, t)
    compressor = _check_compressor(compressor)
    _check_positive("max_new_tokens", max_new_tokens, allow_none=False)
    _check_positive("chunk_size", chunk_size)
    if not (isinstance(temperature, (int, float)) and temperature >= 0):
        raise ValueError(f"temperature must be a float >= 0, got {temperature!r}")
    if not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
    if temperature > 0 and rng is None:
        raise ValueError("sampling (temperature > 0) needs an explicit rng key")
    rng = jax.random.key(0) if rng is None else rng
    if eos_id is None:
        eos_id = model.config.eos_token_id
    if eos_id is not None and eos_id < 0:
        eos_id = None
    pad_id = (eos_id if eos_id is not None else 0) if pad_id is None else pad_id
    model, tokens, lengths = _place(model, tokens, lengths, mesh)
    out, cache = _generate_jit(
        model, tokens, lengths, rng, int(max_new_tokens), compressor,
        chunk_size, float(temperature), float(top_p), eos_id, int(pad_id), mesh,
    )
    return (out, cache) if return_cache else out
