"""Mustafar: per-token magnitude pruning of keys and values, stored as bitmap + packed values.

Joo et al., "Mustafar: Promoting Unstructured Sparsity for KV Cache Pruning in LLM Inference"
(arXiv:2505.22913, 2025; code dhjoo98/mustafar). Every cached key (and value) vector x in R^D
keeps its k = D - round(s * D) largest-magnitude entries (per-token magnitude pruning, the
paper's best strategy for both K and V), the rest become zero; sparsity s in [0, 1), e.g. 0.5 or
0.7 ("up to 70% without accuracy loss").

Format (`MustafarLayerCache`), per token and head:
    *_vals  [B, H, C, k]                  the kept entries in channel order (cache dtype)
    *_bits  uint32[B, H, C, ceil(D / 32)] bitmap words; bit j of word i = channel 32 i + j kept
Because k is the same for every token, the packed values need no offsets: the i-th set bit of a
token's bitmap is its i-th value (rank = popcount of the bits below it, word by word: what the
GPU kernel computes per element without a prefix sum). Bytes per token and head (bf16,
D = 128): dense 256; s = 0.5: 128 + 16 = 144 (56%); s = 0.7: 76 + 16 = 92 (36%), for keys and
values alike (the bitmap is D / 8 bytes when D is a multiple of 32). (The paper's format uses
tiles with offsets and a dense local window; its reported footprint is "down to 45% of dense".)

Attention: `pallas_kernels.sparse_decode_attention` decodes directly over this format on GPU
(one query token per row; `impl="auto"`); the reference decompresses and runs the dense
reference attention. Tokens written later (decode) are pruned and packed on write.

Use: `chain(snapkv(...), mustafar(0.5))`, or `mustafar(key_sparsity=0.7, value_sparsity=0.5)`.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from kvjax import attention as kvattention
from kvjax import cache as kvcache
from kvjax.cache import LayerCache, register_cache_type
from kvjax.compress.base import Compressor, Observation, State

Array = jax.Array

LOG_COUNT = "log_count"  # merged-slot counts (kvjax.compress.kvmerger) are honoured


def check_sparsity(name: str, s: Any) -> float:
    if not isinstance(s, (int, float)) or isinstance(s, bool) or not 0 <= s < 1:
        raise ValueError(f"{name} must be a float in [0, 1), got {s!r}")
    return float(s)


def keep_count(head_dim: int, sparsity: float) -> int:
    """Entries kept per token: D - round(s * D), at least 1."""
    return max(1, head_dim - int(round(sparsity * head_dim)))


WORD = 32  # bits per bitmap word


def num_words(d: int) -> int:
    """Bitmap words per vector of d channels."""
    return -(-d // WORD)


def sparsify(x: Array, keep: int) -> tuple[Array, Array]:
    """Per-token magnitude pruning of x [..., D] -> (vals [..., keep], uint32[..., ceil(D/32)]).

    Ties keep the lower channel (jax.lax.top_k order).
    """
    d = x.shape[-1]
    _, idx = jax.lax.top_k(jnp.abs(x.astype(jnp.float32)), keep)
    idx = jnp.sort(idx, axis=-1)
    vals = jnp.take_along_axis(x, idx, axis=-1)
    mask = jnp.zeros(x.shape, bool)
    mask = jnp.put_along_axis(mask, idx, True, axis=-1, inplace=False)
    return vals, pack_bits(mask, d)


def pack_bits(mask: Array, d: int) -> Array:
    """bool[..., D] -> uint32[..., ceil(D / 32)]; bit j of word i = channel 32 i + j."""
    nw = num_words(d)
    m = jnp.pad(mask, [(0, 0)] * (mask.ndim - 1) + [(0, nw * WORD - d)])
    m = m.reshape(mask.shape[:-1] + (nw, WORD)).astype(jnp.uint32)
    return jnp.sum(m << jnp.arange(WORD, dtype=jnp.uint32), axis=-1, dtype=jnp.uint32)


def unpack_bits(bits: Array, d: int) -> Array:
    """uint32[..., ceil(D / 32)] -> bool[..., D]."""
    shifts = jnp.arange(WORD, dtype=jnp.uint32)
    m = (bits[..., None] >> shifts) & jnp.uint32(1)
    return m.reshape(bits.shape[:-1] + (-1,))[..., :d].astype(bool)


def densify(vals: Array, bits: Array, d: int) -> Array:
    """(vals [..., k], bits) -> [..., D]: entry c is vals[rank(c)] where bit c is set, else 0."""
    mask = unpack_bits(bits, d)
    rank = jnp.cumsum(mask, axis=-1) - 1
    picked = jnp.take_along_axis(vals, jnp.clip(rank, 0, vals.shape[-1] - 1), axis=-1)
    return jnp.where(mask, picked, jnp.zeros((), vals.dtype))


@struct.dataclass
class MustafarLayerCache:
    """Sparse K/V: *_vals [B, H, C, k], *_bits uint32[B, H, C, ceil(D/32)] (module docstring)."""

    k_vals: Array
    k_bits: Array
    v_vals: Array
    v_bits: Array
    lengths: Array
    positions: Array
    slot_data: dict[str, Array] = struct.field(default_factory=dict)
    head_dim: int = struct.field(pytree_node=False, default=0)
    value_dim: int = struct.field(pytree_node=False, default=0)

    @property
    def capacity(self) -> int:
        return self.k_vals.shape[2]

    @property
    def num_heads(self) -> int:
        return self.k_vals.shape[1]

    @property
    def key_keep(self) -> int:
        return self.k_vals.shape[3]

    @property
    def value_keep(self) -> int:
        return self.v_vals.shape[3]

    def _view(self) -> LayerCache:
        data = {**self.slot_data, "_k_bits": self.k_bits, "_v_bits": self.v_bits}
        return LayerCache(self.k_vals, self.v_vals, self.lengths, self.positions, data)

    def _with(self, layer: LayerCache) -> MustafarLayerCache:
        data = dict(layer.slot_data)
        kb, vb = data.pop("_k_bits"), data.pop("_v_bits")
        return self.replace(k_vals=layer.keys, v_vals=layer.values, k_bits=kb, v_bits=vb,
                            lengths=layer.lengths, positions=layer.positions, slot_data=data)

    def write(self, keys, values, positions, num_valid=None) -> MustafarLayerCache:
        kv, kb = sparsify(keys, self.key_keep)
        vv, vb = sparsify(values, self.value_keep)
        layer = kvcache.write(self._view(), kv, vv, positions, num_valid,
                              slot_data={"_k_bits": kb, "_v_bits": vb})
        return self._with(layer)

    def grow(self, capacity: int) -> MustafarLayerCache:
        return self._with(kvcache.grow(self._view(), capacity))

    def dense(self) -> LayerCache:
        """The pruned cache as a dense LayerCache (zeros where pruned): the reference."""
        return LayerCache(
            keys=densify(self.k_vals, self.k_bits, self.head_dim),
            values=densify(self.v_vals, self.v_bits, self.value_dim),
            lengths=self.lengths, positions=self.positions, slot_data=self.slot_data,
        )


register_cache_type(MustafarLayerCache)


def compress(cache: LayerCache, key_sparsity: float, value_sparsity: float) -> MustafarLayerCache:
    """Prunes and packs a dense layer (empty slots are packed too; they stay masked)."""
    d, dv = cache.head_dim, cache.values.shape[-1]
    kv, kb = sparsify(cache.keys, keep_count(d, key_sparsity))
    vv, vb = sparsify(cache.values, keep_count(dv, value_sparsity))
    return MustafarLayerCache(
        k_vals=kv, k_bits=kb, v_vals=vv, v_bits=vb, lengths=cache.lengths,
        positions=cache.positions, slot_data=dict(cache.slot_data), head_dim=d, value_dim=dv,
    )


def attention_bias(layer: MustafarLayerCache, sliding_window: int | None,
                   q_position: Array | None = None) -> Array | None:
    """float32[B, H, C] logit bias for the kernel, or None when counts-only masking is exact.

    Needed when slots carry merge counts (log_count), when the model has a sliding window, or
    for slots inside `lengths` that are empty (position -1). Masked slots get -1e30.
    """
    lc = layer.slot_data.get(LOG_COUNT)
    if lc is None and sliding_window is None:
        return None
    ok = layer.positions >= 0
    if sliding_window is not None and q_position is not None:
        ok = ok & (q_position[:, None, None] - layer.positions < sliding_window)
    base = jnp.zeros(layer.positions.shape, jnp.float32) if lc is None else lc.astype(jnp.float32)
    return jnp.where(ok, base, -1e30)


def _attend(q, q_positions, layer, scale=None, sliding_window=None, impl="auto"):
    b, hq, t, d = q.shape
    if d != layer.head_dim:
        raise ValueError(f"q head dim {d} != cache head dim {layer.head_dim}")
    if impl == "auto" and t == 1 and jax.default_backend() == "gpu":
        from pallas_kernels import sparse_decode_attention as sda

        if sda.supported(layer.head_dim, layer.value_dim):
            out = sda.sparse_decode_attention(
                q[:, :, 0], layer.k_vals, layer.k_bits, layer.v_vals, layer.v_bits,
                layer.lengths, scale=scale, value_dim=layer.value_dim,
                bias=attention_bias(layer, sliding_window, q_positions[:, 0]),
            )
            return out[:, :, None]
    return kvattention.reference_attention(q, q_positions, layer.dense(), scale, sliding_window)


kvattention.register(MustafarLayerCache, _attend)


@functools.cache
def mustafar(
    sparsity: float | None = None,
    key_sparsity: float | None = None,
    value_sparsity: float | None = None,
) -> Compressor:
    """Mustafar pruning at prefill (the layer becomes a `MustafarLayerCache`).

    Args:
      sparsity: fraction in [0, 1) of each key and value vector pruned; or separately
      key_sparsity / value_sparsity (each in [0, 1); a missing one defaults to `sparsity`).
    """
    if sparsity is None and (key_sparsity is None or value_sparsity is None):
        raise ValueError("give sparsity in [0, 1), or both key_sparsity and value_sparsity")
    ks = check_sparsity("key_sparsity", sparsity if key_sparsity is None else key_sparsity)
    vs = check_sparsity("value_sparsity", sparsity if value_sparsity is None else value_sparsity)

    def prefill(cache: LayerCache, obs: Observation, state: State):
        if type(cache) is not LayerCache:
            raise TypeError(f"mustafar prunes a dense LayerCache, got {type(cache).__name__}")
        return compress(cache, ks, vs), state

    return Compressor(init=lambda cache: (), prefill=prefill, decode=lambda c, o, s: (c, s))


def bytes_per_token(head_dim: int, sparsity: float, itemsize: int = 2) -> int:
    """Stored bytes of one vector: packed values + bitmap words (dense: head_dim * itemsize)."""
    return keep_count(head_dim, sparsity) * itemsize + 4 * num_words(head_dim)

