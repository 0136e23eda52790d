"""Ragged decode attention on TPU (Pallas Mosaic TPU): the TPU variant of
`decode_attention.ragged_decode_attention` for the plain layout.

One query token per row; all query heads of a KV head (GQA) are the rows of one program. The
grid is (B, Hkv, ceil(C / block_k)); the last axis walks the cache in `block_k`-slot blocks
("arbitrary": sequential, the online-softmax state lives in VMEM scratch), the first two are
"parallel" (megacore chips split them over their cores). No split-K: a TPU core runs the
grid's steps one after another, so more pieces per head would only add steps.

Ragged lengths: the per-head lengths and the query positions are scalar-prefetched into
SMEM. A block past its head's length maps to the head's last valid block (`_kv_index`), so the
pipeline sees the same block index again and issues no DMA for it, and the step's compute is
skipped (`pl.when`); an empty head reads one block and computes nothing.

Layouts (as `decode_attention`): q [B, Hq, D] with Hq = G * Hkv (query head j uses KV head
j // G); keys [B, Hkv, C, D]; values [B, Hkv, C, Dv]; lengths int32[B, Hkv]; optional
kv_positions int32[B, Hkv, C] with q_positions int32[B] (slot s is seen iff s < length and
0 <= kv_positions <= q_position, and q_position - kv_positions < sliding_window when set);
optional kv_bias float[B, Hkv, C] added to each slot's scaled score (merged slots' log N).
Rows that see no slot return zeros. float32 online softmax; bf16 or float32 inputs.

What was run where: numbers are checked against `decode_attention.reference` on CPU in the
Pallas TPU interpreter (`tests/test_decode_attention_tpu.py`), and the kernel is compiled by
the TPU compiler (libtpu 0.0.42, ahead of time for TPU v4, v5e and v6e topologies, on a CPU
host: `aot.tpu_compile`). It has not run on a TPU, and its speed is unmeasured (this
workplace lends NVIDIA GPUs only), so `kvjax.attention` dispatches to it only where
`kvjax.attention.TPU_DECODE_KERNEL` is set; the default block size is a guess, not a tune.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.aot import tpu_compile
from pallas_kernels.decode_attention import check_inputs

Array = jax.Array

LANES = 128  # TPU vector lane width: the slot axis of a block is a multiple of it
BLOCK_K = 1024  # default slots per step: 512 KB of bf16 K + V at D 128 (a guess: untimed)
DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32))
_NEG = -1e30  # initial running max: finite, so a fully masked row never gives inf - inf


def default_block_k(capacity: int, block_k: int = BLOCK_K) -> int:
    """Slots per step for a cache of `capacity` slots: `block_k` (a multiple of 128), or the
    capacity rounded up to a multiple of 128 when that is smaller. A last block that runs past
    the capacity reads padding, which the kernel masks (scores) and zeroes (values)."""
    return min(block_k, -(-capacity // LANES) * LANES)


def supported(q: Array, keys: Array, values: Array) -> bool:
    """Whether the kernel takes these decode inputs: one dtype among bf16 / float32."""
    return q.dtype == keys.dtype == values.dtype and jnp.dtype(q.dtype) in DTYPES


def last_block(count, size: int):
    """Index of the last block of `size` slots holding any of `count` (>= 0) valid ones, 0 when
    none: index maps clamp to it, so steps past a head's data fetch no new block."""
    # lax.div truncates (count >= 0), where `//` would lower floor semantics via `sign`
    return jnp.maximum(lax.div(count + size - 1, size) - 1, 0)


def head_spec(rows: int, cols: int) -> pl.BlockSpec:
    """The [rows, cols] block of a [B, Hkv, rows, cols] array that belongs to the program's
    (row, KV head) at every step (queries, output, a residual window)."""
    return pl.BlockSpec((None, None, rows, cols), lambda b, h, j, *prefetch: (b, h, 0, 0))


def dot_precision(dtype):
    """float32 operands at full precision (no bf16 passes), others at the default."""
    return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def check_scale(scale: float | None, head_dim: int) -> float:
    """The softmax scale (default head_dim ** -0.5); ValueError unless finite."""
    scale = head_dim ** -0.5 if scale is None else float(scale)
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")
    return scale


def tpu_interpret(interpret: bool | None) -> bool:
    """Whether to run the Pallas TPU interpreter: as given, else exactly off TPU."""
    return jax.default_backend() != "tpu" if interpret is None else bool(interpret)


def _kv_index(b, h, j, lengths_ref, qpos_ref, *, block_k):
    """Block j of head (b, h), or the head's last valid block past its length (no new DMA)."""
    del qpos_ref
    return b, h, jnp.minimum(j, last_block(lengths_ref[b, h], block_k)), 0


def init_state(m_ref, l_ref, acc_ref) -> None:
    """Online-softmax state in VMEM: running max m [G, 128] (repeated over the lanes), running
    sum l [G, 128], unnormalised output acc [G, Dv], all float32."""
    m_ref[...] = jnp.full(m_ref.shape, _NEG, jnp.float32)
    l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
    acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)


def slot_mask(slot, length, kpos_ref, qpos, window):
    """bool[., T]: slots (int32[., T]) below the head's length and, with positions (kpos_ref
    [1, T]), 0 <= position <= qpos and qpos - position < window when a window is set."""
    ok = slot < length
    if kpos_ref is not None:
        kp = kpos_ref[...]
        ok = ok & (kp >= 0) & (kp <= qpos)
        if window is not None:
            ok = ok & (qpos - kp < window)
    return ok


def update_state(q, k, v, ok, bias, m_ref, l_ref, acc_ref, *, scale) -> None:
    """One online-softmax step of queries q [G, D] over keys k [T, D] and values v [T, Dv]:
    ok bool[G or 1, T] masks slots, bias float[1, T] (or None) is added to the scaled scores.
    Dots at `dot_precision` of q's dtype."""
    precision = dot_precision(q.dtype)
    s = lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32,
                        precision=precision) * scale
    if bias is not None:
        s = s + bias.astype(jnp.float32)
    s = jnp.where(ok, s, -jnp.inf)
    m_prev = m_ref[...]
    m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
    alpha = jnp.exp(m_prev - m_new)
    p = jnp.exp(s - m_new[:, :1])
    l_ref[...] = alpha * l_ref[...] + jnp.sum(p, axis=1, keepdims=True)
    m_ref[...] = m_new
    pv = lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())),
                         preferred_element_type=jnp.float32, precision=precision)
    acc_ref[...] = acc_ref[...] * alpha[:, :1] + pv


def write_output(o_ref, l_ref, acc_ref) -> None:
    """acc / l into o_ref; rows that saw no slot (l == 0) get zeros."""
    den = l_ref[...][:, :1]
    out = jnp.where(den > 0, acc_ref[...] / jnp.where(den > 0, den, 1.0), 0.0)
    o_ref[...] = out.astype(o_ref.dtype)


def state_scratch(rows: int, dv: int) -> list:
    """VMEM scratch for `init_state` / `update_state` / `write_output`."""
    return [pltpu.VMEM((rows, LANES), jnp.float32), pltpu.VMEM((rows, LANES), jnp.float32),
            pltpu.VMEM((rows, dv), jnp.float32)]


def head_decode_call(kernel, inputs, in_specs, *, steps, out_shape, num_scalar_prefetch,
                     interpret, name):
    """`pl.pallas_call` of a decode kernel with one program per (row, KV head): grid (B, Hkv,
    steps), the last axis sequential ("arbitrary"), the online-softmax scratch
    (`state_scratch`), the output block [G, Dv] of its head (out_shape [B, Hkv, G, Dv]).
    inputs start with the `num_scalar_prefetch` scalar-prefetched arrays."""
    b, hkv, g, dv = out_shape.shape
    return pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=num_scalar_prefetch,
            grid=(b, hkv, steps),
            in_specs=in_specs,
            out_specs=head_spec(g, dv),
            scratch_shapes=state_scratch(g, dv),
        ),
        out_shape=out_shape,
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=interpret,
        name=name,
    )(*inputs)


def _kernel(lengths_ref, qpos_ref, q_ref, k_ref, v_ref, *refs, block_k, scale, window,
            has_pos, has_bias, num_blocks, capacity):
    i = 0
    kpos_ref = bias_ref = None
    if has_pos:
        kpos_ref, i = refs[i], i + 1
    if has_bias:
        bias_ref, i = refs[i], i + 1
    o_ref, m_ref, l_ref, acc_ref = refs[i:]
    b, h, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    length = lengths_ref[b, h]
    pl.when(j == 0)(lambda: init_state(m_ref, l_ref, acc_ref))

    @pl.when(j * block_k < length)
    def _step():
        slot = j * block_k + lax.broadcasted_iota(jnp.int32, (1, block_k), 1)
        ok = slot_mask(slot, length, kpos_ref, qpos_ref[b], window)
        v = v_ref[...]
        if capacity % block_k:  # the last block's rows past the capacity hold padding
            row = j * block_k + lax.broadcasted_iota(jnp.int32, (block_k, 1), 0)
            v = jnp.where(row < capacity, v, jnp.zeros_like(v))
        update_state(q_ref[...], k_ref[...], v, ok, None if bias_ref is None else bias_ref[...],
                     m_ref, l_ref, acc_ref, scale=scale)

    pl.when(j == num_blocks - 1)(lambda: write_output(o_ref, l_ref, acc_ref))


@functools.partial(jax.jit, static_argnames=("scale", "sliding_window", "block_k", "interpret"))
def _decode(q, keys, values, lengths, kv_positions, q_positions, kv_bias, *, scale,
            sliding_window, block_k, interpret):
    b, hq, d = q.shape
    _, hkv, cap, dv = values.shape
    g = hq // hkv
    nk = -(-cap // block_k)
    has_pos, has_bias = kv_positions is not None, kv_bias is not None
    kv_map = functools.partial(_kv_index, block_k=block_k)

    def slot_map(b_, h_, j, lengths_ref, qpos_ref):  # [B, Hkv, 1, C] per-slot rows
        bb, hh, jj, _ = kv_map(b_, h_, j, lengths_ref, qpos_ref)
        return bb, hh, 0, jj

    in_specs = [head_spec(g, d),
                pl.BlockSpec((None, None, block_k, d), kv_map),
                pl.BlockSpec((None, None, block_k, dv), kv_map)]
    inputs = [q.reshape(b, hkv, g, d), keys, values]
    if has_pos:
        in_specs.append(pl.BlockSpec((None, None, 1, block_k), slot_map))
        inputs.append(kv_positions.astype(jnp.int32).reshape(b, hkv, 1, cap))
    if has_bias:
        in_specs.append(pl.BlockSpec((None, None, 1, block_k), slot_map))
        inputs.append(kv_bias.astype(jnp.float32).reshape(b, hkv, 1, cap))
    qpos = (q_positions if has_pos else jnp.zeros((b,), jnp.int32)).astype(jnp.int32)
    kernel = functools.partial(
        _kernel, block_k=block_k, scale=scale, window=sliding_window, has_pos=has_pos,
        has_bias=has_bias, num_blocks=nk, capacity=cap)
    out = head_decode_call(
        kernel, [jnp.clip(lengths, 0, cap).astype(jnp.int32), qpos, *inputs], in_specs,
        steps=nk, out_shape=jax.ShapeDtypeStruct((b, hkv, g, dv), q.dtype),
        num_scalar_prefetch=2, interpret=interpret, name="ragged_decode_attention_tpu")
    return out.reshape(b, hq, dv)


def ragged_decode_attention_tpu(
    q: Array,
    keys: Array,
    values: Array,
    lengths: Array,
    *,
    kv_positions: Array | None = None,
    q_positions: Array | None = None,
    kv_bias: Array | None = None,
    scale: float | None = None,
    sliding_window: int | None = None,
    block_k: int | None = None,
    interpret: bool | None = None,
) -> Array:
    """[B, Hq, Dv] decode attention over per-head ragged caches (layouts in the module doc).

    block_k: slots per grid step, a multiple of 128 (any capacity: a last partial block is
      masked); default `default_block_k`.
    interpret: run the Pallas TPU interpreter (default: exactly off TPU).
    Raises ValueError/TypeError on mismatched shapes/dtypes before anything is launched.
    """
    check_inputs(q, keys, values, lengths, None, kv_positions, q_positions, sliding_window,
                 kv_bias)
    if jnp.dtype(q.dtype) not in DTYPES:
        raise ValueError(f"the TPU kernel takes bf16 or float32 inputs, got {q.dtype}")
    if block_k is None:
        block_k = default_block_k(keys.shape[2])
    elif not isinstance(block_k, int) or block_k < LANES or block_k % LANES:
        raise ValueError(f"block_k must be a positive multiple of {LANES}, got {block_k!r}")
    return _decode(q, keys, values, lengths, kv_positions, q_positions, kv_bias,
                   scale=check_scale(scale, q.shape[-1]),
                   sliding_window=None if sliding_window is None else int(sliding_window),
                   block_k=int(block_k), interpret=tpu_interpret(interpret))


def compile_for_tpu(topology: str, q, keys, values, lengths, kv_positions=None,
                    q_positions=None, kv_bias=None, **kwargs):
    """`aot.tpu_compile` of `ragged_decode_attention_tpu` (kwargs as the kernel's)."""

    def f(q, keys, values, lengths, kv_positions, q_positions, kv_bias):
        return ragged_decode_attention_tpu(q, keys, values, lengths, kv_positions=kv_positions,
                                           q_positions=q_positions, kv_bias=kv_bias,
                                           interpret=False, **kwargs)

    return tpu_compile(topology, f, q, keys, values, lengths, kv_positions, q_positions,
                       kv_bias)
