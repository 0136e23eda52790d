"""MiniCache: merge adjacent layers' KV caches in the depth dimension.

Liu et al., "MiniCache: KV Cache Compression in Depth Dimension for Large Language Models"
(NeurIPS 2024, arXiv:2405.14366). From layer `start_layer` (default L // 2) up, layers are paired
(l - 1, l) = (start, start + 1), (start + 2, start + 3), ...; per token t, head and pair, with
x^{l-1}, x^l the two layers' key (and, separately, value) vectors:

  magnitude   n^l = ||x^l||, n^{l-1} = ||x^{l-1}||           (kept per layer)
  direction   e = SLERP(x^{l-1}/n^{l-1}, x^l/n^l; t)          (shared by the pair)
              = sin((1 - t) W) / sin W * u^{l-1} + sin(t W) / sin W * u^l,  W = angle(u^{l-1}, u^l)
  restore     x^l ~ n^l e,  x^{l-1} ~ n^{l-1} e
  retention   angular distance d_t = W / pi (the larger of the key and value angles); tokens with
              d_t > d_min + (d_max - d_min) * gamma (per head) keep their original vectors in
              both layers, at most `max_retained` of them (the most distant; a static count).

Defaults (paper): t = 0.6, gamma = 0.05, start_layer = L // 2; max_retained (kvjax, static
shapes) = 10% of the capacity.

Usage (a whole-cache transform; `generate` applies per-layer compressors only):

    cache, logits = kvjax.prefill(model, tokens)
    cache = minicache(cache)                                   # pairs above the middle layer
    cache = cache.replace(layers=tuple(kvjax.cache.grow(l, l.capacity + n) for l in cache.layers))
    logits, cache, _ = kvjax.decode_step(model, cache, next_token)   # ... per generated token

Decode-time tokens go to a per-layer dense tail (`MiniCacheLayerCache.write`); the merged prompt
part is fixed. Every layer of the pair is a `MiniCacheLayerCache` whose shared arrays (the two
directions, retained indices, positions) are the *same* jax arrays; `nbytes` counts each shared
buffer once. Limitation (documented in docs/design_merging.md): the model hands each layer only
its own cache, so inside one jit program XLA keeps a separate copy per layer; halving device
memory under jit needs the model to resolve the shared store from the partner layer.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from kvjax import attention as kvattention
from kvjax import cache as kvcache
from kvjax.cache import KVCache, LayerCache, register_cache_type
from kvjax.compress.base import Compressor, identity

Array = jax.Array


@struct.dataclass
class MiniCacheLayerCache:
    """One layer of a merged pair; fields marked (shared) are the same arrays in both layers.

    dir_k, dir_v     [B, H, C, D]  unit directions (shared)
    norm_k, norm_v   float32[B, H, C]  this layer's magnitudes
    retained_idx     int32[B, H, R]  slots kept unmerged, C where unused (shared)
    retained_k/_v    [B, H, R, D]  this layer's original vectors of those slots
    merged_pos       int32[B, H, C]  positions of the merged part, -1 empty (shared)
    tail_*           dense decode-time slots: keys/values [B, H, Ct, D], positions, lengths
    """

    dir_k: Array
    dir_v: Array
    norm_k: Array
    norm_v: Array
    retained_idx: Array
    retained_k: Array
    retained_v: Array
    merged_pos: Array
    tail_keys: Array
    tail_values: Array
    tail_positions: Array
    tail_lengths: Array

    @property
    def merged_capacity(self) -> int:
        return self.dir_k.shape[2]

    @property
    def capacity(self) -> int:
        return self.merged_capacity + self.tail_keys.shape[2]

    @property
    def num_heads(self) -> int:
        return self.dir_k.shape[1]

    @property
    def head_dim(self) -> int:
        return self.dir_k.shape[3]

    @property
    def lengths(self) -> Array:
        return self.merged_capacity + self.tail_lengths

    @property
    def positions(self) -> Array:
        return jnp.concatenate([self.merged_pos, self.tail_positions], axis=2)

    def _tail(self) -> LayerCache:
        return LayerCache(self.tail_keys, self.tail_values, self.tail_lengths, self.tail_positions)

    def write(self, keys, values, positions, num_valid=None) -> MiniCacheLayerCache:
        t = kvcache.write(self._tail(), keys, values, positions, num_valid)
        return self.replace(tail_keys=t.keys, tail_values=t.values, tail_positions=t.positions,
                            tail_lengths=t.lengths)

    def grow(self, capacity: int) -> MiniCacheLayerCache:
        t = kvcache.grow(self._tail(), capacity - self.merged_capacity)
        return self.replace(tail_keys=t.keys, tail_values=t.values, tail_positions=t.positions)

    def dense(self) -> LayerCache:
        """The restored dense LayerCache (merged part, then the tail); the jnp reference."""
        keys = restore(self.dir_k, self.norm_k, self.retained_idx, self.retained_k)
        values = restore(self.dir_v, self.norm_v, self.retained_idx, self.retained_v)
        return LayerCache(
            keys=jnp.concatenate([keys, self.tail_keys.astype(keys.dtype)], axis=2),
            values=jnp.concatenate([values, self.tail_values.astype(values.dtype)], axis=2),
            lengths=self.lengths,
            positions=self.positions,
        )


register_cache_type(MiniCacheLayerCache)


def restore(direction: Array, norm: Array, idx: Array, retained: Array) -> Array:
    """[B, H, C, D]: norm * direction, with the retained slots' original vectors put back."""
    x = norm[..., None].astype(jnp.float32) * direction.astype(jnp.float32)
    b, h = idx.shape[:2]
    bi, hi = jnp.arange(b)[:, None, None], jnp.arange(h)[None, :, None]
    x = x.at[bi, hi, idx].set(retained.astype(jnp.float32), mode="drop")
    return x.astype(direction.dtype)


def _attend(q, q_positions, layer, scale=None, sliding_window=None, impl="auto"):
    """Reference attention: restore the dense layer, then `reference_attention`."""
    if q.shape[-1] != layer.head_dim:
        raise ValueError(f"q head dim {q.shape[-1]} != cache head dim {layer.head_dim}")
    return kvattention.reference_attention(q, q_positions, layer.dense(), scale, sliding_window)


kvattention.register(MiniCacheLayerCache, _attend)


def slerp(ua: Array, ub: Array, t: float) -> tuple[Array, Array]:
    """(unit direction between unit vectors ua, ub [..., D] at t, angle W [...]) in float32."""
    cos = jnp.clip(jnp.sum(ua * ub, axis=-1), -1.0, 1.0)
    w = jnp.arccos(cos)
    sin = jnp.sin(w)
    small = sin < 1e-6
    safe = jnp.where(small, 1.0, sin)
    ca = jnp.where(small, 1.0 - t, jnp.sin((1.0 - t) * w) / safe)
    cb = jnp.where(small, t, jnp.sin(t * w) / safe)
    e = ca[..., None] * ua + cb[..., None] * ub
    e = e / jnp.maximum(jnp.linalg.norm(e, axis=-1, keepdims=True), 1e-12)
    return e, w


def _unit(x: Array) -> tuple[Array, Array]:
    x = x.astype(jnp.float32)
    n = jnp.linalg.norm(x, axis=-1)
    return x / jnp.maximum(n, 1e-12)[..., None], n


def merge_pair(
    lower: LayerCache, upper: LayerCache, t: float = 0.6, gamma: float = 0.05,
    max_retained: int = 1,
) -> tuple[MiniCacheLayerCache, MiniCacheLayerCache]:
    """Merges two dense layers holding the same tokens into two MiniCache layers (shared store).

    Slots whose positions differ between the layers (or are empty in one of them) are treated
    as maximally distant, so they are retained first.
    """
    ka, nka = _unit(lower.keys)
    kb, nkb = _unit(upper.keys)
    va, nva = _unit(lower.values)
    vb, nvb = _unit(upper.values)
    dir_k, wk = slerp(ka, kb, t)
    dir_v, wv = slerp(va, vb, t)
    dist = jnp.maximum(wk, wv) / math.pi  # [B, H, C] in [0, 1]
    c = lower.capacity
    slot = jnp.arange(c)[None, None, :]
    valid = (slot < lower.lengths[:, :, None]) & (lower.positions >= 0)
    uvalid = (slot < upper.lengths[:, :, None]) & (upper.positions >= 0)
    same = valid & uvalid & (lower.positions == upper.positions)
    dmin = jnp.min(jnp.where(same, dist, jnp.inf), axis=2, keepdims=True)
    dmax = jnp.max(jnp.where(same, dist, -jnp.inf), axis=2, keepdims=True)
    thr = dmin + (dmax - dmin) * gamma
    key = jnp.where(same, jnp.where(dist > thr, dist, -1.0), 2.0)  # mismatched slots first
    key = jnp.where(valid | uvalid, key, -1.0)
    r = min(max_retained, c)
    top, idx = jax.lax.top_k(key, r)
    idx = jnp.where(top >= 0, idx, c).astype(jnp.int32)  # C = unused retention entry
    pos = jnp.where(valid, lower.positions, jnp.where(uvalid, upper.positions, -1))

    def take(x: Array) -> Array:
        return jnp.take_along_axis(x, jnp.minimum(idx, c - 1)[..., None], axis=2)

    def layer(cache: LayerCache, nk: Array, nv: Array) -> MiniCacheLayerCache:
        b, h = cache.lengths.shape
        return MiniCacheLayerCache(
            dir_k=dir_k_s, dir_v=dir_v_s,
            norm_k=nk, norm_v=nv,
            retained_idx=idx, retained_k=take(cache.keys), retained_v=take(cache.values),
            merged_pos=pos,
            tail_keys=jnp.zeros((b, h, 0, cache.head_dim), cache.keys.dtype),
            tail_values=jnp.zeros((b, h, 0, cache.values.shape[-1]), cache.values.dtype),
            tail_positions=jnp.zeros((b, h, 0), jnp.int32),
            tail_lengths=jnp.zeros((b, h), jnp.int32),
        )

    dir_k_s = dir_k.astype(lower.keys.dtype)
    dir_v_s = dir_v.astype(lower.values.dtype)
    return layer(lower, nka, nva), layer(upper, nkb, nvb)


def _check_fractions(**values: Any) -> None:
    """ValueError naming the argument unless each value is a float in [0, 1]."""
    for name, v in values.items():
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not 0 <= v <= 1:
            raise ValueError(f"{name} must be a float in [0, 1], got {v!r}")


def minicache(
    cache: KVCache,
    start_layer: int | None = None,
    t: float = 0.6,
    gamma: float = 0.05,
    max_retained: float = 0.1,
) -> KVCache:
    """Merges layer pairs (start, start+1), (start+2, start+3), ... of a prefilled KVCache.

    Args:
      cache: a KVCache of dense `LayerCache`s; paired layers must have equal shapes.
      start_layer: first layer of the first pair (default num_layers // 2), in [0, L - 2].
      t: SLERP interpolation in [0, 1] (0: the lower layer's direction, 1: the upper's).
      gamma: retention threshold in [0, 1] (fraction of the head's distance range above d_min).
      max_retained: static cap on retained tokens per head, a fraction in [0, 1] of the capacity.

    Returns a KVCache whose paired layers are `MiniCacheLayerCache`s (other layers unchanged;
    the paired layers' other `slot_data` is not carried over).
    """
    if not isinstance(cache, KVCache):
        raise TypeError(f"cache must be a kvjax KVCache, got {type(cache).__name__}")
    n = cache.num_layers
    if start_layer is None:
        start_layer = n // 2
    if not isinstance(start_layer, (int, np.integer)) or not 0 <= start_layer <= n - 2:
        raise ValueError(f"start_layer must be an int in [0, {n - 2}], got {start_layer!r}")
    _check_fractions(t=t, gamma=gamma, max_retained=max_retained)
    layers = list(cache.layers)
    for lo in range(start_layer, n - 1, 2):
        a, b = layers[lo], layers[lo + 1]
        for i, x in ((lo, a), (lo + 1, b)):
            if type(x) is not LayerCache:
                raise TypeError(f"layer {i} is a {type(x).__name__}; minicache merges dense "
                                "LayerCaches (apply it before other cache kinds)")
            if "log_count" in x.slot_data:
                raise ValueError(f"layer {i} holds merged slots (slot_data['log_count']); "
                                 "apply minicache before merging methods")
        if a.keys.shape != b.keys.shape or a.values.shape != b.values.shape:
            raise ValueError(f"layers {lo} and {lo + 1} have different shapes "
                             f"{a.keys.shape} / {b.keys.shape}; merged layers must match")
        r = max(1, math.ceil(max_retained * a.capacity)) if max_retained > 0 else 0
        layers[lo], layers[lo + 1] = _merge_jit(a, b, float(t), float(gamma), r)
    return cache.replace(layers=tuple(layers))


@functools.cache
def minicache_compressor(
    start_layer: int | None = None,
    t: float = 0.6,
    gamma: float = 0.05,
    max_retained: float = 0.1,
) -> Compressor:
    """MiniCache as a Compressor: `minicache(cache, ...)` as the whole-cache `finalize` step.

    `prefill`/`generate` run it once after the prompt is cached (per-layer steps are identity),
    so `kvjax.generate(model, tokens, n, compressor=minicache_compressor())` and
    `chain(snapkv(...), minicache_compressor())` work; evaluation sweeps name it "minicache".
    Arguments as in `minicache` (checked when the cache is known).
    """
    _check_fractions(t=t, gamma=gamma, max_retained=max_retained)
    ident = identity()
    return ident._replace(finalize=functools.partial(
        minicache, start_layer=start_layer, t=float(t), gamma=float(gamma),
        max_retained=float(max_retained)))


def _merge_impl(a, b, t, gamma, r):
    lo, hi = merge_pair(a, b, t, gamma, max(r, 1))
    if r == 0:  # no retention: empty retained arrays
        def empty(x):
            return x.replace(retained_idx=x.retained_idx[:, :, :0],
                             retained_k=x.retained_k[:, :, :0], retained_v=x.retained_v[:, :, :0])
        lo, hi = empty(lo), empty(hi)
    return lo, hi


_merge_core = jax.jit(_merge_impl, static_argnums=(2, 3, 4))


def _merge_jit(a, b, t, gamma, r):
    lo, hi = _merge_core(a, b, t, gamma, r)
    # jit returns separate buffers per output leaf: point both layers at one copy
    return lo, hi.replace(dir_k=lo.dir_k, dir_v=lo.dir_v, retained_idx=lo.retained_idx,
                          merged_pos=lo.merged_pos)


def nbytes(tree: Any) -> int:
    """True bytes of a cache in which layers may share arrays: each buffer counted once."""
    seen: dict[int, Any] = {}
    for x in jax.tree.leaves(tree):
        seen[id(x)] = x
    return sum(kvcache.array_nbytes(x) for x in seen.values())
