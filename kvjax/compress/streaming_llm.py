"""StreamingLLM: attention sinks plus a recent window.

Xiao et al. 2023, "Efficient Streaming Language Models with Attention Sinks", arXiv:2309.17453.
Keep the first `n_sink` tokens (4) and the most recent budget - n_sink tokens (kvpress
StreamingLLMPress: scores 1 everywhere except 0 on the n_pruned tokens after the sinks).
Here the score is the token's position (recency), with the sinks at max + 1, which keeps the
same set and also serves decode-time eviction.

`decode=True` bounds the cache while generating: after each new token, a head over budget drops
its oldest non-sink token (layer capacity budget + 1). With `rerotate=True` as well, kept keys
are re-rotated to contiguous positions, the paper's "positions within the cache" (see
`kvjax.compress.scorer`; at decode only the tokens older than the evicted one, i.e. the sinks,
move).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from kvjax.cache import LayerCache
from kvjax.compress.base import Compressor, Observation, valid_slots
from kvjax.compress.scorer import check_budget_args, check_int, from_scorer, oldest_mask, protect

Array = jax.Array


def streaming_llm_scores(
    cache: LayerCache, obs: Observation | None = None, *, n_sink: int = 4
) -> Array:
    """float32[B, Hkv, C]: the position (newer = higher); the `n_sink` oldest get max + 1."""
    del obs
    valid = valid_slots(cache)
    return protect(cache.positions.astype(jnp.float32), oldest_mask(cache, n_sink), valid)


def streaming_llm(
    compression_ratio: float | None = None,
    budget: int | None = None,
    *,
    n_sink: int = 4,
    rerotate: bool = False,
    decode: bool = False,
) -> Compressor:
    """Sinks + recent window at prefill; with `decode`, also a bounded cache while generating.

    Args:
      compression_ratio / budget: exactly one; the budget must be >= n_sink. With `decode` the
        budget may exceed the prompt (the cache then fills up to it before evicting).
      n_sink: attention-sink tokens always kept (kvpress default 4).
      rerotate: contiguous re-rotation of kept keys (kvpress KeyRerotationPress; the paper).
      decode: keep every head within the budget during generation.
    """
    compression_ratio, budget = check_budget_args(compression_ratio, budget)
    n_sink = check_int("n_sink", n_sink, 0)
    return _streaming_llm(compression_ratio, budget, n_sink, bool(rerotate), bool(decode))


@functools.cache
def _streaming_llm(compression_ratio, budget, n_sink, rerotate, decode) -> Compressor:
    scorer = functools.partial(streaming_llm_scores, n_sink=n_sink)
    return from_scorer(scorer, compression_ratio, budget, keep_sinks=n_sink, rerotate=rerotate,
                       decode=decode)
