"""Ragged decode attention (flash-decoding) as a Pallas kernel, beside its jnp reference.

One query token per sequence attends over a KV cache whose heads hold different numbers of
valid tokens (per-head `lengths`: the layout eviction produces). GQA is native: the program of
a KV head loads that head's keys once and scores all G = Hq / Hkv query heads against them
(the G query rows are one tile, padded to a power of two >= 16 for the tensor-core dot).

Split-K (flash-decoding, Dao et al. 2023): every (row, KV head) is cut into `num_splits`
pieces of equal length *measured on that head's own length*, so short and long heads get
balanced programs; a program whose piece is empty (past the head's length) skips all loads and
writes a neutral partial result. Each program keeps a float32 online softmax (running max m,
sum l, unnormalised output o); a second pass (plain jnp, fused by XLA) merges the S partial
results: out = sum_s e^{m_s - m} o_s / sum_s e^{m_s - m} l_s.

Layouts (B rows, Hq query heads, Hkv KV heads, C capacity, P pool size, D/Dv head dims):
  q          [B, Hq, D]
  keys       [B, Hkv, C, D]  dense `LayerCache` (head h's slots are [h*C, h*C + lengths))
             [B, P, D]       head-wise pool (`kvjax.headwise.HeadwiseLayerCache`): head h owns
                             [offsets[b, h], offsets[b, h] + lengths[b, h]) of the pool
  values     same layout as keys, last dim Dv
  lengths    int32[B, Hkv]
  offsets    int32[B, Hkv]   pool layout only
  kv_positions (optional) int32, keys' layout without D: original token position per slot;
             with q_positions int32[B] slot s is seen iff 0 <= pos <= q_pos (and
             q_pos - pos < sliding_window): the exact mask of `kvjax.attention`, so holes
             (-1) inside [0, lengths) are skipped. Costs 4 bytes per slot (D=128 bf16 K+V: +0.8%).
  kv_bias    (optional) float, keys' layout without D: added to the scaled score of each slot
             (merged slots carry log N, `LayerCache.slot_data["log_count"]`, see
             docs/design_merging.md).

Dtypes: bf16, fp16 or fp32 inputs (q, keys and values alike); scores, softmax and accumulation
are float32; the PV product takes p in the value dtype (as flash attention does); the output
has q's dtype. fp32 dots run at full precision (no TF32).

Backends: the kernel is written for the Pallas Triton backend (`pl.pallas_call` with
`jax.experimental.pallas.triton.CompilerParams`), checked and timed on an H100 with jax 0.11.2
(see docs/benchmarks.md). On CPU it runs with `interpret=True`, chosen automatically, and is
tested there against `reference` (jax 0.10.2). TPU: not implemented (the masked pointer loads
are Triton-only); `kvjax.attention` uses the reference there. Block shapes (block_k a multiple
of 8/128 rows, D = 128) are TPU-tileable if a Mosaic variant is added.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

Array = jax.Array

DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32)
_NEG = -1e30  # finite "minus infinity" for running maxima: keeps exp(m_old - m_new) NaN-free


# --- Pallas/Triton compatibility (jax 0.10.2 here, 0.11.2 on the GPU machine) -------------


def _triton():
    from jax.experimental.pallas import triton as pltriton

    return pltriton


def compiler_params(num_warps: int, num_stages: int) -> Any:
    """Triton compiler params; the class was `TritonCompilerParams` before jax 0.7."""
    pltriton = _triton()
    cls = getattr(pltriton, "CompilerParams", None) or pltriton.TritonCompilerParams
    return cls(num_warps=num_warps, num_stages=num_stages)


def masked_load(ref: Any, mask: Array, other: Any) -> Array:
    """`plgpu.load(ref, mask=, other=)` (a masked Triton load; interpretable on CPU)."""
    return _triton().load(ref, mask=mask, other=other)


def masked_store(ref: Any, value: Array, mask: Array) -> None:
    _triton().store(ref, value, mask=mask)


def dot(a: Array, b: Array, trans_b: bool = False, precision: Any = None) -> Array:
    """[M, K] x [K, N] (or [N, K] with trans_b) -> float32 [M, N] tensor-core dot.

    Written as `lax.dot_general` (what `pl.dot` wraps) so it does not depend on where a jax
    version exports `dot` (`pl.dot` moved to `pallas.triton` in 0.10).
    """
    dims = (((1,), (1 if trans_b else 0,)), ((), ()))
    return jax.lax.dot_general(a, b, dims, precision=precision,
                               preferred_element_type=jnp.float32)


def resolve_interpret(interpret: bool | None) -> bool:
    """None -> interpret exactly when the default backend is the CPU."""
    if interpret is None:
        return jax.default_backend() == "cpu"
    return bool(interpret)


def num_cores() -> int:
    """Streaming multiprocessors of the default device (132 on an H100 SXM when unknown)."""
    try:
        return int(getattr(jax.devices()[0], "core_count", 132) or 132)
    except Exception:  # noqa: BLE001 - a missing attribute must not break a launch
        return 132


def _pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def is_pow2(n: int) -> bool:
    return n >= 1 and (n & (n - 1)) == 0


# --- jnp reference -------------------------------------------------------------------------


def _dense_view(keys, values, lengths, offsets, kv_positions, kv_bias=None):
    """Pool layout -> dense [B, Hkv, Lmax, D] gather (reference only; Lmax = pool size)."""
    if offsets is None:
        return keys, values, kv_positions, kv_bias
    b, p, _ = keys.shape
    j = jnp.arange(p, dtype=jnp.int32)[None, None, :]
    src = jnp.clip(offsets[:, :, None] + j, 0, p - 1)  # [B, H, P]
    h = lengths.shape[1]
    take = lambda a: jnp.take_along_axis(a, src.reshape(b, h * p)[..., None], axis=1).reshape(
        b, h, p, a.shape[-1]
    )
    side = lambda a: None if a is None else jnp.take_along_axis(
        a, src.reshape(b, h * p), axis=1).reshape(b, h, p)
    return take(keys), take(values), side(kv_positions), side(kv_bias)


def reference(
    q: Array,
    keys: Array,
    values: Array,
    lengths: Array,
    *,
    offsets: Array | None = None,
    kv_positions: Array | None = None,
    q_positions: Array | None = None,
    kv_bias: Array | None = None,
    scale: float | None = None,
    sliding_window: int | None = None,
) -> Array:
    """[B, Hq, Dv] plain-jnp decode attention with the kernel's semantics (float32 softmax).

    Heads that see no key return zeros.
    """
    _check(q, keys, values, lengths, offsets, kv_positions, q_positions, sliding_window, kv_bias)
    keys, values, pos, bias = _dense_view(keys, values, lengths, offsets, kv_positions, kv_bias)
    b, hq, d = q.shape
    hkv, cap = keys.shape[1], keys.shape[2]
    scale = d**-0.5 if scale is None else scale
    qg = q.reshape(b, hkv, hq // hkv, d)
    s = jnp.einsum("bhgd,bhsd->bhgs", qg, keys, preferred_element_type=jnp.float32,
                   precision=jax.lax.Precision.HIGHEST) * scale
    if bias is not None:
        s = s + bias[:, :, None, :].astype(jnp.float32)
    ok = jnp.arange(cap)[None, None, :] < lengths[:, :, None]
    if pos is not None:
        qp = q_positions[:, None, None]
        ok = ok & (pos >= 0) & (pos <= qp)
        if sliding_window is not None:
            ok = ok & (qp - pos < sliding_window)
    s = jnp.where(ok[:, :, None, :], s, -jnp.inf)
    m = jnp.max(s, axis=-1, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.exp(s - m)
    den = jnp.sum(p, axis=-1, keepdims=True)
    p = p / jnp.where(den == 0, 1.0, den)
    out = jnp.einsum("bhgs,bhsd->bhgd", p, values.astype(jnp.float32),
                     precision=jax.lax.Precision.HIGHEST)
    return out.reshape(b, hq, -1).astype(q.dtype)


# --- input checks ------------------------------------------------------------------------


def _check(q, keys, values, lengths, offsets, kv_positions, q_positions, sliding_window,
           kv_bias=None):
    if q.ndim != 3:
        raise ValueError(f"q must be [B, Hq, D], got shape {q.shape}")
    pool = offsets is not None
    want = 3 if pool else 4
    if keys.ndim != want or values.ndim != want:
        layout = "[B, P, D] (with offsets)" if pool else "[B, Hkv, C, D]"
        raise ValueError(
            f"keys/values must be {layout}, got shapes {keys.shape} and {values.shape}"
        )
    if keys.shape[:-1] != values.shape[:-1]:
        raise ValueError(f"keys {keys.shape} and values {values.shape} differ before the last dim")
    b, hq, d = q.shape
    if keys.shape[0] != b or keys.shape[-1] != d:
        raise ValueError(f"keys {keys.shape} do not match q {q.shape} (batch, head dim)")
    if lengths.ndim != 2 or lengths.shape[0] != b:
        raise ValueError(f"lengths must be int32[B={b}, Hkv], got shape {lengths.shape}")
    hkv = lengths.shape[1]
    if not pool and keys.shape[1] != hkv:
        raise ValueError(f"lengths has {hkv} heads, keys have {keys.shape[1]}")
    if hkv < 1 or hq % hkv:
        raise ValueError(f"query heads ({hq}) must be a multiple of KV heads ({hkv})")
    if pool and offsets.shape != lengths.shape:
        raise ValueError(f"offsets must have shape {lengths.shape}, got {offsets.shape}")
    for name, arr in (("lengths", lengths), ("offsets", offsets)):
        if arr is not None and not jnp.issubdtype(arr.dtype, jnp.integer):
            raise TypeError(f"{name} must be an integer array, got {arr.dtype}")
    if q.dtype != keys.dtype or q.dtype != values.dtype:
        raise TypeError(
            f"q, keys and values must share one dtype, got {q.dtype}, {keys.dtype}, {values.dtype}"
        )
    if q.dtype not in DTYPES:
        raise TypeError(f"dtype must be one of bfloat16, float16, float32, got {q.dtype}")
    if (kv_positions is None) != (q_positions is None):
        raise ValueError("kv_positions and q_positions must be given together")
    if kv_positions is not None:
        if kv_positions.shape != keys.shape[:-1]:
            raise ValueError(
                f"kv_positions must have shape {keys.shape[:-1]}, got {kv_positions.shape}"
            )
        if q_positions.shape != (b,):
            raise ValueError(f"q_positions must have shape ({b},), got {q_positions.shape}")
    if kv_bias is not None:
        if kv_bias.shape != keys.shape[:-1]:
            raise ValueError(f"kv_bias must have shape {keys.shape[:-1]}, got {kv_bias.shape}")
        if not jnp.issubdtype(kv_bias.dtype, jnp.floating):
            raise TypeError(f"kv_bias must be a float array, got {kv_bias.dtype}")
    if sliding_window is not None:
        if kv_positions is None:
            raise ValueError("sliding_window needs kv_positions and q_positions")
        if not isinstance(sliding_window, (int, np.integer)) or sliding_window < 1:
            raise ValueError(f"sliding_window must be a positive int, got {sliding_window!r}")


def _check_tiling(d: int, dv: int, block_k: int, num_splits: int | None, num_warps: int,
                  num_stages: int) -> None:
    for name, v in (("head dim", d), ("value dim", dv)):
        if not (is_pow2(v) and 16 <= v <= 512):
            raise ValueError(f"{name} must be a power of two in [16, 512] for the kernel, got {v}")
    if not (is_pow2(block_k) and 16 <= block_k <= 1024):
        raise ValueError(f"block_k must be a power of two in [16, 1024], got {block_k}")
    if num_splits is not None and (not isinstance(num_splits, (int, np.integer)) or num_splits < 1):
        raise ValueError(f"num_splits must be a positive int, got {num_splits!r}")
    if num_warps not in (1, 2, 4, 8, 16):
        raise ValueError(f"num_warps must be one of 1, 2, 4, 8, 16, got {num_warps}")
    if not 1 <= num_stages <= 8:
        raise ValueError(f"num_stages must be in [1, 8], got {num_stages}")


def default_splits(batch: int, kv_heads: int, capacity: int, block_k: int) -> int:
    """Split count giving about one program per SM (B * Hkv * S ~ #SMs), >= 1 block per split.

    From the H100 sweep in docs/benchmarks.md (Hkv 8, block_k 64): the best split counts were
    16 / 2 / 1 at batch 1 / 8 / 32 for 32k and 128k contexts (long programs amortise the
    pipeline fill; 512 programs were consistently slow); "~4 programs per SM", the first rule,
    was 4-44% slower.
    """
    target = round(num_cores() / max(1, batch * kv_heads))
    return int(max(1, min(target, capacity // block_k)))


# --- kernel ------------------------------------------------------------------------------


def _decode_kernel(*refs, pool, has_pos, has_bias, group, rows, block_k, cap, scale, window,
                   splits, dot_precision):
    q_ref, k_ref, v_ref, len_ref = refs[:4]
    i = 4
    off_ref = None
    if pool:
        off_ref = refs[i]
        i += 1
    kpos_ref = qpos_ref = bias_ref = None
    if has_pos:
        kpos_ref, qpos_ref = refs[i], refs[i + 1]
        i += 2
    if has_bias:
        bias_ref = refs[i]
        i += 1
    o_ref, m_ref, l_ref = refs[i:]

    b, h, s = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    length = len_ref[b, h]
    # Slot range of this head in the (pooled) key array.
    base = off_ref[b, h] if pool else h * cap
    per = ((length + splits - 1) // splits + block_k - 1) // block_k * block_k
    lo = jnp.minimum(s * per, length)
    hi = jnp.minimum(lo + per, length)
    nblocks = (hi - lo + block_k - 1) // block_k
    row_ok = jnp.arange(rows) < group
    dv = o_ref.shape[-1]

    def compute():
        q = masked_load(q_ref.at[b, h, pl.ds(0, rows), :], row_ok[:, None], 0)
        qpos = qpos_ref[b] if has_pos else None

        def body(j, carry):
            o, m, den = carry
            start = lo + j * block_k
            idx = start + jnp.arange(block_k)
            valid = idx < hi
            k = masked_load(k_ref.at[b, pl.ds(base + start, block_k), :], valid[:, None], 0)
            sc = dot(q, k, trans_b=True, precision=dot_precision) * scale  # [rows, block_k]
            ok = valid
            if has_bias:
                sc = sc + masked_load(bias_ref.at[b, pl.ds(base + start, block_k)], valid,
                                      0.0)[None, :]
            if has_pos:
                kp = masked_load(kpos_ref.at[b, pl.ds(base + start, block_k)], valid, -1)
                ok = ok & (kp >= 0) & (kp <= qpos)
                if window is not None:
                    ok = ok & (qpos - kp < window)
            sc = jnp.where(ok[None, :], sc, -jnp.inf)
            m_new = jnp.maximum(m, jnp.max(sc, axis=1))
            corr = jnp.exp(m - m_new)
            p = jnp.exp(sc - m_new[:, None])
            den = den * corr + jnp.sum(p, axis=1)
            v = masked_load(v_ref.at[b, pl.ds(base + start, block_k), :], valid[:, None], 0)
            pv = dot(p.astype(v.dtype), v, precision=dot_precision)
            return o * corr[:, None] + pv, m_new, den

        init = (
            jnp.zeros((rows, dv), jnp.float32),
            jnp.full((rows,), _NEG, jnp.float32),
            jnp.zeros((rows,), jnp.float32),
        )
        return jax.lax.fori_loop(0, nblocks, body, init)

    def empty():  # a piece past the head's length: no loads at all
        return (
            jnp.zeros((rows, dv), jnp.float32),
            jnp.full((rows,), _NEG, jnp.float32),
            jnp.zeros((rows,), jnp.float32),
        )

    o, m, den = jax.lax.cond(nblocks > 0, compute, empty)
    masked_store(o_ref.at[b, h, s, pl.ds(0, rows), :], o, row_ok[:, None])
    masked_store(m_ref.at[b, h, s, pl.ds(0, rows)], m, row_ok)
    masked_store(l_ref.at[b, h, s, pl.ds(0, rows)], den, row_ok)


def merge_partials(o: Array, m: Array, den: Array) -> Array:
    """Second pass: [..., S, G, Dv], [..., S, G] x2 (float32) -> [..., G, Dv] float32."""
    mx = jnp.max(m, axis=-2, keepdims=True)
    w = jnp.exp(m - mx)
    den = jnp.sum(w * den, axis=-2)
    num = jnp.sum(w[..., None] * o, axis=-3)
    return jnp.where(den[..., None] > 0, num / jnp.where(den > 0, den, 1.0)[..., None], 0.0)


@functools.partial(
    jax.jit,
    static_argnames=("scale", "sliding_window", "block_k", "num_splits", "num_warps",
                     "num_stages", "interpret"),
)
def _decode(q, keys, values, lengths, offsets, kv_positions, q_positions, kv_bias, *, scale,
            sliding_window, block_k, num_splits, num_warps, num_stages, interpret):
    pool = offsets is not None
    has_pos = kv_positions is not None
    has_bias = kv_bias is not None
    b, hq, d = q.shape
    hkv = lengths.shape[1]
    g = hq // hkv
    rows = max(16, _pow2(g))
    dv = values.shape[-1]
    if pool:
        cap = 0
        kf, vf = keys, values
        pos_f = kv_positions
    else:
        cap = keys.shape[2]
        kf = keys.reshape(b, hkv * cap, d)  # free: contiguous
        vf = values.reshape(b, hkv * cap, dv)
        pos_f = None if kv_positions is None else kv_positions.reshape(b, hkv * cap)
    inputs = [q.reshape(b, hkv, g, d), kf, vf, lengths.astype(jnp.int32)]
    if pool:
        inputs.append(offsets.astype(jnp.int32))
    if has_pos:
        inputs += [pos_f.astype(jnp.int32), q_positions.astype(jnp.int32)]
    if has_bias:
        inputs.append(kv_bias.reshape(b, -1).astype(jnp.float32))
    kernel = functools.partial(
        _decode_kernel, pool=pool, has_pos=has_pos, has_bias=has_bias, group=g, rows=rows,
        block_k=block_k, cap=cap, scale=float(scale), window=sliding_window, splits=num_splits,
        dot_precision=jax.lax.Precision.HIGHEST if q.dtype == jnp.float32 else None,
    )
    out_shape = [
        jax.ShapeDtypeStruct((b, hkv, num_splits, g, dv), jnp.float32),
        jax.ShapeDtypeStruct((b, hkv, num_splits, g), jnp.float32),
        jax.ShapeDtypeStruct((b, hkv, num_splits, g), jnp.float32),
    ]
    o, m, den = pl.pallas_call(
        kernel,
        grid=(b, hkv, num_splits),
        out_shape=out_shape,
        compiler_params=compiler_params(num_warps, num_stages),
        interpret=interpret,
        name="ragged_decode_attention",
    )(*inputs)
    out = merge_partials(o, m, den)  # [B, Hkv, G, Dv]
    return out.reshape(b, hq, dv).astype(q.dtype)


# Tuned on the H100 (docs/benchmarks.md): block_k, num_warps, num_stages.
DEFAULT_CONFIG = {"block_k": 64, "num_warps": 4, "num_stages": 3}


def ragged_decode_attention(
    q: Array,
    keys: Array,
    values: Array,
    lengths: Array,
    *,
    offsets: Array | None = None,
    kv_positions: Array | None = None,
    q_positions: Array | None = None,
    kv_bias: Array | None = None,
    scale: float | None = None,
    sliding_window: int | None = None,
    block_k: int | None = None,
    num_splits: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    interpret: bool | None = None,
) -> Array:
    """[B, Hq, Dv] decode attention over per-head ragged caches (layouts in the module doc).

    Args:
      q, keys, values, lengths, offsets, kv_positions, q_positions, kv_bias: see the module
        docstring.
      scale: softmax scale (default D ** -0.5).
      sliding_window: keys with q_pos - pos >= window are masked (needs positions).
      block_k: keys per loop step (power of two >= 16; default `DEFAULT_CONFIG`).
      num_splits: split-K pieces per head (default: ~1 program per SM, see `default_splits`).
      num_warps, num_stages: Triton launch parameters.
      interpret: run the Pallas interpreter (default: exactly on CPU).

    Raises ValueError/TypeError on mismatched shapes/dtypes before anything is launched.
    """
    _check(q, keys, values, lengths, offsets, kv_positions, q_positions, sliding_window, kv_bias)
    cfg = dict(DEFAULT_CONFIG)
    for k_, v_ in (("block_k", block_k), ("num_warps", num_warps), ("num_stages", num_stages)):
        if v_ is not None:
            cfg[k_] = v_
    d, dv = q.shape[-1], values.shape[-1]
    _check_tiling(d, dv, cfg["block_k"], num_splits, cfg["num_warps"], cfg["num_stages"])
    b, hkv = lengths.shape
    span = keys.shape[1] if offsets is not None else keys.shape[2]  # longest possible head
    if num_splits is None:
        num_splits = default_splits(b, hkv, max(span, 1), cfg["block_k"])
    scale = d**-0.5 if scale is None else float(scale)
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")
    return _decode(
        q, keys, values, lengths, offsets, kv_positions, q_positions, kv_bias,
        scale=scale, sliding_window=None if sliding_window is None else int(sliding_window),
        block_k=int(cfg["block_k"]), num_splits=int(num_splits), num_warps=int(cfg["num_warps"]),
        num_stages=int(cfg["num_stages"]), interpret=resolve_interpret(interpret),
    )
