"""Ragged decode attention on the Pallas Mosaic GPU backend (Hopper: TMA + WGMMA), split-K.

The same computation and partial results as `decode_attention.ragged_decode_attention` for the
dense `LayerCache` layout (per-head `lengths`, optional positions; no bias, window or pool
layout): one program per (row, KV head, split) holds the G = Hq / Hkv query heads of its KV
head as the rows of a 64-row WGMMA tile (zero padded), streams its piece of the head's keys and
values through a `num_stages`-deep ring of shared-memory buffers filled by TMA, and runs a
float32 online softmax in the log2 domain. Partials (o, m, l) are merged by
`decode_attention.merge_partials`.

Layouts:
  q        [B, Hq, D]        bf16 or fp16; Hq = G * Hkv, G <= 64
  keys     [B, Hkv, C, D]    C a multiple of block_k; D a multiple of 64
  values   [B, Hkv, C, Dv]   Dv a multiple of 64
  lengths  int32[B, Hkv]     slots [0, lengths) of each head are attended
  kv_positions (optional) int32[B, Hkv, C], with q_positions int32[B]: slot s is seen iff
           0 <= pos <= q_pos as well (holes marked -1), as in the Triton kernel

Backend: Mosaic GPU only (sm_90). The Mosaic GPU interpreter of jax 0.10.2 rejects transposed
WGMMA operands, so on CPU the tests only lower it for CUDA (tests/test_decode_attention_mgpu.py)
and its numbers are checked on the GPU (`experiments/bench_mgpu.py` compares it with
`decode_attention.reference` and checks the output of every timing). Measured on an H100
(docs/benchmarks.md, fifth session): within 1% of the Triton kernel at its best launch config,
so `kvjax.attention` does not dispatch to it; it is the Hopper skeleton for a quantized Mosaic
GPU kernel. The -inf masking of fully masked heads (fixed after that run) passed the GPU checks
of the seventh session (docs/benchmarks.md).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.experimental.pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu
import jax.numpy as jnp
from jax import lax

from pallas_kernels.decode_attention import (
    check_inputs,
    check_num_splits,
    merge_partials,
    pad_query_groups,
)

Array = jax.Array

ROWS = 64  # WGMMA tile rows: the query heads of a KV head, zero padded
NEG = -1e30
_LOG2E = math.log2(math.e)


def _kernel(*refs, block_k, stages, splits, scale, out_rows, dtype, has_pos):
    if has_pos:
        (q_ref, k_ref, v_ref, len_ref, pos_ref, qpos_ref, o_ref, m_ref, l_ref,
         q_smem, k_smem, v_smem, p_smem, o_smem, m_smem, l_smem, q_bar, k_bar, v_bar,
         p_bar) = refs
    else:
        (q_ref, k_ref, v_ref, len_ref, o_ref, m_ref, l_ref,
         q_smem, k_smem, v_smem, o_smem, m_smem, l_smem, q_bar, k_bar, v_bar) = refs
    b = lax.axis_index("b")
    h = lax.axis_index("h")
    s = lax.axis_index("s")
    length = len_ref[b, h]
    qpos = qpos_ref[b] if has_pos else None
    nblk = (length + block_k - 1) // block_k
    per = (nblk + splits - 1) // splits
    lo = jnp.minimum(s * per, nblk)
    n = jnp.minimum(lo + per, nblk) - lo

    def fetch(i, slot):
        rows = pl.ds((lo + i) * block_k, block_k)
        plgpu.copy_gmem_to_smem(k_ref.at[b, h, rows], k_smem.at[slot], k_bar.at[slot])
        plgpu.copy_gmem_to_smem(v_ref.at[b, h, rows], v_smem.at[slot], v_bar.at[slot])
        if has_pos:
            plgpu.copy_gmem_to_smem(pos_ref.at[b, h, rows], p_smem.at[slot], p_bar.at[slot])

    plgpu.copy_gmem_to_smem(q_ref.at[b, h], q_smem, q_bar.at[0])
    for i in range(stages):
        pl.when(i < n)(functools.partial(fetch, i, i))
    plgpu.barrier_wait(q_bar.at[0])

    dv = v_smem.shape[-1]
    row_layout = plgpu.Layout.WGMMA.reduce(1)
    m = plgpu.layout_cast(jnp.full((ROWS,), NEG, jnp.float32), row_layout)
    den = plgpu.layout_cast(jnp.zeros((ROWS,), jnp.float32), row_layout)
    acc = plgpu.layout_cast(jnp.zeros((ROWS, dv), jnp.float32), plgpu.Layout.WGMMA)
    c = scale * _LOG2E

    def step(i, carry):
        acc, m, den = carry
        slot = lax.rem(i, stages)
        plgpu.barrier_wait(k_bar.at[slot])

        def qk(acc_ref):
            plgpu.wgmma(acc_ref, q_smem, plgpu.transpose_ref(k_smem.at[slot], (1, 0)))
            return acc_ref[...]

        sc = pl.run_scoped(qk, plgpu.ACC((ROWS, block_k), jnp.float32))
        col = plgpu.broadcasted_iota(jnp.int32, (ROWS, block_k), 1, layout=plgpu.Layout.WGMMA)
        ok = col < length - (lo + i) * block_k
        if has_pos:
            plgpu.barrier_wait(p_bar.at[slot])
            pos = plgpu.load(p_smem.at[slot], (), layout=plgpu.Layout.WGMMA.reduce(0))
            pos = lax.broadcast_in_dim(pos, sc.shape, [1])
            ok = ok & (pos >= 0) & (pos <= qpos)
        sc = jnp.where(ok, sc * c, -jnp.inf)  # p = 0 even where the running max is still NEG
        m_new = jnp.maximum(m, sc.max(axis=1))
        alpha = jnp.exp2(m - m_new)
        p = jnp.exp2(sc - lax.broadcast_in_dim(m_new, sc.shape, [0]))
        den = den * alpha + p.sum(axis=1)
        acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
        plgpu.barrier_wait(v_bar.at[slot])

        def pv(acc_ref):
            plgpu.wgmma(acc_ref, p.astype(dtype), v_smem.at[slot])

        acc = pl.run_state(pv)(plgpu.ACC.init(acc))
        pl.when(i + stages < n)(lambda: fetch(i + stages, slot))
        return acc, m_new, den

    acc, m, den = lax.fori_loop(0, n, step, (acc, m, den))
    o_smem[...] = acc
    m_smem[...] = m * (1.0 / _LOG2E)
    l_smem[...] = den
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(o_smem.at[pl.ds(0, out_rows)], o_ref.at[b, h, s])
    plgpu.copy_smem_to_gmem(m_smem.at[pl.ds(0, out_rows)], m_ref.at[b, h, s])
    plgpu.copy_smem_to_gmem(l_smem.at[pl.ds(0, out_rows)], l_ref.at[b, h, s])
    plgpu.wait_smem_to_gmem(0)


@functools.partial(jax.jit, static_argnames=("scale", "block_k", "num_splits", "num_stages"))
def _decode(q, keys, values, lengths, kv_positions, q_positions, *, scale, block_k, num_splits,
            num_stages):
    b, hq, d = q.shape
    hkv, dv = values.shape[1], values.shape[-1]
    qg, g, _ = pad_query_groups(q, hkv, ROWS)  # [B, Hkv, ROWS, D]: G <= ROWS is checked
    out_rows = max(4, -(-g // 4) * 4)  # TMA stores need >= 16 bytes per row of m and l
    swz = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
    dtype = q.dtype
    f32 = jnp.float32
    has_pos = kv_positions is not None
    kernel = functools.partial(
        _kernel, block_k=block_k, stages=num_stages, splits=num_splits, scale=scale,
        out_rows=out_rows, dtype=dtype, has_pos=has_pos)
    inputs = [qg, keys, values, lengths.astype(jnp.int32)]
    scratch = [
        plgpu.SMEM((ROWS, d), dtype, transforms=swz),
        plgpu.SMEM((num_stages, block_k, d), dtype, transforms=swz),
        plgpu.SMEM((num_stages, block_k, dv), dtype, transforms=swz),
    ]
    if has_pos:
        inputs += [kv_positions.astype(jnp.int32), q_positions.astype(jnp.int32)]
        scratch.append(plgpu.SMEM((num_stages, block_k), jnp.int32))
    scratch += [plgpu.SMEM((ROWS, dv), f32), plgpu.SMEM((ROWS,), f32), plgpu.SMEM((ROWS,), f32),
                plgpu.Barrier(num_barriers=1), plgpu.Barrier(num_barriers=num_stages),
                plgpu.Barrier(num_barriers=num_stages)]
    if has_pos:
        scratch.append(plgpu.Barrier(num_barriers=num_stages))
    o, m, den = plgpu.kernel(
        kernel,
        out_type=[
            jax.ShapeDtypeStruct((b, hkv, num_splits, out_rows, dv), f32),
            jax.ShapeDtypeStruct((b, hkv, num_splits, out_rows), f32),
            jax.ShapeDtypeStruct((b, hkv, num_splits, out_rows), f32),
        ],
        scratch_types=scratch,
        grid=(b, hkv, num_splits),
        grid_names=("b", "h", "s"),
        compiler_params=plgpu.CompilerParams(approx_math=True),
    )(*inputs)
    out = merge_partials(o[:, :, :, :g], m[:, :, :, :g], den[:, :, :, :g])
    return out.reshape(b, hq, dv).astype(q.dtype)


def ragged_decode_attention_mgpu(
    q: Array,
    keys: Array,
    values: Array,
    lengths: Array,
    *,
    kv_positions: Array | None = None,
    q_positions: Array | None = None,
    scale: float | None = None,
    block_k: int = 64,
    num_splits: int = 16,
    num_stages: int = 3,
) -> Array:
    """[B, Hq, Dv] decode attention (layouts in the module doc) on the Mosaic GPU backend.

    Raises ValueError/TypeError before launching: the shared checks of the Triton kernel
    (`decode_attention.check_inputs`), then this kernel's own limits.
    """
    check_inputs(q, keys, values, lengths, None, kv_positions, q_positions, None)
    _, hq, d = q.shape
    _, hkv, cap, dv = values.shape
    if q.dtype not in (jnp.bfloat16, jnp.float16):
        raise TypeError(f"q, keys, values must all be bf16 or fp16; got {q.dtype}")
    if hq // hkv > ROWS:
        raise ValueError(f"Hq / Hkv ({hq} / {hkv}) must be <= {ROWS}")
    if d % 64 or dv % 64:
        raise ValueError(f"head dims must be multiples of 64; got keys {d}, values {dv}")
    if block_k not in (64, 128, 256) or cap % block_k:
        raise ValueError(f"block_k must be 64, 128 or 256 and divide the capacity {cap}; "
                         f"got {block_k}")
    check_num_splits(num_splits)
    if num_stages < 1:
        raise ValueError(f"num_stages must be >= 1; got {num_stages}")
    scale = d**-0.5 if scale is None else float(scale)
    return _decode(q, keys, values, lengths, kv_positions, q_positions, scale=scale,
                   block_k=block_k, num_splits=num_splits, num_stages=num_stages)
