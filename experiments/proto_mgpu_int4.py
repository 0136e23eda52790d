"""Probe: int4 keys and values as WGMMA register operands on Pallas Mosaic GPU.

The question this answers before a quantized Mosaic GPU decode kernel is written
(docs/benchmarks_quant.md, next steps items 7-8): can int4 codes be streamed by TMA, upcast to
bf16 in registers (Mosaic GPU's i4 -> bf16 conversion, layout WGMMA_UPCAST_4X relaid out to
WGMMA before the cast) and fed to WGMMA as the A operand fast enough to read a cache near the
int4 byte rate? Keys: tokens as the 64 M rows, S^T = K Q^T with N = 16 query columns. Values
(optional): channels as M rows, O^T = V^T P with P stored to shared memory as the B operand.
Each program streams its split of one head with a float32 online softmax per column, so no
work can be skipped; the bf16 variant runs the same kernel on bf16 tiles (4x the bytes), and
`zeros=True` adds the ones x P product that would carry value zero points. No scales here:
codes are the values (the planned fold of scales into B is `expand_scaled` below). Answered on
an H100 (2026-12-07, docs/benchmarks_quant.md): int4 attention 2.38x the bf16 variant, so the
kernel was built (pallas_kernels/quantized_decode_attention_mgpu.py).

Layouts: q8 bf16[B, H, N, D] (query heads of a KV head, padded to N rows), keys int4 or
bf16[B, H, C, D] (token-major), values_t the same dtype [B, H, Dv, C] (channel-major).
Outputs o^T float32[B, H, S, Dv, N] (with values), m, l float32[B, H, S, N] (log2 domain).

    PYTHONPATH=. python3 experiments/proto_mgpu_int4.py            # GPU: check + time
    python experiments/proto_mgpu_int4.py --lower                  # CPU: lower for CUDA only
"""

from __future__ import annotations

import argparse
import functools
import os
import sys

import jax
import jax.experimental.pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax._src.lib.mlir import ir
from jax._src.lib.mlir.dialects import arith, vector
from jax.experimental.mosaic import gpu as mgpu

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

T = 64  # tokens per tile (WGMMA M rows)
N = 16  # padded query columns (WGMMA N; >= 16 so that P can be a swizzled B operand)


def _kernel(*refs, stages, splits, int4, values, zeros):
    if values:
        (q_ref, k_ref, v_ref, o_ref, m_ref, l_ref, q_smem, k_smem, v_smem, p_smem, o_smem,
         m_smem, l_smem, q_bar, k_bar, v_bar) = refs
    else:
        q_ref, k_ref, m_ref, l_ref, q_smem, k_smem, m_smem, l_smem, q_bar, k_bar = refs
    b = lax.axis_index("b")
    h = lax.axis_index("h")
    s = lax.axis_index("s")
    cap = k_ref.shape[2]
    d = k_ref.shape[3]
    per = cap // T // splits
    lo = s * per

    def fetch(i, slot):
        rows = pl.ds((lo + i) * T, T)
        plgpu.copy_gmem_to_smem(k_ref.at[b, h, rows], k_smem.at[slot], k_bar.at[slot])
        if values:
            plgpu.copy_gmem_to_smem(v_ref.at[b, h, :, rows], v_smem.at[slot], v_bar.at[slot])

    plgpu.copy_gmem_to_smem(q_ref.at[b, h], q_smem, q_bar.at[0])
    for i in range(stages):
        fetch(i, i)
    plgpu.barrier_wait(q_bar.at[0])
    col_layout = plgpu.Layout.WGMMA.reduce(0)
    m = plgpu.layout_cast(jnp.full((N,), -1e30, jnp.float32), col_layout)
    den = plgpu.layout_cast(jnp.zeros((N,), jnp.float32), col_layout)
    dv = v_smem.shape[1] if values else 0
    accs = tuple(plgpu.layout_cast(jnp.zeros((64, N), jnp.float32), plgpu.Layout.WGMMA)
                 for _ in range(dv // 64))
    ones = None  # the A operand of the zero-point product, built only when it runs
    if zeros:
        ones = plgpu.layout_cast(jnp.ones((64, 16), jnp.bfloat16), plgpu.Layout.WGMMA)

    def a_operand(ref, regs=False):  # [64, 64] slice of a tile: int4 upcast in registers, or bf16
        if not int4:
            return plgpu.load(ref, (), layout=plgpu.Layout.WGMMA) if regs else ref
        a = plgpu.load(ref, (), layout=plgpu.Layout.WGMMA_UPCAST_4X)
        return plgpu.layout_cast(a, plgpu.Layout.WGMMA).astype(jnp.bfloat16)

    def step(i, carry):
        m, den, accs = carry
        slot = lax.rem(i, stages)
        plgpu.barrier_wait(k_bar.at[slot])

        def qk(acc_ref):
            for c in range(d // 64):
                qb = plgpu.transpose_ref(q_smem.at[:, pl.ds(c * 64, 64)], (1, 0))
                plgpu.wgmma(acc_ref, a_operand(k_smem.at[slot, :, pl.ds(c * 64, 64)]), qb)
            return acc_ref[...]

        sc = pl.run_scoped(qk, plgpu.ACC((T, N), jnp.float32))
        m_new = jnp.maximum(m, sc.max(axis=0))
        p = jnp.exp2(sc - lax.broadcast_in_dim(m_new, sc.shape, [1]))
        alpha = jnp.exp2(m - m_new)
        den = den * alpha + p.sum(axis=0)
        if values:
            p_smem[...] = p.astype(jnp.bfloat16)
            plgpu.commit_smem()
            plgpu.barrier_wait(v_bar.at[slot])
            new = []
            for c, acc in enumerate(accs):
                acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [1])

                def pv(acc_ref, c=c):
                    # A in registers must be [64, swizzle / 2]: P (N = 16 columns, 32-byte
                    # rows) has swizzle 32, so the 64 tokens go as 4 K-chunks of 16.
                    a = a_operand(v_smem.at[slot, pl.ds(c * 64, 64)], regs=True)
                    for kk in range(T // 16):
                        pk = p_smem.at[pl.ds(kk * 16, 16)]
                        plgpu.wgmma(acc_ref, a[:, kk * 16:(kk + 1) * 16], pk)
                        if zeros:  # the zero-point product of the planned kernel: ones x P
                            plgpu.wgmma(acc_ref, ones, pk)

                new.append(pl.run_state(pv)(plgpu.ACC.init(acc)))
            accs = tuple(new)
        pl.when(i + stages < per)(lambda: fetch(i + stages, slot))
        return m_new, den, accs

    m, den, accs = lax.fori_loop(0, per, step, (m, den, accs))
    for c, acc in enumerate(accs):
        o_smem[pl.ds(c * 64, 64)] = acc
    m_smem[...] = m
    l_smem[...] = den
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(m_smem, m_ref.at[b, h, s])
    plgpu.copy_smem_to_gmem(l_smem, l_ref.at[b, h, s])
    if values:
        plgpu.copy_smem_to_gmem(o_smem, o_ref.at[b, h, s])
    plgpu.wait_smem_to_gmem(0)


@functools.partial(jax.jit, static_argnames=("splits", "stages", "zeros"))
def scores_stats(q8, keys, values_t=None, *, splits=16, stages=4, zeros=False):
    """(m, l) float32[B, H, splits, N]: running max / sum of exp2 of S^T = keys @ q8^T, and with
    values_t [B, H, Dv, C] (channel-major) o^T float32[B, H, splits, Dv, N] = values_t @ P."""
    bsz, hkv, cap, d = keys.shape
    values = values_t is not None
    int4 = keys.dtype == jnp.int4
    if cap % (T * splits):
        raise ValueError(f"capacity {cap} must be a multiple of {T} x splits ({splits})")
    swz = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
    # int4 tiles: 64 codes are 32 bytes per row, the swizzle UPCAST_4X loads can plan for
    ktrans = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(32)) if int4 else swz
    f32 = jnp.float32
    kernel = functools.partial(_kernel, stages=stages, splits=splits, int4=int4, values=values,
                               zeros=zeros)
    out_type = [jax.ShapeDtypeStruct((bsz, hkv, splits, N), f32)] * 2
    scratch = [plgpu.SMEM((N, d), jnp.bfloat16, transforms=swz),
               plgpu.SMEM((stages, T, d), keys.dtype, transforms=ktrans)]
    args = [q8, keys]
    if values:
        dv = values_t.shape[2]
        out_type = [jax.ShapeDtypeStruct((bsz, hkv, splits, dv, N), f32)] + out_type
        scratch += [plgpu.SMEM((stages, dv, T), values_t.dtype, transforms=ktrans),
                    plgpu.SMEM((T, N), jnp.bfloat16, transforms=(
                        plgpu.TilingTransform((8, N)), plgpu.SwizzleTransform(2 * N))),
                    plgpu.SMEM((dv, N), f32)]
        args.append(values_t)
    scratch += [plgpu.SMEM((N,), f32), plgpu.SMEM((N,), f32), plgpu.Barrier(num_barriers=1),
                plgpu.Barrier(num_barriers=stages)]
    if values:
        scratch.append(plgpu.Barrier(num_barriers=stages))
    return plgpu.kernel(
        kernel,
        out_type=out_type,
        scratch_types=scratch,
        grid=(bsz, hkv, splits),
        grid_names=("b", "h", "s"),
        compiler_params=plgpu.CompilerParams(approx_math=True),
    )(*args)


def expand_scaled(q_ref, ks_ref):
    """[64, 128] bf16 in WGMMA layout, row r = q[r % 4] * ks[2 (r // 16) + (r // 4) % 2].

    The key-scale fold of the planned kernel: a 256-token block holds 8 key groups; row
    16 i + 8 d + 4 l + h of this array is query head h times the scale row of group 2 i + l of
    the block (d duplicates the columns), so tile i (tokens 64 i .. 64 i + 63) reads its
    16-column B operand as rows 16 i .. 16 i + 15. Per-row gathers have no Pallas-level form,
    hence plgpu.inline_mgpu: each thread loads its own (row, column pair) values from the
    untiled shared-memory q [4, 128] and ks [8, 128] and multiplies them.
    """

    @plgpu.inline_mgpu(arg_types=(plgpu.RefType(), plgpu.RefType()),
                       return_type=plgpu.ShapeDtypeStruct((64, 128), jnp.bfloat16,
                                                          layout=plgpu.Layout.WGMMA))
    def f(ctx, q_ref, ks_ref):
        del ctx
        layout, shape = mgpu.WGMMA_LAYOUT, (64, 128)
        vty = ir.VectorType.get((2,), ir.BF16Type.get())
        index = ir.IndexType.get()

        def c(v):
            return arith.constant(index, v)

        regs = np.empty(layout.registers_shape(shape), dtype=object)
        for reg_idx, (row, col) in zip(np.ndindex(regs.shape), layout.thread_idxs(shape)):
            h = arith.remui(row, c(4))
            g = arith.addi(arith.muli(arith.divui(row, c(16)), c(2)),
                           arith.remui(arith.divui(row, c(4)), c(2)))
            regs[reg_idx] = arith.mulf(vector.load(vty, q_ref, [h, col]),
                                       vector.load(vty, ks_ref, [g, col]))
        return mgpu.FragmentedArray(_registers=regs, _layout=layout, _is_signed=None)

    return f(q_ref, ks_ref)


def _expand_kernel(q_hbm, ks_hbm, o_hbm, q_smem, ks_smem, o_smem, bar):
    plgpu.copy_gmem_to_smem(q_hbm, q_smem, bar.at[0])
    plgpu.copy_gmem_to_smem(ks_hbm, ks_smem, bar.at[1])
    plgpu.barrier_wait(bar.at[0])
    plgpu.barrier_wait(bar.at[1])
    o_smem[...] = expand_scaled(q_smem, ks_smem)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(o_smem, o_hbm)
    plgpu.wait_smem_to_gmem(0)


def expand_call(q, ks):
    """Runs expand_scaled on q bf16[4, 128], ks bf16[8, 128] -> bf16[64, 128]."""
    swz = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
    return plgpu.kernel(
        _expand_kernel, out_type=jax.ShapeDtypeStruct((64, 128), jnp.bfloat16),
        scratch_types=[plgpu.SMEM((4, 128), jnp.bfloat16), plgpu.SMEM((8, 128), jnp.bfloat16),
                       plgpu.SMEM((64, 128), jnp.bfloat16, transforms=swz),
                       plgpu.Barrier(num_barriers=2)])(q, ks)


def expand_reference(q, ks):
    r = np.arange(64)
    return q[r % 4] * ks[2 * (r // 16) + (r // 4) % 2]


def reference(q8, keys, values_t, splits):
    """jnp (o^T, m, l) of the same split layout, float32 (o^T None without values)."""
    bsz, hkv, cap, d = keys.shape
    sc = jnp.einsum("bhcd,bhnd->bhcn", keys.astype(jnp.float32), q8.astype(jnp.float32))
    sc = sc.reshape(bsz, hkv, splits, cap // splits, N)
    m = sc.max(axis=3)
    p = jnp.exp2(sc - m[:, :, :, None])
    o = None
    if values_t is not None:
        vt = values_t.astype(jnp.float32).reshape(bsz, hkv, -1, splits, cap // splits)
        o = jnp.einsum("bhdsc,bhscn->bhsdn", vt, p)
    return o, m, p.sum(axis=3)


def inputs(key, b, h, cap, d):
    """q8, int4 keys, int4 values^T, and the same codes as bf16."""
    k1, k2, k3 = jax.random.split(key, 3)
    q8 = (0.05 * jax.random.normal(k1, (b, h, N, d), jnp.float32)).astype(jnp.bfloat16)
    kc = jax.random.randint(k2, (b, h, cap, d), -8, 8, jnp.int32)
    vc = jax.random.randint(k3, (b, h, d, cap), -8, 8, jnp.int32)
    return q8, kc.astype(jnp.int4), vc.astype(jnp.int4), kc.astype(jnp.bfloat16), vc.astype(
        jnp.bfloat16)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lower", action="store_true", help="lower for CUDA on this host only")
    args = ap.parse_args()
    if args.lower:
        q8, k4, v4, kb, vb = inputs(jax.random.key(0), 1, 2, 2048, 128)
        for keys, vals in ((k4, None), (kb, None), (k4, v4), (kb, vb)):
            for zeros in (False, True):
                f = functools.partial(scores_stats, splits=4, zeros=zeros)
                jax.jit(f).trace(q8, keys, vals).lower(lowering_platforms=("cuda",))
                print("lowered", keys.dtype, vals is not None, zeros)
        q, ks = jnp.ones((4, 128), jnp.bfloat16), jnp.ones((8, 128), jnp.bfloat16)
        jax.jit(expand_call).trace(q, ks).lower(lowering_platforms=("cuda",))
        print("lowered expand_scaled")
        return
    from experiments._bench import rel_err, time_jax  # noqa: PLC0415

    q = jax.random.normal(jax.random.key(5), (4, 128), jnp.float32).astype(jnp.bfloat16)
    ks = jax.random.normal(jax.random.key(6), (8, 128), jnp.float32).astype(jnp.bfloat16)
    print("check expand_scaled: rel. err", rel_err(expand_call(q, ks), expand_reference(q, ks)))
    q8, k4, v4, kb, vb = inputs(jax.random.key(0), 2, 4, 8192, 128)
    for keys, vals in ((k4, None), (kb, None), (k4, v4), (kb, vb)):
        for zeros in (False, True) if vals is not None else (False,):
            out = scores_stats(q8, keys, vals, splits=4, zeros=zeros)
            ref = reference(q8, keys, vals, 4)
            if zeros:
                ref = (ref[0] + ref[2][:, :, :, None, :], *ref[1:])
            errs = [rel_err(x, r) for x, r in zip(out[-2:], ref[1:])]
            if vals is not None:
                errs.append(rel_err(out[0], ref[0]))
            print(f"check {str(keys.dtype):8s} values={vals is not None} zeros={zeros}: "
                  "rel. err (m, l, o) " + " ".join(f"{e:.1e}" for e in errs), flush=True)
    b, h, cap, d = 8, 8, 32768, 128
    q8, k4, v4, kb, vb = inputs(jax.random.key(1), b, h, cap, d)
    qs = jnp.stack([q8 * (1 + i / 8) for i in range(6)])
    for keys, vals, zeros in ((k4, None, False), (kb, None, False), (k4, v4, False),
                              (k4, v4, True), (kb, vb, False)):
        for splits, stages in ((16, 4), (8, 4), (32, 4), (16, 2), (16, 8)):
            f = functools.partial(scores_stats, splits=splits, stages=stages, zeros=zeros)
            if vals is None:
                t = time_jax(lambda q, k, f=f: f(q, k), qs, [(keys,)])
            else:
                t = time_jax(lambda q, k, v, f=f: f(q, k, v), qs, [(keys, vals)])
            nbytes = (keys.size + (0 if vals is None else vals.size)) * (
                0.5 if keys.dtype == jnp.int4 else 2)
            print(f"{str(keys.dtype):8s} values={vals is not None:d} zeros={zeros:d} "
                  f"splits {splits:2d} stages {stages}: {t * 1e6:8.1f} us "
                  f"{nbytes / t / 1e9:7.0f} GB/s", flush=True)


if __name__ == "__main__":
    main()
