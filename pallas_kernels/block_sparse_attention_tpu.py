"""Block-sparse decode attention on TPU (Pallas Mosaic TPU): the TPU variant of
`block_sparse_attention.block_sparse_decode`, same lists and semantics.

The cache is cut into blocks of `block_size` slots; `block_indices` int32[B, Hkv, N] lists the
active blocks of each KV head and `block_counts` int32[B, Hkv] how many leading entries are
used. The lists, the lengths and the query positions are scalar-prefetched into SMEM, and the
BlockSpec index maps read them: the grid is (B, Hkv, ceil(N / P)), and grid step j of a head
fetches its list entries j P ... j P + P - 1, each through its own operand (the keys, values,
positions and bias are passed P times, operand t mapped to entry j P + t), so one step reads P
scattered blocks with P DMAs and time scales with the number of listed blocks. Entries past
the count map to the last listed block (no new DMA) and are masked; steps with no listed entry
skip their compute. Inside a block the usual mask holds (slot < length, 0 <= position <=
q_position, window), and each block is one online-softmax update (`decode_attention_tpu`'s
`update_state`). P (`blocks_per_step`) defaults to 512 / block_size slots per step, at most 16
blocks.

Layouts: q [B, Hq, D] (Hq = G * Hkv); keys/values [B, Hkv, C, D/Dv] with C a multiple of
block_size (viewed as [B, Hkv, C / block_size, block_size, D], a free reshape, so a block of
any power-of-two size >= 8 is a whole trailing tile); optional kv_positions int32[B, Hkv, C]
with q_positions int32[B]; optional kv_bias float[B, Hkv, C]. bf16 or float32.

What was run where: numbers checked against `block_sparse_attention.reference_decode` in the
Pallas TPU interpreter on CPU, and the kernel compiled by libtpu 0.0.42 ahead of time for TPU
v4, v5e and v6e on a CPU host (`tests/test_block_sparse_attention_tpu.py`). Not run or timed on
a TPU; Quest (`kvjax.sparse.quest`) uses it on TPU only where
`kvjax.attention.TPU_DECODE_KERNEL` is set.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.aot import tpu_compile
from pallas_kernels.block_sparse_attention import _check_common, _check_lists
from pallas_kernels.decode_attention_tpu import (
    DTYPES,
    check_scale,
    head_decode_call,
    head_spec,
    init_state,
    slot_mask,
    tpu_interpret,
    update_state,
    write_output,
)

Array = jax.Array

MAX_BLOCKS_PER_STEP = 16


def default_blocks_per_step(block_size: int) -> int:
    """Listed blocks per grid step: 512 slots' worth, between 1 and MAX_BLOCKS_PER_STEP."""
    return max(1, min(MAX_BLOCKS_PER_STEP, 512 // block_size))


def supported(q: Array, keys: Array, values: Array, block_size: int) -> bool:
    """Whether the kernel takes these decode inputs (the entry point raises for the rest): one
    dtype among bf16 / float32, power-of-two head dims in [16, 512] (as the GPU kernel), a
    power-of-two block size >= 8 dividing the capacity."""
    dims_ok = all(d & (d - 1) == 0 and 16 <= d <= 512 for d in (keys.shape[-1], values.shape[-1]))
    return (q.dtype == keys.dtype == values.dtype and jnp.dtype(q.dtype) in DTYPES and dims_ok
            and block_size >= 8 and block_size & (block_size - 1) == 0
            and keys.shape[2] % block_size == 0)


def _entry_index(b, h, j, lengths_ref, qpos_ref, idx_ref, cnt_ref, *, t, per_step):
    """Block of list entry j P + t of head (b, h) in the [B, Hkv, NB, ...] view; entries past
    the count take the last listed block (entry 0 of an empty list), so no new DMA."""
    del lengths_ref, qpos_ref
    last = jnp.maximum(cnt_ref[b, h] - 1, 0)
    return b, h, idx_ref[b, h, jnp.minimum(j * per_step + t, last)], 0, 0


def _kernel(lengths_ref, qpos_ref, idx_ref, cnt_ref, q_ref, *refs, per_step, block_size, scale,
            window, has_pos, has_bias, last_step):
    p = per_step
    k_refs, v_refs = refs[:p], refs[p:2 * p]
    i = 2 * p
    pos_refs = bias_refs = (None,) * p
    if has_pos:
        pos_refs, i = refs[i:i + p], i + p
    if has_bias:
        bias_refs, i = refs[i:i + p], i + p
    o_ref, m_ref, l_ref, acc_ref = refs[i:]
    b, h, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    count, length = cnt_ref[b, h], lengths_ref[b, h]
    pl.when(j == 0)(lambda: init_state(m_ref, l_ref, acc_ref))

    @pl.when(j * p < count)
    def _step():
        q = q_ref[...]
        for t in range(p):
            entry = j * p + t
            block = idx_ref[b, h, jnp.minimum(entry, count - 1)]
            slot = block * block_size + lax.broadcasted_iota(jnp.int32, (1, block_size), 1)
            ok = (entry < count) & slot_mask(slot, length, pos_refs[t], qpos_ref[b], window)
            bias = None if bias_refs[t] is None else bias_refs[t][...]
            update_state(q, k_refs[t][...], v_refs[t][...], ok, bias, m_ref, l_ref, acc_ref,
                         scale=scale)

    pl.when(j == last_step)(lambda: write_output(o_ref, l_ref, acc_ref))


@functools.partial(jax.jit, static_argnames=("block_size", "scale", "sliding_window",
                                             "per_step", "interpret"))
def _decode(q, keys, values, lengths, block_indices, block_counts, kv_positions, q_positions,
            kv_bias, *, block_size, scale, sliding_window, per_step, interpret):
    b, hq, d = q.shape
    _, hkv, cap, dv = values.shape
    g, nb, n = hq // hkv, cap // block_size, block_indices.shape[-1]
    steps = max(1, -(-n // per_step))
    has_pos, has_bias = kv_positions is not None, kv_bias is not None

    maps = [functools.partial(_entry_index, t=t, per_step=per_step) for t in range(per_step)]
    in_specs = [head_spec(g, d)]
    inputs = [q.reshape(b, hkv, g, d)]
    # per-slot arrays as [B, Hkv, NB, rows, cols] views (free reshapes), each passed once per
    # entry of a step: keys / values [block_size, D] tiles, positions / bias [1, block_size]
    views = [keys.reshape(b, hkv, nb, block_size, d), values.reshape(b, hkv, nb, block_size, dv)]
    if has_pos:
        views.append(kv_positions.astype(jnp.int32).reshape(b, hkv, nb, 1, block_size))
    if has_bias:
        views.append(kv_bias.astype(jnp.float32).reshape(b, hkv, nb, 1, block_size))
    for view in views:
        in_specs += [pl.BlockSpec((None, None, None, *view.shape[3:]), m) for m in maps]
        inputs += [view] * per_step
    qpos = (q_positions if has_pos else jnp.zeros((b,), jnp.int32)).astype(jnp.int32)
    prefetch = (jnp.clip(lengths, 0, cap).astype(jnp.int32), qpos,
                jnp.clip(block_indices, 0, nb - 1).astype(jnp.int32),
                jnp.clip(block_counts, 0, n).astype(jnp.int32))
    kernel = functools.partial(
        _kernel, per_step=per_step, block_size=block_size, scale=scale, window=sliding_window,
        has_pos=has_pos, has_bias=has_bias, last_step=steps - 1)
    out = head_decode_call(
        kernel, [*prefetch, *inputs], in_specs, steps=steps,
        out_shape=jax.ShapeDtypeStruct((b, hkv, g, dv), q.dtype), num_scalar_prefetch=4,
        interpret=interpret, name="block_sparse_decode_tpu")
    return out.reshape(b, hq, dv)


def block_sparse_decode_tpu(
    q: Array,
    keys: Array,
    values: Array,
    lengths: Array,
    block_indices: Array,
    block_counts: Array,
    *,
    block_size: int,
    kv_positions: Array | None = None,
    q_positions: Array | None = None,
    kv_bias: Array | None = None,
    scale: float | None = None,
    sliding_window: int | None = None,
    blocks_per_step: int | None = None,
    interpret: bool | None = None,
) -> Array:
    """[B, Hq, Dv] decode attention over the listed KV blocks of each KV head (module doc).

    block_size: slots per block, a power of two >= 8 dividing the capacity.
    blocks_per_step: listed blocks fetched per grid step (default `default_blocks_per_step`).
    interpret: run the Pallas TPU interpreter (default: exactly off TPU).
    Raises ValueError/TypeError naming the argument before anything is launched.
    """
    _check_common(q, keys, values, lengths, block_size, kv_positions, q_positions,
                  sliding_window, (q.shape[0],))
    if q.ndim != 3:
        raise ValueError(f"q must be [B, Hq, D], got {q.shape}")
    if jnp.dtype(q.dtype) not in DTYPES:
        raise ValueError(f"the TPU kernel takes bf16 or float32 inputs, got {q.dtype}")
    if block_size < 8:
        raise ValueError(f"block_size must be >= 8 on TPU (a sublane tile), got {block_size}")
    b, hkv, cap, _ = keys.shape
    _check_lists(block_indices, block_counts, [(b, hkv)], cap // block_size)
    if kv_bias is not None and (kv_bias.shape != (b, hkv, cap)
                                or not jnp.issubdtype(kv_bias.dtype, jnp.floating)):
        raise ValueError(f"kv_bias must be float[{b}, {hkv}, {cap}], got {kv_bias.dtype}"
                         f"{list(kv_bias.shape)}")
    if blocks_per_step is None:
        blocks_per_step = default_blocks_per_step(block_size)
    if not isinstance(blocks_per_step, int) or not 1 <= blocks_per_step <= MAX_BLOCKS_PER_STEP:
        raise ValueError(f"blocks_per_step must be an int in [1, {MAX_BLOCKS_PER_STEP}], got "
                         f"{blocks_per_step!r}")
    return _decode(q, keys, values, lengths, block_indices, block_counts, kv_positions,
                   q_positions, kv_bias, block_size=int(block_size),
                   scale=check_scale(scale, q.shape[-1]),
                   sliding_window=None if sliding_window is None else int(sliding_window),
                   per_step=int(blocks_per_step), interpret=tpu_interpret(interpret))


def compile_for_tpu(topology: str, *args, **kwargs):
    """`aot.tpu_compile` of `block_sparse_decode_tpu(*args, **kwargs)` (args
    in the order q, keys, values, lengths, block_indices, block_counts, kv_positions,
    q_positions, kv_bias; None for absent optional arrays)."""

    def f(q, keys, values, lengths, idx, cnt, kv_positions=None, q_positions=None,
          kv_bias=None):
        return block_sparse_decode_tpu(q, keys, values, lengths, idx, cnt,
                                       kv_positions=kv_positions, q_positions=q_positions,
                                       kv_bias=kv_bias, interpret=False, **kwargs)

    return tpu_compile(topology, f, *args)
