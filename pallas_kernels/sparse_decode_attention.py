"""Decode attention directly over a Mustafar (bitmap + packed values) sparse KV cache, Pallas.

Format (`kvjax.sparse.mustafar`): per token and KV head, k = D - round(s D) kept entries in
channel order, `vals` [.., k], and a little-endian bitmap `bits` uint8[.., D / 8] (bit j of byte
i = channel 8 i + j). The i-th set bit of a token's bitmap holds its i-th value.

One query token per row. Each program owns one (row, KV head, split of the tokens) and all query
heads of that KV head (GQA), padded to 16 rows for tensor-core dots. Per block of BS tokens it

  1. loads the bitmap bytes of the block, one per (token, channel) by a gathered load of byte
     c // 8 (the D / 8 bytes of a row are read once from memory; the rest hit L1), and
     expands them to bits b[t, c] = (byte >> (c % 8)) & 1;
  2. ranks the set bits, r[t, c] = sum_{c' < c} b[t, c'] (an exclusive cumsum along channels);
  3. gathers the packed values at (t, r[t, c]) where b is set (zero elsewhere) -> the dense
     [BS, D] block in registers; only the k packed values per token are read from memory;
  4. does q . k^T on tensor cores, adds the optional per-slot bias (merged-slot log counts,
     holes, sliding window: -1e30 masks), masks slots >= lengths, and runs an online float32
     softmax; values are decompressed the same way and p . v accumulated.

Split partials (unnormalised output, running max, denominator) are merged by `combine`
(log-sum-exp). Every stored token is taken to precede the query (true at decode); other
masking goes through `bias`.

Bytes read per token and KV head at D = 128 (bf16): dense 512 (K + V); s = 0.5: 288; s = 0.7:
184 (+4 with a bias). `reference` is the plain jnp version (densify, mask, float32 softmax);
tests compare the kernel with it on CPU in interpret mode (automatic there).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

Array = jax.Array

NEG = -1e30
MIN_ROWS = 16  # tensor-core dots need >= 16 rows: query heads of a KV head are padded to this
TARGET_PROGRAMS = 528  # ~4 programs per SM on an H100 (132 SMs)


def _pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def supported(head_dim: int, value_dim: int | None = None) -> bool:
    """Whether the compiled (GPU) kernel handles these head dims; otherwise use `reference`."""
    value_dim = head_dim if value_dim is None else value_dim
    return all(_pow2(x) and 16 <= x <= 256 for x in (head_dim, value_dim))


def _dot_nt(a: Array, b: Array) -> Array:  # a [M, K] . b [N, K]^T -> float32 [M, N]
    return lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def _dot_nn(a: Array, b: Array) -> Array:  # a [M, K] . b [K, N] -> float32 [M, N]
    return lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def _decompress(vals_ref, bits_ref, rows: Array, d: int) -> Array:
    """Dense [BS, d] block of the rows `rows` int32[BS] (clamped in range) from the refs."""
    bs = rows.shape[0]
    r2 = jnp.broadcast_to(rows[:, None], (bs, d))
    col = lax.broadcasted_iota(jnp.int32, (bs, d), 1)
    byte = bits_ref[r2, col // 8].astype(jnp.int32)
    bit = lax.shift_right_logical(byte, col % 8) & 1
    rank = jnp.cumsum(bit, axis=1) - bit
    rank = jnp.minimum(rank, vals_ref.shape[1] - 1)
    vals = vals_ref[r2, rank]
    return jnp.where(bit > 0, vals, jnp.zeros((), vals.dtype))


def _kernel(len_ref, q_ref, kv_ref, kb_ref, vv_ref, vb_ref, *rest, block: int,
            blocks_per_split: int, capacity: int, sm_scale: float, has_bias: bool):
    if has_bias:
        bias_ref, o_ref, m_ref, l_ref = rest
    else:
        o_ref, m_ref, l_ref = rest
    split = pl.program_id(2)
    gp, d = q_ref.shape
    dv = o_ref.shape[-1]
    q = q_ref[...]
    ddt = q.dtype
    n = len_ref[()]
    iota = lax.broadcasted_iota(jnp.int32, (block,), 0)

    def body(blk, carry):
        m, den, acc = carry
        slot = blk * block + iota
        rows = jnp.minimum(slot, capacity - 1)
        k = _decompress(kv_ref, kb_ref, rows, d)
        s = _dot_nt(q, k.astype(ddt)) * sm_scale  # [gp, BS]
        if has_bias:
            s = s + bias_ref[rows][None, :]
        valid = (slot < n)[None, :] & (s > 0.5 * NEG)  # bias <= -1e30 masks a slot
        s = jnp.where(valid, s, NEG)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        alpha = jnp.exp(m - m_new)
        p = jnp.where(valid, jnp.exp(s - m_new[:, None]), 0.0)
        v = _decompress(vv_ref, vb_ref, rows, dv)
        acc = acc * alpha[:, None] + _dot_nn(p.astype(ddt), v.astype(ddt))
        return m_new, den * alpha + jnp.sum(p, axis=1), acc

    nblk = (n + block - 1) // block
    start = split * blocks_per_split
    stop = jnp.minimum(start + blocks_per_split, nblk)
    carry = (
        jnp.full((gp,), NEG, jnp.float32),
        jnp.zeros((gp,), jnp.float32),
        jnp.zeros((gp, dv), jnp.float32),
    )
    m, den, acc = lax.fori_loop(start, jnp.maximum(stop, start), body, carry)
    o_ref[...] = acc
    m_ref[...] = m
    l_ref[...] = den


def _check(q, k_vals, k_bits, v_vals, v_bits, lengths, bias):
    if q.ndim != 3:
        raise ValueError(f"q must be [batch, query_heads, head_dim], got shape {q.shape}")
    b, hq, d = q.shape
    if k_vals.ndim != 4:
        raise ValueError(f"k_vals must be [B, Hkv, C, k], got shape {k_vals.shape}")
    _, h, c, _ = k_vals.shape
    if hq % h or k_vals.shape[0] != b:
        raise ValueError(f"q {q.shape} does not match k_vals {k_vals.shape} (GQA needs Hq % Hkv)")
    if d % 8:
        raise ValueError(f"head_dim must be a multiple of 8, got {d}")
    for name, arr in (("k_bits", k_bits), ("v_bits", v_bits)):
        if arr.dtype != jnp.uint8:
            raise TypeError(f"{name} must be uint8, got {arr.dtype}")
    if k_bits.shape != (b, h, c, d // 8):
        raise ValueError(f"k_bits has shape {k_bits.shape}, expected {(b, h, c, d // 8)}")
    if v_vals.shape[:3] != (b, h, c) or v_bits.shape[:3] != (b, h, c):
        raise ValueError(f"v_vals {v_vals.shape} / v_bits {v_bits.shape} do not match {(b, h, c)}")
    if lengths.shape != (b, h):
        raise ValueError(f"lengths must have shape {(b, h)}, got {lengths.shape}")
    if bias is not None and bias.shape != (b, h, c):
        raise ValueError(f"bias must have shape {(b, h, c)}, got {bias.shape}")
    return b, hq, h, c, d, v_bits.shape[3] * 8


def default_splits(batch: int, num_kv_heads: int, num_blocks: int) -> int:
    """Token splits so that about TARGET_PROGRAMS programs run."""
    return max(1, min(num_blocks, -(-TARGET_PROGRAMS // (batch * num_kv_heads))))


@functools.partial(
    jax.jit,
    static_argnames=("scale", "block_size", "num_splits", "num_warps", "num_stages",
                     "interpret"),
)
def _partials(q, k_vals, k_bits, v_vals, v_bits, lengths, bias, *, scale, block_size,
              num_splits, num_warps, num_stages, interpret):
    b, hq, h, c, d, dv = _check(q, k_vals, k_bits, v_vals, v_bits, lengths, bias)
    gq = hq // h
    gp = max(MIN_ROWS, 1 << (gq - 1).bit_length())
    qg = jnp.pad(q.reshape(b, h, gq, d), ((0, 0), (0, 0), (0, gp - gq), (0, 0)))
    if qg.dtype not in (jnp.bfloat16, jnp.float16):
        qg = qg.astype(jnp.float32)
    nblocks = -(-c // block_size)
    splits = default_splits(b, h, nblocks) if num_splits is None else min(num_splits, nblocks)
    bps = -(-nblocks // splits)
    splits = -(-nblocks // bps)

    def whole(shape):
        return pl.BlockSpec((None, None) + tuple(shape), lambda i, j, s: (i, j) + (0,) * len(shape))

    inputs = [lengths.astype(jnp.int32), qg, k_vals, k_bits, v_vals, v_bits]
    in_specs = [
        pl.BlockSpec((None, None), lambda i, j, s: (i, j)),
        whole((gp, d)),
        whole(k_vals.shape[2:]), whole(k_bits.shape[2:]),
        whole(v_vals.shape[2:]), whole(v_bits.shape[2:]),
    ]
    if bias is not None:
        inputs.append(bias.astype(jnp.float32))
        in_specs.append(whole((c,)))
    kernel = functools.partial(
        _kernel, block=block_size, blocks_per_split=bps, capacity=c, sm_scale=scale,
        has_bias=bias is not None,
    )
    params = {}
    if not interpret:
        from jax.experimental.pallas import triton as pltriton

        cls = getattr(pltriton, "CompilerParams", None) or pltriton.TritonCompilerParams
        params["compiler_params"] = cls(num_warps=num_warps, num_stages=num_stages)
    o, m, den = pl.pallas_call(
        kernel,
        grid=(b, h, splits),
        in_specs=in_specs,
        out_specs=[
            pl.BlockSpec((None, None, None, gp, dv), lambda i, j, s: (i, j, s, 0, 0)),
            pl.BlockSpec((None, None, None, gp), lambda i, j, s: (i, j, s, 0)),
            pl.BlockSpec((None, None, None, gp), lambda i, j, s: (i, j, s, 0)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((b, h, splits, gp, dv), jnp.float32),
            jax.ShapeDtypeStruct((b, h, splits, gp), jnp.float32),
            jax.ShapeDtypeStruct((b, h, splits, gp), jnp.float32),
        ],
        interpret=interpret,
        name="mustafar_sparse_decode_attention",
        **params,
    )(*inputs)
    return o[:, :, :, :gq], m[..., :gq], den[..., :gq]


def combine(o: Array, m: Array, den: Array, dtype=jnp.float32) -> Array:
    """Merges split partials (o [B, H, S, G, Dv], m, den [B, H, S, G]) into [B, H * G, Dv].

    Rows that saw no valid slot return zeros.
    """
    peak = jnp.max(m, axis=2, keepdims=True)
    w = jnp.exp(m - peak)
    num = jnp.sum(w[..., None] * o, axis=2)
    tot = jnp.sum(w * den, axis=2)
    out = num / jnp.where(tot == 0, 1.0, tot)[..., None]
    b, h, g, dv = out.shape
    return out.reshape(b, h * g, dv).astype(dtype)


def sparse_decode_attention(
    q: Array,
    k_vals: Array,
    k_bits: Array,
    v_vals: Array,
    v_bits: Array,
    lengths: Array,
    *,
    bias: Array | None = None,
    scale: float | None = None,
    block_size: int = 64,
    num_splits: int | None = None,
    num_warps: int = 4,
    num_stages: int = 2,
    interpret: bool | None = None,
) -> Array:
    """Decode attention [B, Hq, Dv] of q [B, Hq, D] over a Mustafar cache.

    Args:
      q: one query per row; query head j reads KV head j // (Hq / Hkv).
      k_vals, v_vals: [B, Hkv, C, k] packed kept entries; k_bits, v_bits: uint8[B, Hkv, C, D/8].
      lengths: int32[B, Hkv]; slots [0, lengths) are attended.
      bias: optional float32[B, Hkv, C] added to the scaled logits (-1e30 masks a slot).
      scale: softmax scale (default D ** -0.5).
      block_size: tokens per inner step, a power of two >= 16.
      num_splits: token splits per (row, head) (default: ~TARGET_PROGRAMS programs in all).
      interpret: None runs interpreted on CPU and compiled (Triton) elsewhere.
    """
    if not isinstance(block_size, int) or not _pow2(block_size) or block_size < 16:
        raise ValueError(f"block_size must be a power of two >= 16, got {block_size!r}")
    if num_splits is not None and (not isinstance(num_splits, int) or num_splits < 1):
        raise ValueError(f"num_splits must be a positive int, got {num_splits!r}")
    if interpret is None:
        interpret = jax.default_backend() == "cpu"
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    o, m, den = _partials(
        q, k_vals, k_bits, v_vals, v_bits, lengths, bias, scale=scale, block_size=block_size,
        num_splits=num_splits, num_warps=num_warps, num_stages=num_stages,
        interpret=bool(interpret),
    )
    return combine(o, m, den, q.dtype)


def _densify(vals: Array, bits: Array, d: int) -> Array:
    shifts = jnp.arange(8, dtype=jnp.uint8)
    mask = ((bits[..., None] >> shifts) & 1).reshape(bits.shape[:-1] + (-1,))[..., :d] > 0
    rank = jnp.cumsum(mask, axis=-1) - 1
    picked = jnp.take_along_axis(vals, jnp.clip(rank, 0, vals.shape[-1] - 1), axis=-1)
    return jnp.where(mask, picked.astype(jnp.float32), 0.0)


def reference(
    q: Array,
    k_vals: Array,
    k_bits: Array,
    v_vals: Array,
    v_bits: Array,
    lengths: Array,
    *,
    bias: Array | None = None,
    scale: float | None = None,
) -> Array:
    """Plain jnp: densify, add bias, mask by lengths, float32 softmax -> [B, Hq, Dv]."""
    b, hq, h, c, d, dv = _check(q, k_vals, k_bits, v_vals, v_bits, lengths, bias)
    keys = _densify(k_vals, k_bits, d)
    values = _densify(v_vals, v_bits, dv)
    scale = d**-0.5 if scale is None else scale
    qg = q.reshape(b, h, hq // h, d).astype(jnp.float32)
    s = jnp.einsum("bhgd,bhsd->bhgs", qg, keys, precision="highest") * scale
    if bias is not None:
        s = s + bias[:, :, None, :]
    valid = jnp.arange(c)[None, None, :] < lengths[:, :, None]
    s = jnp.where(valid[:, :, None], s, -jnp.inf)
    peak = jnp.max(s, axis=-1, keepdims=True)
    p = jnp.exp(s - jnp.where(jnp.isfinite(peak), peak, 0.0))
    p = jnp.where(s <= NEG / 2, 0.0, p)  # bias-masked slots contribute nothing
    den = jnp.sum(p, axis=-1, keepdims=True)
    out = jnp.einsum("bhgs,bhsd->bhgd", p, values, precision="highest")
    out = out / jnp.where(den == 0, 1.0, den)
    return out.reshape(b, hq, dv).astype(q.dtype)


def hbm_bytes(batch: int, num_kv_heads: int, tokens: int, head_dim: int, key_keep: int,
              value_keep: int, itemsize: int = 2) -> int:
    """Bytes a decode step reads: packed values + bitmaps of K and V for `tokens` tokens."""
    per = (key_keep + value_keep) * itemsize + 2 * (head_dim // 8)
    return batch * num_kv_heads * tokens * per
