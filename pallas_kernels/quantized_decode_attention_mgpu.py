"""Decode attention over a KIVI int4 cache on Pallas Mosaic GPU (Hopper TMA + WGMMA), split-K.

The quantized part is read as int4 codes, 16-bit scales and zero points and dequantized in
registers (no bf16 copy of the cache is written); the full-precision residual window is a
separate small jnp pass merged by log-sum-exp. One program per (row, KV head, split) streams
steps of `block_tokens` tokens (one to four 64-token tiles sharing one online-softmax update)
through a `num_stages`-deep shared-memory ring filled by TMA:

  keys    S^T = K Q^T: the tile's [64, 64] code chunks are upcast to bf16 by Mosaic GPU
          (`WGMMA_UPCAST_4X` load, relaid out to `WGMMA`), dequantized in registers
          (`dequant`: (code + 8) * scale + zero on bf16 pairs, each thread gathering the scale
          and zero of its own elements) and fed to WGMMA as the register A operand; the query
          heads of the KV head are the N = 16 columns (zero padded).
          With `fold_keys` the key scales and zero points are folded into the query operand
          once per step instead (`fold_key_scales`) and the codes enter WGMMA as upcast;
          with `fold_values` the value scales and zero points go into the probabilities
          (`fold_value_scales`). Both options are lowering-checked only so far.
  softmax float32 online softmax per column (log2 domain); tokens >= num_quantized are masked.
  values  O^T = V^T P: channel-major [64, 64] code chunks, dequantized the same way, times the
          probabilities P [64 tokens, 16] stored to shared memory as the B operand, in four
          K = 16 steps (a register A operand must be [64, swizzle / 2]).

Layout (B batch, Hkv KV heads, C quantized capacity, D head dim, G token group, Gv channel
group; Ng = C / G):
  q               [B, Hq, D] bf16          Hq = Gq * Hkv, Gq <= 16
  k4              int4[B, Hkv, C, D]        KIVI key code - 8 (signed), token-major
  k_scale/k_zero  [B, Hkv, Ng, D] bf16      as `kvjax.quant.kivi`
  v4              int4[B, Hkv, D, C]        KIVI value code - 8, channel-major
  v_scale/v_zero  [B, Hkv, Ng, D // Gv, G] bf16  as `kvjax.quant.kivi`
  num_quantized   int32[B, Hkv]             tokens [0, n) are valid
  residual_keys/values [B, Hkv, R, D], num_residual int32[B, Hkv] (optional)
`repack_int4` turns `kivi`'s packed uint32 codes (4 bits) into k4 / v4. Constraints: D a
multiple of 64, C a multiple of block_tokens (64, 128 or 256), G and Gv in (16, 32, 64).

Backend: Mosaic GPU (sm_90) only. The interpreter of jax 0.10.2 cannot run register-A WGMMA or
`inline_mgpu`, so on CPU the tests lower the kernel for CUDA and check the layout
(`repack_int4` + `reference_mgpu_layout` equal `quantized_decode_attention.reference`); the
kernel's numbers are checked on the GPU by `experiments/bench_quant_mgpu.py` against that
reference (six checks over four shape families: ragged counts, empty heads, partial
residuals, G = 16 / 32 / 64, 1 to 16 query heads per KV head: rel. L2 error 1.0e-3 to 1.6e-3,
bf16).
Measured on an H100 (docs/benchmarks_quant.md), int4 at 8 x 32k: 214.1 us with the defaults
(128-token steps, `hoist_index`) against 361.6 us for the bf16 dense kernel in the same run
(1.69x; 256-token steps without hoisting, the first default, 250.0 us = 1.45x; the Triton
int4 kernel 0.90x). `kvjax.attention` dispatches here for `kivi(4, layout="int4")` caches
(k_codes / v_codes are k4 / v4) on sm_90 with bf16 queries and scales (`supported`, `on_hopper`).
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
from jax._src.lib.mlir.dialects import arith, memref, vector
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
_SWZ128 = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
_SWZ_I4 = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(32))  # UPCAST_4X loads
_SWZ_P = (plgpu.TilingTransform((8, N)), plgpu.SwizzleTransform(2 * N))  # [tokens, N] B operands


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


def dequant(a: Array, scale_ref, zero_ref, index, hoisted=None) -> Array:
    """(a + 8) * scale + zero for a bf16[64, 64] WGMMA-layout array a (upcast signed codes).

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
        return_type=plgpu.ShapeDtypeStruct((64, 64), jnp.bfloat16, layout=plgpu.Layout.WGMMA))
    def f(ctx, a, s_ref, z_ref):
        del ctx
        layout, shape = mgpu.WGMMA_LAYOUT, (64, 64)
        vty = ir.VectorType.get((2,), ir.BF16Type.get())
        eight = arith.constant(vty, ir.DenseElementsAttr.get_splat(
            vty, ir.FloatAttr.get(ir.BF16Type.get(), 8.0)))
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
            regs[reg_idx] = arith.addf(arith.mulf(arith.addf(a.registers[reg_idx], eight), sc),
                                       zc)
        return mgpu.FragmentedArray(_registers=regs, _layout=layout, _is_signed=None)

    return f(a, scale_ref, zero_ref)


def fold_key_scales(q_ref, scale_ref, zero_ref, gq: int, groups_per_tile: int
                    ) -> tuple[Array, Array]:
    """(Q', Z') bf16[64, D] in WGMMA layout: the key scales and zero points of one step folded
    into the query operand, so that the key codes enter WGMMA as they are (`fold_keys`).

    Row 16 j + c of both (tile j of the step, score column c = l * gq + h, l < groups_per_tile)
    belongs to query head h and key group j * groups_per_tile + l of the step:
        Q'[16 j + c] = q[h] * scale[g],   Z'[16 j + c] = q[h] * (zero[g] + 8 * scale[g])
    (float32 products rounded once), zero for c >= groups_per_tile * gq. Then for a token t of
    group g, sum_ch code[t] Q'[ch] + sum_ch Z'[ch] = q[h] . ((code + 8) * scale + zero): the
    score of column c, valid for the tokens of its own group only (the kernel masks the rest).
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
            c = arith.remui(row, _c(16))
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

    p float32[64 tokens, 16] holds the probabilities in its columns 0..7; column 8 h + c of the
    results belongs to the chunk's channel group 2 chunk + h:
        B[t, 8 h + c] = p[t, c] * scale[t, 2 chunk + h]
        Bz[t, 8 h + c] = p[t, c] * (zero[t, 2 chunk + h] + 8 * scale[t, 2 chunk + h])
    so codes^T B + ones Bz gives, in rows of channel group h of the chunk and columns 8 h + c,
    sum_t ((code + 8) * scale + zero) p[t, c]. A thread holds columns col0 + {0, 1} and
    col0 + 8 + {0, 1} of its rows (`register_offsets`), so no value crosses threads.
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
        offs = register_offsets(shape)
        regs = list(np.ndindex(layout.registers_shape(shape)))
        by_off = dict(zip(offs, regs))
        bs = np.empty(layout.registers_shape(shape), dtype=object)
        bz = np.empty(layout.registers_shape(shape), dtype=object)
        for reg, (row, _), (dr, dc) in zip(regs, layout.thread_idxs(shape), offs):
            src = p.registers[by_off[(dr, dc % 8)]]
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


def _c(v: int):
    return arith.constant(ir.IndexType.get(), v)


def _kernel(q_ref, k_ref, ks_ref, kz_ref, v_ref, vs_ref, vz_ref, n_ref, o_ref, m_ref, l_ref,
            q_smem, k_smem, ks_smem, kz_smem, v_smem, vs_smem, vz_smem, p_smem, o_smem,
            m_smem, l_smem, q_bar, k_bar, v_bar, *fold_refs, stages, splits, scale, group,
            vgroup, block_tokens, hoist_index, fold_keys, fold_values, gq):
    b = lax.axis_index("b")
    h = lax.axis_index("h")
    s = lax.axis_index("s")
    d = k_ref.shape[3]
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
        plgpu.copy_gmem_to_smem(k_ref.at[b, h, rows], k_smem.at[slot], k_bar.at[slot])
        plgpu.copy_gmem_to_smem(ks_ref.at[b, h, grp], ks_smem.at[slot], k_bar.at[slot])
        plgpu.copy_gmem_to_smem(kz_ref.at[b, h, grp], kz_smem.at[slot], k_bar.at[slot])
        plgpu.copy_gmem_to_smem(v_ref.at[b, h, :, rows], v_smem.at[slot], v_bar.at[slot])
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

    def step(i, carry):
        m, den, accs = carry
        slot = lax.rem(i, stages)
        t0 = (lo + i) * bt
        plgpu.barrier_wait(k_bar.at[slot])
        if fold_keys:
            qp, zp = fold_key_scales(qplain_smem, ks_smem.at[slot], kz_smem.at[slot], gq, lpt)
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
                    a = dequant(codes(k_smem.at[slot, pl.ds(j * T, T), pl.ds(ch * 64, 64)]),
                                ks_smem.at[slot], kz_smem.at[slot], kidx, hoisted)
                    plgpu.wgmma(acc_ref, a, q_smem.at[:, pl.ds(ch * 64, 64)].T)
                return acc_ref[...]

            sc = pl.run_scoped(qk_folded if fold_keys else qk, plgpu.ACC((T, N), jnp.float32))
            tok = plgpu.broadcasted_iota(jnp.int32, (T, N), 0, layout=wg)
            ok = tok < length - t0 - j * T
            if fold_keys:  # column l * gq + h scores the tokens of key group l of the tile only
                column = plgpu.broadcasted_iota(jnp.int32, (T, N), 1, layout=wg)
                ok = ok & (tok // group == column // gq)
            scs.append(jnp.where(ok, sc * c, -jnp.inf))
        peak = functools.reduce(jnp.maximum, scs)
        m_new = jnp.maximum(m, peak.max(axis=0))
        alpha = jnp.exp2(m - m_new)
        ps = [jnp.exp2(sc - lax.broadcast_in_dim(m_new, sc.shape, [1])) for sc in scs]
        den = den * lax.broadcast_in_dim(alpha, den.shape, [1]) + functools.reduce(jnp.add, ps)
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

                    a = dequant(codes(v_smem.at[slot, pl.ds(ch * 64, 64), pl.ds(j * T, T)]),
                                vs_smem.at[slot], vz_smem.at[slot], vidx,
                                (vbase, voff) if hoist_index else None)
                    for kk in range(T // 16):
                        plgpu.wgmma(acc_ref, a[:, kk * 16:(kk + 1) * 16],
                                    p_smem.at[pl.ds(j * T + kk * 16, 16)])

            new.append(pl.run_state(pv_folded if fold_values else pv)(plgpu.ACC.init(acc)))
        pl.when(i + stages < n)(lambda: fetch(i + stages, slot))
        return m_new, den, tuple(new)

    m, den, accs = lax.fori_loop(0, n, step, (m, den, accs))
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


def _check(q, k4, k_scale, k_zero, v4, v_scale, v_zero, num_quantized, num_splits,
           num_stages, block_tokens) -> tuple[int, int]:
    """Raises for inputs this kernel does not take; returns (G, Gv)."""
    if q.ndim != 3 or q.dtype != jnp.bfloat16:
        raise ValueError(f"q must be bf16[batch, query_heads, head_dim], got {q.dtype}{q.shape}")
    b, hq, d = q.shape
    if k4.ndim != 4 or k4.dtype != jnp.int4 or k4.shape[0] != b or k4.shape[3] != d:
        raise ValueError(f"k4 must be int4[{b}, Hkv, C, {d}], got {k4.dtype}{k4.shape}")
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
                                             "fold_values"))
def _partials(q, k4, k_scale, k_zero, v4, v_scale, v_zero, num_quantized, *, scale,
              num_splits, num_stages, block_tokens, hoist_index, fold_keys, fold_values):
    b, _, d = q.shape
    hkv, cap = k4.shape[1], k4.shape[2]
    g, vg = cap // k_scale.shape[2], d // v_scale.shape[3]
    qg, gq, _ = pad_query_groups(q, hkv, N)  # [B, Hkv, N, D]: Gq <= N is checked
    bt = block_tokens
    gps = bt // g
    f32, bf16 = jnp.float32, jnp.bfloat16
    kernel = functools.partial(_kernel, stages=num_stages, splits=num_splits, scale=scale,
                               group=g, vgroup=vg, block_tokens=bt, hoist_index=hoist_index,
                               fold_keys=fold_keys, fold_values=fold_values, gq=gq)
    st = num_stages
    o, m, den = plgpu.kernel(
        kernel,
        out_type=[jax.ShapeDtypeStruct((b, hkv, num_splits, d, N), f32),
                  jax.ShapeDtypeStruct((b, hkv, num_splits, N), f32),
                  jax.ShapeDtypeStruct((b, hkv, num_splits, N), f32)],
        scratch_types=[
            plgpu.SMEM((N, d), bf16, transforms=_SWZ128),
            plgpu.SMEM((st, bt, d), jnp.int4, transforms=_SWZ_I4),
            plgpu.SMEM((st, gps, d), bf16), plgpu.SMEM((st, gps, d), bf16),
            plgpu.SMEM((st, d, bt), jnp.int4, transforms=_SWZ_I4),
            plgpu.SMEM((st, gps, d // vg, g), bf16), plgpu.SMEM((st, gps, d // vg, g), bf16),
            plgpu.SMEM((16 if fold_values else bt, N), bf16, transforms=_SWZ_P),  # P
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
    )(qg, k4, k_scale, k_zero, v4, v_scale, v_zero, num_quantized.astype(jnp.int32))
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
      required. Needs block_tokens >= 128 (with fold_values at 64-token steps the GPU check
      failed, rel. error 5.9e-2, so 64 is refused for both folds until that is found).
    fold_values: fold the value scales and zero points into the probabilities
      (`fold_value_scales`: per 64-channel chunk, B = P * scale and Bz = P * zero' with the
      two channel groups of the chunk in column halves) instead of dequantizing the value
      codes. Needs Gv = 32, at most 8 score columns (Gq, or (64 / G) x Gq with fold_keys) and
      block_tokens >= 128.
    Defaults: the fastest measured at 8 x 32k on an H100 (docs/benchmarks_quant.md).
    """
    g, vg = _check(q, k4, k_scale, k_zero, v4, v_scale, v_zero, num_quantized, num_splits,
                   num_stages, block_tokens)
    gq = q.shape[1] // k4.shape[1]
    if (fold_keys or fold_values) and block_tokens < 128:
        raise ValueError(f"fold_keys / fold_values need block_tokens >= 128, got {block_tokens} "
                         "(both folds at 64-token steps failed their GPU check)")
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
    o, m, den = _partials(q, k4, k_scale, k_zero, v4, v_scale, v_zero, num_quantized,
                          scale=scale, num_splits=num_splits, num_stages=num_stages,
                          block_tokens=block_tokens, hoist_index=bool(hoist_index),
                          fold_keys=bool(fold_keys), fold_values=bool(fold_values))
    if residual_keys is not None:
        ro, rm, rl = window_partials(q, residual_keys, residual_values, num_residual, scale)
        o, m, den = (jnp.concatenate(x, axis=2) for x in ((o, ro), (m, rm), (den, rl)))
    return merge_partials(o, m, den).reshape(q.shape).astype(q.dtype)


def repack_int4(k_codes: Array, v_codes: Array) -> tuple[Array, Array]:
    """`kivi`'s packed 4-bit codes (uint32[B, H, Nb, G, D]) -> (k4 int4[B, H, C, D],
    v4 int4[B, H, D, C]) signed (code - 8), C = Nb * 8 * G tokens in order."""
    from kvjax.quant import packing  # noqa: PLC0415 - kvjax imports pallas_kernels
    from kvjax.quant.kivi import to_int4  # noqa: PLC0415

    def tokens(words):  # [B, H, C, D] signed codes in token order
        c = packing.unpack(words, 4)  # [B, H, Ng, G, D]
        return to_int4(c.reshape(c.shape[0], c.shape[1], -1, c.shape[-1]))

    return tokens(k_codes), jnp.swapaxes(tokens(v_codes), 2, 3)


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
