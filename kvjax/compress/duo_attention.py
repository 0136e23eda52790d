"""DuoAttention-style static split: retrieval heads keep everything, streaming heads keep
sinks + a recent window.

Xiao et al. 2024, "DuoAttention: Efficient Long-Context LLM Inference with Retrieval and
Streaming Heads", arXiv:2410.10819. A per-(layer, KV head) profile (the paper's learned gate
values; higher = more retrieval-like) decides the split, as kvpress DuoAttentionPress:
n_streaming = round(profile.size * head_compression_ratio) heads with the lowest profile values
(numpy's `argsort` over the flattened profile) become streaming heads, which keep the first
`sink_size` and the last `recent_size` tokens of the prompt. kvpress masks the dropped keys of a
full-size cache; here the streaming heads really drop them (per-head `lengths`).

Storage (real memory): a layer whose heads all stream becomes a dense LayerCache of capacity
sink_size + recent_size; a mixed layer becomes a `kvjax.headwise.HeadwiseLayerCache` pool of
n_retrieval * C + n_streaming * min(C, sink_size + recent_size) slots (C the prompt capacity);
an all-retrieval layer is left untouched. Defaults sink 128 / recent 256 are kvpress's
on-the-fly settings.
"""

from __future__ import annotations

import functools
from typing import Any

import jax.numpy as jnp
import numpy as np

from kvjax.cache import LayerCache
from kvjax.compress.base import Compressor, Observation, State, valid_slots
from kvjax.compress.scorer import check_int, oldest_mask, recent_mask
from kvjax.headwise import dense_from_mask, from_mask


def streaming_mask(head_scores: Any, head_compression_ratio: float) -> np.ndarray:
    """bool[L, Hkv]: True for streaming heads (kvpress `post_init_from_model`)."""
    scores = np.asarray(head_scores, dtype=np.float64)
    n = round(scores.size * head_compression_ratio)
    mask = np.zeros(scores.shape, bool)
    if n > 0:
        mask[np.unravel_index(np.argsort(scores, axis=None)[:n], scores.shape)] = True
    return mask


def duo_attention(
    head_scores: Any,
    head_compression_ratio: float = 0.5,
    *,
    sink_size: int = 128,
    recent_size: int = 256,
) -> Compressor:
    """Static retrieval/streaming split from a profile array.

    Args:
      head_scores: float[num_layers, num_kv_heads] head profile (higher = retrieval).
      head_compression_ratio: fraction of heads made streaming, in [0, 1].
      sink_size, recent_size: what a streaming head keeps (>= 0; kvpress 128 / 256).
    """
    scores = np.asarray(head_scores)
    if scores.ndim != 2 or scores.size == 0 or not np.issubdtype(scores.dtype, np.number):
        raise ValueError(
            f"head_scores must be a numeric [num_layers, num_kv_heads] array, got shape "
            f"{scores.shape} dtype {scores.dtype}"
        )
    ratio = head_compression_ratio
    if not isinstance(ratio, (int, float)) or isinstance(ratio, bool) or not 0.0 <= ratio <= 1.0:
        raise ValueError(f"head_compression_ratio must be in [0, 1], got {ratio!r}")
    sink_size = check_int("sink_size", sink_size, 0)
    recent_size = check_int("recent_size", recent_size, 0)
    mask = streaming_mask(scores, float(ratio))
    return _duo_attention(tuple(map(tuple, mask.tolist())), sink_size, recent_size)


@functools.cache
def _duo_attention(mask: tuple, sink_size: int, recent_size: int) -> Compressor:
    streaming = np.asarray(mask, bool)

    def prefill(cache: LayerCache, obs: Observation, state: State):
        if streaming.shape != (obs.num_layers, cache.num_heads):
            raise ValueError(
                f"head_scores has shape {streaming.shape}, the model has "
                f"({obs.num_layers}, {cache.num_heads}) (num_layers, num_kv_heads)"
            )
        layer = streaming[obs.layer]
        if not layer.any():
            return cache, state
        keep_streaming = recent_mask(cache, obs, recent_size) | oldest_mask(cache, sink_size)
        keep = jnp.where(jnp.asarray(layer)[None, :, None], keep_streaming, valid_slots(cache))
        window = min(cache.capacity, sink_size + recent_size)
        if layer.all():
            return dense_from_mask(cache, keep, window), state
        pool = int(layer.sum()) * window + int((~layer).sum()) * cache.capacity
        return from_mask(cache, keep, pool), state

    def decode(cache, obs, state):
        return cache, state

    return Compressor(init=lambda cache: (), prefill=prefill, decode=decode)
