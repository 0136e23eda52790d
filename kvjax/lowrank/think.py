"""ThinK: query-driven pruning of key channels.

Xu et al., "ThinK: Thinner Key Cache by Query-Driven Pruning" (ICLR 2025, arXiv:2407.21018);
kvpress `ThinKPress` (reviewed by the first author) is the executable reference. Per layer and
KV head, with the last `window` queries Q_w (GQA group pooled) and the cached keys K:

    score_c = mean_{t in window, group} Q_w[t, c]^2  *  mean_{slots} K[:, c]^2

(the squares of ||Q_w[:, c]|| ||K[:, c]||, the paper's criterion, up to constant factors) and the
int(D * ratio) lowest-scoring channels are pruned; the kept channels are the same for every slot
of the head. Keys are post-RoPE, as cached.

Storage (`ThinKLayerCache`, real savings): keys [B, H, C, Dk] hold only the kept channels and
`channels` int32[B, H, Dk] (ascending) says which; values are untouched. Attention gathers the
same channels of the query: q.k ~ sum_{c kept} q_c k_c, with the original scale 1 / sqrt(D)
(kvpress zeroes the pruned channels, which gives the same scores but no memory gain). Keys of
tokens written later (decode) are pruned to the same channels (kvpress keeps them whole; kvjax
keeps the cache one format).

Defaults (kvpress): window 32; key_channel_compression_ratio is the fraction of channels pruned
(the paper prunes 40-50%). Chain after an eviction method (`chain(snapkv(...), think(...))`):
eviction works on dense caches.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from kvjax import attention as kvattention
from kvjax import cache as kvcache
from kvjax.cache import LayerCache, register_cache_type
from kvjax.compress.base import Compressor, Observation, State, valid_slots

Array = jax.Array

LOG_COUNT = "log_count"  # merged-slot counts (kvjax.compress.kvmerger) are honoured


@struct.dataclass
class ThinKLayerCache:
    """keys [B, H, C, Dk] (kept channels), channels int32[B, H, Dk], values [B, H, C, Dv]."""

    keys: Array
    channels: Array
    values: Array
    lengths: Array
    positions: Array
    slot_data: dict[str, Array] = struct.field(default_factory=dict)
    head_dim: int = struct.field(pytree_node=False, default=0)  # D before pruning

    @property
    def capacity(self) -> int:
        return self.keys.shape[2]

    @property
    def num_heads(self) -> int:
        return self.keys.shape[1]

    def _dense_view(self) -> LayerCache:
        return LayerCache(self.keys, self.values, self.lengths, self.positions, self.slot_data)

    def _with(self, layer: LayerCache) -> ThinKLayerCache:
        return self.replace(keys=layer.keys, values=layer.values, lengths=layer.lengths,
                            positions=layer.positions, slot_data=layer.slot_data)

    def write(self, keys, values, positions, num_valid=None) -> ThinKLayerCache:
        kept = select_channels(keys, self.channels)
        return self._with(kvcache.write(self._dense_view(), kept, values, positions, num_valid))

    def grow(self, capacity: int) -> ThinKLayerCache:
        return self._with(kvcache.grow(self._dense_view(), capacity))

    def dense(self) -> LayerCache:
        """LayerCache with pruned channels set to zero (kvpress's representation)."""
        b, h, c, _ = self.keys.shape
        full = jnp.zeros((b, h, c, self.head_dim), self.keys.dtype)
        full = full.at[
            jnp.arange(b)[:, None, None, None], jnp.arange(h)[None, :, None, None],
            jnp.arange(c)[None, None, :, None], self.channels[:, :, None, :],
        ].set(self.keys)
        return LayerCache(full, self.values, self.lengths, self.positions, self.slot_data)


register_cache_type(ThinKLayerCache)


def select_channels(x: Array, channels: Array) -> Array:
    """x [B, H, T, D] -> [B, H, T, Dk]: the channels int32[B, H, Dk] of each head."""
    return jnp.take_along_axis(x, channels[:, :, None, :], axis=3)


def softmax_attend(scores: Array, mask: Array, values: Array, log_count: Array | None,
                   dtype: Any) -> Array:
    """Masked float32 softmax over slots and the weighted values.

    scores [B, H, G, T, C] (scaled), mask bool[B, H, T, C], values [B, H, C, Dv], optional
    log_count [B, H, C] added to the logits -> [B, H * G, T, Dv] in `dtype` (rows seeing no
    slot give zeros).
    """
    if log_count is not None:
        scores = scores + log_count[:, :, None, None, :].astype(jnp.float32)
    scores = jnp.where(mask[:, :, None], scores, -jnp.inf)
    peak = jnp.max(scores, axis=-1, keepdims=True)
    p = jnp.exp(scores - jnp.where(jnp.isfinite(peak), peak, 0.0))
    den = jnp.sum(p, axis=-1, keepdims=True)
    p = p / jnp.where(den == 0, 1.0, den)
    out = jnp.einsum("bhgts,bhsd->bhgtd", p, values.astype(jnp.float32),
                     preferred_element_type=jnp.float32)
    b, h, g, t, dv = out.shape
    return out.reshape(b, h * g, t, dv).astype(dtype)


def _attend(q, q_positions, layer, scale=None, sliding_window=None, impl="auto"):
    """Reference attention over a ThinK cache: the query's kept channels only."""
    b, hq, t, d = q.shape
    if d != layer.head_dim:
        raise ValueError(f"q head dim {d} != cache head dim {layer.head_dim}")
    h = layer.num_heads
    scale = d**-0.5 if scale is None else scale
    qs = select_channels(q.reshape(b, h, (hq // h) * t, d), layer.channels)
    qs = qs.reshape(b, h, hq // h, t, -1)
    scores = jnp.einsum("bhgtk,bhsk->bhgts", qs, layer.keys,
                        preferred_element_type=jnp.float32) * scale
    mask = kvattention.attention_mask(q_positions, layer, sliding_window)
    return softmax_attend(scores, mask, layer.values, layer.slot_data.get(LOG_COUNT), q.dtype)


kvattention.register(ThinKLayerCache, _attend)


def channel_scores(cache: LayerCache, queries: Array, query_positions: Array) -> Array:
    """float32[B, Hkv, D]: mean_q q_c^2 (window and GQA group) * mean_slots k_c^2."""
    b, hq, t, d = queries.shape
    h = cache.num_heads
    real = (query_positions >= 0).astype(jnp.float32)  # [B, T]
    q2 = queries.astype(jnp.float32) ** 2 * real[:, None, :, None]
    q2 = jnp.sum(q2.reshape(b, h, hq // h, t, d), axis=(2, 3))
    q2 = q2 / (hq // h) / jnp.maximum(jnp.sum(real, axis=1), 1.0)[:, None, None]
    valid = valid_slots(cache).astype(jnp.float32)
    k2 = jnp.einsum("bhc,bhcd->bhd", valid, cache.keys.astype(jnp.float32) ** 2)
    k2 = k2 / jnp.maximum(jnp.sum(valid, axis=2), 1.0)[..., None]
    return q2 * k2


def keep_count(head_dim: int, key_channel_compression_ratio: float | None,
               keep_channels: int | None) -> int:
    """Kept key channels: D - int(D * ratio) (kvpress), or `keep_channels`."""
    if keep_channels is not None:
        if keep_channels > head_dim:
            raise ValueError(f"keep_channels must be in [1, head_dim={head_dim}], "
                             f"got {keep_channels}")
        return int(keep_channels)
    return max(1, head_dim - int(head_dim * key_channel_compression_ratio))


def prune(cache: LayerCache, scores: Array, keep: int) -> ThinKLayerCache:
    """The ThinK cache keeping the `keep` highest-scoring channels (scores [B, Hkv, D])."""
    _, idx = jax.lax.top_k(scores, keep)
    channels = jnp.sort(idx, axis=-1).astype(jnp.int32)
    return ThinKLayerCache(
        keys=select_channels(cache.keys, channels),
        channels=channels,
        values=cache.values,
        lengths=cache.lengths,
        positions=cache.positions,
        slot_data=dict(cache.slot_data),
        head_dim=cache.head_dim,
    )


@functools.cache
def think(
    key_channel_compression_ratio: float | None = None,
    keep_channels: int | None = None,
    window: int = 32,
) -> Compressor:
    """ThinK key-channel pruning at prefill (turns the layer into a `ThinKLayerCache`).

    Args:
      key_channel_compression_ratio: fraction in [0, 1) of key channels pruned, or
      keep_channels: key channels kept per head, an int in [1, head_dim] (exactly one of them).
      window: the last `window` (>= 1) observed queries score the channels.
    """
    if (key_channel_compression_ratio is None) == (keep_channels is None):
        raise ValueError("give exactly one of key_channel_compression_ratio in [0, 1) or "
                         "keep_channels (int in [1, head_dim])")
    r = key_channel_compression_ratio
    if r is not None and (not isinstance(r, (int, float)) or isinstance(r, bool)
                          or not 0 <= r < 1):
        raise ValueError(f"key_channel_compression_ratio must be a float in [0, 1), got {r!r}")
    if keep_channels is not None and (
        not isinstance(keep_channels, (int, np.integer)) or isinstance(keep_channels, bool)
        or keep_channels < 1
    ):
        raise ValueError(f"keep_channels must be an int in [1, head_dim], got {keep_channels!r}")
    if not isinstance(window, (int, np.integer)) or isinstance(window, bool) or window < 1:
        raise ValueError(f"window must be an int >= 1, got {window!r}")

    def prefill(cache: LayerCache, obs: Observation, state: State):
        if type(cache) is not LayerCache:
            raise TypeError(f"think prunes a dense LayerCache, got {type(cache).__name__}; "
                            "put it after eviction/merging and before other cache kinds")
        keep = keep_count(cache.head_dim, r, keep_channels)
        scores = channel_scores(cache, obs.queries[:, :, -window:],
                                obs.query_positions[:, -window:])
        return prune(cache, scores, keep), state

    return Compressor(init=lambda cache: (), prefill=prefill, decode=lambda c, o, s: (c, s))
