"""KIVI: tuning-free asymmetric 2-bit quantization of the KV cache (Liu et al., ICML 2024,
arXiv:2402.02750).

Keys are quantized per channel over groups of G tokens along the sequence (key outliers live in
fixed channels), values per token over groups of G channels; both asymmetric (scale and zero
point), at 2 bits (also 4 and 8). The R most recent tokens stay in full precision in a residual
window; when a new token finds the window full, its oldest G tokens are quantized (one key group)
and moved to the quantized part. Paper defaults: G = 32, R = 128.

    comp = kvjax.quant.kivi(bits=2)                                    # a Compressor
    out = kvjax.generate(model, tokens, 64, compressor=comp)
    comp = kvjax.compress.chain(kvjax.compress.snapkv(budget=2048), kvjax.quant.kivi(bits=2))

`kivi().prefill` turns the layer's dense `LayerCache` into a `QuantizedLayerCache`; decoding then
appends into the residual window (`QuantizedLayerCache.write`), so `decode` has nothing to do.

QuantizedLayerCache layout (B batch, H KV heads, D head dim, G group, P = 32 // bits groups per
uint32 word, Nb blocks of P groups, Ng = Nb * P groups, R residual slots):
  k_codes, v_codes      uint32[B, H, Nb, G, D]  packed codes (`kvjax.quant.packing`)
  k_scale, k_zero       [B, H, Ng, D]           per key group and channel (16-bit, default bf16)
  v_scale, v_zero       [B, H, Ng, D // G, G]   per token and channel group (16-bit)
  quant_positions       int32[B, Hp, Ng * G]    original positions of quantized tokens; -1 empty
                                                Hp = H (per head) or 1 (shared by the heads)
  num_quantized         int32[B, H]             quantized tokens [0, n) are valid
  residual_keys/values  [B, H, R, D]            full precision (the model's dtype), oldest first
  residual_positions    int32[B, H, R]          -1 for empty slots
  num_residual          int32[B, H]             residual slots [0, n) are valid
The int4 layout (`kivi(bits=4, layout="int4")`, for the Hopper kernel
`pallas_kernels/quantized_decode_attention_mgpu.py`) stores the same codes unpacked as signed
int4 (code - 8), keys token-major and values channel-major; everything else is as above:
  k_codes               int4[B, H, Ng * G, D]
  v_codes               int4[B, H, D, Ng * G]
The words layout (`kivi(bits, layout="words")`, 4 or 2 bits, head dim a multiple of 64, G in
16 / 32 / 64 at 4 bits and 32 / 64 at 2 bits) stores the codes of each 64 x 64 tile (keys:
64 tokens x 64 channels; values: 64 channels x 64 tokens) in the order the threads of a
Hopper warpgroup hold them in WGMMA registers (`quantized_decode_attention_mgpu.pack_words`:
one 16- or 8-byte load per thread and tile, unpacked with shifts and masks, no Mosaic upcast,
so 2 bits work too):
  k_codes, v_codes      uint32[B, H, Ng * G / 64, D / 64, 2 * bits, 64]
A flush writes whole words (a group of G tokens owns whole words of its tile at these G).
Bits, G, R, Hp and the layout follow from the array shapes and dtypes (no static fields), so
save/restore is plain arrays. Token slots (`capacity`, `positions`) are the quantized slots
followed by the residual slots; a slot holds a token iff its position is >= 0.

Shared positions (`kivi(..., head_positions=False)`): when every KV head of a row holds the same
tokens in the same slots (a cache no per-head method touched: the prefill of a plain model),
`quant_positions` is stored once per row ([B, 1, Ng * G], read broadcast over the heads). The
heads then flush together, so the invariant holds through decoding. After per-head eviction
(`chain(snapkv(...), kivi(...))`) positions differ by head: keep the default
`head_positions=True`. The residual window's positions are always per head (R slots).

Memory per token and KV head (D = 128, G = 32, bf16 scale/zero): codes + scales + zeros are
2-bit 96 bytes, 4-bit 160, 8-bit 288, plus the int32 position (4 bytes per head, or 4 / H
shared), versus 516 for a bf16 LayerCache (keys + values + int32 position per head). Measured
on the real arrays at 32k tokens, 8 KV heads, R = 128 (tests/test_quant_kivi.py): shared
positions 2-bit 0.1909x, 4-bit 0.3150x of the bf16 LayerCache; per-head 0.1977x, 0.3217x.

Capacity granularity: the quantized part is allocated in whole blocks of P groups (P * G
tokens: 128 / 256 / 512 at 8 / 4 / 2 bits with G = 32, at least one block) plus R residual
slots, so the ratios above hold for caches much longer than P * G + R. A 512-token cache of
the shipped lm_tiny (head dim 32, f32) at 4 bits is 0.42x, and chain(snapkv, kivi4) stays at
0.33x for every SnapKV ratio up to 0.75 (the evicted 128-384 tokens fit one block + R); at
4096 tokens the composition follows the ratio (tests/test_eval_runner.py).
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
from kvjax.cache import LayerCache
from kvjax.compress.base import Compressor, Observation
from kvjax.quant import packing

Array = jax.Array


@struct.dataclass
class QuantizedLayerCache:
    k_codes: Array
    k_scale: Array
    k_zero: Array
    v_codes: Array
    v_scale: Array
    v_zero: Array
    quant_positions: Array
    num_quantized: Array
    residual_keys: Array
    residual_values: Array
    residual_positions: Array
    num_residual: Array

    # --- static facts, read off the shapes -------------------------------------------------
    @property
    def int4_layout(self) -> bool:
        """True for the unpacked signed-int4 layout (module docstring), False for packed words."""
        return self.k_codes.dtype == jnp.int4

    @property
    def words_layout(self) -> bool:
        """True for the words layout (module docstring: per-thread WGMMA order)."""
        return self.k_codes.ndim == 6

    @property
    def bits(self) -> int:
        if self.int4_layout:
            return 4
        if self.words_layout:
            return self.k_codes.shape[4] // 2
        return 32 // (self.k_scale.shape[2] // self.k_codes.shape[2])

    @property
    def group_size(self) -> int:
        if self.int4_layout or self.words_layout:
            return self.quantized_capacity // self.k_scale.shape[2]
        return self.k_codes.shape[3]

    @property
    def residual_size(self) -> int:
        return self.residual_keys.shape[2]

    @property
    def batch(self) -> int:
        return self.k_codes.shape[0]

    @property
    def num_heads(self) -> int:
        return self.k_codes.shape[1]

    @property
    def head_dim(self) -> int:
        return self.k_scale.shape[-1]

    @property
    def quantized_capacity(self) -> int:
        return self.quant_positions.shape[2]

    @property
    def head_positions(self) -> bool:
        """False when quant_positions is shared by the heads ([B, 1, Ng * G], H > 1)."""
        return self.quant_positions.shape[1] == self.num_heads

    def head_quant_positions(self) -> Array:
        """int32[B, H, Ng * G] quant_positions (broadcast when shared)."""
        b, h = self.num_quantized.shape
        return jnp.broadcast_to(self.quant_positions, (b, h, self.quantized_capacity))

    # --- the cache-kind protocol -----------------------------------------------------------
    @property
    def capacity(self) -> int:
        return self.quantized_capacity + self.residual_size

    @property
    def lengths(self) -> Array:
        return (self.num_quantized + self.num_residual).astype(jnp.int32)

    @property
    def positions(self) -> Array:
        return jnp.concatenate([self.head_quant_positions(), self.residual_positions], axis=2)

    def write(self, keys: Array, values: Array, positions: Array,
              num_valid: Array | None = None) -> QuantizedLayerCache:
        """Appends T tokens per head to the residual window (`kvjax.cache.write` semantics).

        keys, values [B, H, T, D]; positions int32[B, T]; num_valid int32[B] (default T).
        Before each append, a head whose window is full moves its oldest G tokens to the
        quantized part. Tokens that find both parts full are dropped (capacities are static;
        `grow` makes room).
        """
        b, h, t, _ = keys.shape
        if num_valid is None:
            num_valid = jnp.full((b,), t, jnp.int32)
        return _write(self, keys, values, positions, num_valid)

    def grow(self, capacity: int) -> QuantizedLayerCache:
        """Room for at least `capacity` token slots (the quantized part grows by whole blocks of
        P groups, so the result may hold more; a smaller `capacity` returns the cache as is)."""
        g, per = self.group_size, 32 // self.bits
        ng_old = self.k_scale.shape[2]
        ng = _round_up(-(-(capacity - self.residual_size) // g), per)
        if ng <= ng_old:
            return self
        extra = ng - ng_old

        def pad(arr: Array, n: int, value: Any = 0) -> Array:
            widths = [(0, 0)] * arr.ndim
            widths[2] = (0, n)
            return jnp.pad(arr, widths, constant_values=value)

        if self.int4_layout:  # empty slots hold code 0 (int4 -8), as in the packed layout
            k_codes = pad(self.k_codes, extra * g, -8)
            v_codes = jnp.pad(self.v_codes, [(0, 0)] * 3 + [(0, extra * g)],
                              constant_values=-8)
        elif self.words_layout:  # whole 64-token tiles (P * G is a multiple of 64)
            tiles = extra * g // 64
            k_codes, v_codes = pad(self.k_codes, tiles), pad(self.v_codes, tiles)
        else:
            k_codes, v_codes = pad(self.k_codes, extra // per), pad(self.v_codes, extra // per)
        return self.replace(
            k_codes=k_codes,
            k_scale=pad(self.k_scale, extra),
            k_zero=pad(self.k_zero, extra),
            v_codes=v_codes,
            v_scale=pad(self.v_scale, extra),
            v_zero=pad(self.v_zero, extra),
            quant_positions=pad(self.quant_positions, extra * g, -1),
        )

    # --- reading ---------------------------------------------------------------------------
    def dequantize(self) -> tuple[Array, Array]:
        """float32 (keys, values) [B, H, Ng * G, D] of the quantized part."""
        b, h, ng, d = self.k_scale.shape
        g = self.group_size
        kc, vc = self.codes()
        kc = kc.reshape(b, h, ng, g, d)
        keys = packing.dequantize(kc, self.k_scale[:, :, :, None], self.k_zero[:, :, :, None])
        vs = jnp.swapaxes(self.v_scale, 3, 4).reshape(b, h, ng * g, -1)
        vz = jnp.swapaxes(self.v_zero, 3, 4).reshape(b, h, ng * g, -1)
        values = packing.dequantize_values(vc, jnp.swapaxes(vs, 2, 3), jnp.swapaxes(vz, 2, 3))
        return keys.reshape(b, h, ng * g, d), values

    def codes(self) -> tuple[Array, Array]:
        """(key codes, value codes) uint32[B, H, Ng * G, D] in token order, either layout."""
        b, h, _, d = self.k_scale.shape
        if self.int4_layout:
            return from_int4(self.k_codes), jnp.swapaxes(from_int4(self.v_codes), 2, 3)
        if self.words_layout:
            return from_words(self.k_codes, self.v_codes, self.bits)
        kc = packing.unpack(self.k_codes, self.bits).reshape(b, h, -1, d)
        return kc, packing.unpack(self.v_codes, self.bits).reshape(b, h, -1, d)

    def to_dense(self, dtype: Any = jnp.float32) -> LayerCache:
        """A dense LayerCache of the same slots (validity by position >= 0; the reference)."""
        return _to_dense(self, jnp.dtype(dtype))


@functools.partial(jax.jit, static_argnums=1)
def _to_dense(c: QuantizedLayerCache, dtype: Any) -> LayerCache:
    keys, values = c.dequantize()
    keys = jnp.concatenate([keys, c.residual_keys.astype(jnp.float32)], axis=2)
    values = jnp.concatenate([values, c.residual_values.astype(jnp.float32)], axis=2)
    return LayerCache(
        keys=keys.astype(dtype),
        values=values.astype(dtype),
        lengths=jnp.full(c.lengths.shape, c.capacity, jnp.int32),
        positions=_valid_positions(c),
    )


kvcache.register_cache_type(QuantizedLayerCache)


@jax.jit
def _write(cache: QuantizedLayerCache, keys: Array, values: Array, positions: Array,
           num_valid: Array) -> QuantizedLayerCache:
    if keys.shape[2] == 1:
        return _append(cache, keys[:, :, 0], values[:, :, 0], positions[:, 0], num_valid > 0)

    def step(cache, xs):
        k, v, p, i = xs
        return _append(cache, k, v, p, i < num_valid), None

    xs = (jnp.moveaxis(keys, 2, 0), jnp.moveaxis(values, 2, 0), jnp.moveaxis(positions, 1, 0),
          jnp.arange(keys.shape[2]))
    return jax.lax.scan(step, cache, xs)[0]


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def to_int4(codes: Array) -> Array:
    """4-bit codes (unsigned, [0, 16)) -> the int4 layout's signed int4 (code - 8)."""
    return (codes.astype(jnp.int32) - 8).astype(jnp.int4)


def from_int4(codes: Array) -> Array:
    """The int4 layout's signed codes -> uint32 codes in [0, 16)."""
    return (codes.astype(jnp.int32) + 8).astype(jnp.uint32)


def to_words(kc: Array, vc: Array, bits: int) -> tuple[Array, Array]:
    """Codes [B, H, C, D] (keys, values; unsigned, token order) -> the words layout's
    (k_codes, v_codes), uint32 [B, H, C / 64, D / 64, 2 bits, 64]."""
    from pallas_kernels.quantized_decode_attention_mgpu import pack_words  # noqa: PLC0415

    xp = np if isinstance(vc, np.ndarray) else jnp  # numpy in, numpy out (static tables)
    vw = pack_words(xp.swapaxes(vc, 2, 3), bits)  # [B, H, D / 64, C / 64, ...]
    return pack_words(kc, bits), xp.swapaxes(vw, 2, 3)


def from_words(k_codes: Array, v_codes: Array, bits: int) -> tuple[Array, Array]:
    """Inverse of `to_words`: uint32 codes [B, H, C, D] of keys and values."""
    from pallas_kernels.quantized_decode_attention_mgpu import unpack_words_reference  # noqa: PLC0415

    vt = unpack_words_reference(jnp.swapaxes(v_codes, 2, 3), bits)
    return unpack_words_reference(k_codes, bits), jnp.swapaxes(vt, 2, 3)


def _valid_positions(c: QuantizedLayerCache) -> Array:
    qvalid = jnp.arange(c.quantized_capacity)[None, None] < c.num_quantized[:, :, None]
    rvalid = jnp.arange(c.residual_size)[None, None] < c.num_residual[:, :, None]
    return jnp.concatenate(
        [jnp.where(qvalid, c.head_quant_positions(), -1),
         jnp.where(rvalid, c.residual_positions, -1)],
        axis=2,
    )


LAYOUTS = ("packed", "int4", "words")
WORDS_GROUPS = {4: (16, 32, 64), 2: (32, 64)}  # G owning whole words of its 64-token tile


def check_config(bits: Any, group_size: Any, residual: Any, layout: Any = "packed") -> None:
    """ValueError unless bits in {2, 4, 8}, group_size >= 1, residual a multiple of it and
    layout "packed", (4 bits only) "int4" or (4 or 2 bits, G in `WORDS_GROUPS`) "words"."""
    packing.check_bits(bits)
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if layout == "int4" and bits != 4:
        raise ValueError(f'layout="int4" stores 4-bit codes: bits must be 4, got {bits}')
    if layout == "words" and group_size not in WORDS_GROUPS.get(bits, ()):
        raise ValueError(f'layout="words" takes bits 4 with group_size in {WORDS_GROUPS[4]} or '
                         f"bits 2 with group_size in {WORDS_GROUPS[2]}, got bits {bits}, "
                         f"group_size {group_size!r}")
    if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size < 1:
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")
    if not isinstance(residual, int) or isinstance(residual, bool):
        raise ValueError(f"residual must be an int, got {residual!r}")
    if residual < group_size or residual % group_size:
        raise ValueError(
            f"residual ({residual}) must be a positive multiple of group_size ({group_size}): "
            "the window hands G tokens at a time to the quantized part"
        )


def _check_head_dim(head_dim: int, group_size: int, layout: str = "packed") -> None:
    if head_dim % group_size:
        raise ValueError(
            f"group_size ({group_size}) must divide the head dim ({head_dim}): values are "
            "quantized in groups of group_size channels"
        )
    if layout == "words" and head_dim % 64:
        raise ValueError(f'layout="words" needs a head dim that is a multiple of 64 (64 x 64 '
                         f"tiles), got {head_dim}")


def from_dense(
    layer: LayerCache,
    bits: int,
    group_size: int = 32,
    residual: int = 128,
    scale_dtype: Any = jnp.bfloat16,
    head_positions: bool = True,
    layout: str = "packed",
) -> QuantizedLayerCache:
    """Quantizes a dense LayerCache (valid slots [0, lengths) in order, oldest first).

    Each head keeps its newest tokens in the residual window (at most `residual`, the rest in
    whole groups of G); with residual = 0 everything is quantized, the last group of a head may
    be partial, and an empty window of G slots is allocated (zero-size arrays cannot be saved;
    with a partial group nothing is ever flushed, so such a cache is meant to stay as built).
    Slot data is not carried over.

    head_positions=False stores the quantized tokens' positions once per row (module
    docstring); every head of a row must then hold the same lengths and positions, which is
    checked (ValueError) when `layer` is concrete, i.e. called outside jit.

    layout: "packed" (uint32 words), at 4 bits "int4", at 4 or 2 bits "words" (module
      docstring).
    """
    check_config(bits, group_size, residual if residual else group_size, layout)  # 0: no window
    if not head_positions:
        _check_shared(layer)
    return _from_dense(layer, bits, group_size, residual, scale_dtype, bool(head_positions),
                       layout)


def _check_shared(layer: LayerCache) -> None:
    """ValueError if a concrete layer's heads hold different lengths or valid positions."""
    slot = jnp.arange(layer.capacity)[None, None]
    pos = jnp.where(slot < layer.lengths[:, :, None], layer.positions, -1)
    same = jnp.all(layer.lengths == layer.lengths[:, :1]) & jnp.all(pos == pos[:, :1])
    try:
        same = bool(same)
    except jax.errors.ConcretizationTypeError:  # traced (under jit): not checkable
        return
    if not same:
        raise ValueError(
            "head_positions=False needs every KV head of a row to hold the same tokens (an "
            "un-evicted cache); this cache's heads differ in lengths or positions (after "
            "per-head eviction use head_positions=True)"
        )


@functools.partial(
    jax.jit,
    static_argnames=("bits", "group_size", "residual", "scale_dtype", "head_positions", "layout"),
)
def _from_dense(
    layer: LayerCache,
    bits: int,
    group_size: int,
    residual: int,
    scale_dtype: Any,
    head_positions: bool,
    layout: str,
) -> QuantizedLayerCache:
    g = group_size  # checked by from_dense
    b, h, c, d = layer.keys.shape
    _check_head_dim(d, g, layout)
    per = 32 // bits
    n = jnp.minimum(layer.lengths, c).astype(jnp.int32)
    if residual:
        nq = g * (-(-jnp.maximum(n - residual, 0) // g))
    else:
        nq = n
    nr = n - nq
    ng = max(_round_up(-(-max(c - residual, 0) // g), per), per)  # at least one block
    cq = ng * g

    def pad_to(arr: Array, size: int, value: Any = 0) -> Array:
        if arr.shape[2] >= size:
            return arr[:, :, :size]
        widths = [(0, 0)] * arr.ndim
        widths[2] = (0, size - arr.shape[2])
        return jnp.pad(arr, widths, constant_values=value)

    tok = jnp.arange(cq)[None, None, :]
    qvalid = tok < nq[:, :, None]  # [B, H, Cq]
    keys = pad_to(layer.keys, cq).reshape(b, h, ng, g, d)
    kc, ks, kz = packing.quantize_keys(keys, qvalid.reshape(b, h, ng, g), bits, scale_dtype)
    values = pad_to(layer.values, cq).reshape(b, h, ng, g, d)
    vc, vs, vz = packing.quantize_values(values, g, bits, scale_dtype)  # [B,H,Ng,G,D], [..,D/G,G]
    vmask = qvalid.reshape(b, h, ng, 1, g)
    vc = jnp.where(qvalid.reshape(b, h, ng, g, 1), vc, 0).astype(jnp.uint32)
    qpos = jnp.where(qvalid, pad_to(layer.positions, cq, -1), -1).astype(jnp.int32)
    if not head_positions:
        qpos = qpos[:, :1]  # the heads agree (see from_dense)

    r = residual if residual else g
    idx = nq[:, :, None] + jnp.arange(r)[None, None, :]  # [B, H, R]
    rvalid = idx < n[:, :, None]
    idx = jnp.clip(idx, 0, max(c - 1, 0))

    def take(arr: Array) -> Array:
        ix = idx.reshape(idx.shape + (1,) * (arr.ndim - 3))
        return jnp.take_along_axis(arr, ix, axis=2)

    zero = jnp.zeros((), layer.keys.dtype)
    if layout == "int4":  # token-major keys, channel-major values
        k_codes = to_int4(kc.reshape(b, h, cq, d))
        v_codes = jnp.swapaxes(to_int4(vc.reshape(b, h, cq, d)), 2, 3)
    elif layout == "words":  # cq = P * G tokens per block: a multiple of 64
        k_codes, v_codes = to_words(kc.reshape(b, h, cq, d), vc.reshape(b, h, cq, d), bits)
    else:
        k_codes, v_codes = packing.pack(kc, bits), packing.pack(vc, bits)
    return QuantizedLayerCache(
        k_codes=k_codes,
        k_scale=ks,
        k_zero=kz,
        v_codes=v_codes,
        v_scale=jnp.where(vmask, vs, 0).astype(scale_dtype),
        v_zero=jnp.where(vmask, vz, 0).astype(scale_dtype),
        quant_positions=qpos,
        num_quantized=nq.astype(jnp.int32),
        residual_keys=jnp.where(rvalid[..., None], take(layer.keys), zero),
        residual_values=jnp.where(rvalid[..., None], take(layer.values), zero),
        residual_positions=jnp.where(rvalid, take(layer.positions), -1).astype(jnp.int32),
        num_residual=nr.astype(jnp.int32),
    )


def _flush(c: QuantizedLayerCache, mask: Array) -> QuantizedLayerCache:
    """Moves the oldest G residual tokens of the heads in `mask` (bool[B, H]) to a new group."""
    g, bits = c.group_size, c.bits
    per = 32 // bits
    b, h = mask.shape
    ng = c.k_scale.shape[2]
    kc, ks, kz = packing.quantize_keys(
        c.residual_keys[:, :, None, :g], jnp.ones((b, h, 1, g), bool), bits, c.k_scale.dtype
    )
    vc, vs, vz = packing.quantize_values(c.residual_values[:, :, :g], g, bits, c.v_scale.dtype)
    gi = c.num_quantized // g  # [B, H] the group to fill
    bi = jnp.arange(b)[:, None]
    hi = jnp.arange(h)[None, :]
    gi_idx = jnp.where(mask, gi, ng)  # out of range: dropped
    slots = jnp.where(mask[..., None], gi[..., None] * g + jnp.arange(g), ng * g)  # [B, H, G]
    bi3, hi3 = bi[..., None], hi[..., None]
    if c.int4_layout:  # G token rows of keys, G token columns of values
        k_codes = c.k_codes.at[bi3, hi3, slots].set(to_int4(kc[:, :, 0]), mode="drop")
        v_codes = c.v_codes.at[bi3, hi3, :, slots].set(to_int4(vc), mode="drop")
    elif c.words_layout:
        k_codes, v_codes = _flush_words(c, kc[:, :, 0], vc, gi * g, mask)
    else:  # or the codes into bit field j of the block's words
        nb = c.k_codes.shape[2]
        blk, j = gi // per, (gi % per).astype(jnp.uint32)
        shift = (j * bits)[:, :, None, None]
        old_k = c.k_codes[bi, hi, jnp.minimum(blk, nb - 1)]  # [B, H, G, D]
        old_v = c.v_codes[bi, hi, jnp.minimum(blk, nb - 1)]
        blk_idx = jnp.where(mask, blk, nb)
        k_codes = c.k_codes.at[bi, hi, blk_idx].set(old_k | (kc[:, :, 0] << shift), mode="drop")
        v_codes = c.v_codes.at[bi, hi, blk_idx].set(old_v | (vc << shift), mode="drop")
    roll = lambda x, fill: jnp.concatenate(  # noqa: E731
        [x[:, :, g:], jnp.full_like(x[:, :, :g], fill)], axis=2
    )
    m4 = mask[:, :, None, None]
    if c.head_positions:
        qpos = c.quant_positions.at[bi3, hi3, slots].set(
            c.residual_positions[:, :, :g], mode="drop"
        )
    else:  # shared: the heads of a row flush together (head 0 speaks for them)
        qpos = c.quant_positions.at[bi3, 0, slots[:, :1]].set(
            c.residual_positions[:, :1, :g], mode="drop"
        )
    return c.replace(
        k_codes=k_codes,
        v_codes=v_codes,
        k_scale=c.k_scale.at[bi, hi, gi_idx].set(ks[:, :, 0], mode="drop"),
        k_zero=c.k_zero.at[bi, hi, gi_idx].set(kz[:, :, 0], mode="drop"),
        v_scale=c.v_scale.at[bi, hi, gi_idx].set(vs, mode="drop"),
        v_zero=c.v_zero.at[bi, hi, gi_idx].set(vz, mode="drop"),
        quant_positions=qpos,
        num_quantized=c.num_quantized + g * mask,
        residual_keys=jnp.where(m4, roll(c.residual_keys, 0), c.residual_keys),
        residual_values=jnp.where(m4, roll(c.residual_values, 0), c.residual_values),
        residual_positions=jnp.where(
            mask[..., None], roll(c.residual_positions, -1), c.residual_positions
        ),
        num_residual=c.num_residual - g * mask,
    )


def _flush_words(c: QuantizedLayerCache, kc: Array, vc: Array, start: Array, mask: Array
                 ) -> tuple[Array, Array]:
    """Words-layout codes with the new group (codes kc, vc [B, H, G, D], first token `start`
    int32[B, H]) written where `mask`: the group's 64-token tile is packed with the G codes at
    their offset and replaces exactly the words that hold the group's tokens (`_group_words`;
    `WORDS_GROUPS` makes them whole words)."""
    g, bits = c.group_size, c.bits
    b, h, nt = c.k_codes.shape[:3]
    tile, off = start // 64, start % 64
    row = jnp.arange(64)[None, None, :] - off[:, :, None]  # [B, H, 64] index into the group
    inside = ((row >= 0) & (row < g))[..., None]
    at = jnp.clip(row, 0, g - 1)[..., None]

    def place(x):  # [B, H, G, D] -> [B, H, 64, D], zeros outside the group
        return jnp.where(inside, jnp.take_along_axis(x, at, axis=2), 0).astype(jnp.uint32)

    kw, vw = to_words(place(kc), place(vc), bits)
    kmask, vmask = (jnp.asarray(m)[off // g] for m in _group_words(g, bits, c.head_dim))
    bi, hi = jnp.arange(b)[:, None], jnp.arange(h)[None, :]
    old_tile = jnp.minimum(tile, nt - 1)
    dest = jnp.where(mask, tile, nt)  # out of range: dropped

    def update(codes, new, sel):
        merged = jnp.where(sel, new[:, :, 0], codes[bi, hi, old_tile])
        return codes.at[bi, hi, dest].set(merged, mode="drop")

    return update(c.k_codes, kw, kmask), update(c.v_codes, vw, vmask)


@functools.cache
def _group_words(g: int, bits: int, d: int) -> tuple[np.ndarray, np.ndarray]:
    """bool[64 / G, D / 64, 2 bits, 64] per group offset in a tile: the words of the keys' and
    the values' tile that hold the group's codes (the words layout of a tile of ones there)."""
    ones = np.zeros((1, 64 // g, 64, d), np.uint32)
    for i in range(64 // g):
        ones[0, i, i * g:(i + 1) * g] = 1
    kw, vw = to_words(ones, ones, bits)
    return kw[0, :, 0] != 0, vw[0, :, 0] != 0


def _append(c: QuantizedLayerCache, k: Array, v: Array, pos: Array, valid: Array):
    """One token per row (k, v [B, H, D], pos int32[B], valid bool[B]) into the residual."""
    r = c.residual_size
    room = c.num_quantized // c.group_size < c.k_scale.shape[2]
    full = (c.num_residual >= r) & valid[:, None]
    c = _flush(c, full & room & (c.num_quantized % c.group_size == 0))
    b, h = c.num_residual.shape
    ok = valid[:, None] & (c.num_residual < r)
    slot = jnp.where(ok, c.num_residual, r)
    bi = jnp.arange(b)[:, None]
    hi = jnp.arange(h)[None, :]
    pos = jnp.broadcast_to(pos[:, None], (b, h)).astype(jnp.int32)
    return c.replace(
        residual_keys=c.residual_keys.at[bi, hi, slot].set(
            k.astype(c.residual_keys.dtype), mode="drop"
        ),
        residual_values=c.residual_values.at[bi, hi, slot].set(
            v.astype(c.residual_values.dtype), mode="drop"
        ),
        residual_positions=c.residual_positions.at[bi, hi, slot].set(pos, mode="drop"),
        num_residual=c.num_residual + ok,
    )


# --- attention -------------------------------------------------------------------------------


def use_kernel(layer: QuantizedLayerCache, q: Array, sliding_window: int | None,
               impl: str) -> bool:
    """The Triton kernel serves packed-layout decode (one query per row, no window) on GPU."""
    from pallas_kernels import quantized_decode_attention as qda

    return (
        impl == "auto" and kvattention.kernel_platform() == "gpu" and q.shape[2] == 1
        and sliding_window is None and not layer.int4_layout and not layer.words_layout
        and qda.supported(layer.head_dim, layer.group_size, layer.residual_size)
    )


def use_mgpu_kernel(layer: QuantizedLayerCache, q: Array, sliding_window: int | None,
                    impl: str) -> bool:
    """The Mosaic GPU kernel serves int4- and words-layout decode on Hopper (bf16 queries and
    scales); other calls over these layouts take the reference."""
    from pallas_kernels import quantized_decode_attention_mgpu as qm

    return (
        impl == "auto" and (layer.int4_layout or layer.words_layout)
        and kvattention.kernel_platform() == "gpu"
        and q.shape[2] == 1 and sliding_window is None
        and qm.supported(q.dtype, q.shape[1] // layer.num_heads, layer.head_dim,
                         layer.group_size, layer.head_dim // layer.v_scale.shape[3],
                         layer.k_scale.dtype, layer.quantized_capacity)
        and qm.on_hopper()
    )


def use_tpu_kernel(layer: QuantizedLayerCache, q: Array, sliding_window: int | None,
                   impl: str) -> bool:
    """The TPU kernel serves packed-layout decode (one query per row, no window, bf16 scales)
    on TPU where `kvjax.attention.TPU_DECODE_KERNEL` is set (compiled, not yet run on a TPU)."""
    from pallas_kernels import quantized_decode_attention_tpu as qt

    return (
        impl == "auto" and kvattention.TPU_DECODE_KERNEL
        and kvattention.kernel_platform() == "tpu" and q.shape[2] == 1
        and sliding_window is None and not layer.int4_layout and not layer.words_layout
        and qt.supported(q, layer.k_scale)
    )


def kernel_arrays(layer: QuantizedLayerCache) -> tuple[Array, ...]:
    """The cache's arrays in the quantized decode kernels' argument order (after q): codes,
    scales and zero points of keys then values, num_quantized, the residual window and its
    count."""
    return (layer.k_codes, layer.k_scale, layer.k_zero, layer.v_codes, layer.v_scale,
            layer.v_zero, layer.num_quantized, layer.residual_keys, layer.residual_values,
            layer.num_residual)


def kernel_partials(q: Array, layer: QuantizedLayerCache, scale: float | None, **kwargs):
    """Split-K partials of decode queries q [B, Hq, D] over the cache (see the kernel module)."""
    from pallas_kernels import quantized_decode_attention as qda

    return qda.quantized_decode_partials(q, *kernel_arrays(layer), scale=scale, **kwargs)


def quantized_attend(
    q: Array,
    q_positions: Array,
    layer: QuantizedLayerCache,
    scale: float | None = None,
    sliding_window: int | None = None,
    impl: str = "auto",
) -> Array:
    """Attention over a QuantizedLayerCache: for GPU decode the Triton kernel (packed layout)
    or, on Hopper, the Mosaic GPU kernel (int4 layout); for TPU decode where
    `kvjax.attention.TPU_DECODE_KERNEL` is set the TPU kernel (packed layout); else the
    reference (dequantize to float32, `kvjax.attention.reference_attention`)."""
    if q.shape[-1] != layer.head_dim:
        raise ValueError(f"q head dim {q.shape[-1]} != cache head dim {layer.head_dim}")
    if use_kernel(layer, q, sliding_window, impl):
        from pallas_kernels import quantized_decode_attention as qda

        out = qda.combine([kernel_partials(q[:, :, 0], layer, scale)], q.dtype)
        return out[:, :, None]
    if use_mgpu_kernel(layer, q, sliding_window, impl):
        from pallas_kernels import quantized_decode_attention_mgpu as qm

        out = qm.quantized_decode_attention_mgpu(
            q[:, :, 0], *kernel_arrays(layer), scale=scale,
            block_tokens=qm.default_block_tokens(layer.quantized_capacity))
        return out[:, :, None]
    if use_tpu_kernel(layer, q, sliding_window, impl):
        from pallas_kernels import quantized_decode_attention_tpu as qt

        out = qt.quantized_decode_attention_tpu(q[:, :, 0], *kernel_arrays(layer), scale=scale)
        return out[:, :, None]
    return kvattention.reference_attention(q, q_positions, layer.to_dense(), scale, sliding_window)


kvattention.register(QuantizedLayerCache, quantized_attend)


# --- the compressor --------------------------------------------------------------------------


def kivi(
    bits: int = 2,
    group_size: int = 32,
    residual: int = 128,
    scale_dtype: Any = jnp.bfloat16,
    head_positions: bool = True,
    layout: str = "packed",
) -> Compressor:
    """KIVI quantization as a Compressor (prefill quantizes; decode appends to the residual).

    Args:
      bits: 2, 4 or 8 bits per key/value entry (paper: 2).
      group_size: G, tokens per key group and channels per value group (paper: 32); must divide
        the head dim.
      residual: R, recent tokens kept in full precision (paper: 128); a multiple of G.
      scale_dtype: 16-bit dtype of scales and zero points (bfloat16 or float16).
      head_positions: store the quantized tokens' positions per KV head (default; needed after
        per-head eviction, e.g. in `chain(snapkv(...), kivi(...))`), or, False, once per row
        for a cache whose heads hold the same tokens (a plain prefill): 4 bytes per token
        instead of 4 per token and head (module docstring). Under jit the premise is not
        checked: a per-head-evicted cache would get head 0's positions for every head.
      layout: "packed" (uint32 words, the Triton kernel's; any bits) or "int4" (bits=4 only:
        signed int4 codes, keys token-major and values channel-major, the layout the Hopper
        kernel `quantized_decode_attention_mgpu` reads; decoding with bf16 queries and scales
        dispatches to it on sm_90, other platforms take the reference), or "words" (bits 4 or
        2, head dim a multiple of 64, G in `WORDS_GROUPS`: each 64 x 64 tile in the order the
        Hopper kernel's threads hold it, module docstring; decoding with bf16 queries and
        scales dispatches to the same Hopper kernel, its fastest layout: 2.21x (4 bits) and
        2.28x (2 bits) of the dense kernel at 8 x 32k on an H100). Same codes, scales and
        bytes in every layout, so the same attention output up to rounding.
    """
    check_config(bits, group_size, residual, layout)
    if jnp.dtype(scale_dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        raise ValueError(f"scale_dtype must be bfloat16 or float16, got {scale_dtype!r}")
    if not isinstance(head_positions, bool):
        raise ValueError(f"head_positions must be True or False, got {head_positions!r}")
    return _kivi(bits, group_size, residual, jnp.dtype(scale_dtype).name, head_positions,
                 layout)


@functools.cache
def _kivi(bits: int, group_size: int, residual: int, scale_dtype: str,
          head_positions: bool, layout: str) -> Compressor:
    def prefill(cache: Any, obs: Observation, state: Any):
        if not isinstance(cache, LayerCache):
            raise TypeError(f"kivi quantizes a dense LayerCache, got {type(cache).__name__}")
        out = from_dense(cache, bits, group_size, residual, jnp.dtype(scale_dtype),
                         head_positions, layout)
        return out, state

    def decode(cache: Any, obs: Observation, state: Any):
        return cache, state  # appends go through QuantizedLayerCache.write

    return Compressor(init=lambda cache: (), prefill=prefill, decode=decode)
