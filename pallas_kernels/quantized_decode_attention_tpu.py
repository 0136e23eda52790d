"""Decode attention over a KIVI-quantized cache on TPU (Pallas Mosaic TPU): the TPU variant of
`quantized_decode_attention` for `kivi`'s packed layout (8 / 4 / 2 bits) plus its residual
window.

Grid (B, Hkv, Nb + 1): step n < Nb reads packed block n of a KV head (its key and value words
[G, D] uint32 and the scales / zero points of its P = 32 / bits groups), step Nb the bf16
residual window [R, D]; the last axis is sequential, the online-softmax state lives in VMEM
scratch (the helpers of `decode_attention_tpu`). Blocks past a head's `num_quantized` map to
its last valid block (no DMA) and skip their compute, as in the ragged TPU kernel. Within a
block, field j (the G tokens of group n P + j) is unpacked in registers, (word >> bits j) &
(2^bits - 1), and dequantized, code * scale + zero, in float32, then rounded to the query's
dtype for the two dots (the GPU kernels round the same way). Key scales are per channel
([1, D] rows); value scales are per token and channel group ([D / Gv, G]) and are spread over
the channels with a 0/1 matrix product (`_spread`), which keeps every operand 2-D and
lane-dense. No dequantized copy of the cache is written to HBM.

Layout (`quantized_decode_attention`'s): q [B, Hq, D]; k_codes / v_codes uint32[B, Hkv, Nb, G,
D]; k_scale / k_zero [B, Hkv, Ng, D]; v_scale / v_zero [B, Hkv, Ng, D / Gv, G] (bf16:
Mosaic rejects float16 scale loads on v5e, so `kivi(scale_dtype=float16)` caches take the
reference); num_quantized int32[B, Hkv]; residual_keys / residual_values [B, Hkv, R, D],
num_residual int32[B, Hkv] (optional). Token (n P + j) G + w of the quantized part is valid
iff below num_quantized; residual slot r iff below num_residual. bf16 or float32 queries.

What was run where: numbers checked against `quantized_decode_attention.reference` in the
Pallas TPU interpreter on CPU, and compiled by libtpu 0.0.42 ahead of time for TPU v4, v5e and
v6e on a CPU host (`tests/test_quantized_decode_attention_tpu.py`). Not run or timed on a TPU;
`kvjax.quant.kivi` dispatches packed-layout decode on TPU to it only where
`kvjax.attention.TPU_DECODE_KERNEL` is set.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.aot import tpu_compile
from pallas_kernels.decode_attention_tpu import (
    DTYPES,
    check_scale,
    dot_precision,
    head_decode_call,
    head_spec,
    init_state,
    last_block,
    tpu_interpret,
    update_state,
    write_output,
)
from pallas_kernels.quantized_decode_attention import _layout, check_residual

Array = jax.Array


def _spread(x, expand, precision):
    """[G, D] per-channel values from x [D / Gv, G] (per token and channel group): x^T E with
    E [D / Gv, D] the 0/1 matrix of channel groups (exact: one nonzero term per output)."""
    return lax.dot_general(x, expand, (((0,), (0,)), ((), ())),
                           preferred_element_type=jnp.float32, precision=precision)


def _block_index(b, h, n, nq_ref, nr_ref, *, tokens_per_block):
    """Packed block n of head (b, h); past the head's last valid block (and at the residual
    step) that block again, so no new DMA."""
    del nr_ref
    return b, h, jnp.minimum(n, last_block(nq_ref[b, h], tokens_per_block)), 0, 0


def _kernel(nq_ref, nr_ref, q_ref, kc_ref, ks_ref, kz_ref, vc_ref, vs_ref, vz_ref, e_ref, *refs,
            bits, group, scale, residual, num_blocks):
    if residual:
        rk_ref, rv_ref = refs[:2]
        refs = refs[2:]
    o_ref, m_ref, l_ref, acc_ref = refs
    b, h, n = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    per = 32 // bits
    nq = nq_ref[b, h]
    dtype = q_ref.dtype
    precision = dot_precision(dtype)  # of the scale spreads, as of `update_state`'s dots
    pl.when(n == 0)(lambda: init_state(m_ref, l_ref, acc_ref))

    @pl.when((n < num_blocks) & (n * per * group < nq))
    def _quantized():
        q = q_ref[...]
        kw, vw = kc_ref[...], vc_ref[...]  # [G, D] uint32
        expand = e_ref[...]
        for j in range(per):  # field j: the G tokens of group n P + j

            def field(words, j=j):
                c = (words >> jnp.uint32(bits * j)) & jnp.uint32(2**bits - 1)
                return lax.bitcast_convert_type(c, jnp.int32).astype(jnp.float32)

            rows = pl.ds(j, 1)
            k = field(kw) * ks_ref[rows, :].astype(jnp.float32) + kz_ref[rows, :].astype(
                jnp.float32)
            vs = _spread(vs_ref[j].astype(jnp.float32), expand, precision)
            vz = _spread(vz_ref[j].astype(jnp.float32), expand, precision)
            v = field(vw) * vs + vz
            token = (n * per + j) * group + lax.broadcasted_iota(jnp.int32, (1, group), 1)
            update_state(q, k.astype(dtype), v.astype(dtype), token < nq, None, m_ref, l_ref,
                         acc_ref, scale=scale)

    if residual:

        @pl.when(n == num_blocks)
        def _window():
            w = rk_ref.shape[0]
            ok = lax.broadcasted_iota(jnp.int32, (1, w), 1) < nr_ref[b, h]
            update_state(q_ref[...], rk_ref[...].astype(dtype), rv_ref[...].astype(dtype), ok,
                         None, m_ref, l_ref, acc_ref, scale=scale)

    pl.when(n == num_blocks)(lambda: write_output(o_ref, l_ref, acc_ref))


@functools.partial(jax.jit, static_argnames=("scale", "interpret"))
def _decode(q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, num_quantized,
            residual_keys, residual_values, num_residual, *, scale, interpret):
    b, hq, d = q.shape
    _, h, nb, g, _ = k_codes.shape
    per = k_scale.shape[2] // nb
    bits, ncg = 32 // per, v_scale.shape[3]
    gq = hq // h
    residual = residual_keys is not None and residual_keys.shape[2] > 0
    blk = functools.partial(_block_index, tokens_per_block=per * g)

    def blocks(shape):  # a [B, Hkv, Nb, ...] view, one block per step
        return pl.BlockSpec((None, None, None, *shape),
                            lambda *i: (*blk(*i), *(0,) * (len(shape) - 2)))

    in_specs = [head_spec(gq, d), blocks((g, d)), blocks((per, d)),
                blocks((per, d)), blocks((g, d)), blocks((per, ncg, g)), blocks((per, ncg, g)),
                pl.BlockSpec((ncg, d), lambda b_, h_, n, *prefetch: (0, 0))]
    expand = (jnp.arange(d)[None, :] // (d // ncg) == jnp.arange(ncg)[:, None]).astype(
        jnp.float32)
    inputs = [q.reshape(b, h, gq, d), k_codes, k_scale.reshape(b, h, nb, per, d),
              k_zero.reshape(b, h, nb, per, d), v_codes,
              v_scale.reshape(b, h, nb, per, ncg, g), v_zero.reshape(b, h, nb, per, ncg, g),
              expand]
    nr = jnp.zeros((b, h), jnp.int32)
    if residual:
        w = residual_keys.shape[2]
        in_specs += [head_spec(w, d)] * 2
        inputs += [residual_keys, residual_values]
        nr = jnp.clip(num_residual, 0, w).astype(jnp.int32)
    kernel = functools.partial(
        _kernel, bits=bits, group=g, scale=scale, residual=residual, num_blocks=nb)
    out = head_decode_call(
        kernel, [jnp.clip(num_quantized, 0, nb * per * g).astype(jnp.int32), nr, *inputs],
        in_specs, steps=nb + 1, out_shape=jax.ShapeDtypeStruct((b, h, gq, d), q.dtype),
        num_scalar_prefetch=2, interpret=interpret, name="quantized_decode_attention_tpu")
    return out.reshape(b, hq, d)


def supported(q: Array, k_scale: Array) -> bool:
    """Whether the kernel takes this decode (the entry point raises for the rest): bf16 or
    float32 queries and bf16 scales (Mosaic rejects the float16 scale loads on TPU v5e)."""
    return jnp.dtype(q.dtype) in DTYPES and k_scale.dtype == jnp.bfloat16


def quantized_decode_attention_tpu(
    q: Array,
    k_codes: Array, k_scale: Array, k_zero: Array,
    v_codes: Array, v_scale: Array, v_zero: Array,
    num_quantized: Array,
    residual_keys: Array | None = None,
    residual_values: Array | None = None,
    num_residual: Array | None = None,
    *,
    scale: float | None = None,
    interpret: bool | None = None,
) -> Array:
    """[B, Hq, D] decode attention over one packed KIVI cache (+ residual window).

    interpret: run the Pallas TPU interpreter (default: exactly off TPU).
    Raises ValueError/TypeError naming the argument before anything is launched.
    """
    _layout(q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, num_quantized)
    check_residual(q, k_codes.shape[1], residual_keys, residual_values, num_residual)
    if num_residual is not None and num_residual.shape != num_quantized.shape:
        raise ValueError(f"num_residual must be {list(num_quantized.shape)}, got "
                         f"{list(num_residual.shape)}")
    if jnp.dtype(q.dtype) not in DTYPES:
        raise ValueError(f"q must be bf16 or float32 for the TPU kernel, got {q.dtype}")
    for name, x in (("k_scale", k_scale), ("k_zero", k_zero), ("v_scale", v_scale),
                    ("v_zero", v_zero)):
        if x.dtype != jnp.bfloat16:
            raise ValueError(f"{name} must be bf16 for the TPU kernel (kivi's default "
                             f"scale_dtype), got {x.dtype}")
    return _decode(q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, num_quantized,
                   residual_keys, residual_values, num_residual,
                   scale=check_scale(scale, q.shape[-1]), interpret=tpu_interpret(interpret))


def compile_for_tpu(topology: str, *args, **kwargs):
    """`aot.tpu_compile` of `quantized_decode_attention_tpu(*args, **kwargs)`
    (args in the kernel's order; None for an absent residual window)."""

    def f(*a):
        return quantized_decode_attention_tpu(*a, interpret=False, **kwargs)

    return tpu_compile(topology, f, *args)
