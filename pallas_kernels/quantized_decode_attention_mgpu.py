"""Decode attention over a KIVI int4 / int2 cache on Pallas Mosaic GPU (Hopper TMA + WGMMA),
split-K.

The quantized part is read as int4 codes, 16-bit scales and zero points and dequantized in
registers (no bf16 copy of the cache is written). One program per (row, KV head, split) streams
steps of `block_tokens` tokens (one to four 64-token tiles sharing one online-softmax update)
through a `num_stages`-deep shared-memory ring filled by TMA. The last split goes on over the
bf16 residual window in 64-token steps of the same online softmax, its tiles loaded straight
into WGMMA registers (`load_tile`), so that one launch and one merge cover the whole cache
(`fuse_residual`, the default since the twelfth session; False: a separate jnp pass merged by
log-sum-exp):

  keys    S^T = K Q^T: the tile's [64, 64] code chunks are upcast to bf16 by Mosaic GPU
          (`WGMMA_UPCAST_4X` load, relaid out to `WGMMA`), dequantized in registers
          (`dequant`: (code + 8) * scale + zero on bf16 pairs, each thread gathering the scale
          and zero of its own elements) and fed to WGMMA as the register A operand; the query
          heads of the KV head are the N = 16 columns (zero padded).
          Words layout (k4 / v4 uint32 words, `pack_words`, 4 or 2 bits; the fastest, twelfth
          session): each 64 x 64 tile is stored in the order
          the threads hold it in WGMMA registers, so a thread reads its 32 codes with one
          16-byte (8-byte) shared-memory load and unpacks them with shifts, masks and a
          magic-number bf16 conversion (`unpack_words`): no Mosaic upcast and its cross-thread
          shuffles, and 2-bit codes, which Mosaic GPU does not upcast, work.
          Dequantizing is one bf16x2 fused multiply-add per register pair (`fma`, default).
          With `fold_keys` the key scales and zero points are folded into the query operand
          once per step instead (`fold_key_scales`) and the codes enter WGMMA as upcast;
          with `fold_values` the value scales and zero points go into the probabilities
          (`fold_value_scales`). Both pass their GPU checks and are slower (8 x 32k, twelfth
          session: 234.9 us with fold_values, 356.4 with both, against 220.2 without).
  softmax float32 online softmax per column (log2 domain); tokens >= num_quantized are masked.
  values  O^T = V^T P: channel-major [64, 64] code chunks, dequantized the same way, times the
          probabilities P [64 tokens, 16] stored to shared memory as the B operand, in four
          K = 16 steps (a register A operand must be [64, swizzle / 2]).

Layout (B batch, Hkv KV heads, C quantized capacity, D head dim, G token group, Gv channel
group; Ng = C / G):
  q               [B, Hq, D] bf16          Hq = Gq * Hkv, Gq <= 16
  k4              int4[B, Hkv, C, D]        KIVI key code - 8 (signed), token-major
                  or uint32[B, Hkv, C / 64, D / 64, 2 bits, 64] words (`repack_words`)
  k_scale/k_zero  [B, Hkv, Ng, D] bf16      as `kvjax.quant.kivi`
  v4              int4[B, Hkv, D, C]        KIVI value code - 8, channel-major
                  or words like k4 of [64 channels, 64 tokens] tiles (token tile first)
  v_scale/v_zero  [B, Hkv, Ng, D // Gv, G] bf16  as `kvjax.quant.kivi`
  num_quantized   int32[B, Hkv]             tokens [0, n) are valid
  residual_keys/values [B, Hkv, R, D] (read as bf16), num_residual int32[B, Hkv] (optional)
`repack_int4` turns `kivi`'s packed uint32 codes (4 bits) into k4 / v4. Constraints: D a
multiple of 64, C a multiple of block_tokens (64, 128 or 256), G and Gv in (16, 32, 64).

Backend: Mosaic GPU (sm_90) only. The interpreter of jax 0.10.2 cannot run register-A WGMMA or
`inline_mgpu`, so on CPU the tests lower the kernel for CUDA and check the layout
(`repack_int4` + `reference_mgpu_layout` equal `quantized_decode_attention.reference`), and
compile it for an H100 through Mosaic GPU and ptxas (`tests/test_gpu_aot.py`,
`pallas_kernels.aot`); the kernel's numbers are checked on the GPU by
`experiments/bench_quant_mgpu.py` against that reference (six shape families: ragged counts,
empty heads, partial residuals, G = 16 / 32 / 64, 1 to 16 query heads per KV head; 49 checks
over the launch options and both layouts in the twelfth session, rel. L2 error <= 2.1e-3, bf16).
Measured on an H100 (docs/benchmarks_quant.md, twelfth session), 8 x 32k against the bf16 dense
kernel of the same run (358.8 us): words layout with the defaults 162.0 us at 4 bits (2.21x)
and 157.6 us at 2 bits (2.28x); int4 layout 192.9 us (1.86x); the Triton kernel 0.87x / 0.91x.
`kvjax.attention` dispatches here for `kivi(4, layout="int4")` and `kivi(4 or 2,
layout="words")` caches on sm_90 with bf16 queries and scales (`supported`, `on_hopper`).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.experimental.pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax._src.lib.mlir import ir
from jax._src.lib.mlir.dialects import arith, llvm, memref, vector
from jax.experimental.mosaic import gpu as mgpu

from pallas_kernels.decode_attention import check_num_splits, merge_partials, pad_query_groups
from pallas_kernels.quantized_decode_attention import check_residual

Array = jax.Array

T = 64  # tokens per tile (the WGMMA M rows of the key product)
N = 16  # query columns (query heads of a KV head, zero padded)
NEG = -1e30
_LOG2E = math.log2(math.e)
GROUPS = (16, 32, 64)
BLOCK_TOKENS = (64, 128, 256)
WORD_BITS = (2, 4)  # code widths of the words layout (`pack_words`)
_SWZ128 = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
_SWZ_I4 = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(32))  # UPCAST_4X loads
_SWZ_P = (plgpu.TilingTransform((8, N)), plgpu.SwizzleTransform(2 * N))  # [tokens, N] B operands
_TILE = plgpu.ShapeDtypeStruct((64, 64), jnp.bfloat16, layout=plgpu.Layout.WGMMA)  # register A


def register_offsets(shape: tuple[int, int] = (64, 64)) -> list[tuple[int, int]]:
    """(row, col) of each register of a WGMMA-layout array relative to the thread's first one.

    `thread_idxs` computes element (row, col) of register r as divmod(thread offset + t_r, width)
    with t_r a constant; in the WGMMA layout the thread offset's column is 2 * (lane % 4) <= 6 and
    every t_r's column a multiple of 8, so no carry crosses a row: row = row0 + t_r // width,
    col = col0 + t_r % width. These constants let `dequant` form each register's shared-memory
    address as one per-thread base plus an immediate offset.
    """
    layout = mgpu.WGMMA_LAYOUT
    strides = layout.tiling.tile_strides(tuple(mgpu.utils.get_contiguous_strides(shape)))
    offs = [divmod(sum(i * st for i, st in zip(t, strides)), shape[1])
            for t in np.ndindex(layout.registers_shape(shape))]
    if any(c % 8 for _, c in offs):
        raise AssertionError(f"unexpected WGMMA register offsets {offs}")
    return offs


@functools.cache
def thread_elements(shape: tuple[int, int] = (64, 64)) -> np.ndarray:
    """int[128, R, 2, 2]: (row, col) of element e of register r of thread t of a 16-bit array
    in Mosaic GPU's WGMMA layout (registers in `np.ndindex` order), computed from the layout
    object the way its `thread_idxs` does, so `pack_words` follows Mosaic's layout, not a copy.
    """
    layout = mgpu.WGMMA_LAYOUT
    strides = layout.tiling.tile_strides(tuple(mgpu.utils.get_contiguous_strides(shape)))
    tiled_shape = layout.tiled_tiling_shape
    tiled_strides = strides[-layout.tiled_tiling_rank:]

    def delinearize(i: int, dims) -> list[int]:  # as TiledLayout._delinearize_index
        sizes = [getattr(d, "times", None) or tiled_shape[d] for d in dims]
        out = [0] * len(tiled_shape)
        for d, st, n in zip(dims, mgpu.utils.get_contiguous_strides(sizes), sizes):
            if isinstance(d, int):
                out[d] = (i // st) % n
        return out

    regs = list(np.ndindex(layout.registers_shape(shape)))
    out = np.zeros((128, len(regs), 2, 2), np.int32)
    for t in range(128):
        idx = [a + b for a, b in zip(delinearize(t % 32, layout.lane_dims),
                                     delinearize((t // 32) % 4, layout.warp_dims))]
        base = sum(i * st for i, st in zip(idx, tiled_strides))
        for r, reg in enumerate(regs):
            row, col = divmod(base + sum(i * st for i, st in zip(reg, strides)), shape[1])
            out[t, r] = ((row, col), (row, col + 1))
    return out


def pack_words(codes: Array, bits: int) -> Array:
    """Codes [..., R, C] (unsigned, < 2**bits; R, C multiples of 64) -> uint32 words
    [..., R / 64, C / 64, 2 bits, 64]: per 64 x 64 tile, the 32 codes that thread t of a
    warpgroup holds in the WGMMA layout (`thread_elements`), in its `bits` consecutive words
    (t * bits ... of the tile's 128 * bits): register r's pair in word r // (16 / bits), its two
    codes at bits (bits * j, 16 + bits * j) for j = r % (16 / bits). A thread reads its tile with
    one 16-byte (4 bit) or 8-byte (2 bit) shared-memory load and unpacks with shifts and masks
    (`unpack_words`), no shuffles. A numpy `codes` gives numpy words (static tables)."""
    check_word_bits(bits)
    xp = np if isinstance(codes, np.ndarray) else jnp
    *lead, r, c = codes.shape
    if r % 64 or c % 64:
        raise ValueError(f"pack_words needs both trailing dimensions multiples of 64, got "
                         f"{codes.shape}")
    tiles = xp.swapaxes(codes.reshape(*lead, r // 64, 64, c // 64, 64), -3, -2)
    el = thread_elements()
    v = tiles.reshape(*lead, r // 64, c // 64, 4096)[..., el[..., 0] * 64 + el[..., 1]]
    v = v.astype(xp.uint32).reshape(*lead, r // 64, c // 64, 128, bits, 16 // bits, 2)
    words = (v << xp.asarray(_word_shifts(bits))).sum(axis=(-2, -1), dtype=xp.uint32)  # == or
    return words.reshape(*lead, r // 64, c // 64, 2 * bits, 64)


def unpack_words_reference(words: Array, bits: int) -> Array:
    """jnp inverse of `pack_words`: uint32 [..., R / 64, C / 64, 2 bits, 64] -> codes
    uint32 [..., R, C]."""
    *lead, nr, nc, _, _ = words.shape
    w = words.reshape(*lead, nr, nc, 128, bits, 1, 1)
    v = ((w >> jnp.asarray(_word_shifts(bits))) & (2**bits - 1)).reshape(*lead, nr, nc, 4096)
    el = thread_elements()
    pos = (el[..., 0] * 64 + el[..., 1]).reshape(-1)
    flat = jnp.zeros((*lead, nr, nc, 4096), jnp.uint32).at[..., pos].set(v)
    tiles = jnp.swapaxes(flat.reshape(*lead, nr, nc, 64, 64), -3, -2)
    return tiles.reshape(*lead, nr * 64, nc * 64)


def _word_shifts(bits: int) -> np.ndarray:
    """uint32[16 / bits, 2]: bit offsets of the two codes of pair j in its word (`pack_words`)."""
    lo = bits * np.arange(16 // bits, dtype=np.uint32)
    return np.stack([lo, lo + 16], axis=-1)


def check_word_bits(bits) -> None:
    if bits not in WORD_BITS:
        raise ValueError(f"bits of the words layout must be one of {WORD_BITS}, got {bits!r}")


def prmt_pairs(shift: int, bits: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """The two register pairs (j, PTX prmt selector) built from u = (word >> bits * shift) &
    (2**bits - 1) * 0x01010101 (`unpack_words` with prmt): its bytes 0 / 2 hold pair `shift`'s
    low / high code (bits bits * j and 16 + bits * j of the word), bytes 1 / 3 pair
    `shift + 8 / bits`'s. Selector nibble i names the source byte of result byte i (0-3: u,
    4: the 0x43 of the second operand): 0x4240 = [u0, 0x43, u2, 0x43], two bf16 128 + code."""
    return (shift, 0x4240), (shift + 8 // bits, 0x4341)


def unpack_words(ref, bits: int, prmt: bool = False) -> Array:
    """bf16[64, 64] WGMMA-layout codes (unsigned, exact) of one tile's words (`pack_words`;
    ref: uint32 [2 bits, 64] untiled shared memory). Each thread loads its `bits` words at once;
    a pair is (word >> bits j) & mask | 0x43004300, two bf16 128 + code, minus 128. With prmt
    (`prmt_pairs`) one mask serves two pairs and a byte permute puts the 0x43 exponent bytes
    beside them: per 4-bit word 2 LOP3 + 1 SHF + 4 PRMT instead of 4 LOP3 + 3 SHF, and ptxas no
    longer re-materialises the mask constant before every LOP3 (offline SASS: 128 instructions
    fewer per 128-token step)."""

    @plgpu.inline_mgpu(arg_types=(plgpu.RefType(),), return_type=_TILE)
    def f(ctx, r):
        del ctx
        layout, shape = mgpu.WGMMA_LAYOUT, (64, 64)
        i32 = ir.IntegerType.get_signless(32)
        ety = ir.MemRefType(r.type).element_type
        bf2 = ir.VectorType.get((2,), ir.BF16Type.get())
        start = arith.index_cast(ir.IndexType.get(), arith.muli(
            arith.remui(mgpu.utils.thread_idx(), mgpu.utils.c(128, i32)),
            mgpu.utils.c(bits, i32)))
        vec = vector.load(ir.VectorType.get((bits,), ety), r,
                          [arith.divui(start, _c(64)), arith.remui(start, _c(64))])
        words = [mgpu.utils.bitcast(vector.extract(
            vec, dynamic_position=[], static_position=ir.DenseI64ArrayAttr.get([k])), i32)
            for k in range(bits)]
        ppw = 16 // bits  # register pairs per word
        pairs = [None] * (bits * ppw)  # i32: two bf16 128 + code, register k's
        if prmt:  # per word: bits shifts, masks of a code per byte, one byte permute per pair
            m43 = mgpu.utils.c(0x43434343, i32)
            bmask = mgpu.utils.c((2**bits - 1) * 0x01010101, i32)
            for word, w in enumerate(words):
                for sh in range(8 // bits):
                    u = arith.shrui(w, mgpu.utils.c(bits * sh, i32)) if sh else w
                    u = arith.andi(u, bmask)
                    for j, sel in prmt_pairs(sh, bits):
                        pairs[word * ppw + j] = llvm.inline_asm(
                            i32, [u, m43], f"prmt.b32 $0, $1, $2, {sel:#x};", "=r,r,r")
        else:
            mask = mgpu.utils.c((2**bits - 1) * 0x10001, i32)
            magic = mgpu.utils.c(0x43004300, i32)
            for k in range(bits * ppw):
                word, j = divmod(k, ppw)
                w = arith.shrui(words[word], mgpu.utils.c(bits * j, i32)) if j else words[word]
                pairs[k] = arith.ori(arith.andi(w, mask), magic)
        c128 = arith.constant(bf2, ir.DenseElementsAttr.get_splat(
            bf2, ir.FloatAttr.get(ir.BF16Type.get(), 128.0)))
        regs = np.empty(layout.registers_shape(shape), dtype=object)
        for reg_idx, pair in zip(np.ndindex(regs.shape), pairs, strict=True):
            regs[reg_idx] = arith.subf(mgpu.utils.bitcast(pair, bf2), c128)
        return mgpu.FragmentedArray(_registers=regs, _layout=layout, _is_signed=None)

    return f(ref)


def fma_bf16x2(x, y, z):
    """x * y + z on two bf16 lanes (MLIR vector<2xbf16> values), rounded once: one PTX
    `fma.rn.bf16x2` (SASS HFMA2.BF16). LLVM lowers `math.fma` on bf16 vectors through float32
    (unpack, FFMA, repack: ~5x the instructions), hence the inline assembly."""
    i32 = ir.IntegerType.get_signless(32)
    out = llvm.inline_asm(i32, [mgpu.utils.bitcast(v, i32) for v in (x, y, z)],
                          "fma.rn.bf16x2 $0, $1, $2, $3;", "=r,r,r,r")
    return mgpu.utils.bitcast(out, x.type)


def dequant(a: Array, scale_ref, zero_ref, index, hoisted=None, bias: float = 8.0,
            fma: bool = False) -> Array:
    """(a + bias) * scale + zero for a bf16[64, 64] WGMMA-layout array a (upcast signed codes,
    bias 8; or `unpack_words`' unsigned codes, bias 0), on bf16 pairs: multiply, then add
    (two roundings), or with `fma` one fused multiply-add per register (`fma_bf16x2`: one
    rounding, one instruction where LLVM emits HMUL2 + HADD2). The bias sum is exact.

    Each thread gathers the scale and zero pairs of its own element pairs from shared memory
    (untiled refs; columns col, col + 1 adjacent in their last dimension) and applies them with
    bf16x2 arithmetic; no Pallas-level op gathers per element, hence `plgpu.inline_mgpu`.
    index(row, col) -> the MLIR index list of element (row, col) in the refs, evaluated for every
    register (`hoist_index=False`). hoisted = (base, offset): base(row0, col0) -> the
    index list of the thread's first element (computed once), offset(dr, dc) -> Python ints
    added to it for the element at (row0 + dr, col0 + dc) (`register_offsets`: dr in {0, 8}, dc a
    multiple of 8), so the loads take immediate offsets instead of per-register index arithmetic
    and each scale pair is loaded once per thread (`hoist_index=True`, the default).
    """

    @plgpu.inline_mgpu(
        arg_types=(plgpu.Layout.WGMMA, plgpu.RefType(), plgpu.RefType()),
        return_type=_TILE)
    def f(ctx, a, s_ref, z_ref):
        del ctx
        layout, shape = mgpu.WGMMA_LAYOUT, (64, 64)
        vty = ir.VectorType.get((2,), ir.BF16Type.get())
        shift = arith.constant(vty, ir.DenseElementsAttr.get_splat(
            vty, ir.FloatAttr.get(ir.BF16Type.get(), bias)))
        regs = np.empty(layout.registers_shape(shape), dtype=object)
        if hoisted is None:
            pairs = [(r, (index(row, col),)) for r, (row, col) in
                     zip(np.ndindex(regs.shape), layout.thread_idxs(shape))]
        else:
            base, offset = hoisted
            start = base(*next(iter(layout.thread_idxs(shape))))
            pairs = [(r, tuple(offset(dr, dc))) for r, (dr, dc) in
                     zip(np.ndindex(regs.shape), register_offsets(shape))]
        loaded = {}
        for reg_idx, key in pairs:
            if hoisted is None:
                idx = key[0]
                sc, zc = vector.load(vty, s_ref, idx), vector.load(vty, z_ref, idx)
            else:
                if key not in loaded:  # rows row0 and row0 + 8 share their scale pairs
                    idx = [arith.addi(x, _c(o)) if o else x for x, o in zip(start, key)]
                    loaded[key] = (vector.load(vty, s_ref, idx), vector.load(vty, z_ref, idx))
                sc, zc = loaded[key]
            x = a.registers[reg_idx]
            x = arith.addf(x, shift) if bias else x  # exact: small integers
            regs[reg_idx] = (fma_bf16x2(x, sc, zc) if fma else
                             arith.addf(arith.mulf(x, sc), zc))
        return mgpu.FragmentedArray(_registers=regs, _layout=layout, _is_signed=None)

    return f(a, scale_ref, zero_ref)


def fold_key_scales(q_ref, scale_ref, zero_ref, gq: int, groups_per_tile: int,
                    period: int = N) -> tuple[Array, Array]:
    """(Q', Z') bf16[64, D] in WGMMA layout: the key scales and zero points of one step folded
    into the query operand, so that the key codes enter WGMMA as they are (`fold_keys`).

    Row 16 j + c of both (tile j of the step, score column c = l * gq + h, l < groups_per_tile)
    belongs to query head h and key group j * groups_per_tile + l of the step:
        Q'[16 j + c] = q[h] * scale[g],   Z'[16 j + c] = q[h] * (zero[g] + 8 * scale[g])
    (float32 products rounded once), zero for c >= groups_per_tile * gq. Then for a token t of
    group g, sum_ch code[t] Q'[ch] + sum_ch Z'[ch] = q[h] . ((code + 8) * scale + zero): the
    score of column c, valid for the tokens of its own group only (the kernel masks the rest).
    period 8 (`fold_values`): columns 8 + c repeat columns c (c taken modulo the period).
    q_ref [16, D], scale_ref / zero_ref [G_step, D]: untiled shared memory.
    """

    d = q_ref.shape[1]
    ret = plgpu.ShapeDtypeStruct((64, d), jnp.bfloat16, layout=plgpu.Layout.WGMMA)

    @plgpu.inline_mgpu(arg_types=(plgpu.RefType(), plgpu.RefType(), plgpu.RefType()),
                       return_type=(ret, ret))
    def f(ctx, q_ref, s_ref, z_ref):
        del ctx
        layout, shape = mgpu.WGMMA_LAYOUT, (64, d)
        bf2 = ir.VectorType.get((2,), ir.BF16Type.get())
        f2 = ir.VectorType.get((2,), ir.F32Type.get())
        eight = arith.constant(f2, ir.DenseElementsAttr.get_splat(
            f2, ir.FloatAttr.get(ir.F32Type.get(), 8.0)))
        zeros = arith.constant(bf2, ir.DenseElementsAttr.get_splat(
            bf2, ir.FloatAttr.get(ir.BF16Type.get(), 0.0)))
        nrows = ir.MemRefType(s_ref.type).shape[0]
        qs = np.empty(layout.registers_shape(shape), dtype=object)
        zs = np.empty(layout.registers_shape(shape), dtype=object)
        for reg_idx, (row, col) in zip(np.ndindex(qs.shape), layout.thread_idxs(shape)):
            c = arith.remui(arith.remui(row, _c(16)), _c(period))
            lg = arith.divui(c, _c(gq))
            head = arith.remui(c, _c(gq))
            g = arith.addi(arith.muli(arith.divui(row, _c(16)), _c(groups_per_tile)), lg)
            g = arith.minui(g, _c(nrows - 1))
            ok = arith.cmpi(arith.CmpIPredicate.ult, lg, _c(groups_per_tile))
            qv = arith.extf(f2, vector.load(bf2, q_ref, [head, col]))
            sv = arith.extf(f2, vector.load(bf2, s_ref, [g, col]))
            zv = arith.extf(f2, vector.load(bf2, z_ref, [g, col]))
            qp = arith.truncf(bf2, arith.mulf(qv, sv))
            zp = arith.truncf(bf2, arith.mulf(qv, arith.addf(zv, arith.mulf(sv, eight))))
            qs[reg_idx] = arith.select(ok, qp, zeros)
            zs[reg_idx] = arith.select(ok, zp, zeros)
        return (mgpu.FragmentedArray(_registers=qs, _layout=layout, _is_signed=None),
                mgpu.FragmentedArray(_registers=zs, _layout=layout, _is_signed=None))

    return f(q_ref, scale_ref, zero_ref)


def fold_value_scales(p: Array, scale_ref, zero_ref, chunk: int, tile: int, group: int
                      ) -> tuple[Array, Array]:
    """(B, Bz) bf16[64, 16] in WGMMA layout: the value scales and zero points of one 64-channel
    chunk (two channel groups of Gv = 32) folded into the probabilities of one tile
    (`fold_values`).

    p float32[64 tokens, 16] holds the probabilities of score column c in its columns c and
    8 + c (the kernel duplicates the query columns for this); column 8 h + c of the results
    belongs to the chunk's channel group 2 chunk + h:
        B[t, 8 h + c] = p[t, 8 h + c] * scale[t, 2 chunk + h]
        Bz[t, 8 h + c] = p[t, 8 h + c] * (zero[t, 2 chunk + h] + 8 * scale[t, 2 chunk + h])
    so codes^T B + ones Bz gives, in rows of channel group h of the chunk and columns 8 h + c,
    sum_t ((code + 8) * scale + zero) p[t, c]. Every element scales its own probability.
    (Until the ninth session column 8 + c took p[t, c] from the thread's column-c register while
    the online-softmax rescale of the accumulator used column 8 + c's own running maximum, that
    of an empty column: wrong as soon as a split streamed two steps.)
    scale_ref / zero_ref [G_step / G, D / 32, G] (untiled shared memory, `kivi`'s layout);
    token t of the tile is token 64 tile + t of the step.
    """
    ret = plgpu.ShapeDtypeStruct((64, 16), jnp.bfloat16, layout=plgpu.Layout.WGMMA)

    @plgpu.inline_mgpu(arg_types=(plgpu.Layout.WGMMA, plgpu.RefType(), plgpu.RefType()),
                       return_type=(ret, ret))
    def f(ctx, p, s_ref, z_ref):
        del ctx
        layout, shape = mgpu.WGMMA_LAYOUT, (64, 16)
        bf2 = ir.VectorType.get((2,), ir.BF16Type.get())
        f32 = ir.F32Type.get()
        f2 = ir.VectorType.get((2,), f32)
        eight = arith.constant(f32, ir.FloatAttr.get(f32, 8.0))
        regs = list(np.ndindex(layout.registers_shape(shape)))
        bs = np.empty(layout.registers_shape(shape), dtype=object)
        bz = np.empty(layout.registers_shape(shape), dtype=object)
        for reg, (row, _), (_, dc) in zip(regs, layout.thread_idxs(shape),
                                          register_offsets(shape)):
            src = p.registers[reg]
            tok = arith.addi(row, _c(tile * T))
            idx = [arith.divui(tok, _c(group)), _c(2 * chunk + dc // 8),
                   arith.remui(tok, _c(group))]
            sc = arith.extf(f32, memref.load(s_ref, idx))
            zc = arith.addf(arith.extf(f32, memref.load(z_ref, idx)), arith.mulf(sc, eight))
            bs[reg] = arith.truncf(bf2, arith.mulf(src, vector.broadcast(f2, sc)))
            bz[reg] = arith.truncf(bf2, arith.mulf(src, vector.broadcast(f2, zc)))
        return (mgpu.FragmentedArray(_registers=bs, _layout=layout, _is_signed=None),
                mgpu.FragmentedArray(_registers=bz, _layout=layout, _is_signed=None))

    return f(p, scale_ref, zero_ref)


def load_tile(ref, transposed: bool = False) -> Array:
    """bf16[64, 64] in WGMMA layout read by each thread straight from a [64, 64] bf16 global
    memory ref (the residual window): ref[row, col], or ref[col, row] with `transposed` (values
    enter WGMMA channel-major). Mosaic GPU's own loads into registers read shared memory only;
    the residual window is read once per (row, KV head), so plain per-thread loads (pairs of
    adjacent elements, or two scalars when transposed) replace a TMA ring there."""

    @plgpu.inline_mgpu(arg_types=(plgpu.RefType(),), return_type=_TILE)
    def f(ctx, r):
        del ctx
        layout, shape = mgpu.WGMMA_LAYOUT, (64, 64)
        vty = ir.VectorType.get((2,), ir.BF16Type.get())
        regs = np.empty(layout.registers_shape(shape), dtype=object)
        for idx, (row, col) in zip(np.ndindex(regs.shape), layout.thread_idxs(shape)):
            if transposed:
                pair = [memref.load(r, [col, row]), memref.load(r, [arith.addi(col, _c(1)), row])]
                regs[idx] = vector.from_elements(vty, pair)
            else:
                regs[idx] = vector.load(vty, r, [row, col])
        return mgpu.FragmentedArray(_registers=regs, _layout=layout, _is_signed=None)

    return f(ref)


def _c(v: int):
    return arith.constant(ir.IndexType.get(), v)


def _kernel(*refs, stages, splits, scale, group, vgroup, block_tokens, hoist_index, fold_keys,
            fold_values, gq, residual, bits, fma, prmt):
    nin = 11 if residual else 8  # inputs: q, k, ks, kz, v, vs, vz, n (+ rk, rv, nr)
    q_ref, k_ref, ks_ref, kz_ref, v_ref, vs_ref, vz_ref, n_ref = refs[:8]
    o_ref, m_ref, l_ref = refs[nin:nin + 3]
    (q_smem, k_smem, ks_smem, kz_smem, v_smem, vs_smem, vz_smem, p_smem, o_smem, m_smem, l_smem,
     q_bar, k_bar, v_bar, *fold_refs) = refs[nin + 3:]
    period = 8 if fold_values else N  # score columns 8 + c repeat columns c with fold_values
    b = lax.axis_index("b")
    h = lax.axis_index("h")
    s = lax.axis_index("s")
    d = q_ref.shape[3]  # q [B, Hkv, N, D] (k_ref is [.., D / 64, ..] in the words layout)
    bt = block_tokens  # tokens per step: bt // T tiles of T share one online-softmax update
    nt = bt // T
    gps = bt // group  # scale rows per step (group <= T <= bt)
    length = n_ref[b, h]
    nblk = (length + bt - 1) // bt
    per = (nblk + splits - 1) // splits
    lo = jnp.minimum(s * per, nblk)
    n = jnp.minimum(lo + per, nblk) - lo

    def fetch(i, slot):
        t0 = (lo + i) * bt
        rows = pl.ds(t0, bt)
        grp = pl.ds(t0 // group, gps)
        tiles = pl.ds(t0 // T, nt)  # words layout: [tiles, D / 64, 2 bits, 64] per step
        kv_src = (k_ref.at[b, h, tiles], v_ref.at[b, h, tiles]) if bits else (
            k_ref.at[b, h, rows], v_ref.at[b, h, :, rows])
        plgpu.copy_gmem_to_smem(kv_src[0], k_smem.at[slot], k_bar.at[slot])
        plgpu.copy_gmem_to_smem(ks_ref.at[b, h, grp], ks_smem.at[slot], k_bar.at[slot])
        plgpu.copy_gmem_to_smem(kz_ref.at[b, h, grp], kz_smem.at[slot], k_bar.at[slot])
        plgpu.copy_gmem_to_smem(kv_src[1], v_smem.at[slot], v_bar.at[slot])
        plgpu.copy_gmem_to_smem(vs_ref.at[b, h, grp], vs_smem.at[slot], v_bar.at[slot])
        plgpu.copy_gmem_to_smem(vz_ref.at[b, h, grp], vz_smem.at[slot], v_bar.at[slot])

    plgpu.copy_gmem_to_smem(q_ref.at[b, h], q_smem, q_bar.at[0])
    if fold_keys:
        qplain_smem, qp_smem, zp_smem = fold_refs[:3]
        plgpu.copy_gmem_to_smem(q_ref.at[b, h], qplain_smem, q_bar.at[0])
    if fold_values:
        pv_smem, pz_smem = fold_refs[-2:]
    for i in range(stages):
        pl.when(i < n)(functools.partial(fetch, i, i))
    plgpu.barrier_wait(q_bar.at[0])
    wg = plgpu.Layout.WGMMA
    col_layout = wg.reduce(0)
    m = plgpu.layout_cast(jnp.full((N,), NEG, jnp.float32), col_layout)
    # the softmax denominator as per-element partial sums, reduced over the tokens once at the
    # end (a cross-warp reduction per step fewer: 1.10x at 8 x 32k, docs/benchmarks_quant.md)
    den = plgpu.layout_cast(jnp.zeros((T, N), jnp.float32), wg)
    accs = tuple(plgpu.layout_cast(jnp.zeros((64, N), jnp.float32), wg) for _ in range(d // 64))
    c = scale * _LOG2E
    lpt = T // group  # key groups per 64-token tile (score columns l * gq + h with fold_keys)
    ones = plgpu.layout_cast(jnp.ones((64, 64), jnp.bfloat16), wg) if fold_keys else None
    ones16 = plgpu.layout_cast(jnp.ones((64, 16), jnp.bfloat16), wg) if fold_values else None

    def codes(ref):  # [64, 64] int4 smem slice -> bf16 WGMMA registers (signed codes)
        a = plgpu.load(ref, (), layout=plgpu.Layout.WGMMA_UPCAST_4X)
        return plgpu.layout_cast(a, wg).astype(jnp.bfloat16)

    def code_tile(ref, slot, j, ch, channel_major=False):  # token tile j, channel tile ch ->
        if bits:  # registers, and the bias `dequant` adds (words: unsigned codes)
            return unpack_words(ref.at[slot, j, ch], bits, prmt), 0.0
        tok, chan = pl.ds(j * T, T), pl.ds(ch * 64, 64)  # int4: keys [C, D], values [D, C]
        return codes(ref.at[slot, chan, tok] if channel_major else ref.at[slot, tok, chan]), 8.0

    def pv_tile(acc_ref, a, row0):  # O^T += a [64 channels, 64 tokens] P[row0:row0 + 64]
        for kk in range(T // 16):
            plgpu.wgmma(acc_ref, a[:, kk * 16:(kk + 1) * 16], p_smem.at[pl.ds(row0 + kk * 16, 16)])

    def online_softmax(m, den, scs):  # scores (log2 domain) of one step's tiles
        peak = functools.reduce(jnp.maximum, scs)
        m_new = jnp.maximum(m, peak.max(axis=0))
        alpha = jnp.exp2(m - m_new)
        ps = [jnp.exp2(sc - lax.broadcast_in_dim(m_new, sc.shape, [1])) for sc in scs]
        den = den * lax.broadcast_in_dim(alpha, den.shape, [1]) + functools.reduce(jnp.add, ps)
        return m_new, alpha, ps, den

    def step(i, carry):
        m, den, accs = carry
        slot = lax.rem(i, stages)
        t0 = (lo + i) * bt
        plgpu.barrier_wait(k_bar.at[slot])
        if fold_keys:
            qp, zp = fold_key_scales(qplain_smem, ks_smem.at[slot], kz_smem.at[slot], gq, lpt,
                                     period)
            qp_smem[...] = qp
            zp_smem[...] = zp
            plgpu.commit_smem()
        scs = []
        for j in range(nt):  # keys: row = token (tile j), col = channel; scale [token // G, ch]

            def qk_folded(acc_ref, j=j):
                for ch in range(d // 64):
                    cols = (pl.ds(16 * j, 16), pl.ds(ch * 64, 64))
                    a = codes(k_smem.at[slot, pl.ds(j * T, T), pl.ds(ch * 64, 64)])
                    plgpu.wgmma(acc_ref, a, qp_smem.at[cols].T)
                    plgpu.wgmma(acc_ref, ones, zp_smem.at[cols].T)
                return acc_ref[...]

            def qk(acc_ref, j=j):
                for ch in range(d // 64):
                    # scale [token // G, channel]; hoisted: a thread's rows row0, row0 + 8
                    # (row0 % 16 < 8) share one group for G >= 16

                    def kidx(row, col, ch=ch, j=j):
                        return [arith.divui(arith.addi(row, _c(j * T)), _c(group)),
                                arith.addi(col, _c(ch * 64))]

                    hoisted = (kidx, lambda dr, dc: (0, dc)) if hoist_index else None
                    a, bias = code_tile(k_smem, slot, j, ch)
                    a = dequant(a, ks_smem.at[slot], kz_smem.at[slot], kidx, hoisted, bias, fma)
                    plgpu.wgmma(acc_ref, a, q_smem.at[:, pl.ds(ch * 64, 64)].T)
                return acc_ref[...]

            sc = pl.run_scoped(qk_folded if fold_keys else qk, plgpu.ACC((T, N), jnp.float32))
            tok = plgpu.broadcasted_iota(jnp.int32, (T, N), 0, layout=wg)
            ok = tok < length - t0 - j * T
            if fold_keys:  # column l * gq + h scores the tokens of key group l of the tile only
                column = plgpu.broadcasted_iota(jnp.int32, (T, N), 1, layout=wg) % period
                ok = ok & (tok // group == column // gq)
            scs.append(jnp.where(ok, sc * c, -jnp.inf))
        m_new, alpha, ps, den = online_softmax(m, den, scs)
        if fold_values:  # value scales / zero points into per-chunk B operands
            plgpu.barrier_wait(v_bar.at[slot])
            for j, p in enumerate(ps):
                for ch in range(d // 64):
                    bs, bz = fold_value_scales(p, vs_smem.at[slot], vz_smem.at[slot], ch, j,
                                               group)
                    pv_smem[ch, pl.ds(j * T, T)] = bs
                    pz_smem[ch, pl.ds(j * T, T)] = bz
            plgpu.commit_smem()
        else:
            for j, p in enumerate(ps):
                p_smem[pl.ds(j * T, T)] = p.astype(jnp.bfloat16)
            plgpu.commit_smem()
            plgpu.barrier_wait(v_bar.at[slot])
        new = []
        for ch, acc in enumerate(accs):
            acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [1])

            def pv_folded(acc_ref, ch=ch):
                for j in range(nt):
                    a = codes(v_smem.at[slot, pl.ds(ch * 64, 64), pl.ds(j * T, T)])
                    for kk in range(T // 16):
                        rows = pl.ds(j * T + kk * 16, 16)
                        plgpu.wgmma(acc_ref, a[:, kk * 16:(kk + 1) * 16], pv_smem.at[ch, rows])
                        plgpu.wgmma(acc_ref, ones16, pz_smem.at[ch, rows])

            def pv(acc_ref, ch=ch):
                for j in range(nt):  # values: row = channel, col = token of tile j
                    # scale [token // G, channel // Gv, token % G]; hoisted: rows row0, row0 + 8
                    # share a channel group for Gv >= 16, and a thread's tokens are
                    # col0 + dc + 64 j with col0 < 8, dc a multiple of 8: group (dc + 64 j) // G

                    def vidx(row, col, ch=ch, j=j):
                        tok = arith.addi(col, _c(j * T))
                        return [arith.divui(tok, _c(group)),
                                arith.divui(arith.addi(row, _c(ch * 64)), _c(vgroup)),
                                arith.remui(tok, _c(group))]

                    def vbase(row0, col0, ch=ch):
                        return [_c(0), arith.divui(arith.addi(row0, _c(ch * 64)), _c(vgroup)),
                                col0]

                    def voff(dr, dc, j=j):
                        tok = dc + j * T
                        return (tok // group, 0, tok % group)

                    a, bias = code_tile(v_smem, slot, j, ch, channel_major=True)
                    a = dequant(a, vs_smem.at[slot], vz_smem.at[slot], vidx,
                                (vbase, voff) if hoist_index else None, bias, fma)
                    pv_tile(acc_ref, a, j * T)

            new.append(pl.run_state(pv_folded if fold_values else pv)(plgpu.ACC.init(acc)))
        pl.when(i + stages < n)(lambda: fetch(i + stages, slot))
        return m_new, den, tuple(new)

    m, den, accs = lax.fori_loop(0, n, step, (m, den, accs))
    if residual:  # the last split goes on over the bf16 residual window, 64 tokens a step
        rk_ref, rv_ref, nr_ref = refs[8:11]
        nres = jnp.where(s == splits - 1, nr_ref[b, h], 0)

        def rstep(i, carry):
            m, den, accs = carry
            t0 = i * T

            def qk(acc_ref):
                for ch in range(d // 64):
                    a = load_tile(rk_ref.at[b, h, pl.ds(t0, T), pl.ds(ch * 64, 64)])
                    plgpu.wgmma(acc_ref, a, q_smem.at[:, pl.ds(ch * 64, 64)].T)
                return acc_ref[...]

            sc = pl.run_scoped(qk, plgpu.ACC((T, N), jnp.float32))
            ok = plgpu.broadcasted_iota(jnp.int32, (T, N), 0, layout=wg) < nres - t0
            if fold_keys:  # the window's tokens count in the columns of key group 0
                column = plgpu.broadcasted_iota(jnp.int32, (T, N), 1, layout=wg) % period
                ok = ok & (column < gq)
            m_new, alpha, (p,), den = online_softmax(m, den, [jnp.where(ok, sc * c, -jnp.inf)])
            # plain P also serves fold_values' accumulators: its columns 8 + c repeat columns c
            p_smem[pl.ds(0, T)] = p.astype(jnp.bfloat16)
            plgpu.commit_smem()
            new = []
            for ch, acc in enumerate(accs):

                def pv(acc_ref, ch=ch):
                    pv_tile(acc_ref, load_tile(rv_ref.at[b, h, pl.ds(t0, T), pl.ds(ch * 64, 64)],
                                               True), 0)

                acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [1])
                new.append(pl.run_state(pv)(plgpu.ACC.init(acc)))
            return m_new, den, tuple(new)

        m, den, accs = lax.fori_loop(0, (nres + T - 1) // T, rstep, (m, den, accs))
    for ch, acc in enumerate(accs):
        o_smem[pl.ds(ch * 64, 64)] = acc
    m_smem[...] = m * (1.0 / _LOG2E)
    l_smem[...] = den.sum(axis=0)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(o_smem, o_ref.at[b, h, s])
    plgpu.copy_smem_to_gmem(m_smem, m_ref.at[b, h, s])
    plgpu.copy_smem_to_gmem(l_smem, l_ref.at[b, h, s])
    plgpu.wait_smem_to_gmem(0)


def on_hopper() -> bool:
    """Whether the default device is an sm_90 GPU (H100 / H200), the kernel's only target."""
    dev = jax.devices()[0]
    return dev.platform == "gpu" and getattr(dev, "compute_capability", "") == "9.0"


def supported(q_dtype, gq: int, head_dim: int, group_size: int, value_group: int,
              scale_dtype, capacity: int) -> bool:
    """Whether the kernel takes these sizes and dtypes (`kvjax.quant.kivi`'s dispatch; the
    entry point raises for the rest): bf16 queries and scales, Gq <= 16, D a multiple of 64,
    G and Gv in (16, 32, 64), a capacity that some `block_tokens` divides."""
    return (jnp.dtype(q_dtype) == jnp.bfloat16 and jnp.dtype(scale_dtype) == jnp.bfloat16
            and 1 <= gq <= N and head_dim % 64 == 0 and group_size in GROUPS
            and value_group in GROUPS and capacity > 0 and capacity % BLOCK_TOKENS[0] == 0)


def default_block_tokens(capacity: int) -> int:
    """The default `block_tokens` (128) where it divides the capacity, else 64."""
    return 128 if capacity % 128 == 0 else 64


def words_bits(k_codes: Array) -> int:
    """The code width of a words-layout key array (uint32 [B, Hkv, C / 64, D / 64, 2 bits, 64],
    `pack_words`), 0 for the int4 layout."""
    return k_codes.shape[4] // 2 if k_codes.dtype == jnp.uint32 and k_codes.ndim == 6 else 0


def _check(q, k4, k_scale, k_zero, v4, v_scale, v_zero, num_quantized, num_splits,
           num_stages, block_tokens) -> tuple[int, int]:
    """Raises for inputs this kernel does not take; returns (G, Gv)."""
    if q.ndim != 3 or q.dtype != jnp.bfloat16:
        raise ValueError(f"q must be bf16[batch, query_heads, head_dim], got {q.dtype}{q.shape}")
    b, hq, d = q.shape
    if k4.dtype == jnp.uint32:  # the words layout
        if (k4.ndim != 6 or k4.shape[0] != b or k4.shape[3] * 64 != d or k4.shape[5] != 64
                or k4.shape[4] // 2 not in WORD_BITS or k4.shape[4] % 2):
            raise ValueError(f"k4 as words must be uint32[{b}, Hkv, C / 64, {d // 64}, 2 bits, "
                             f"64] with bits in {WORD_BITS} (`pack_words`), got "
                             f"{k4.dtype}{k4.shape}")
        hkv, cap = k4.shape[1], k4.shape[2] * T
        if v4.shape != k4.shape or v4.dtype != jnp.uint32:
            raise ValueError(f"v4 as words must be uint32{k4.shape} like k4, got "
                             f"{v4.dtype}{v4.shape}")
    else:
        if k4.ndim != 4 or k4.dtype != jnp.int4 or k4.shape[0] != b or k4.shape[3] != d:
            raise ValueError(f"k4 must be int4[{b}, Hkv, C, {d}] or uint32 words, got "
                             f"{k4.dtype}{k4.shape}")
        _, hkv, cap, _ = k4.shape
        if v4.shape != (b, hkv, d, cap) or v4.dtype != jnp.int4:
            raise ValueError(f"v4 must be int4{(b, hkv, d, cap)}, got {v4.dtype}{v4.shape}")
    if hq % hkv or hq // hkv > N:
        raise ValueError(f"query heads per KV head must divide evenly and be <= {N}, got "
                         f"{hq} / {hkv}")
    if d % 64:
        raise ValueError(f"head_dim must be a multiple of 64, got {d}")
    ng = k_scale.shape[2] if k_scale.ndim == 4 else 0
    if ng == 0 or cap % ng or cap // ng not in GROUPS:
        raise ValueError(f"k_scale must be [B, Hkv, C / G, D] with G in {GROUPS}, got "
                         f"{k_scale.shape} for C = {cap}")
    g = cap // ng
    if k_scale.shape != (b, hkv, ng, d) or k_zero.shape != k_scale.shape:
        raise ValueError(f"k_scale and k_zero must be {(b, hkv, ng, d)}, got {k_scale.shape} "
                         f"and {k_zero.shape}")
    if v_scale.ndim != 5 or v_scale.shape[:3] != (b, hkv, ng) or v_scale.shape[4] != g or (
            d % v_scale.shape[3]) or v_zero.shape != v_scale.shape:
        raise ValueError(f"v_scale and v_zero must be [{b}, {hkv}, {ng}, D / Gv, {g}], got "
                         f"{v_scale.shape} and {v_zero.shape}")
    vg = d // v_scale.shape[3]
    if vg not in GROUPS:
        raise ValueError(f"the value channel group (head_dim / v_scale.shape[3]) must be in "
                         f"{GROUPS}, got {vg}")
    for name, x in (("k_scale", k_scale), ("k_zero", k_zero), ("v_scale", v_scale),
                    ("v_zero", v_zero)):
        if x.dtype != jnp.bfloat16:
            raise ValueError(f"{name} must be bf16, got {x.dtype}")
    if num_quantized.shape != (b, hkv):
        raise ValueError(f"num_quantized must be [{b}, {hkv}], got {num_quantized.shape}")
    check_num_splits(num_splits)
    if block_tokens not in BLOCK_TOKENS:
        raise ValueError(f"block_tokens must be one of {BLOCK_TOKENS}, got {block_tokens!r}")
    if cap % block_tokens:
        raise ValueError(f"the capacity ({cap}) must be a multiple of block_tokens "
                         f"({block_tokens})")
    if not isinstance(num_stages, int) or num_stages < 1:
        raise ValueError(f"num_stages must be an int >= 1, got {num_stages!r}")
    return g, vg


@functools.partial(jax.jit, static_argnames=("scale", "num_splits", "num_stages",
                                             "block_tokens", "hoist_index", "fold_keys",
                                             "fold_values", "fma", "prmt"))
def _partials(q, k4, k_scale, k_zero, v4, v_scale, v_zero, num_quantized, residual_keys=None,
              residual_values=None, num_residual=None, *, scale, num_splits, num_stages,
              block_tokens, hoist_index, fold_keys, fold_values, fma, prmt):
    b, _, d = q.shape
    bits = words_bits(k4)
    hkv, cap = k4.shape[1], k4.shape[2] * (T if bits else 1)
    g, vg = cap // k_scale.shape[2], d // v_scale.shape[3]
    qg, gq, _ = pad_query_groups(q, hkv, N)  # [B, Hkv, N, D]: Gq <= N is checked
    if fold_values:  # columns 8 + c repeat columns c (Gq <= 8 is checked): `fold_value_scales`
        qg = jnp.concatenate([qg[:, :, :8]] * 2, axis=2)
    bt = block_tokens
    gps = bt // g
    f32, bf16 = jnp.float32, jnp.bfloat16
    residual = residual_keys is not None
    args = [qg, k4, k_scale, k_zero, v4, v_scale, v_zero,
            jnp.clip(num_quantized.astype(jnp.int32), 0, cap)]
    if residual:  # bf16, padded to whole 64-token tiles; counts past the window mean all of it
        w = residual_keys.shape[2]
        pad = ((0, 0), (0, 0), (0, -w % T), (0, 0))
        args += [jnp.pad(residual_keys.astype(bf16), pad),
                 jnp.pad(residual_values.astype(bf16), pad),
                 jnp.clip(num_residual.astype(jnp.int32), 0, w)]
    kernel = functools.partial(_kernel, stages=num_stages, splits=num_splits, scale=scale,
                               group=g, vgroup=vg, block_tokens=bt, hoist_index=hoist_index,
                               fold_keys=fold_keys, fold_values=fold_values, gq=gq, fma=fma,
                               prmt=prmt,
                               residual=residual, bits=bits)
    st = num_stages
    p_rows = (T if residual else 16) if fold_values else bt  # P's rows in shared memory
    if bits:  # whole tiles of words, untiled (each thread loads its own words)
        kv_smem = [plgpu.SMEM((st, bt // T, d // 64, 2 * bits, 64), jnp.uint32)] * 2
    else:
        kv_smem = [plgpu.SMEM((st, bt, d), jnp.int4, transforms=_SWZ_I4),
                   plgpu.SMEM((st, d, bt), jnp.int4, transforms=_SWZ_I4)]
    o, m, den = plgpu.kernel(
        kernel,
        out_type=[jax.ShapeDtypeStruct((b, hkv, num_splits, d, N), f32),
                  jax.ShapeDtypeStruct((b, hkv, num_splits, N), f32),
                  jax.ShapeDtypeStruct((b, hkv, num_splits, N), f32)],
        scratch_types=[
            plgpu.SMEM((N, d), bf16, transforms=_SWZ128),
            kv_smem[0],
            plgpu.SMEM((st, gps, d), bf16), plgpu.SMEM((st, gps, d), bf16),
            kv_smem[1],
            plgpu.SMEM((st, gps, d // vg, g), bf16), plgpu.SMEM((st, gps, d // vg, g), bf16),
            plgpu.SMEM((p_rows, N), bf16, transforms=_SWZ_P),  # P
            plgpu.SMEM((d, N), f32), plgpu.SMEM((N,), f32), plgpu.SMEM((N,), f32),
            plgpu.Barrier(num_arrivals=2 if fold_keys else 1, num_barriers=1),
            plgpu.Barrier(num_arrivals=3, num_barriers=st),
            plgpu.Barrier(num_arrivals=3, num_barriers=st),
        ] + ([plgpu.SMEM((N, d), bf16), plgpu.SMEM((64, d), bf16, transforms=_SWZ128),
              plgpu.SMEM((64, d), bf16, transforms=_SWZ128)] if fold_keys else [])
          + ([plgpu.SMEM((d // 64, bt, N), bf16, transforms=_SWZ_P)] * 2 if fold_values else []),
        grid=(b, hkv, num_splits),
        grid_names=("b", "h", "s"),
        compiler_params=plgpu.CompilerParams(approx_math=True),
    )(*args)
    o = jnp.swapaxes(o, 3, 4)  # [B, Hkv, S, N, D]
    if fold_values:  # rows of channel group h of each chunk hold their result in columns 8 h + c
        o = o.reshape(b, hkv, num_splits, 2, 8, d // 64, 2, 32)
        o = jnp.stack([o[:, :, :, 0, :, :, 0], o[:, :, :, 1, :, :, 1]], axis=5)
        o = o.reshape(b, hkv, num_splits, 8, d)
    if not fold_keys:
        return o[:, :, :, :gq], m[:, :, :, :gq], den[:, :, :, :gq]
    # columns l * gq + h are separate partials (key group l of every tile): more splits
    cols = (T // g) * gq
    return (o[:, :, :, :cols].reshape(b, hkv, -1, gq, d), m[:, :, :, :cols].reshape(b, hkv, -1, gq),
            den[:, :, :, :cols].reshape(b, hkv, -1, gq))


def window_partials(q: Array, keys: Array, values: Array, count: Array, scale: float,
                    precision=None) -> tuple[Array, Array, Array]:
    """(o [B, Hkv, 1, Gq, D], m, l [B, Hkv, 1, Gq]), float32, jnp: the softmax partials of q over
    a window keys / values [B, Hkv, W, D] whose first `count` int32[B, Hkv] slots are valid (the
    residual window; in `reference_mgpu_layout` also the dequantized quantized part)."""
    b, hq, d = q.shape
    hkv, w = keys.shape[1], keys.shape[2]
    qg = q.reshape(b, hkv, hq // hkv, d).astype(jnp.float32)
    sc = jnp.einsum("bhgd,bhwd->bhgw", qg, keys.astype(jnp.float32),
                    precision=precision) * scale
    valid = jnp.arange(w)[None, None, None, :] < count[:, :, None, None]
    sc = jnp.where(valid, sc, -jnp.inf)
    m = jnp.maximum(sc.max(axis=-1), NEG)
    p = jnp.exp(sc - m[..., None])
    o = jnp.einsum("bhgw,bhwd->bhgd", p, values.astype(jnp.float32), precision=precision)
    return o[:, :, None], m[:, :, None], p.sum(axis=-1)[:, :, None]


def quantized_decode_attention_mgpu(
    q: Array,
    k4: Array, k_scale: Array, k_zero: Array,
    v4: Array, v_scale: Array, v_zero: Array,
    num_quantized: Array,
    residual_keys: Array | None = None,
    residual_values: Array | None = None,
    num_residual: Array | None = None,
    *,
    scale: float | None = None,
    num_splits: int = 16,
    num_stages: int = 2,
    block_tokens: int = 128,
    hoist_index: bool = True,
    fold_keys: bool = False,
    fold_values: bool = False,
    fuse_residual: bool = True,
    fma: bool = True,
    prmt: bool = False,
) -> Array:
    """[B, Hq, D] decode attention over an int4 cache in the layout of the module doc.

    Raises ValueError before launching for shapes, dtypes and launch parameters it does not
    take (each message names the argument and what it accepts).

    num_splits: split-K pieces per (row, KV head) (whole steps each; empty splits are cheap).
    num_stages: depth of the shared-memory ring (steps in flight).
    block_tokens: tokens per online-softmax step and ring slot (64, 128 or 256: one, two or
      four 64-token tiles); must divide the capacity (kivi's 4-bit capacity is a multiple of
      8 G, so 128 always divides it for G >= 16).
    hoist_index: form the scale / zero addresses once per thread plus immediate offsets and
      load each scale pair once (`dequant`); fewer index operations (MLIR ops of the kernel
      body, `python experiments/count_mgpu_ops.py`: 492 -> 280 divisions, 132 -> 68
      shared-memory loads at 64-token steps). H100, 8 x 32k: 250.0 us without, 230.2 with,
      214.1 with 128-token steps (the default since; docs/benchmarks_quant.md).
    fold_keys: fold the key scales and zero points into the query operand once per step
      (`fold_key_scales`) instead of dequantizing the key codes: keys cost the upcast only.
      Each score column is (key group l of a tile, query head), so (64 / G) x Gq <= 16 is
      required.
    fold_values: fold the value scales and zero points into the probabilities
      (`fold_value_scales`: per 64-channel chunk, B = P * scale and Bz = P * zero' with the
      two channel groups of the chunk in column halves, the query columns duplicated into
      both halves) instead of dequantizing the value codes. Needs Gv = 32 and at most 8 score
      columns (Gq, or (64 / G) x Gq with fold_keys).
      The folds are GPU-checked with the window as a jnp pass (`fuse_residual=False`); with
      the fused window, the default since, they are compile-checked only so far.
    fuse_residual: the last split goes on over the residual window inside the kernel (module
      doc); False: the window is a separate jnp pass (`window_partials`) merged with the
      kernel's partials. H100, 8 x 32k with fma: 162.0 us fused against 172.5 us (words, 4
      bits), 192.9 against 208.1 (int4 layout).
    fma: dequantize with one bf16x2 fused multiply-add per register pair (`fma_bf16x2`)
      instead of a multiply and an add: 128 fewer instructions per thread and 128-token step
      (SASS of the ahead-of-time compile, `experiments/sass_mgpu.py --aot h100`). H100,
      8 x 32k: 172.5 us against 181.4 (words, 4 bits), 208.1 against 220.2 (int4 layout).
    prmt: words layout: unpack two pairs per mask with a byte permute (`unpack_words`; offline
      SASS 1728 against 1856 instructions, registers 130 against 135; GPU check and timing
      pending, hence off by default).
    Defaults: the fastest measured at 8 x 32k on an H100 (docs/benchmarks_quant.md).
    """
    g, vg = _check(q, k4, k_scale, k_zero, v4, v_scale, v_zero, num_quantized, num_splits,
                   num_stages, block_tokens)
    gq = q.shape[1] // k4.shape[1]
    if words_bits(k4) and (fold_keys or fold_values):
        raise ValueError("fold_keys / fold_values take the int4 layout (k4 int4), not words")
    if prmt and not words_bits(k4):
        raise ValueError("prmt takes the words layout (k4 uint32 words), not int4")
    if fold_keys and (T // g) * gq > N:
        raise ValueError(f"fold_keys needs (64 / group size) x query heads per KV head <= {N}, "
                         f"got (64 / {g}) x {gq}")
    if fold_values:
        cols = (T // g) * gq if fold_keys else gq
        if vg != 32 or cols > 8:
            raise ValueError(f"fold_values needs a value channel group of 32 and at most 8 score "
                             f"columns (query heads per KV head, times 64 / group size with "
                             f"fold_keys), got {vg} and {cols}")
    check_residual(q, k4.shape[1], residual_keys, residual_values, num_residual)
    if num_residual is not None and num_residual.shape != num_quantized.shape:
        raise ValueError(f"num_residual must be {list(num_quantized.shape)}, got "
                         f"{num_residual.shape}")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    res = (residual_keys, residual_values, num_residual)
    window = residual_keys is not None and residual_keys.shape[2] > 0
    o, m, den = _partials(q, k4, k_scale, k_zero, v4, v_scale, v_zero, num_quantized,
                          *(res if window and fuse_residual else (None,) * 3),
                          scale=scale, num_splits=num_splits, num_stages=num_stages,
                          block_tokens=block_tokens, hoist_index=bool(hoist_index),
                          fold_keys=bool(fold_keys), fold_values=bool(fold_values),
                          fma=bool(fma), prmt=bool(prmt))
    if window and not fuse_residual:
        ro, rm, rl = window_partials(q, *res, scale)
        o, m, den = (jnp.concatenate(x, axis=2) for x in ((o, ro), (m, rm), (den, rl)))
    return merge_partials(o, m, den).reshape(q.shape).astype(q.dtype)


def repack_int4(k_codes: Array, v_codes: Array) -> tuple[Array, Array]:
    """`kivi`'s packed 4-bit codes (uint32[B, H, Nb, G, D]) -> (k4 int4[B, H, C, D],
    v4 int4[B, H, D, C]) signed (code - 8), C = Nb * 8 * G tokens in order."""
    from kvjax.quant.kivi import to_int4  # noqa: PLC0415 - kvjax imports pallas_kernels

    k, v = (to_int4(_token_codes(x, 4)) for x in (k_codes, v_codes))
    return k, jnp.swapaxes(v, 2, 3)


def _token_codes(words: Array, bits: int) -> Array:
    """`kivi`'s packed words uint32[B, H, Nb, G, D] -> codes uint32[B, H, C, D], token order."""
    from kvjax.quant import packing  # noqa: PLC0415 - kvjax imports pallas_kernels

    c = packing.unpack(words, bits)  # [B, H, Ng, G, D]
    return c.reshape(c.shape[0], c.shape[1], -1, c.shape[-1])


def repack_words(k_codes: Array, v_codes: Array, bits: int) -> tuple[Array, Array]:
    """`kivi`'s packed codes (uint32[B, H, Nb, G, D], 4 or 2 bits) -> the words layout
    (`pack_words`) of keys (tiles [64 tokens, 64 channels]) and values (tiles [64 channels,
    64 tokens]), both uint32 [B, H, C / 64, D / 64, 2 bits, 64] indexed (token tile, channel
    tile); C = Nb * (32 / bits) * G must be a multiple of 64."""
    from kvjax.quant.kivi import to_words  # noqa: PLC0415 - kvjax imports pallas_kernels

    check_word_bits(bits)
    return to_words(_token_codes(k_codes, bits), _token_codes(v_codes, bits), bits)


def reference_mgpu_layout(q, k4, k_scale, k_zero, v4, v_scale, v_zero, num_quantized,
                          residual_keys=None, residual_values=None, num_residual=None, *,
                          scale=None) -> Array:
    """Plain jnp over the k4 / v4 layout: dequantize (code + 8) * scale + zero in float32,
    mask by counts, float32 softmax (the kernel rounds dequantized values to bf16)."""
    b, hkv, cap, d = k4.shape
    g = cap // k_scale.shape[2]
    kc = k4.astype(jnp.float32) + 8
    keys = kc * jnp.repeat(k_scale, g, axis=2).astype(jnp.float32) + jnp.repeat(
        k_zero, g, axis=2).astype(jnp.float32)
    vg = d // v_scale.shape[3]

    def per_token(x):  # [B, H, Ng, D / Gv, G] -> [B, H, C, D]
        x = jnp.swapaxes(x, 3, 4).reshape(b, hkv, cap, d // vg)
        return jnp.repeat(x, vg, axis=3).astype(jnp.float32)

    values = (jnp.swapaxes(v4, 2, 3).astype(jnp.float32) + 8) * per_token(v_scale) + per_token(
        v_zero)
    scale = d**-0.5 if scale is None else scale
    o, m, den = window_partials(q, keys, values, num_quantized, scale, precision="highest")
    if residual_keys is not None:
        ro, rm, rl = window_partials(q, residual_keys, residual_values, num_residual, scale,
                                     precision="highest")
        o, m, den = (jnp.concatenate(x, axis=2) for x in ((o, ro), (m, rm), (den, rl)))
    return merge_partials(o, m, den).reshape(q.shape).astype(q.dtype)
