"""Asymmetric group quantization and bit packing for quantized KV caches.

Quantization (KIVI, Liu et al. 2024, arXiv:2402.02750; asymmetric "zero point" form): a group of
values with minimum `lo` and maximum `hi` is stored as b-bit integer codes plus a scale and a zero
point, x ~= code * scale + zero, code in [0, 2^b - 1]. Scale and zero are stored in a 16-bit
dtype (default bfloat16). They are rounded *outward* to that dtype (zero rounded down, scale
rounded up) and the codes are computed against the stored values, so the round trip keeps the
analytic bound

    |x - (code * scale + zero)| <= scale / 2      (exact arithmetic; `error_bound`)

for every group, whatever the 16-bit rounding did (float32 arithmetic adds a few ulps).

Packing (group-interleaved, little-endian within a 32-bit word): P = 32 // bits groups of G tokens
share one block of G x D words. For a block `n`, word row `w` and channel `d`, bits
[bits * j, bits * (j + 1)) hold the code of token (n * P + j) * G + w, channel d. Unpacking code j
of a block is one shift and one mask and yields a whole group (G tokens x D channels) in order,
which is what the decode kernel needs (no in-register reshapes). Shapes:

    codes   uint32[..., Ng, G, D]      (unpacked, Ng groups of G tokens)
    packed  uint32[..., Ng // P, G, D]  (Ng a multiple of P)
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

Array = jax.Array

SUPPORTED_BITS = (2, 4, 8)
WORD_BITS = 32


def check_bits(bits: Any) -> int:
    """Validates a bit width (2, 4 or 8)."""
    if not isinstance(bits, int) or isinstance(bits, bool) or bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits!r}")
    return bits


def per_word(bits: int) -> int:
    """Codes per 32-bit word (P = 32 // bits)."""
    return WORD_BITS // check_bits(bits)


def _round_down(x: Array, dtype: Any) -> Array:
    """Largest `dtype` value <= x (x float32)."""
    y = x.astype(dtype)
    return jnp.where(y.astype(jnp.float32) > x, jnp.nextafter(y, jnp.array(-jnp.inf, dtype)), y)


def _round_up(x: Array, dtype: Any) -> Array:
    """Smallest `dtype` value >= x (x float32)."""
    y = x.astype(dtype)
    return jnp.where(y.astype(jnp.float32) < x, jnp.nextafter(y, jnp.array(jnp.inf, dtype)), y)


def params(lo: Array, hi: Array, bits: int, dtype: Any = jnp.bfloat16) -> tuple[Array, Array]:
    """(scale, zero) in `dtype` for groups with float32 minimum `lo` and maximum `hi`.

    zero <= lo and zero + (2^bits - 1) * scale >= hi hold in exact arithmetic.
    """
    levels = float(2**bits - 1)
    lo = lo.astype(jnp.float32)
    hi = jnp.maximum(hi.astype(jnp.float32), lo)
    zero = _round_down(lo, dtype)
    scale = _round_up((hi - zero.astype(jnp.float32)) / levels, dtype)
    return scale, zero


def quantize(x: Array, scale: Array, zero: Array, bits: int) -> Array:
    """uint32 codes round((x - zero) / scale) clipped to [0, 2^bits - 1]; scale, zero broadcast."""
    s = scale.astype(jnp.float32)
    inv = jnp.where(s > 0, 1.0 / jnp.where(s > 0, s, 1.0), 0.0)
    q = jnp.round((x.astype(jnp.float32) - zero.astype(jnp.float32)) * inv)
    return jnp.clip(q, 0, 2**bits - 1).astype(jnp.uint32)


def dequantize(codes: Array, scale: Array, zero: Array) -> Array:
    """float32 code * scale + zero (scale, zero broadcast against codes)."""
    return codes.astype(jnp.float32) * scale.astype(jnp.float32) + zero.astype(jnp.float32)


def error_bound(scale: Array) -> Array:
    """The analytic round-trip bound scale / 2 (float32), per group."""
    return 0.5 * scale.astype(jnp.float32)


def quantize_keys(
    keys: Array, valid: Array, bits: int, dtype: Any = jnp.bfloat16
) -> tuple[Array, Array, Array]:
    """Per-channel quantization over groups of tokens (KIVI keys).

    Args:
      keys: [..., Ng, G, D] (G tokens per group).
      valid: bool[..., Ng, G]; invalid tokens do not enter the min/max and get code 0.
    Returns:
      codes uint32[..., Ng, G, D]; scale, zero `dtype`[..., Ng, D].
    """
    x = keys.astype(jnp.float32)
    m = valid[..., None]
    lo = jnp.min(jnp.where(m, x, jnp.inf), axis=-2)
    hi = jnp.max(jnp.where(m, x, -jnp.inf), axis=-2)
    empty = ~jnp.any(valid, axis=-1)[..., None]
    lo, hi = jnp.where(empty, 0.0, lo), jnp.where(empty, 0.0, hi)
    scale, zero = params(lo, hi, bits, dtype)
    codes = quantize(x, scale[..., None, :], zero[..., None, :], bits)
    return jnp.where(m, codes, 0).astype(jnp.uint32), scale, zero


def quantize_values(
    values: Array, group_size: int, bits: int, dtype: Any = jnp.bfloat16
) -> tuple[Array, Array, Array]:
    """Per-token quantization over groups of `group_size` channels (KIVI values).

    Args:
      values: [..., T, D] with D a multiple of group_size.
    Returns:
      codes uint32[..., T, D]; scale, zero `dtype`[..., D // group_size, T] (channel group
      first, the layout the decode kernel reads).
    """
    *lead, t, d = values.shape
    if d % group_size:
        raise ValueError(f"group_size ({group_size}) must divide the head dim ({d})")
    x = values.astype(jnp.float32).reshape(*lead, t, d // group_size, group_size)
    scale, zero = params(jnp.min(x, axis=-1), jnp.max(x, axis=-1), bits, dtype)
    codes = quantize(x, scale[..., None], zero[..., None], bits).reshape(*lead, t, d)
    return codes, jnp.swapaxes(scale, -1, -2), jnp.swapaxes(zero, -1, -2)


def dequantize_values(codes: Array, scale: Array, zero: Array) -> Array:
    """float32[..., T, D] from codes [..., T, D] and scale/zero [..., D // group, T]."""
    *lead, t, d = codes.shape
    ncg = scale.shape[-2]
    c = codes.reshape(*lead, t, ncg, d // ncg)
    s = jnp.swapaxes(scale, -1, -2)[..., None]
    z = jnp.swapaxes(zero, -1, -2)[..., None]
    return dequantize(c, s, z).reshape(*lead, t, d)


def pack(codes: Array, bits: int) -> Array:
    """uint32[..., Ng, G, D] codes -> uint32[..., Ng // P, G, D] group-interleaved words."""
    p = per_word(bits)
    *lead, ng, g, d = codes.shape
    if ng % p:
        raise ValueError(f"the number of groups ({ng}) must be a multiple of {p} for {bits} bits")
    c = codes.astype(jnp.uint32).reshape(*lead, ng // p, p, g, d)
    shifts = (jnp.arange(p, dtype=jnp.uint32) * bits).reshape(p, 1, 1)
    return jnp.sum(c << shifts, axis=-3, dtype=jnp.uint32)  # disjoint bit fields: sum == or


def unpack(words: Array, bits: int) -> Array:
    """uint32[..., Nb, G, D] words -> uint32[..., Nb * P, G, D] codes (inverse of `pack`)."""
    p = per_word(bits)
    *lead, nb, g, d = words.shape
    shifts = (jnp.arange(p, dtype=jnp.uint32) * bits).reshape(p, 1, 1)
    codes = (words[..., None, :, :] >> shifts) & jnp.uint32(2**bits - 1)
    return codes.reshape(*lead, nb * p, g, d)
