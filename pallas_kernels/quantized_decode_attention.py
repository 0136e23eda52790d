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

Inner loop, per block of P * G tokens: load the G x D key and value words once; for each of the
P groups: codes = (word >> bits*j) & mask, converted to float32 with the exponent trick
(bit-or into 2^23, subtract 2^23, no int->float conversion instruction), keys dequantized as
codes * scale + zero ([1, D] broadcasts), q @ k^T on tensor cores; values are never dequantized
elementwise: their per-token scale is folded into the probabilities,
    p @ (c * s + z) = (p * s) @ c + (p . z),
so the value dot reads the exact small-integer codes. Softmax is online (float32) across groups.

Bytes read per token and KV head at D=128, G=32, 16-bit scale/zero: int8 288, int4 160, int2 96
versus 512 for a bf16 cache (1.8x, 3.2x, 5.3x less).

`reference` is the plain jnp version (dequantize, mask, float32 softmax); tests compare the kernel
against it on CPU in interpret mode (automatic there).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

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


def _codes_f32(words: Array, shift, mask: int) -> Array:
    """float32 codes (words >> shift) & mask via the 2^23 exponent trick (shift int or traced)."""
    shift = jnp.uint32(shift) if isinstance(shift, int) else shift.astype(jnp.uint32)
    c = jnp.right_shift(words, shift) & jnp.uint32(mask)
    return lax.bitcast_convert_type(c | jnp.uint32(_MAGIC), jnp.float32) - _MAGIC_F


def _softmax_step(carry, scores, valids, pv):
    """Online-softmax update with several score tiles; pv(i, probs) -> per-channel-group outputs."""
    m, den, accs = carry
    m_new = m
    for s in scores:
        m_new = jnp.maximum(m_new, jnp.max(s, axis=1))
    alpha = jnp.exp(m - m_new)
    den = den * alpha
    accs = [a * alpha[:, None] for a in accs]
    for i, (s, valid) in enumerate(zip(scores, valids)):
        probs = jnp.where(valid, jnp.exp(s - m_new[:, None]), 0.0)
        den = den + jnp.sum(probs, axis=1)
        accs = [a + c for a, c in zip(accs, pv(i, probs))]
    return m_new, den, tuple(accs)


def _kernel(
    nq_ref, nr_ref, q_ref, kc_ref, ks_ref, kz_ref, vc_ref, vs_ref, vz_ref, *rest,
    bits: int, group: int, vgroup: int, blocks_per_split: int, num_splits: int, sm_scale: float,
    chunk: int, res_chunk: int, has_residual: bool, unroll: bool,
):
    if has_residual:
        rk_ref, rv_ref, o_ref, m_ref, l_ref = rest
    else:
        o_ref, m_ref, l_ref = rest
    split = pl.program_id(2)
    per = 32 // bits
    mask = 2**bits - 1
    gp, d = q_ref.shape
    ncg = d // vgroup
    q = q_ref[...]
    ddt = q.dtype
    nq = nq_ref[()]
    carry = (
        jnp.full((gp,), NEG, jnp.float32),
        jnp.zeros((gp,), jnp.float32),
        tuple(jnp.zeros((gp, vgroup), jnp.float32) for _ in range(ncg)),
    )
    iota = lax.broadcasted_iota(jnp.int32, (1, group), 1)

    def qblock(blk, carry):
        kw = kc_ref[pl.ds(blk * group, group), :]  # [G, D] words
        vws = [vc_ref[pl.ds(blk * group, group), pl.ds(c * vgroup, vgroup)] for c in range(ncg)]

        def chunk_step(j0, carry):  # groups j0 * chunk + [0, chunk) of the block
            scores, valids = [], []
            for i in range(chunk):
                j = j0 * chunk + i
                gi = blk * per + j
                ks = ks_ref[pl.ds(gi, 1), :].astype(jnp.float32)  # [1, D]
                kz = kz_ref[pl.ds(gi, 1), :].astype(jnp.float32)
                k = _codes_f32(kw, bits * j, mask) * ks + kz  # [G, D]
                s = _dot_nt(q, k.astype(ddt)) * sm_scale  # [gp, G]
                valid = gi * group + iota < nq
                scores.append(jnp.where(valid, s, NEG))
                valids.append(valid)

            def pv(i, probs):
                j = j0 * chunk + i
                gi = blk * per + j
                out = []
                for c in range(ncg):
                    vs = vs_ref[pl.ds(gi * ncg + c, 1), :].astype(jnp.float32)  # [1, G]
                    vz = vz_ref[pl.ds(gi * ncg + c, 1), :].astype(jnp.float32)
                    codes = _codes_f32(vws[c], bits * j, mask)  # [G, Gv], exact small integers
                    pv_c = _dot_nn((probs * vs).astype(ddt), codes.astype(ddt))
                    out.append(pv_c + jnp.sum(probs * vz, axis=1)[:, None])
                return out

            return _softmax_step(carry, scores, valids, pv)

        if unroll:  # static shifts and offsets (the compiled path)
            for j0 in range(per // chunk):
                carry = chunk_step(j0, carry)
            return carry
        return lax.fori_loop(0, per // chunk, chunk_step, carry)  # small programs (interpret)

    span = per * group
    nblk = (nq + span - 1) // span
    start = split * blocks_per_split
    stop = jnp.where(split < num_splits, jnp.minimum(start + blocks_per_split, nblk), start)
    carry = lax.fori_loop(start, jnp.maximum(stop, start), qblock, carry)

    if has_residual:
        nr = nr_ref[()]
        riota = lax.broadcasted_iota(jnp.int32, (1, res_chunk), 1)

        def rblock(c, carry):
            rk = rk_ref[pl.ds(c * res_chunk, res_chunk), :]
            s = _dot_nt(q, rk.astype(ddt)) * sm_scale
            valid = c * res_chunk + riota < nr

            def pv(i, probs):
                return [
                    _dot_nn(
                        probs.astype(ddt),
                        rv_ref[pl.ds(c * res_chunk, res_chunk), pl.ds(g * vgroup, vgroup)]
                        .astype(ddt),
                    )
                    for g in range(ncg)
                ]

            return _softmax_step(carry, [jnp.where(valid, s, NEG)], [valid], pv)

        n_rc = jnp.where(split == num_splits, (nr + res_chunk - 1) // res_chunk, 0)
        carry = lax.fori_loop(0, n_rc, rblock, carry)

    m, den, accs = carry
    for c in range(ncg):
        o_ref[:, pl.ds(c * vgroup, vgroup)] = accs[c]
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


def default_splits(batch: int, num_kv_heads: int, num_blocks: int) -> int:
    """Splits of the quantized part so that about TARGET_PROGRAMS programs run."""
    return max(1, min(num_blocks, -(-TARGET_PROGRAMS // (batch * num_kv_heads))))


@functools.partial(
    jax.jit,
    static_argnames=("scale", "num_splits", "num_warps", "num_stages", "softmax_chunk",
                     "unroll", "interpret"),
)
def _partials(q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, num_quantized,
              residual_keys, residual_values, num_residual, *, scale, num_splits, num_warps,
              num_stages, softmax_chunk, unroll, interpret):
    bits, g, vg, gq = _layout(q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero,
                              num_quantized)
    b, hq, d = q.shape
    h, nb = k_codes.shape[1], k_codes.shape[2]
    per = 32 // bits
    ng, ncg = nb * per, d // vg
    gp = max(MIN_ROWS, 1 << (gq - 1).bit_length())
    qg = jnp.pad(q.reshape(b, h, gq, d), ((0, 0), (0, 0), (0, gp - gq), (0, 0)))
    if qg.dtype not in (jnp.bfloat16, jnp.float16):
        qg = qg.astype(jnp.float32)
    splits = default_splits(b, h, nb) if num_splits is None else min(num_splits, nb)
    bps = -(-nb // splits)
    splits = -(-nb // bps)
    has_res = residual_keys is not None
    chunk = min(softmax_chunk, per)
    res_chunk = 0
    inputs = [
        num_quantized.astype(jnp.int32),
        (num_residual if has_res else num_quantized).astype(jnp.int32),
        qg,
        k_codes.reshape(b, h, nb * g, d), k_scale, k_zero,
        v_codes.reshape(b, h, nb * g, d),
        v_scale.reshape(b, h, ng * ncg, g), v_zero.reshape(b, h, ng * ncg, g),
    ]

    def whole(shape):
        return pl.BlockSpec((None, None) + tuple(shape), lambda i, j, s: (i, j) + (0,) * len(shape))

    in_specs = [
        pl.BlockSpec((None, None), lambda i, j, s: (i, j)),
        pl.BlockSpec((None, None), lambda i, j, s: (i, j)),
        whole((gp, d)),
        whole((nb * g, d)), whole((ng, d)), whole((ng, d)),
        whole((nb * g, d)), whole((ng * ncg, g)), whole((ng * ncg, g)),
    ]
    if has_res:
        r = residual_keys.shape[2]
        res_chunk = next(c for c in (128, 64, 32, 16, 8, 4, 2, 1) if r % c == 0)
        inputs += [residual_keys, residual_values]
        in_specs += [whole((r, d)), whole((r, d))]
    grid_splits = splits + int(has_res)
    kernel = functools.partial(
        _kernel, bits=bits, group=g, vgroup=vg, blocks_per_split=bps, num_splits=splits,
        sm_scale=scale, chunk=chunk, res_chunk=res_chunk, has_residual=has_res, unroll=unroll,
    )
    params = {}
    if not interpret:
        from jax.experimental.pallas import triton as pltriton

        cls = getattr(pltriton, "CompilerParams", None) or pltriton.TritonCompilerParams
        params["compiler_params"] = cls(num_warps=num_warps, num_stages=num_stages)
    o, m, den = pl.pallas_call(
        kernel,
        grid=(b, h, grid_splits),
        in_specs=in_specs,
        out_specs=[
            pl.BlockSpec((None, None, None, gp, d), lambda i, j, s: (i, j, s, 0, 0)),
            pl.BlockSpec((None, None, None, gp), lambda i, j, s: (i, j, s, 0)),
            pl.BlockSpec((None, None, None, gp), lambda i, j, s: (i, j, s, 0)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((b, h, grid_splits, gp, d), jnp.float32),
            jax.ShapeDtypeStruct((b, h, grid_splits, gp), jnp.float32),
            jax.ShapeDtypeStruct((b, h, grid_splits, gp), jnp.float32),
        ],
        interpret=interpret,
        name=f"quantized_decode_attention_int{bits}",
        **params,
    )(*inputs)
    return o[:, :, :, :gq], m[..., :gq], den[..., :gq]


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
    num_splits: int | None = None,
    num_warps: int = 4,
    num_stages: int = 2,
    softmax_chunk: int | None = None,
    unroll: bool | None = None,
    interpret: bool | None = None,
) -> tuple[Array, Array, Array]:
    """Split-K partials: (o float32[B, Hkv, S, Gq, D], m, l float32[B, Hkv, S, Gq]).

    o is the unnormalised output, m the running max and l the softmax denominator of each
    split; the residual window (when given) is the last split. Merge with `combine`.
    interpret: None runs interpreted on CPU and compiled (Triton) elsewhere.
    unroll: unroll the groups of a block in Python (static shifts; default when compiled) or loop
      over them with `lax.fori_loop` (default in interpret mode: small programs, fast compiles).
    softmax_chunk: groups per online-softmax update (default 8 unrolled, 1 looped).
    num_warps, num_stages: Triton launch parameters (compiled only).
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
    if num_splits is not None and (not isinstance(num_splits, int) or num_splits < 1):
        raise ValueError(f"num_splits must be a positive int, got {num_splits!r}")
    if interpret is None:
        interpret = jax.default_backend() == "cpu"
    unroll = (not interpret) if unroll is None else bool(unroll)
    softmax_chunk = (8 if unroll else 1) if softmax_chunk is None else softmax_chunk
    if softmax_chunk not in (1, 2, 4, 8, 16):
        raise ValueError(f"softmax_chunk must be one of 1, 2, 4, 8, 16, got {softmax_chunk!r}")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return _partials(
        q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, num_quantized,
        residual_keys, residual_values, num_residual, scale=scale, num_splits=num_splits,
        num_warps=num_warps, num_stages=num_stages, softmax_chunk=softmax_chunk, unroll=unroll,
        interpret=bool(interpret),
    )


def combine(partials: Sequence[tuple[Array, Array, Array]], dtype=jnp.float32) -> Array:
    """Merges split partials (of one or several caches) into the output [B, Hq, D].

    Rows that saw no valid key anywhere return zeros.
    """
    o = jnp.concatenate([p[0] for p in partials], axis=2)
    m = jnp.concatenate([p[1] for p in partials], axis=2)
    den = jnp.concatenate([p[2] for p in partials], axis=2)
    peak = jnp.max(m, axis=2, keepdims=True)
    w = jnp.exp(m - peak)
    num = jnp.sum(w[..., None] * o, axis=2)
    den = jnp.sum(w * den, axis=2)
    out = num / jnp.where(den == 0, 1.0, den)[..., None]
    b, h, gq, d = out.shape
    return out.reshape(b, h * gq, d).astype(dtype)


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
