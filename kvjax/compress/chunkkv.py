"""ChunkKV: keep whole chunks of consecutive tokens, ranked by their tokens' scores.

Liu et al. 2025, "ChunkKV: Semantic-Preserving KV Cache Compression for Efficient Long-Context
LLM Inference", arXiv:2502.00299. As kvpress ChunkKVPress: token scores from any scorer
(default SnapKV with kvpress's defaults) are summed over the layer's KV heads; the prompt is cut
into chunks of `chunk_length` slots (the last one possibly partial); a chunk's score is the mean
of its tokens' summed scores; the top max(1, int(n_chunks (1 - r))) chunks are kept, the same
chunks for every head. A prompt shorter than one chunk falls back to token-level top-k.

The kept token count depends on whether the partial chunk is chosen, so the layer's static
capacity is n_kept_chunks * chunk_length and `lengths` says how many are real. An absolute
`budget` keeps budget // chunk_length chunks. Defaults: chunk_length 20 (kvpress; the paper
uses 10).

Layer-wise index reuse (the paper's option, not in kvpress): with `reuse_layers=k`, layers
0, k, 2k, ... score and select; the k - 1 layers after each reuse its chunks without scoring.
The selection travels as the compressor state through `Observation.previous` (set by
`kvjax.prefill` / `kvjax.generate`); without it every layer selects for itself.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from kvjax.cache import LayerCache, gather
from kvjax.compress.base import Compressor, Observation, State, keep_topk, valid_slots
from kvjax.compress.scorer import (
    Scorer,
    check_budget_args,
    check_int,
    last_position,
    n_kept,
    rerotate_contiguous,
    resolve_scorer,
)
from kvjax.compress.snapkv import snapkv_scores

Array = jax.Array


def chunk_scores(cache: LayerCache, scores: Array, chunk_length: int) -> Array:
    """float32[B, ceil(C / chunk_length)]: mean over each chunk's valid slots of the head-summed
    scores; chunks without a valid slot get -inf."""
    b, h, c = scores.shape
    n = -(-c // chunk_length)
    valid = valid_slots(cache)
    total = jnp.sum(jnp.where(valid, scores.astype(jnp.float32), 0.0), axis=1)  # [B, C]
    count = jnp.any(valid, axis=1).astype(jnp.float32)  # [B, C]
    pad = n * chunk_length - c
    total = jnp.pad(total, ((0, 0), (0, pad))).reshape(b, n, chunk_length).sum(-1)
    count = jnp.pad(count, ((0, 0), (0, pad))).reshape(b, n, chunk_length).sum(-1)
    return jnp.where(count > 0, total / jnp.maximum(count, 1.0), -jnp.inf)


def select_chunks(cache: LayerCache, scores: Array, chunk_length: int, n_chunks: int) -> Array:
    """int32[B, n_chunks]: indices of the best chunks (`chunk_scores`), ascending."""
    top = jax.lax.top_k(chunk_scores(cache, scores, chunk_length), n_chunks)[1]
    return jnp.sort(top, axis=-1).astype(jnp.int32)


def keep_chunks(cache: LayerCache, chunks: Array, chunk_length: int) -> LayerCache:
    """Keeps the chunks `chunks` (int32[B, n], ascending) of every head, in slot order."""
    c = cache.capacity
    idx = chunks[:, :, None] * chunk_length + jnp.arange(chunk_length)[None, None, :]
    idx = idx.reshape(idx.shape[0], -1)  # [B, K]
    idx = jnp.broadcast_to(idx[:, None, :], (idx.shape[0], cache.num_heads, idx.shape[1]))
    inside = idx < c
    idx = jnp.minimum(idx, c - 1)
    keep = inside & jnp.take_along_axis(valid_slots(cache), idx, axis=2)
    order = jnp.argsort(jnp.where(keep, 0, 1), axis=-1, stable=True)  # real slots first
    idx = jnp.take_along_axis(idx, order, axis=-1)
    return gather(cache, idx.astype(jnp.int32), jnp.sum(keep, axis=-1).astype(jnp.int32))


def chunkkv(
    compression_ratio: float | None = None,
    budget: int | None = None,
    *,
    chunk_length: int = 20,
    scorer: Scorer | str = snapkv_scores,
    reuse_layers: int = 1,
    rerotate: bool = False,
) -> Compressor:
    """ChunkKV eviction at prefill.

    Args:
      compression_ratio: fraction of chunks removed (kvpress), in [0, 1); or
      budget: tokens kept per head, >= chunk_length (kept chunks = budget // chunk_length).
      chunk_length: tokens per chunk (kvpress 20).
      scorer: token scorer `scorer(cache, obs) -> [B, Hkv, C]` or a method name (default
        `snapkv_scores`, kvpress's defaults).
      reuse_layers: layers sharing one chunk selection (1: none; module docstring).
      rerotate: contiguous re-rotation of the kept keys.
    """
    compression_ratio, budget = check_budget_args(compression_ratio, budget)
    chunk_length = check_int("chunk_length", chunk_length, 1)
    if budget is not None and budget < chunk_length:
        raise ValueError(f"budget ({budget}) must be >= chunk_length ({chunk_length})")
    scorer = resolve_scorer(scorer)
    reuse_layers = check_int("reuse_layers", reuse_layers, 1)
    return _chunkkv(compression_ratio, budget, chunk_length, scorer, reuse_layers, bool(rerotate))


@functools.cache
def _chunkkv(compression_ratio, budget, chunk_length, scorer, reuse_layers, rerotate):
    def prefill(cache: LayerCache, obs: Observation, state: State):
        c = cache.capacity
        if budget is not None and budget > c:
            raise ValueError(f"budget ({budget}) is larger than the prompt (static capacity {c})")
        if compression_ratio == 0:
            return cache, state
        if c < chunk_length:  # kvpress: no complete chunk, token-level top-k
            n = budget if budget is not None else n_kept(c, compression_ratio)
            cache = keep_topk(cache, scorer(cache, obs), n)
        else:
            total = -(-c // chunk_length)
            if budget is not None:
                n = budget // chunk_length
            else:
                n = max(1, int(total * (1 - compression_ratio)))
            if n >= total:
                return cache, state
            reuse = obs.layer % reuse_layers != 0 and obs.previous is not None
            if reuse and getattr(obs.previous, "shape", None) == (cache.batch, n):
                state = obs.previous
            else:
                state = select_chunks(cache, scorer(cache, obs), chunk_length, n)
            cache = keep_chunks(cache, state, chunk_length)
        if rerotate:
            cache = rerotate_contiguous(cache, last_position(obs), obs.inv_freq)
        return cache, state

    return Compressor(init=lambda cache: (), prefill=prefill, decode=lambda c, o, s: (c, s))
