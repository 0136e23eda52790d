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

Three kernels (`variant`), the same partials:

"fold" (`_fold_kernel`, the default): one loop step = one code field j of one block (the G
tokens of group n * P + j). The block's key and value words are loaded once and read for each of
its P fields (a dynamic loop: one field's registers, whatever the bit width). By default
(`dequant=True`) each field is read in place (`unpack_plan`: one word shift per group of fields,
then a mask-or and the exact 2^23 trick per element) and scaled on the code tile,
k = c * scale + zero (one FMA per element), leaving the queries and probabilities untouched.
`dequant=False` folds the scales into the small operands instead:
  scores = (q * k_scale) @ c^T [+ q . k_zero]        k_scale, k_zero: the group's [1, D] rows
  out_c += (p * v_scale_c) @ c_c [+ p . v_zero_c]    per channel group c, per-token scales
with (`zero_in_codes`) the zero points in the code operand as c + zero / scale.
Options (timed, not faster, docs/benchmarks_quant.md): `reload` (re-read the words per field
instead of holding them in registers), `fields` (several fields per online-softmax step),
`fast_unpack` (no FADD; spills at 2 warps); `gather_scales` (scales loaded as whole tiles) was
tried in commit d1beea1, 1.16x slower, and removed.
"stack" (`_stack_kernel`): "fold" with 16 / Gq fields per step stacked as query rows
(block-diagonal operands); timed 1.9-2.1x slower than the default.

"tile" (`_kernel`, kept for Gv < 16 and for comparison): one iteration = one tile of Nt =
block_tokens / G blocks; for each of the P fields (unrolled: shifts and masks constants) the
[T = Nt * G, D] key and value tiles are dequantized element by element (codes * scale + zero, the
scales broadcast and reshaped), cast, and fed to one score dot and one value dot (or one per
channel group with `value_split`). Split-K: each split owns whole tiles; its last tile is moved
back inside the array when it would run past the end, and blocks it re-reads are masked.

All visit tokens in field-major order; attention does not depend on the order.

Bytes read per token and KV head at D=128, G=32, 16-bit scale/zero: int8 288, int4 160, int2 96
versus 512 for a bf16 cache (1.8x, 3.2x, 5.3x less).

`reference` is the plain jnp version (dequantize, mask, float32 softmax); tests compare the kernel
against it on CPU in interpret mode (automatic there).

Measured on an H100 (2026-12-05, fourth session, `experiments/bench_quant.py`, 32k x batch 8):
the default ("fold", dequant, exact unpack, 2 warps) int8 455 / int4 413 / int2 391 us vs 365 us
for the bf16 dense kernel (0.80x / 0.88x / 0.93x; third session's default 814 / 774 / 754 us).
Still bound by per-step work (one 32-token field per softmax step, ~0.8 us of SM time each), not
bytes. docs/benchmarks_quant.md has the sweeps, the profile and the next steps.
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
_TINY = 2.0**-60  # stands in for a zero scale in `_fold_kernel` (zero / scale stays finite)
MIN_ROWS = 16  # tensor-core dots need >= 16 rows: query heads of a KV head are padded to this
TARGET_PROGRAMS = 1024  # ~8 programs per SM on an H100 (132 SMs): 16 splits at 8 x 8 heads


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


def unpack_plan(
    bits: int, fast: bool, multiple: int = 1
) -> list[tuple[int, list[tuple[int, int]]]]:
    """Static plan [(shift, [(field j, bit position p), ...]), ...] of one word's P fields.

    Each entry shifts the word once (shift > 0: right, < 0: left, 0: none) and then reads its
    fields at bit p with one mask/or (see `_field`); p lies in [lo, 23 - bits] with lo = 0
    (exact) or FAST_WINDOW (fast), so a few shifts per word serve all P fields. Every entry
    holds a multiple of `multiple` fields (a power of two dividing P that fits one shift's
    window; `fields_per_shift`).
    """
    per, lo, top = 32 // bits, FAST_WINDOW if fast else 0, _MANTISSA - bits
    limit = fields_per_shift(bits, fast)
    if multiple < 1 or per % multiple or multiple > limit:
        raise ValueError(f"multiple must divide {per} and be at most {limit} at {bits} bits, "
                         f"got {multiple}")
    plan, j = [], 0
    while j < per:
        shift = bits * j - lo
        fields = []
        while j < per and bits * j - shift <= top:
            fields.append((j, bits * j - shift))
            j += 1
        keep = len(fields) // multiple * multiple
        j -= len(fields) - keep
        plan.append((shift, fields[:keep]))
    return plan


def fields_per_shift(bits: int, fast: bool) -> int:
    """Largest power of two of fields one word shift can serve (`unpack_plan`)."""
    n = (_MANTISSA - bits - (FAST_WINDOW if fast else 0)) // bits + 1
    return min(32 // bits, _pow2_floor(n))


def _shift(words: Array, shift: int) -> Array:
    if shift > 0:
        return jnp.right_shift(words, jnp.uint32(shift))
    if shift < 0:
        return jnp.left_shift(words, jnp.uint32(-shift))
    return words


def _pow2(e):
    """2.0 ** e: a Python float for an int e, else float32 from the exponent bits of an int32
    scalar in [-126, 127] (a field position only known inside a loop)."""
    if isinstance(e, int):
        return 2.0**e
    return lax.bitcast_convert_type((e.astype(jnp.int32) + 127) << 23, jnp.float32)


def _field(src: Array, bits: int, pos, fast: bool) -> tuple[Array, float, float]:
    """The code at bit `pos` of `src` words as float32 f with code * scale + zero =
    f * (scale * a) + (zero - scale * b); returns (f, a, b). pos is an int (then a, b are
    Python floats) or an int32 scalar traced in a loop (then a, and b when fast, are float32).

    One LOP3 (mask and or into a float's bits), no int->float conversion:
      exact (a field below bit 23): f = 2^23 + code * 2^pos - 2^23 (one FADD): a = 2^-pos, b = 0;
      fast: f = 1 + code * 2^(pos - 23) (no FADD): a = b = 2^(23 - pos); the rounding of
        zero - scale * b costs <= scale * 2^(-1 - pos) (pos >= FAST_WINDOW), below bf16 rounding.
    """
    mask = jnp.uint32(2**bits - 1)
    shifted = mask << (jnp.uint32(pos) if isinstance(pos, int) else pos.astype(jnp.uint32))
    c = src & shifted
    if fast:
        a = _pow2(_MANTISSA - pos)
        return lax.bitcast_convert_type(c | jnp.uint32(_ONE), jnp.float32), a, a
    f = lax.bitcast_convert_type(c | jnp.uint32(_MAGIC), jnp.float32) - _MAGIC_F
    return f, _pow2(-pos), 0.0


def _affine(f: Array, scale: Array, zero: Array, a, b) -> Array:
    """f * (scale * a) + (zero - scale * b) (scale, zero broadcast against f; b is 0.0 or a)."""
    sa = scale * a
    if isinstance(b, float) and b == 0.0:
        return f * sa + zero
    return f * sa + (zero - sa)


def _online_update(carry, s, valid, pv):
    """One online-softmax step over a score tile s [gp, T] (masked by valid [1, T]).

    pv(probs) -> list of per-channel-group products probs @ v_c, added to the rescaled
    accumulators."""
    return _online_update_many(carry, [(s, valid, pv)])


def _online_update_many(carry, tiles):
    """One online-softmax step over several score tiles [(s [gp, T], valid [1, T], pv), ...]:
    one running-max update and one rescale of the accumulators for all of them."""
    m, den, accs = carry
    m_new = m
    for s, _, _ in tiles:
        m_new = jnp.maximum(m_new, jnp.max(s, axis=1))
    alpha = jnp.exp(m - m_new)
    den = den * alpha
    accs = tuple(a * alpha[:, None] for a in accs)
    for s, valid, pv in tiles:
        probs = jnp.where(valid, jnp.exp(s - m_new[:, None]), 0.0)
        den = den + jnp.sum(probs, axis=1)
        accs = tuple(a + c for a, c in zip(accs, pv(probs)))
    return m_new, den, accs


def _residual(carry, q, rk_ref, rv_ref, nr, is_residual_split, res_chunk, sm_scale, aw,
              row_ok=None):
    """Online-softmax steps over the residual window (rk_ref, rv_ref [R, D], slots [0, nr)
    valid), in chunks of res_chunk keys; only the residual split (is_residual_split) reads it.
    The output accumulators are D / aw tiles [gp, aw]; row_ok [gp, 1] (optional) limits the
    rows that attend."""
    ddt = q.dtype
    d = q.shape[1]
    riota = lax.broadcasted_iota(jnp.int32, (1, res_chunk), 1)

    def rblock(c, carry):
        rk = rk_ref[pl.ds(c * res_chunk, res_chunk), :]
        s = _dot_nt(q, rk.astype(ddt)) * sm_scale
        valid = c * res_chunk + riota < nr
        if row_ok is not None:
            valid = valid & row_ok

        def pv(probs):
            pd = probs.astype(ddt)
            return [
                _dot_nn(pd, rv_ref[pl.ds(c * res_chunk, res_chunk), pl.ds(g * aw, aw)].astype(ddt))
                for g in range(d // aw)
            ]

        return _online_update(carry, jnp.where(valid, s, NEG), valid, pv)

    n_rc = jnp.where(is_residual_split, (nr + res_chunk - 1) // res_chunk, 0)
    return lax.fori_loop(0, n_rc, rblock, carry)


def _out_refs(rest, has_residual):
    """(rk_ref, rv_ref, o_ref, m_ref, l_ref) from a kernel's trailing refs (None, None when no
    residual window is passed)."""
    return tuple(rest) if has_residual else (None, None, *rest)


def _empty_carry(rows: int, width: int, n: int):
    """Online-softmax state: running max, denominator, n accumulators [rows, width]."""
    return (jnp.full((rows,), NEG, jnp.float32), jnp.zeros((rows,), jnp.float32),
            tuple(jnp.zeros((rows, width), jnp.float32) for _ in range(n)))


def _split_blocks(nq, split, tokens_per_block: int, blocks_per_split: int, num_splits: int):
    """Blocks [start, stop) of split `split` that hold any of the nq valid tokens (empty for
    the residual split, index num_splits)."""
    nblk = (nq + tokens_per_block - 1) // tokens_per_block
    start = split * blocks_per_split
    stop = jnp.where(split < num_splits, jnp.minimum(start + blocks_per_split, nblk), start)
    return start, jnp.maximum(stop, start)


def _store(o_ref, m_ref, l_ref, carry, width: int):
    m, den, accs = carry
    for c, acc in enumerate(accs):
        o_ref[:, pl.ds(c * width, width)] = acc
    m_ref[...] = m
    l_ref[...] = den


def _exact_codes(words: Array, shift: Array, mask: Array) -> Array:
    """float32 codes (words >> shift) & mask, exact (the 2^23 trick: no int->float convert)."""
    c = (words >> shift) & mask
    return lax.bitcast_convert_type(c | jnp.uint32(_MAGIC), jnp.float32) - _MAGIC_F


def _safe_scale(scale: Array) -> Array:
    """Scales (>= 0, as `kvjax.quant` writes them) with zeros (constant groups) raised to a
    tiny one: code + zero / scale stays finite and scale * (code + zero / scale) is still the
    zero point. One max per element (a where on |scale| cost a compare and a select)."""
    return jnp.maximum(scale, _TINY)


def _over(zero: Array, scale: Array) -> Array:
    """zero / scale for safe scales, as zero * rsqrt(scale)^2: a hardware reciprocal square
    root and two multiplies (relative error ~2^-22) instead of an IEEE division (a dozen
    instructions with its special-case checks, per element of the broadcast row)."""
    r = lax.rsqrt(scale)
    return zero * (r * r)


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
    rk_ref, rv_ref, o_ref, m_ref, l_ref = _out_refs(rest, has_residual)
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
    carry = _empty_carry(gp, aw, d // aw)
    t3 = lax.broadcasted_iota(jnp.int32, (rows, 1, 1), 0)
    c3 = lax.broadcasted_iota(jnp.int32, (1, ncg, 1), 1)
    # tile row t -> (block n0 + t // G, word row t % G); as a row [1, T] and a column [T, 1]
    t_row = lax.broadcasted_iota(jnp.int32, (1, rows), 1)
    t_col = lax.broadcasted_iota(jnp.int32, (rows, 1), 0)
    start, stop = _split_blocks(nq, split, per * group, blocks_per_split, num_splits)

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
        carry = _residual(carry, q, rk_ref, rv_ref, nr_ref[()], split == num_splits, res_chunk,
                          sm_scale, aw)
    _store(o_ref, m_ref, l_ref, carry, aw)


def _fold_kernel(
    nq_ref, nr_ref, q_ref, kc_ref, ks_ref, kz_ref, vc_ref, vs_ref, vz_ref, *rest,
    bits: int, group: int, vgroup: int, blocks_per_split: int, num_splits: int,
    sm_scale: float, res_chunk: int, has_residual: bool, unroll: bool, prefetch: bool,
    zero_in_codes: bool, dequant: bool, fast: bool, reload: bool = False, nf: int = 1,
):
    """Variant "fold": one program (row b, KV head h, split s); refs per (b, h):
    kc_ref, vc_ref uint32[Nb, G, D]; ks_ref, kz_ref [Nb, P, D]; vs_ref, vz_ref [Nb, P, ncg, G].

    Scales are folded into the small operands instead of dequantizing every element: for the
    token group of field j of block n, with codes c exact in the dot dtype (<= 255),
      scores = (q * k_scale * sm) @ c^T + (q . k_zero) * sm        (k_scale, k_zero: [1, D])
      out_c += (p * v_scale_c) @ c_c + p @ v_zero_c                (per channel group c)
    so the per-element work is one shift, one mask-or and one add (exact 2^23 trick) plus the
    cast; the words of a block are loaded once and read for each of its P fields.
    zero_in_codes moves the zero points into the code operand instead (k = s (c + z / s), one
    more add per element) so that no step needs the row sums q . z and p . z (cross-lane
    shuffles, the largest cost of a step in the H100 profile); its rounding is that of a bf16
    key or value (c + z / s is rounded to the dot dtype, relative 2^-9).
    dequant instead applies scale and zero to the code tiles (one FMA per element, the [1, D]
    key rows and [G, 1] value columns broadcast): the dots' A operands (queries,
    probabilities) are held by every warp of a program, so scaling them costs more per step
    than scaling the codes (compiled-code count, `experiments/kernel_report.py`). With
    dequant, fields are read in place as in "tile" (`unpack_plan`: one word shift per group of
    fields, then one mask-or per element; `fast` also drops the FADD, error <= scale * 2^-9).
    With dequant (and the field loop not unrolled), `reload` reads a block's words again in
    every step instead of holding them in registers across the field loop (the block is in L1
    after its first step): fewer registers per thread, more L1 loads. `nf` fields (with
    dequant) share one online-softmax step: one running-max update and one accumulator rescale
    per nf * G tokens (separate dots per field, no reshapes)."""
    rk_ref, rv_ref, o_ref, m_ref, l_ref = _out_refs(rest, has_residual)
    split = pl.program_id(2)
    per = 32 // bits
    gp, d = q_ref.shape
    ncg = d // vgroup
    q = q_ref[...].astype(jnp.float32)
    ddt = q_ref.dtype
    nq = nq_ref[()]
    carry = _empty_carry(gp, vgroup, ncg)
    w_row = lax.broadcasted_iota(jnp.int32, (1, group), 1)
    start, stop = _split_blocks(nq, split, per * group, blocks_per_split, num_splits)
    mask = jnp.uint32(2**bits - 1)

    def codes(words, j, off=None):  # field j (a Python int when unrolled) in the dot dtype:
        # the exact code, or code + off (zero / scale, broadcast) with zero_in_codes
        f = _exact_codes(words, lax.convert_element_type(j * bits, jnp.uint32), mask)
        return (f if off is None else f + off).astype(ddt)

    def load_words(n):
        n = jnp.minimum(n, kc_ref.shape[0] - 1)
        return kc_ref[n], tuple(vc_ref[n, :, pl.ds(c * vgroup, vgroup)] for c in range(ncg))

    qd = (q * sm_scale).astype(ddt)  # the score dot's A operand when dequantizing
    reloading = dequant and reload and not unroll

    def dq(words, pos, scale, zero):  # code * scale + zero, the field read in place
        f, a, b = _field(words, bits, pos, fast)
        return _affine(f, scale, zero, a, b)

    def field(n, j, kw, vws, carry, shift=0):
        return fields_step(n, [j], kw, vws, carry, shift)

    def fields_step(n, js, kw, vws, carry, shift=0):  # one online-softmax step, fields js
        if kw is None:  # reload: this step's own load of the block (j >> 30 == 0 keeps the
            # loop-invariant load inside the loop)
            kw, vws = load_words(n + (js[0] >> 30))
            kw, vws = _shift(kw, shift), tuple(_shift(v, shift) for v in vws)
        return _online_update_many(carry, [tile(n, j, kw, vws, shift) for j in js])

    def tile(n, j, kw, vws, shift):  # (scores [gp, G], valid [1, G], pv) of field j
        ks = ks_ref[n, pl.ds(j, 1), :].astype(jnp.float32)  # [1, D]
        kz = kz_ref[n, pl.ds(j, 1), :].astype(jnp.float32)
        if dequant:  # k = code * scale + zero on the B operand; A (the queries) stays put
            s = _dot_nt(qd, dq(kw, j * bits - shift, ks, kz).astype(ddt))
        elif zero_in_codes:  # q . (s (c + z / s)): no row reduction for the zero term
            ks = _safe_scale(ks)
            s = _dot_nt((q * (ks * sm_scale)).astype(ddt), codes(kw, j, _over(kz, ks)))
        else:
            zq = jnp.sum(q * kz, axis=1) * sm_scale  # [gp]
            s = _dot_nt((q * (ks * sm_scale)).astype(ddt), codes(kw, j)) + zq[:, None]
        valid = (n * per + j) * group + w_row < nq  # [1, G]
        s = jnp.where(valid, s, NEG)

        def pv(probs):
            out = []
            pd = probs.astype(ddt)
            for c in range(ncg):
                vs = vs_ref[n, j, c, :].astype(jnp.float32)  # [G] (per token)
                vz = vz_ref[n, j, c, :].astype(jnp.float32)
                if dequant:
                    v = dq(vws[c], j * bits - shift, vs[:, None], vz[:, None])
                    out.append(_dot_nn(pd, v.astype(ddt)))
                elif zero_in_codes:
                    vs = _safe_scale(vs)
                    out.append(_dot_nn((probs * vs[None, :]).astype(ddt),
                                       codes(vws[c], j, _over(vz, vs)[:, None])))
                else:
                    pc = _dot_nn((probs * vs[None, :]).astype(ddt), codes(vws[c], j))
                    out.append(pc + jnp.sum(probs * vz[None, :], axis=1)[:, None])
            return out

        return s, valid, pv

    def block(n, state):
        carry, words = state
        if reloading:  # every field loads the block itself
            kw = vws = nxt = None
        else:
            kw, vws = words if prefetch else load_words(n)
            nxt = load_words(n + 1) if prefetch else words
        if dequant:  # fields grouped by the word shift that brings them into the mantissa
            for shift, fields in unpack_plan(bits, fast, nf):
                if reloading:
                    ksrc, vsrc = None, None
                else:
                    ksrc, vsrc = _shift(kw, shift), tuple(_shift(v, shift) for v in vws)
                j0, steps = fields[0][0], len(fields) // nf
                if unroll:
                    for i in range(steps):
                        js = list(range(j0 + i * nf, j0 + (i + 1) * nf))
                        carry = fields_step(n, js, ksrc, vsrc, carry, shift)
                else:
                    def step(i, c, ks=ksrc, vs=vsrc, sh=shift, j0=j0):
                        js = [j0 + i * nf + f for f in range(nf)]
                        return fields_step(n, js, ks, vs, c, sh)

                    carry = lax.fori_loop(0, steps, step, carry)
        elif unroll:
            for j in range(per):
                carry = field(n, j, kw, vws, carry)
        else:
            carry = lax.fori_loop(0, per, lambda j, c: field(n, j, kw, vws, c), carry)
        return carry, nxt

    words0 = load_words(start) if prefetch and not reloading else None
    carry, _ = lax.fori_loop(start, stop, block, (carry, words0))

    if has_residual:
        carry = _residual(carry, q_ref[...], rk_ref, rv_ref, nr_ref[()], split == num_splits,
                          res_chunk, sm_scale, vgroup)
    _store(o_ref, m_ref, l_ref, carry, vgroup)


def _stack_kernel(
    nq_ref, nr_ref, q_ref, kc_ref, ks_ref, kz_ref, vc_ref, vs_ref, vz_ref, *rest,
    bits: int, group: int, vgroup: int, blocks_per_split: int, num_splits: int,
    sm_scale: float, res_chunk: int, has_residual: bool, fields: int, qrows: int,
):
    """Variant "stack": like "fold" (zero points in the codes), but F = `fields` code fields
    share one step, stacked as virtual query rows. Row r of q_ref [R, D] is query head r % Gp
    (Gp = qrows) of field slot jr = r // Gp (rows with jr >= F are padding). For fields j0 + jj,
    jj < F, of block n:
      scores [R, G]   = Qf @ Cf^T,  Qf[r, (jj, d)] = [jj == jr] q[r, d] k_scale_jj[d] sm,
                                    Cf[w, (jj, d)] = code_jj[w, d] + k_zero_jj[d] / k_scale_jj[d]
      out_c  [R, Gv] += Pf_c @ Vf_c, Pf_c[r, (jj, w)] = [jj == jr] p[r, w] v_scale_jj[c, w],
                                    Vf_c[(jj, w), e] = code_jj[w, e] + v_zero_jj[c, w] / v_scale
    Every row of a score tile is a real (query head, token group) pair when F * Gp >= 16 (in
    "fold" 12 of 16 rows are padding at Gp = 4) and one softmax step covers F * G tokens. Rows
    of different field slots are separate partials, merged by `combine` like splits. The
    block-diagonal operands cost F x the tensor-core work, which decode has to spare."""
    rk_ref, rv_ref, o_ref, m_ref, l_ref = _out_refs(rest, has_residual)
    split = pl.program_id(2)
    per = 32 // bits
    rows, d = q_ref.shape
    ncg = d // vgroup
    q = q_ref[...].astype(jnp.float32)
    ddt = q_ref.dtype
    nq = nq_ref[()]
    carry = _empty_carry(rows, vgroup, ncg)
    jr = lax.broadcasted_iota(jnp.int32, (rows, 1), 0) // qrows  # field slot of each row
    w_row = lax.broadcasted_iota(jnp.int32, (1, group), 1)
    # [jj == jr] masks of the block-diagonal operands: [R, F, 1] (keys), [R, F, 1] (values)
    diag = (lax.broadcasted_iota(jnp.int32, (rows, fields, 1), 0) // qrows
            == lax.broadcasted_iota(jnp.int32, (rows, fields, 1), 1))
    slot_k = lax.broadcasted_iota(jnp.int32, (1, fields, 1), 1)  # jj of Cf's [G, F, D]
    slot_v = lax.broadcasted_iota(jnp.int32, (fields, 1, 1), 0)  # jj of Vf's [F, G, Gv]
    start, stop = _split_blocks(nq, split, per * group, blocks_per_split, num_splits)
    mask = jnp.uint32(2**bits - 1)

    def unpack(words, slot, j0):  # exact codes of fields j0 + slot, float32
        return _exact_codes(words, ((j0 + slot) * bits).astype(jnp.uint32), mask)

    def step(n, j0, kw, vws, carry):
        ks = _safe_scale(ks_ref[n, pl.ds(j0, fields), :].astype(jnp.float32))  # [F, D]
        kz = kz_ref[n, pl.ds(j0, fields), :].astype(jnp.float32)
        cf = unpack(kw[:, None, :], slot_k, j0) + _over(kz, ks)[None]  # [G, F, D]
        qf = jnp.where(diag, q[:, None, :] * (ks * sm_scale)[None], 0.0)  # [R, F, D]
        s = _dot_nt(qf.reshape(rows, fields * d).astype(ddt),
                    cf.reshape(group, fields * d).astype(ddt))  # [R, G]
        valid = (jr < fields) & ((n * per + j0 + jr) * group + w_row < nq)  # [R, G]
        s = jnp.where(valid, s, NEG)

        def pv(probs):
            out = []
            for c in range(ncg):
                vs = _safe_scale(vs_ref[n, pl.ds(j0, fields), c, :].astype(jnp.float32))
                vz = vz_ref[n, pl.ds(j0, fields), c, :].astype(jnp.float32)
                vf = unpack(vws[c][None], slot_v, j0) + _over(vz, vs)[:, :, None]  # [F, G, Gv]
                pf = jnp.where(diag, probs[:, None, :] * vs[None], 0.0)  # [R, F, G]
                out.append(_dot_nn(pf.reshape(rows, fields * group).astype(ddt),
                                   vf.reshape(fields * group, vgroup).astype(ddt)))
            return out

        return _online_update(carry, s, valid, pv)

    def block(n, carry):
        kw = kc_ref[n]  # [G, D]
        vws = tuple(vc_ref[n, :, pl.ds(c * vgroup, vgroup)] for c in range(ncg))
        return lax.fori_loop(0, per // fields,
                             lambda i, cr: step(n, i * fields, kw, vws, cr), carry)

    carry = lax.fori_loop(start, stop, block, carry)
    if has_residual:  # field slot 0's rows read the residual window
        carry = _residual(carry, q_ref[...], rk_ref, rv_ref, nr_ref[()], split == num_splits,
                          res_chunk, sm_scale, vgroup, row_ok=jr == 0)
    _store(o_ref, m_ref, l_ref, carry, vgroup)


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
    static_argnames=("scale", "variant", "block_tokens", "num_splits", "num_warps", "num_stages",
                     "fast_unpack", "value_split", "unroll", "prefetch", "zero_in_codes",
                     "dequant", "reload", "fields", "interpret"),
)
def _partials(q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, num_quantized,
              residual_keys, residual_values, num_residual, *, scale, variant, block_tokens,
              num_splits, num_warps, num_stages, fast_unpack, value_split, unroll, prefetch,
              zero_in_codes, dequant, reload, fields, interpret):
    bits, g, vg, gq = _layout(q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero,
                              num_quantized)
    b, hq, d = q.shape
    h, nb = k_codes.shape[1], k_codes.shape[2]
    per = 32 // bits
    ng, ncg = nb * per, d // vg
    fold = variant in ("fold", "stack")  # one block per step, fold layouts
    if variant == "stack":  # q rows stacked per field slot: row r = head r % gp of slot r // gp
        qg, _, gp = pad_query_groups(q, h, 1)
        nf = min(per, max(1, MIN_ROWS // gp)) if fields is None else fields
        qg = jnp.tile(qg, (1, 1, nf, 1))
        rows = max(MIN_ROWS, nf * gp)
        qg = jnp.pad(qg, ((0, 0), (0, 0), (0, rows - nf * gp), (0, 0)))
    else:
        qg, _, gp = pad_query_groups(q, h, MIN_ROWS)
        nf, rows = 1, gp
    nt = 1 if fold else _pow2_floor(min(max(1, block_tokens // g), nb))  # blocks per tile
    splits = default_splits(b, h, nb, nt) if num_splits is None else min(num_splits, nb)
    bps = _cdiv(_cdiv(nb, splits), nt) * nt  # blocks per split: whole tiles
    splits = _cdiv(nb, bps)
    has_res = residual_keys is not None
    res_chunk = 0
    kshape = (nb, per, d)
    if fold:
        vc, vshape = v_codes.reshape(b, h, nb, g, d), (nb, g, d)
        vsshape = (nb, per, ncg, g)
    else:
        vshape = (nb * g, d) if value_split else (nb * g, ncg, vg)
        vc, vsshape = v_codes.reshape(b, h, *vshape), (ng * ncg * g,)
    inputs = [
        num_quantized.astype(jnp.int32),
        (num_residual if has_res else num_quantized).astype(jnp.int32),
        qg,
        k_codes, k_scale.reshape(b, h, *kshape), k_zero.reshape(b, h, *kshape),
        vc, v_scale.reshape(b, h, *vsshape), v_zero.reshape(b, h, *vsshape),
    ]
    in_specs = [
        pl.BlockSpec((None, None), lambda i, j, s: (i, j)),
        pl.BlockSpec((None, None), lambda i, j, s: (i, j)),
        whole_head((rows, d)),
        whole_head((nb, g, d)), whole_head(kshape), whole_head(kshape),
        whole_head(vshape), whole_head(vsshape), whole_head(vsshape),
    ]
    if has_res:
        r = residual_keys.shape[2]
        res_chunk = next(c for c in (128, 64, 32, 16, 8, 4, 2, 1) if r % c == 0)
        inputs += [residual_keys, residual_values]
        in_specs += [whole_head((r, d)), whole_head((r, d))]
    grid_splits = splits + int(has_res)
    common = dict(bits=bits, group=g, vgroup=vg, blocks_per_split=bps, num_splits=splits,
                  sm_scale=scale, res_chunk=res_chunk, has_residual=has_res)
    if variant == "stack":
        kernel = functools.partial(_stack_kernel, fields=nf, qrows=gp, **common)
    elif fold:
        kernel = functools.partial(_fold_kernel, unroll=unroll, prefetch=prefetch,
                                   zero_in_codes=zero_in_codes, dequant=dequant,
                                   fast=fast_unpack, reload=reload, nf=fields or 1, **common)
    else:
        kernel = functools.partial(_kernel, tile_blocks=nt, fast=fast_unpack,
                                   value_split=value_split, **common)
    o, m, den = pl.pallas_call(
        kernel,
        grid=(b, h, grid_splits),
        in_specs=in_specs,
        out_specs=partial_specs(rows, d),
        out_shape=partial_shapes(b, h, grid_splits, rows, d),
        interpret=interpret,
        name=f"quantized_decode_attention_int{bits}",
        **launch_params(num_warps, num_stages, interpret),
    )(*inputs)
    if variant == "stack":  # field slots become splits: [B, H, S * F, G, ...]
        o = o[:, :, :, :nf * gp].reshape(b, h, grid_splits * nf, gp, d)
        m = m[..., :nf * gp].reshape(b, h, grid_splits * nf, gp)
        den = den[..., :nf * gp].reshape(b, h, grid_splits * nf, gp)
    return o[:, :, :, :gq], m[..., :gq], den[..., :gq]


# Launch defaults per bit width (H100, 32k x batch 8; `experiments/bench_quant.py --tune`,
# 2026-12-05 fourth session: "fold" with `dequant` (scales applied to the code tiles), the exact
# unpack, 2 warps and ~1024 programs was the best of every width in two sweeps; `reload`,
# `fields` = 2, 4 / 8 warps, 2 stages and 8 / 32 splits were slower; docs/benchmarks_quant.md).
DEFAULT_CONFIG = {
    bits: dict(variant="fold", block_tokens=64, num_warps=2, num_stages=1, value_split=False,
               unroll=False, prefetch=False, zero_in_codes=True, dequant=True, reload=False,
               fast_unpack=False, fields=None)
    for bits in (8, 4, 2)
}
VARIANTS = ("fold", "tile", "stack")


def check_residual(q: Array, kv_heads: int, residual_keys: Array | None,
                   residual_values: Array | None, num_residual: Array | None) -> None:
    """ValueError unless the residual window's arrays come all or none, keys / values shaped
    [B, Hkv, R, D] for q [B, Hq, D] (shared by the Triton and Mosaic GPU quantized kernels)."""
    if (residual_keys is None) != (residual_values is None) or (
        (residual_keys is None) != (num_residual is None)
    ):
        raise ValueError("residual_keys, residual_values and num_residual go together")
    if residual_keys is not None:
        expect = (q.shape[0], kv_heads, residual_keys.shape[2], q.shape[2])
        if residual_keys.shape != expect or residual_values.shape != expect:
            raise ValueError(
                f"residual keys/values must have shape {expect}, got "
                f"{residual_keys.shape} and {residual_values.shape}"
            )


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
    variant: str | None = None,
    unroll: bool | None = None,
    prefetch: bool | None = None,
    zero_in_codes: bool | None = None,
    dequant: bool | None = None,
    reload: bool | None = None,
    fields: int | None = None,
    interpret: bool | None = None,
) -> tuple[Array, Array, Array]:
    """Split-K partials: (o float32[B, Hkv, S, Gq, D], m, l float32[B, Hkv, S, Gq]).

    o is the unnormalised output, m the running max and l the softmax denominator of each
    split; the residual window (when given) is the last split. Merge with `combine`. Scales
    must be >= 0, as `kvjax.quant` writes them ((max - min) / levels): "fold" with
    zero_in_codes and "stack" raise zero scales to a tiny positive one before dividing by them.

    variant: "fold" (`_fold_kernel`: one block of G word rows and one code field per step,
      scales applied to the code tiles with `dequant` (the default) or folded into the query /
      probability rows; needs a value channel group Gv >= 16 when compiled), "stack"
      (`_stack_kernel`: "fold" with several fields per step stacked as query rows) or "tile"
      (`_kernel`: every element dequantized, tiles of several blocks).
      None: `DEFAULT_CONFIG` of the bit width, "tile" where Gv < 16.
    Launch parameters (None: `DEFAULT_CONFIG` of the bit width, splits from `default_splits`):
      num_splits: split-K pieces of the quantized part per (row, KV head).
      num_warps, num_stages: Triton launch parameters (compiled only).
      unroll ("fold"): unroll the loop over the P code fields of a block (else a loop).
      prefetch ("fold"): load the next block's words before reading the current block's.
      zero_in_codes ("fold" without dequant): add zero / scale to the codes instead of row
        sums of the zero terms (see `_fold_kernel`).
      dequant ("fold"): scale the code tiles (one FMA per element) instead of folding scales
        into the query / probability rows (see `_fold_kernel`).
      reload ("fold" with dequant): every code field loads its block's words again (from L1)
        instead of keeping them in registers across the field loop (see `_fold_kernel`).
      fields: code fields per online-softmax step. "stack": a power of two dividing 32 / bits
        (None: as many as fill 16 query rows). "fold": needs dequant, a power of two up to
        `fields_per_shift(bits, fast_unpack)` (None: 1).
      block_tokens ("tile"): word rows per tile = tokens per dot and per softmax step (a
        power-of-two multiple of G, at most 512); one loop iteration covers block_tokens * P
        tokens.
    fast_unpack ("tile", and "fold" with dequant): read codes without the FADD of the exact
      2^23 trick (`_field`): the zero point absorbs a power-of-two offset, adding an error
      <= scale * 2^-9 per dequantized element, below the rounding of the bf16/fp16 dot
      operands. None: `DEFAULT_CONFIG` (off: with "fold" at 2 warps it spills registers; on the
      H100 int4 / int2 ran 1.3-1.5x slower with it, int8 the same).
    value_split ("tile"): dequantize values as D / Gv tiles [T, Gv] with one dot each instead of one
      [T, ncg, Gv] tile reshaped to [T, D] and one dot (an alternative lowering, same result).
    interpret: None runs interpreted on CPU and compiled (Triton) elsewhere.
    """
    if q.ndim != 3:
        raise ValueError(f"q must be [batch, query_heads, head_dim], got shape {q.shape}")
    check_residual(q, k_codes.shape[1], residual_keys, residual_values, num_residual)
    check_num_splits(num_splits)
    bits, g, vg, _ = _layout(q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero,
                             num_quantized)
    cfg = launch_config(DEFAULT_CONFIG[bits], block_tokens=block_tokens, num_warps=num_warps,
                        num_stages=num_stages, unroll=unroll, prefetch=prefetch,
                        zero_in_codes=zero_in_codes, dequant=dequant, reload=reload,
                        fast_unpack=fast_unpack, value_split=value_split, fields=fields)
    fields = cfg["fields"]
    fast = bool(cfg["fast_unpack"])
    interpret = resolve_interpret(interpret)
    if variant is None:
        variant = cfg["variant"] if vg >= 16 or interpret else "tile"
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    if variant != "tile" and vg < 16 and not interpret:
        raise ValueError(f'variant "{variant}" needs a value channel group >= 16 when '
                         f"compiled, got {vg}")
    per = 32 // bits
    if fields is not None and (not isinstance(fields, int) or fields < 1
                               or fields & (fields - 1) or fields > per):
        raise ValueError(f"fields must be a power of two in [1, {per}] at {bits} bits, "
                         f"got {fields!r}")
    limit = fields_per_shift(bits, fast)
    if variant == "fold" and fields not in (None, 1) and (not cfg["dequant"] or fields > limit):
        raise ValueError(
            f'fields > 1 with variant "fold" needs dequant=True and at most {limit} fields at '
            f"{bits} bits (fast_unpack={fast}), got {fields!r}")
    if variant == "tile" and fields not in (None, 1):
        raise ValueError(f'variant "tile" takes no fields, got {fields!r}')
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
        residual_keys, residual_values, num_residual, scale=scale, variant=variant,
        block_tokens=bt, num_splits=num_splits, num_warps=int(cfg["num_warps"]),
        num_stages=int(cfg["num_stages"]),
        fast_unpack=fast, value_split=bool(cfg["value_split"]),
        unroll=bool(cfg["unroll"]), prefetch=bool(cfg["prefetch"]),
        zero_in_codes=bool(cfg["zero_in_codes"]), dequant=bool(cfg["dequant"]),
        reload=bool(cfg["reload"]), fields=fields,
        interpret=interpret,
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
