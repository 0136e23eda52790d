"""Decode attention over a KIVI-quantized KV cache (packed int8/int4/int2), split-K, Pallas.

One query token per row attends over (a) a quantized part, read as packed uint32 codes plus 16-bit
scales and zero points and dequantized in registers (no dequantized copy of the cache is ever
written to HBM), and (b) a full-precision residual window of recent tokens, handled by the same
kernel as one extra split. Each program owns one (row, KV head, split) and all query heads of that
KV head (GQA), padded to 16 rows for the tensor-core dots; partial results (unnormalised output,
running max, running sum) are merged by `combine` (log-sum-exp), which also merges partials of
several caches (the mixed-precision cache reads two quantized parts).

Layout (see `kvjax.quant.packing`; P = 32 // bits groups per word, G tokens per group):
  q              [B, Hq, D]                 Hq = Gq * Hkv; query head j uses KV head j // Gq
  k_codes        uint32[B, Hkv, Nb, G, D]   block n, row w, channel d, bits [bits*j, bits*(j+1)):
                                            token (n * P + j) * G + w   (Ng = Nb * P groups)
  k_scale/k_zero [B, Hkv, Ng, D]            per group of G tokens, per channel (16-bit)
  v_codes        uint32[B, Hkv, Nb, G, D]   same token layout; values are quantized per token
  v_scale/v_zero [B, Hkv, Ng, D // Gv, G]   per token, per group of Gv channels (16-bit)
  num_quantized  int32[B, Hkv]              tokens [0, n) of the quantized part are valid
  residual_keys/values [B, Hkv, R, D]       full precision; slots [0, num_residual) valid
Every stored token is taken to precede the query (true at decode), so masking is by counts only.

Main loop (one iteration = one tile of Nt = block_tokens / G blocks = block_tokens * P tokens):
load the key words [Nt, G, D] and the value words [Nt * G, D] once (16-byte coalesced rows), then
for each of the P code fields j (unrolled: shifts and masks are constants), with T = Nt * G:
  - codes of field j for all T word rows at once, as exact float32 `code * 2^off`: a field below
    bit 23 is masked in place and or-ed into the float 2^23 (one LOP3 + one FADD, no shift, no
    int->float conversion); higher fields are shifted down first. 2^-off is folded into the
    scales ([Nt, D] rows, not per element);
  - keys k = codes * scale + zero with the per-(block, channel) rows broadcast over the G rows of
    a [Nt, G, D] tile, reshaped to [T, D], cast to the query dtype; scores q @ k^T [16, T] on
    tensor cores (the GQA query rows padded to 16);
  - one online-softmax step (float32) over the T tokens;
  - values dequantized in one [T, D] tile (codes * scale + zero with the per-token, per-channel-
    group scales broadcast and reshaped; `value_split=True` instead issues one dot per channel
    group c: codes [T, Gv] * scale[T, 1] + zero[T, 1], then p @ v_c), then p @ v [16, T] x [T, D].
A tile therefore issues two dots of T tokens per field instead of five per group of 32 tokens.
Split-K: each split owns whole tiles; its last tile is moved back inside the array when it would
run past the end (never reading out of bounds), and blocks it re-reads are masked. Tokens are
visited in field-major order inside a tile; attention does not depend on the order.

Bytes read per token and KV head at D=128, G=32, 16-bit scale/zero: int8 288, int4 160, int2 96
versus 512 for a bf16 cache (1.8x, 3.2x, 5.3x less).

`reference` is the plain jnp version (dequantize, mask, float32 softmax); tests compare the kernel
against it on CPU in interpret mode (automatic there).

Measured on an H100 (2026-11-23, `experiments/bench_quant.py`, 32k x batch 8): int8 849 us,
int4 847 us, int2 1091 us vs 362 us for the bf16 dense kernel - still slower than dense (the
dequantize-and-dot work per field, not the bytes, bounds it: int4 moves 401 GB/s); see
docs/benchmarks_quant.md for the next steps.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.decode_attention import (
    check_num_splits,
    check_warps_stages,
    combine_splits,
    launch_config,
    launch_params,
    pad_query_groups,
    partial_shapes,
    partial_specs,
    resolve_interpret,
    whole_head,
)

Array = jax.Array

NEG = -1e30  # finite "minus infinity": masked scores and the running max start here
_MAGIC = 0x4B000000  # float32 bits of 2^23; or-ing a code < 2^23 into it gives 2^23 + code
_MAGIC_F = 8388608.0
MIN_ROWS = 16  # tensor-core dots need >= 16 rows: query heads of a KV head are padded to this
TARGET_PROGRAMS = 528  # ~4 programs per SM on an H100 (132 SMs)


def supported(head_dim: int, group_size: int, residual: int) -> bool:
    """Whether the compiled (GPU) kernel handles these sizes; otherwise use `reference`."""

    def pow2(n: int) -> bool:
        return n > 0 and n & (n - 1) == 0

    return (
        pow2(head_dim) and 16 <= head_dim <= 256 and pow2(group_size) and 16 <= group_size
        and head_dim % group_size == 0 and residual % 16 == 0
    )


def _dot_nt(a: Array, b: Array) -> Array:  # a [M, K] . b [N, K]^T -> float32 [M, N]
    return lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def _dot_nn(a: Array, b: Array) -> Array:  # a [M, K] . b [K, N] -> float32 [M, N]
    return lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)


_MANTISSA = 23  # float32 mantissa bits
_ONE = 0x3F800000  # float32 bits of 1.0
FAST_WINDOW = 8  # fast unpack: fields sit at mantissa bits >= 8 (error <= scale * 2^-9)


def unpack_plan(bits: int, fast: bool) -> list[tuple[int, list[tuple[int, int]]]]:
    """Static plan [(shift, [(field j, bit position p), ...]), ...] of one word's P fields.

    Each entry shifts the word once (shift > 0: right, < 0: left, 0: none) and then reads its
    fields at bit p with one mask/or (see `_field`); p lies in [lo, 23 - bits] with lo = 0
    (exact) or FAST_WINDOW (fast), so a few shifts per word serve all P fields.
    """
    per, lo, top = 32 // bits, FAST_WINDOW if fast else 0, _MANTISSA - bits
    plan, j = [], 0
    while j < per:
        shift = bits * j - lo
        fields = []
        while j < per and bits * j - shift <= top:
            fields.append((j, bits * j - shift))
            j += 1
        plan.append((shift, fields))
    return plan


def _shift(words: Array, shift: int) -> Array:
    if shift > 0:
        return jnp.right_shift(words, jnp.uint32(shift))
    if shift < 0:
        return jnp.left_shift(words, jnp.uint32(-shift))
    return words


def _field(src: Array, bits: int, pos: int, fast: bool) -> tuple[Array, float, float]:
    """The code at bit `pos` of `src` words as float32 f with code * scale + zero =
    f * (scale * a) + (zero - scale * b); returns (f, a, b) (a, b static).

    One LOP3 (mask and or into a float's bits), no int->float conversion:
      exact (a field below bit 23): f = 2^23 + code * 2^pos - 2^23 (one FADD): a = 2^-pos, b = 0;
      fast: f = 1 + code * 2^(pos - 23) (no FADD): a = b = 2^(23 - pos); the rounding of
        zero - scale * b costs <= scale * 2^(-1 - pos) (pos >= FAST_WINDOW), below bf16 rounding.
    """
    c = src & jnp.uint32((2**bits - 1) << pos)
    if fast:
        a = 2.0 ** (_MANTISSA - pos)
        return lax.bitcast_convert_type(c | jnp.uint32(_ONE), jnp.float32), a, a
    f = lax.bitcast_convert_type(c | jnp.uint32(_MAGIC), jnp.float32) - _MAGIC_F
    return f, 2.0**-pos, 0.0


def _affine(f: Array, scale: Array, zero: Array, a: float, b: float) -> Array:
    """f * (scale * a) + (zero - scale * b) (scale, zero broadcast against f; b is 0 or a)."""
    sa = scale * a
    return f * sa + (zero - sa if b else zero)


def _online_update(carry, s, valid, pv):
    """One online-softmax step over a score tile s [gp, T] (masked by valid [1, T]).

    pv(probs) -> list of per-channel-group products probs @ v_c, added to the rescaled
    accumulators."""
    m, den, accs = carry
    m_new = jnp.maximum(m, jnp.max(s, axis=1))
    alpha = jnp.exp(m - m_new)
    probs = jnp.where(valid, jnp.exp(s - m_new[:, None]), 0.0)
    den = den * alpha + jnp.sum(probs, axis=1)
    accs = tuple(a * alpha[:, None] + c for a, c in zip(accs, pv(probs)))
    return m_new, den, accs


def _kernel(
    nq_ref, nr_ref, q_ref, kc_ref, ks_ref, kz_ref, vc_ref, vs_ref, vz_ref, *rest,
    bits: int, group: int, vgroup: int, tile_blocks: int, blocks_per_split: int,
    num_splits: int, sm_scale: float, res_chunk: int, has_residual: bool, fast: bool,
    value_split: bool,
):
    """One program: (row b, KV head h, split s). Refs (per (b, h), see `_partials`):
    kc_ref uint32[Nb, G, D]; ks_ref, kz_ref [Nb, P, D];
    vc_ref uint32[Nb * G, ncg, Gv] ([Nb * G, D] with value_split); vs_ref, vz_ref flat
    [Ng * ncg * G]. Accumulators: one [gp, D], or ncg [gp, Gv] with value_split."""
    if has_residual:
        rk_ref, rv_ref, o_ref, m_ref, l_ref = rest
    else:
        o_ref, m_ref, l_ref = rest
    split = pl.program_id(2)
    per = 32 // bits
    gp, d = q_ref.shape
    ncg = d // vgroup
    aw = vgroup if value_split else d  # accumulator width
    nb = kc_ref.shape[0]
    nt = tile_blocks
    rows = nt * group  # word rows (= tokens per code field) of one tile
    q = q_ref[...]
    ddt = q.dtype
    nq = nq_ref[()]
    carry = (
        jnp.full((gp,), NEG, jnp.float32),
        jnp.zeros((gp,), jnp.float32),
        tuple(jnp.zeros((gp, aw), jnp.float32) for _ in range(d // aw)),
    )
    t3 = lax.broadcasted_iota(jnp.int32, (rows, 1, 1), 0)
    c3 = lax.broadcasted_iota(jnp.int32, (1, ncg, 1), 1)
    # tile row t -> (block n0 + t // G, word row t % G); as a row [1, T] and a column [T, 1]
    t_row = lax.broadcasted_iota(jnp.int32, (1, rows), 1)
    t_col = lax.broadcasted_iota(jnp.int32, (rows, 1), 0)
    span = per * group
    nblk = (nq + span - 1) // span
    start = split * blocks_per_split
    stop = jnp.where(split < num_splits, jnp.minimum(start + blocks_per_split, nblk), start)
    stop = jnp.maximum(stop, start)

    def tile(it, carry):
        lo = start + it * nt
        n0 = jnp.minimum(lo, nb - nt)  # the last tile is moved back, never read out of bounds
        blk_r, blk_c = n0 + t_row // group, n0 + t_col // group
        w_r, w_c = t_row % group, t_col % group
        fresh = (blk_r >= lo) & (blk_r < stop)  # blocks of this split not seen by earlier tiles
        if nt == 1:
            kw = kc_ref[n0]  # [G, D]
        else:
            kw = kc_ref[pl.ds(n0, nt)]  # [nt, G, D]
        if value_split:  # ncg tiles [T, Gv]
            vws = [vc_ref[pl.ds(n0 * group, rows), pl.ds(c * vgroup, vgroup)]
                   for c in range(ncg)]
        else:  # one tile [T, ncg, Gv]
            vws = [vc_ref[pl.ds(n0 * group, rows)]]
        vrow = ((n0 + t3 // group) * per * ncg + c3) * group + t3 % group  # [T, ncg, 1], j = 0
        for shift, fields in unpack_plan(bits, fast):  # static: shifts and masks constants
            ksrc = _shift(kw, shift)
            vsrcs = [_shift(vw, shift) for vw in vws]
            for j, pos in fields:
                valid = fresh & ((blk_r * per + j) * group + w_r < nq)  # [1, T]
                kf, a, b_ = _field(ksrc, bits, pos, fast)
                if nt == 1:
                    ks = ks_ref[pl.ds(n0, 1), j, :].astype(jnp.float32)  # [1, D]
                    kz = kz_ref[pl.ds(n0, 1), j, :].astype(jnp.float32)
                    k = _affine(kf, ks, kz, a, b_)
                else:
                    ks = ks_ref[pl.ds(n0, nt), j, :].astype(jnp.float32)[:, None, :]  # [nt,1,D]
                    kz = kz_ref[pl.ds(n0, nt), j, :].astype(jnp.float32)[:, None, :]
                    k = _affine(kf, ks, kz, a, b_).reshape(rows, d)
                s = _dot_nt(q, k.astype(ddt)) * sm_scale  # [gp, T]
                s = jnp.where(valid, s, NEG)

                def pv(probs, j=j, pos=pos, vsrcs=vsrcs):
                    pd = probs.astype(ddt)
                    if not value_split:  # dequantize [T, ncg, Gv], one [16, T] x [T, D] dot
                        vf, va, vb = _field(vsrcs[0], bits, pos, fast)
                        vidx = vrow + j * ncg * group  # [T, ncg, 1]
                        v = _affine(vf, vs_ref[vidx].astype(jnp.float32),
                                    vz_ref[vidx].astype(jnp.float32), va, vb)
                        return [_dot_nn(pd, v.reshape(rows, d).astype(ddt))]
                    out = []
                    for c in range(ncg):
                        vf, va, vb = _field(vsrcs[c], bits, pos, fast)  # [T, Gv]
                        vidx = ((blk_c * per + j) * ncg + c) * group + w_c  # [T, 1]
                        vs = vs_ref[vidx].astype(jnp.float32)
                        vz = vz_ref[vidx].astype(jnp.float32)
                        out.append(_dot_nn(pd, _affine(vf, vs, vz, va, vb).astype(ddt)))
                    return out

                carry = _online_update(carry, s, valid, pv)
        return carry

    ntiles = (stop - start + nt - 1) // nt
    carry = lax.fori_loop(0, ntiles, tile, carry)

    if has_residual:
        nr = nr_ref[()]
        riota = lax.broadcasted_iota(jnp.int32, (1, res_chunk), 1)

        def rblock(c, carry):
            rk = rk_ref[pl.ds(c * res_chunk, res_chunk), :]
            s = _dot_nt(q, rk.astype(ddt)) * sm_scale
            valid = c * res_chunk + riota < nr

            def pv(probs):
                pd = probs.astype(ddt)
                return [
                    _dot_nn(pd, rv_ref[pl.ds(c * res_chunk, res_chunk),
                                       pl.ds(g * aw, aw)].astype(ddt))
                    for g in range(d // aw)
                ]

            return _online_update(carry, jnp.where(valid, s, NEG), valid, pv)

        n_rc = jnp.where(split == num_splits, (nr + res_chunk - 1) // res_chunk, 0)
        carry = lax.fori_loop(0, n_rc, rblock, carry)

    m, den, accs = carry
    for c in range(d // aw):
        o_ref[:, pl.ds(c * aw, aw)] = accs[c]
    m_ref[...] = m
    l_ref[...] = den


def _layout(q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, num_quantized):
    """Validates shapes/dtypes; returns (bits, G, Gv, Gq)."""
    if q.ndim != 3:
        raise ValueError(f"q must be [batch, query_heads, head_dim], got shape {q.shape}")
    b, hq, d = q.shape
    if k_codes.ndim != 5:
        raise ValueError(f"k_codes must be uint32[B, Hkv, Nb, G, D], got shape {k_codes.shape}")
    _, h, nb, g, dk = k_codes.shape
    for name, arr in (("k_codes", k_codes), ("v_codes", v_codes)):
        if arr.dtype != jnp.uint32:
            raise TypeError(f"{name} must be uint32 words, got {arr.dtype}")
        if arr.shape != (b, h, nb, g, d):
            raise ValueError(f"{name} has shape {arr.shape}, expected {(b, h, nb, g, d)}")
    if dk != d or hq % h:
        raise ValueError(f"q {q.shape} does not match the cache (Hkv={h}, D={dk})")
    if nb < 1 or k_scale.ndim != 4 or k_scale.shape[2] % nb:
        raise ValueError(f"k_scale {k_scale.shape} does not match k_codes {k_codes.shape}")
    per = k_scale.shape[2] // nb
    if per not in (4, 8, 16):
        raise ValueError(f"{per} groups per word: bits must be 8, 4 or 2")
    ng = nb * per
    for name, arr, shape in (
        ("k_scale", k_scale, (b, h, ng, d)),
        ("k_zero", k_zero, (b, h, ng, d)),
    ):
        if arr.shape != shape:
            raise ValueError(f"{name} has shape {arr.shape}, expected {shape}")
    if v_scale.ndim != 5 or d % v_scale.shape[3]:
        raise ValueError(f"v_scale must be [B, Hkv, Ng, D // Gv, G], got {v_scale.shape}")
    ncg = v_scale.shape[3]
    for name, arr in (("v_scale", v_scale), ("v_zero", v_zero)):
        if arr.shape != (b, h, ng, ncg, g):
            raise ValueError(f"{name} has shape {arr.shape}, expected {(b, h, ng, ncg, g)}")
    if num_quantized.shape != (b, h):
        raise ValueError(f"num_quantized must have shape {(b, h)}, got {num_quantized.shape}")
    return 32 // per, g, d // ncg, hq // h


def default_splits(batch: int, num_kv_heads: int, num_blocks: int, tile_blocks: int = 1) -> int:
    """Splits of the quantized part so that about TARGET_PROGRAMS programs run (>= 1 tile each)."""
    tiles = max(1, num_blocks // max(1, tile_blocks))
    return max(1, min(tiles, -(-TARGET_PROGRAMS // (batch * num_kv_heads))))


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _pow2_floor(n: int) -> int:
    return 1 << (max(1, n).bit_length() - 1)


@functools.partial(
    jax.jit,
    static_argnames=("scale", "block_tokens", "num_splits", "num_warps", "num_stages",
                     "fast_unpack", "value_split", "interpret"),
)
def _partials(q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, num_quantized,
              residual_keys, residual_values, num_residual, *, scale, block_tokens, num_splits,
              num_warps, num_stages, fast_unpack, value_split, interpret):
    bits, g, vg, gq = _layout(q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero,
                              num_quantized)
    b, hq, d = q.shape
    h, nb = k_codes.shape[1], k_codes.shape[2]
    per = 32 // bits
    ng, ncg = nb * per, d // vg
    qg, _, gp = pad_query_groups(q, h, MIN_ROWS)
    nt = _pow2_floor(min(max(1, block_tokens // g), nb))  # blocks per tile (a power of two)
    splits = default_splits(b, h, nb, nt) if num_splits is None else min(num_splits, nb)
    bps = _cdiv(_cdiv(nb, splits), nt) * nt  # blocks per split: whole tiles
    splits = _cdiv(nb, bps)
    has_res = residual_keys is not None
    res_chunk = 0
    kshape = (nb, per, d)
    inputs = [
        num_quantized.astype(jnp.int32),
        (num_residual if has_res else num_quantized).astype(jnp.int32),
        qg,
        k_codes, k_scale.reshape(b, h, *kshape), k_zero.reshape(b, h, *kshape),
        v_codes.reshape((b, h, nb * g, d) if value_split else (b, h, nb * g, ncg, vg)),
        v_scale.reshape(b, h, ng * ncg * g), v_zero.reshape(b, h, ng * ncg * g),
    ]

    in_specs = [
        pl.BlockSpec((None, None), lambda i, j, s: (i, j)),
        pl.BlockSpec((None, None), lambda i, j, s: (i, j)),
        whole_head((gp, d)),
        whole_head((nb, g, d)), whole_head(kshape), whole_head(kshape),
        whole_head((nb * g, d) if value_split else (nb * g, ncg, vg)),
        whole_head((ng * ncg * g,)), whole_head((ng * ncg * g,)),
    ]
    if has_res:
        r = residual_keys.shape[2]
        res_chunk = next(c for c in (128, 64, 32, 16, 8, 4, 2, 1) if r % c == 0)
        inputs += [residual_keys, residual_values]
        in_specs += [whole_head((r, d)), whole_head((r, d))]
    grid_splits = splits + int(has_res)
    kernel = functools.partial(
        _kernel, bits=bits, group=g, vgroup=vg, tile_blocks=nt, blocks_per_split=bps,
        num_splits=splits, sm_scale=scale, res_chunk=res_chunk, has_residual=has_res,
        fast=fast_unpack, value_split=value_split,
    )
    o, m, den = pl.pallas_call(
        kernel,
        grid=(b, h, grid_splits),
        in_specs=in_specs,
        out_specs=partial_specs(gp, d),
        out_shape=partial_shapes(b, h, grid_splits, gp, d),
        interpret=interpret,
        name=f"quantized_decode_attention_int{bits}",
        **launch_params(num_warps, num_stages, interpret),
    )(*inputs)
    return o[:, :, :, :gq], m[..., :gq], den[..., :gq]


# Launch defaults per bit width (H100, 32k x batch 8; `experiments/bench_quant.py --tune`).
DEFAULT_CONFIG = {
    8: dict(block_tokens=128, num_warps=16, num_stages=1, value_split=False),
    4: dict(block_tokens=64, num_warps=8, num_stages=1, value_split=False),
    2: dict(block_tokens=64, num_warps=8, num_stages=1, value_split=False),
}


def quantized_decode_partials(
    q: Array,
    k_codes: Array, k_scale: Array, k_zero: Array,
    v_codes: Array, v_scale: Array, v_zero: Array,
    num_quantized: Array,
    residual_keys: Array | None = None,
    residual_values: Array | None = None,
    num_residual: Array | None = None,
    *,
    scale: float | None = None,
    block_tokens: int | None = None,
    num_splits: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    fast_unpack: bool | None = None,
    value_split: bool | None = None,
    interpret: bool | None = None,
) -> tuple[Array, Array, Array]:
    """Split-K partials: (o float32[B, Hkv, S, Gq, D], m, l float32[B, Hkv, S, Gq]).

    o is the unnormalised output, m the running max and l the softmax denominator of each
    split; the residual window (when given) is the last split. Merge with `combine`.

    Launch parameters (None: `DEFAULT_CONFIG` of the bit width, splits from `default_splits`):
      block_tokens: word rows per tile = tokens per dot and per softmax step (a power-of-two
        multiple of G, at most 512); one loop iteration covers block_tokens * P tokens.
      num_splits: split-K pieces of the quantized part per (row, KV head).
      num_warps, num_stages: Triton launch parameters (compiled only).
    fast_unpack: read codes without the FADD of the exact 2^23 trick (`_field`): the zero point
      absorbs a power-of-two offset, adding an error <= scale * 2^-9 per dequantized element,
      below the rounding of the bf16/fp16 dot operands. None: on for 16-bit queries, off for
      float32 (exact).
    value_split: dequantize values as D / Gv tiles [T, Gv] with one dot each instead of one
      [T, ncg, Gv] tile reshaped to [T, D] and one dot (an alternative lowering, same result).
    interpret: None runs interpreted on CPU and compiled (Triton) elsewhere.
    """
    if q.ndim != 3:
        raise ValueError(f"q must be [batch, query_heads, head_dim], got shape {q.shape}")
    if (residual_keys is None) != (residual_values is None) or (
        (residual_keys is None) != (num_residual is None)
    ):
        raise ValueError("residual_keys, residual_values and num_residual go together")
    if residual_keys is not None:
        expect = (q.shape[0], k_codes.shape[1], residual_keys.shape[2], q.shape[2])
        if residual_keys.shape != expect or residual_values.shape != expect:
            raise ValueError(
                f"residual keys/values must have shape {expect}, got "
                f"{residual_keys.shape} and {residual_values.shape}"
            )
    check_num_splits(num_splits)
    bits, g, _, _ = _layout(q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero,
                            num_quantized)
    cfg = launch_config(DEFAULT_CONFIG[bits], block_tokens=block_tokens, num_warps=num_warps,
                        num_stages=num_stages)
    bt = cfg["block_tokens"]
    if not isinstance(bt, int) or bt < g or bt % g or (bt // g) & (bt // g - 1) or bt > 512:
        raise ValueError(
            f"block_tokens must be a power-of-two multiple of the group size ({g}) and at most "
            f"512, got {bt!r}"
        )
    check_warps_stages(cfg["num_warps"], cfg["num_stages"])
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return _partials(
        q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, num_quantized,
        residual_keys, residual_values, num_residual, scale=scale, block_tokens=bt,
        num_splits=num_splits, num_warps=int(cfg["num_warps"]),
        num_stages=int(cfg["num_stages"]),
        fast_unpack=(q.dtype != jnp.float32) if fast_unpack is None else bool(fast_unpack),
        value_split=bool(cfg["value_split"]) if value_split is None else bool(value_split),
        interpret=resolve_interpret(interpret),
    )


def combine(partials: Sequence[tuple[Array, Array, Array]], dtype=jnp.float32) -> Array:
    """Merges split partials (of one or several caches) into the output [B, Hq, D].

    Rows that saw no valid key anywhere return zeros.
    """
    return combine_splits(*(jnp.concatenate([p[i] for p in partials], axis=2)
                            for i in range(3)), dtype)


def quantized_decode_attention(
    q: Array,
    k_codes: Array, k_scale: Array, k_zero: Array,
    v_codes: Array, v_scale: Array, v_zero: Array,
    num_quantized: Array,
    residual_keys: Array | None = None,
    residual_values: Array | None = None,
    num_residual: Array | None = None,
    **kwargs,
) -> Array:
    """Decode attention [B, Hq, D] over one quantized cache (+ residual); kwargs as in
    `quantized_decode_partials`."""
    parts = quantized_decode_partials(
        q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, num_quantized,
        residual_keys, residual_values, num_residual, **kwargs,
    )
    return combine([parts], q.dtype)


def reference(
    q: Array,
    k_codes: Array, k_scale: Array, k_zero: Array,
    v_codes: Array, v_scale: Array, v_zero: Array,
    num_quantized: Array,
    residual_keys: Array | None = None,
    residual_values: Array | None = None,
    num_residual: Array | None = None,
    *,
    scale: float | None = None,
) -> Array:
    """Plain jnp: unpack, dequantize to float32, mask by counts, float32 softmax -> [B, Hq, D]."""
    bits, g, vg, gq = _layout(q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero,
                              num_quantized)
    b, hq, d = q.shape
    h, nb = k_codes.shape[1], k_codes.shape[2]
    per = 32 // bits
    ng, ncg = nb * per, d // vg
    shifts = jnp.arange(per, dtype=jnp.uint32)[:, None, None] * bits

    def unpack(words):  # [B, H, Nb, G, D] -> [B, H, Ng, G, D]
        codes = (words[:, :, :, None] >> shifts) & jnp.uint32(2**bits - 1)
        return codes.reshape(b, h, ng, g, d).astype(jnp.float32)

    keys = unpack(k_codes) * k_scale[:, :, :, None].astype(jnp.float32) + k_zero[:, :, :, None]
    vs = jnp.swapaxes(v_scale, 3, 4).astype(jnp.float32)[..., None]  # [B, H, Ng, G, ncg, 1]
    vz = jnp.swapaxes(v_zero, 3, 4).astype(jnp.float32)[..., None]
    values = unpack(v_codes).reshape(b, h, ng, g, ncg, vg) * vs + vz
    keys = keys.reshape(b, h, ng * g, d)
    values = values.reshape(b, h, ng * g, d)
    valid = jnp.arange(ng * g)[None, None, :] < num_quantized[:, :, None]
    if residual_keys is not None:
        r = residual_keys.shape[2]
        keys = jnp.concatenate([keys, residual_keys.astype(jnp.float32)], axis=2)
        values = jnp.concatenate([values, residual_values.astype(jnp.float32)], axis=2)
        rvalid = jnp.arange(r)[None, None, :] < num_residual[:, :, None]
        valid = jnp.concatenate([valid, rvalid], axis=2)
    scale = d**-0.5 if scale is None else scale
    qg = q.reshape(b, h, gq, d).astype(jnp.float32)
    s = jnp.einsum("bhgd,bhsd->bhgs", qg, keys, precision="highest") * scale
    s = jnp.where(valid[:, :, None], s, -jnp.inf)
    peak = jnp.max(s, axis=-1, keepdims=True)
    p = jnp.exp(s - jnp.where(jnp.isfinite(peak), peak, 0.0))
    den = jnp.sum(p, axis=-1, keepdims=True)
    out = jnp.einsum("bhgs,bhsd->bhgd", p, values, precision="highest")
    out = out / jnp.where(den == 0, 1.0, den)
    return out.reshape(b, hq, d).astype(q.dtype)


def hbm_bytes(b: int, hkv: int, tokens: int, head_dim: int, bits: int, group: int = 32,
              scale_bytes: int = 2) -> int:
    """Bytes a decode step must read for `tokens` quantized tokens (codes + scales + zeros)."""
    codes = 2 * tokens * head_dim * bits // 8
    k_params = 2 * scale_bytes * math.ceil(tokens / group) * head_dim
    v_params = 2 * scale_bytes * tokens * (head_dim // group)
    return b * hkv * (codes + k_params + v_params)
