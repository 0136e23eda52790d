"""Mixed-precision KV cache: important tokens at high precision, the rest at low precision.

In the spirit of MiKV ("No Token Left Behind", Yang et al. 2024, arXiv:2402.18096: tokens that
eviction would drop are kept at low precision instead) and ZipCache (He et al. 2024,
arXiv:2405.14256: salient tokens get more bits). Importance comes from any scorer of the eviction
family, `scorer(cache, obs, **params) -> [B, Hkv, C]` (higher is more important), e.g.
`kvjax.compress.knorm.knorm_scores`; ties and budgets follow `keep_topk`.

At prefill, per head: the newest tokens form the full-precision residual window (as in KIVI); of
the older ones, the `high_fraction` highest-scoring go to the high part (`high_bits`, 8 by
default, or None for full precision) and the others to the low part (`low_bits`, 2 by default,
KIVI layout). Decoding appends into the low part's residual window; tokens leaving it are
quantized at low precision. Attention reads both parts (on GPU, two kernel passes merged by
log-sum-exp).

    comp = kvjax.quant.mixed_precision(knorm_scores, high_fraction=0.2, high_bits=8, low_bits=2)
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from kvjax import attention as kvattention
from kvjax import cache as kvcache
from kvjax.cache import LayerCache, gather
from kvjax.compress.base import Compressor, Observation, valid_slots
from kvjax.quant import packing
from kvjax.quant.kivi import (
    QuantizedLayerCache,
    check_config,
    from_dense,
    kernel_partials,
    use_kernel,
)

Array = jax.Array


@struct.dataclass
class MixedPrecisionLayerCache:
    """`high`: QuantizedLayerCache with an empty residual window (or a dense LayerCache) of
    the important tokens; `low`: QuantizedLayerCache of the rest plus the residual window.
    Slots are high's followed by low's; a slot holds a token iff its position is >= 0."""

    high: Any
    low: QuantizedLayerCache

    def __post_init__(self):  # `kvjax.cache.restore` passes the parts as dicts of arrays
        for name in ("high", "low"):
            part = getattr(self, name)
            if isinstance(part, dict):
                cls = LayerCache if "keys" in part else QuantizedLayerCache
                object.__setattr__(self, name, cls(**part))

    @property
    def capacity(self) -> int:
        return self.high.capacity + self.low.capacity

    @property
    def lengths(self) -> Array:
        return (self.high.lengths + self.low.lengths).astype(jnp.int32)

    @property
    def positions(self) -> Array:
        return self.to_dense().positions

    @property
    def head_dim(self) -> int:
        return self.low.head_dim

    def write(self, keys: Array, values: Array, positions: Array,
              num_valid: Array | None = None) -> MixedPrecisionLayerCache:
        """Appends to the low part's residual window (see `QuantizedLayerCache.write`)."""
        return self.replace(low=self.low.write(keys, values, positions, num_valid))

    def grow(self, capacity: int) -> MixedPrecisionLayerCache:
        """Room for at least `capacity` slots (the low part grows; see QuantizedLayerCache)."""
        return self.replace(low=self.low.grow(capacity - self.high.capacity))

    def to_dense(self, dtype: Any = jnp.float32) -> LayerCache:
        """Both parts as one dense LayerCache (validity by position >= 0; the reference)."""
        if isinstance(self.high, LayerCache):
            h = self.high
            valid = jnp.arange(h.capacity)[None, None] < h.lengths[:, :, None]
            hk, hv = h.keys.astype(jnp.float32), h.values.astype(jnp.float32)
            hpos = jnp.where(valid, h.positions, -1)
        else:
            d = self.high.to_dense()
            hk, hv, hpos = d.keys, d.values, d.positions
        lo = self.low.to_dense()
        keys = jnp.concatenate([hk, lo.keys], axis=2).astype(dtype)
        return LayerCache(
            keys=keys,
            values=jnp.concatenate([hv, lo.values], axis=2).astype(dtype),
            lengths=jnp.full(lo.lengths.shape, keys.shape[2], jnp.int32),
            positions=jnp.concatenate([hpos, lo.positions], axis=2),
        )


kvcache.register_cache_type(MixedPrecisionLayerCache)


def _dense_partials(q: Array, layer: LayerCache, scale: float | None):
    """(o, m, l) of decode queries q [B, Hq, D] over a dense LayerCache, one split (jnp)."""
    b, hq, d = q.shape
    h = layer.num_heads
    scale = d**-0.5 if scale is None else scale
    qg = q.reshape(b, h, hq // h, d).astype(jnp.float32)
    s = jnp.einsum("bhgd,bhsd->bhgs", qg, layer.keys.astype(jnp.float32)) * scale
    valid = (jnp.arange(layer.capacity)[None, None] < layer.lengths[:, :, None]) & (
        layer.positions >= 0
    )
    s = jnp.where(valid[:, :, None], s, -1e30)
    m = jnp.max(s, axis=-1)
    p = jnp.where(valid[:, :, None], jnp.exp(s - m[..., None]), 0.0)
    o = jnp.einsum("bhgs,bhsd->bhgd", p, layer.values.astype(jnp.float32))
    return o[:, :, None], m[:, :, None], jnp.sum(p, axis=-1)[:, :, None]


def mixed_attend(
    q: Array,
    q_positions: Array,
    layer: MixedPrecisionLayerCache,
    scale: float | None = None,
    sliding_window: int | None = None,
    impl: str = "auto",
) -> Array:
    """Attention over both parts: kernel partials merged by log-sum-exp (GPU decode), else the
    reference over the dequantized cache."""
    if q.shape[-1] != layer.head_dim:
        raise ValueError(f"q head dim {q.shape[-1]} != cache head dim {layer.head_dim}")
    if use_kernel(layer.low, q, sliding_window, impl):
        from pallas_kernels import quantized_decode_attention as qda

        q1 = q[:, :, 0]
        if isinstance(layer.high, LayerCache):
            high = _dense_partials(q1, layer.high, scale)
        else:
            high = kernel_partials(q1, layer.high, scale)
        return qda.combine([high, kernel_partials(q1, layer.low, scale)], q.dtype)[:, :, None]
    return kvattention.reference_attention(q, q_positions, layer.to_dense(), scale, sliding_window)


kvattention.register(MixedPrecisionLayerCache, mixed_attend)


def split_by_importance(
    cache: LayerCache, scores: Array, high_budget: int, group_size: int, residual: int
) -> tuple[LayerCache, LayerCache]:
    """(high, low) dense caches: the top `high_budget` scored tokens of each head outside the
    residual window, and everything else (in order, the window's tokens last)."""
    c = cache.capacity
    n = jnp.minimum(cache.lengths, c)
    older = group_size * (-(-jnp.maximum(n - residual, 0) // group_size))
    valid = valid_slots(cache.replace(lengths=older))
    masked = jnp.where(valid, scores.astype(jnp.float32), -jnp.inf)
    _, idx = jax.lax.top_k(masked, high_budget)
    picked = jnp.take_along_axis(valid, idx, axis=2)
    order = jnp.argsort(jnp.where(picked, idx, idx + c), axis=2)
    idx, picked = jnp.take_along_axis(idx, order, 2), jnp.take_along_axis(picked, order, 2)
    n_high = jnp.sum(picked, axis=2).astype(jnp.int32)
    high = gather(cache, idx.astype(jnp.int32), n_high)
    b, h = n.shape
    is_high = jnp.zeros((b, h, c), bool).at[
        jnp.arange(b)[:, None, None], jnp.arange(h)[None, :, None], idx
    ].set(picked)
    slot = jnp.arange(c)[None, None, :]
    low_key = jnp.where((slot < n[:, :, None]) & ~is_high, slot, slot + c)
    low_cap = max(c - high_budget, min(c, residual))
    low_idx = jnp.argsort(low_key, axis=2)[:, :, :low_cap].astype(jnp.int32)
    low = gather(cache, low_idx, n - n_high)
    return high, low


def mixed_precision(
    scorer: Callable[..., Array] | str,
    high_fraction: float = 0.2,
    high_bits: int | None = 8,
    low_bits: int = 2,
    group_size: int = 32,
    residual: int = 128,
    scale_dtype: Any = jnp.bfloat16,
    **scorer_params: Any,
) -> Compressor:
    """Mixed-precision quantization as a Compressor.

    Args:
      scorer: `scorer(cache, obs, **scorer_params) -> [B, Hkv, C]` importance (higher kept at
        high precision), e.g. `kvjax.compress.knorm.knorm_scores`, or a method name whose
        `<name>_scores` function is the scorer ("snapkv", "knorm", ...; as in `adakv`), so a
        sweep can name it: "mixed_precision('snapkv', high_fraction=0.2)".
      high_fraction: share of the tokens outside the residual window kept at high precision,
        in (0, 1] (a static budget from the prompt's capacity, as eviction budgets are).
      high_bits: 8, 4 or 2 (KIVI layout, window left empty), or None for full precision.
      low_bits: 2, 4 or 8 for the other tokens.
      group_size, residual, scale_dtype: as in `kivi`.
    """
    if isinstance(scorer, str):
        from kvjax.compress.adakv import resolve_scorer

        scorer = resolve_scorer(scorer)
    if not callable(scorer):
        raise TypeError(f"scorer must be callable or a method name, got {type(scorer).__name__}")
    if not isinstance(high_fraction, (int, float)) or not 0 < high_fraction <= 1:
        raise ValueError(f"high_fraction must be in (0, 1], got {high_fraction!r}")
    if high_bits is not None:
        packing.check_bits(high_bits)
    check_config(low_bits, group_size, residual)
    if jnp.dtype(scale_dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        raise ValueError(f"scale_dtype must be bfloat16 or float16, got {scale_dtype!r}")
    params = tuple(sorted(scorer_params.items()))
    return _mixed(scorer, params, float(high_fraction), high_bits, low_bits, group_size,
                  residual, jnp.dtype(scale_dtype).name)


@functools.cache
def _mixed(scorer, params, high_fraction, high_bits, low_bits, group_size, residual,
           scale_dtype) -> Compressor:
    sdt = jnp.dtype(scale_dtype)

    def prefill(cache: Any, obs: Observation, state: Any):
        if not isinstance(cache, LayerCache):
            raise TypeError(
                f"mixed_precision quantizes a dense LayerCache, got {type(cache).__name__}"
            )
        c = cache.capacity
        older = group_size * -(-max(c - residual, 0) // group_size)  # outside the window
        budget = min(c, max(1, round(high_fraction * older)))
        scores = scorer(cache, obs, **dict(params))
        if scores.shape != cache.positions.shape:
            raise ValueError(
                f"scorer returned shape {scores.shape}, expected {cache.positions.shape}"
            )
        high, low = split_by_importance(cache, scores, budget, group_size, residual)
        if high_bits is not None:
            high = from_dense(high, high_bits, group_size, 0, sdt)
        low = from_dense(low, low_bits, group_size, residual, sdt)
        return MixedPrecisionLayerCache(high=high, low=low), state

    def decode(cache: Any, obs: Observation, state: Any):
        return cache, state

    return Compressor(init=lambda cache: (), prefill=prefill, decode=decode)
