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
results: out = sum_s e^{m_s - m} o_s / sum_s e^{m_s - m} l_s. With one split the kernel
normalises and writes the output itself (no partials, no second pass). Launch parameters
default per shape (`decode_config`, from the `TUNED_DECODE` table that
`experiments/bench_kernels.py --tune` prints).

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
tested there against `reference` (jax 0.10.2). TPU: the masked pointer loads are Triton-only;
`decode_attention_tpu` is the Mosaic TPU variant for the plain layout (BlockSpec pipeline,
scalar-prefetched lengths; compiled for TPU v4 / v5e / v6e by libtpu on a CPU host, checked in
the TPU interpreter, not yet run on a TPU; `kvjax.attention.TPU_DECODE_KERNEL` switches its
dispatch on).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
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


# --- split-K launch plumbing shared by the decode kernels (this module, block-sparse, -------
# --- quantized and Mustafar sparse decode) --------------------------------------------------


def launch_config(defaults: Mapping[str, Any], **overrides: Any) -> dict[str, Any]:
    """A copy of `defaults` with every override that is not None applied."""
    cfg = dict(defaults)
    cfg.update({k: v for k, v in overrides.items() if v is not None})
    return cfg


# Shared memory a launch may plan for its pipelined K/V tiles (H100: 227 KB per block; the
# rest is left for the query tile, accumulators and Triton's own buffers).
SMEM_BUDGET = 200 * 1024


def fit_block_k(block_k: int, num_stages: int, row_bytes: int) -> int:
    """`block_k`, halved (down to 16) until (num_stages - 1) K/V tiles of `row_bytes` per key
    fit `SMEM_BUDGET`: the tuned defaults are sized for bf16; float32 caches need half the
    tile (a float32 256-key tile at 2 stages asks for 281 KB and does not launch on an H100)."""
    while block_k > 16 and max(num_stages - 1, 1) * block_k * row_bytes > SMEM_BUDGET:
        block_k //= 2
    return block_k


def check_choice(name: str, value: Any, choices: Sequence[Any]) -> None:
    """ValueError naming `name` unless `value` is one of `choices`."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def check_num_splits(num_splits: int | None) -> None:
    """None (automatic) or a positive int, else ValueError."""
    if num_splits is not None and (not isinstance(num_splits, (int, np.integer))
                                   or num_splits < 1):
        raise ValueError(f"num_splits must be a positive int, got {num_splits!r}")


def check_warps_stages(num_warps: Any, num_stages: Any) -> None:
    """Triton launch parameters: num_warps in {1, 2, 4, 8, 16}, num_stages an int in [1, 8]."""
    if num_warps not in (1, 2, 4, 8, 16):
        raise ValueError(f"num_warps must be one of 1, 2, 4, 8, 16, got {num_warps!r}")
    if not isinstance(num_stages, (int, np.integer)) or not 1 <= num_stages <= 8:
        raise ValueError(f"num_stages must be an int in [1, 8], got {num_stages!r}")


def launch_params(num_warps: int, num_stages: int, interpret: bool) -> dict[str, Any]:
    """`pallas_call` keyword arguments: Triton compiler params when compiled, none interpreted."""
    if interpret:
        return {}
    return {"compiler_params": compiler_params(num_warps, num_stages)}


def pad_query_groups(q: Array, kv_heads: int, min_rows: int = 16) -> tuple[Array, int, int]:
    """q [B, Hq, D] -> (qg [B, Hkv, GP, D], G, GP): the G = Hq / Hkv query heads of each KV
    head padded with zero rows to GP = max(min_rows, next power of two >= G) (tensor-core dots
    need >= 16 rows); bf16/fp16 queries keep their dtype, others become float32."""
    b, hq, d = q.shape
    g = hq // kv_heads
    gp = max(min_rows, 1 << (g - 1).bit_length())
    qg = jnp.pad(q.reshape(b, kv_heads, g, d), ((0, 0), (0, 0), (0, gp - g), (0, 0)))
    if qg.dtype not in (jnp.bfloat16, jnp.float16):
        qg = qg.astype(jnp.float32)
    return qg, g, gp


def whole_head(shape: Sequence[int]) -> Any:
    """BlockSpec handing program (b, h, s) the whole [*shape] slice [b, h] of an input."""
    return pl.BlockSpec((None, None) + tuple(shape), lambda i, j, s: (i, j) + (0,) * len(shape))


def partial_shapes(b: int, h: int, splits: int, rows: int, dv: int) -> list[Any]:
    """Output shapes of a split-K launch: o float32[B, H, S, rows, Dv], m and l float32[B, H,
    S, rows] (running max and softmax denominator of each split)."""
    return [
        jax.ShapeDtypeStruct((b, h, splits, rows, dv), jnp.float32),
        jax.ShapeDtypeStruct((b, h, splits, rows), jnp.float32),
        jax.ShapeDtypeStruct((b, h, splits, rows), jnp.float32),
    ]


def partial_specs(rows: int, dv: int) -> list[Any]:
    """Out BlockSpecs matching `partial_shapes` for a (B, H, S) grid: program (b, h, s) writes
    its split's [rows, Dv] and [rows] slices."""
    return [
        pl.BlockSpec((None, None, None, rows, dv), lambda i, j, s: (i, j, s, 0, 0)),
        pl.BlockSpec((None, None, None, rows), lambda i, j, s: (i, j, s, 0)),
        pl.BlockSpec((None, None, None, rows), lambda i, j, s: (i, j, s, 0)),
    ]


def combine_splits(o: Array, m: Array, den: Array, dtype: Any = jnp.float32) -> Array:
    """Merges split partials (o [B, H, S, G, Dv], m, den [B, H, S, G]) into [B, H * G, Dv]
    of `dtype`; rows that saw no valid key return zeros (the quantized and sparse kernels)."""
    peak = jnp.max(m, axis=2, keepdims=True)
    w = jnp.exp(m - peak)
    num = jnp.sum(w[..., None] * o, axis=2)
    tot = jnp.sum(w * den, axis=2)
    out = num / jnp.where(tot == 0, 1.0, tot)[..., None]
    b, h, g, dv = out.shape
    return out.reshape(b, h * g, dv).astype(dtype)


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
    check_inputs(q, keys, values, lengths, offsets, kv_positions, q_positions, sliding_window,
                 kv_bias)
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


def check_inputs(q, keys, values, lengths, offsets, kv_positions, q_positions, sliding_window,
                 kv_bias=None):
    """ValueError/TypeError naming the argument for inputs no decode kernel here accepts."""
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
    check_num_splits(num_splits)
    check_warps_stages(num_warps, num_stages)


def default_splits(batch: int, kv_heads: int, capacity: int, block_k: int,
                   programs_per_sm: float = 1.0) -> int:
    """Split count giving ~`programs_per_sm` programs per SM (B * Hkv * S), >= 1 block per split.

    From the H100 sweep in docs/benchmarks.md (Hkv 8, block_k 64): the best split counts were
    16 / 2 / 1 at batch 1 / 8 / 32 for 32k and 128k contexts (long programs amortise the
    pipeline fill; 512 programs were consistently slow); "~4 programs per SM", the first rule,
    was 4-44% slower.
    """
    if not programs_per_sm > 0:
        raise ValueError(f"programs_per_sm must be > 0, got {programs_per_sm!r}")
    target = round(programs_per_sm * num_cores() / max(1, batch * kv_heads))
    return int(max(1, min(target, capacity // block_k)))


# Launch configs per regime, from `experiments/bench_kernels.py --tune` on an H100 (paste the
# "TUNED_DECODE" line it prints), per `regime`: "few" (B * Hkv <= #SMs / 4, batch-1-like:
# split-K fills the GPU; tuned at batch 1) and "many" (the rest; tuned at batch 8).
# programs_per_sm sets the split count (`default_splits`); merge is how split partials are
# combined: "xla" (`merge_partials`) or "pallas" (one merge kernel); split_tail runs the full
# blocks of a piece without load masks and its partial last block separately.
# Re-tuned on an H100, 2026-11-23 (third session, device-time harness; docs/benchmarks.md).
TUNED_DECODE: dict[str, dict[str, Any]] = {
    "few": {"block_k": 128, "num_warps": 4, "num_stages": 3, "programs_per_sm": 1.0,
            "merge": "xla", "split_tail": False},
    "many": {"block_k": 256, "num_warps": 8, "num_stages": 2, "programs_per_sm": 1.0,
             "merge": "xla", "split_tail": False},
}
MERGES = ("xla", "pallas")


def regime(batch: int, kv_heads: int) -> str:
    """Tuning regime: 'few' when B * Hkv <= #SMs / 4 (split-K must fill the GPU), else 'many'."""
    return "few" if batch * kv_heads <= num_cores() // 4 else "many"


def _regime(batch: int, kv_heads: int) -> dict[str, Any]:
    return TUNED_DECODE[regime(batch, kv_heads)]


def decode_config(batch: int, kv_heads: int, capacity: int, row_bytes: int = 0
                  ) -> dict[str, Any]:
    """Launch config {block_k, num_warps, num_stages, num_splits, merge, split_tail} for a shape.

    capacity: the longest a head can be (C, or the pool size). Picks the `TUNED_DECODE` regime
    from the number of (row, KV head) pairs against the SM count. row_bytes: K + V bytes per key
    (0: unknown); the tuned tile is halved to fit shared memory (`fit_block_k`) and, above 16
    keys, to the capacity (the tuned 256-key tile is for long caches).
    """
    t = _regime(batch, kv_heads)
    bk = fit_block_k(int(t["block_k"]), int(t["num_stages"]), row_bytes)
    while bk > 16 and bk > capacity:
        bk //= 2
    return {"block_k": bk, "num_warps": int(t["num_warps"]), "num_stages": int(t["num_stages"]),
            "num_splits": default_splits(batch, kv_heads, max(capacity, 1), bk,
                                         float(t["programs_per_sm"])),
            "merge": str(t["merge"]), "split_tail": bool(t.get("split_tail", False))}


# --- kernel ------------------------------------------------------------------------------


def _decode_kernel(*refs, pool, has_pos, has_bias, group, rows, block_k, cap, scale, window,
                   splits, dot_precision, direct, split_tail):
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
    if direct:
        (o_ref,) = refs[i:]
    else:
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

    # No branch around the loop: a piece past the head's length runs zero steps (no K/V
    # loads) and writes the neutral partial (o 0, m -1e30, l 0).
    q = masked_load(q_ref.at[b, h, pl.ds(0, rows), :], row_ok[:, None], 0)
    qpos = qpos_ref[b] if has_pos else None

    def body(j, carry, full=False):
        """One step; full=True: all block_k slots are inside the piece, so no load masks."""
        o, m, den = carry
        start = lo + j * block_k
        valid = start + jnp.arange(block_k) < hi

        def load(ref, rows_mask, other):
            if full:
                return ref[...]
            return masked_load(ref, rows_mask, other)

        rows_k = pl.ds(base + start, block_k)
        # Every load of the step is issued before any math uses one (more bytes in flight).
        k = load(k_ref.at[b, rows_k, :], valid[:, None], 0)
        v = load(v_ref.at[b, rows_k, :], valid[:, None], 0)
        ok = jnp.ones((block_k,), jnp.bool_) if full else valid
        if has_pos:
            kp = load(kpos_ref.at[b, rows_k], valid, -1)
            ok = ok & (kp >= 0) & (kp <= qpos)
            if window is not None:
                ok = ok & (qpos - kp < window)
        sc = dot(q, k, trans_b=True, precision=dot_precision) * scale  # [rows, block_k]
        if has_bias:
            sc = sc + load(bias_ref.at[b, rows_k], valid, 0.0)[None, :]
        sc = jnp.where(ok[None, :], sc, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(sc, axis=1))
        corr = jnp.exp(m - m_new)
        p = jnp.exp(sc - m_new[:, None])
        den = den * corr + jnp.sum(p, axis=1)
        pv = dot(p.astype(v.dtype), v, precision=dot_precision)
        return o * corr[:, None] + pv, m_new, den

    init = (
        jnp.zeros((rows, dv), jnp.float32),
        jnp.full((rows,), _NEG, jnp.float32),
        jnp.zeros((rows,), jnp.float32),
    )
    if split_tail:  # unmasked loop over the full blocks, then the partial one (if any)
        nfull = (hi - lo) // block_k
        carry = jax.lax.fori_loop(0, nfull, functools.partial(body, full=True), init)
        o, m, den = jax.lax.fori_loop(nfull, nblocks, body, carry)
    else:
        o, m, den = jax.lax.fori_loop(0, nblocks, body, init)
    if direct:  # one piece per head: normalise here, no second pass
        out = jnp.where(den[:, None] > 0, o / jnp.where(den > 0, den, 1.0)[:, None], 0.0)
        masked_store(o_ref.at[b, h, pl.ds(0, rows), :], out.astype(o_ref.dtype),
                     row_ok[:, None])
        return
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


_MERGE_CHUNK = 16  # splits merged per loop step of the Pallas merge


def _merge_kernel(o_ref, m_ref, l_ref, out_ref, *, splits, group, gp):
    b, h = pl.program_id(0), pl.program_id(1)
    g_ok = jnp.arange(gp) < group
    sc = min(_MERGE_CHUNK, _pow2(splits))

    def body(c, carry):
        mx, den, num = carry
        s_ok = c * sc + jnp.arange(sc) < splits
        mk = s_ok[:, None] & g_ok[None, :]
        m = masked_load(m_ref.at[b, h, pl.ds(c * sc, sc), pl.ds(0, gp)], mk, _NEG)
        ls = masked_load(l_ref.at[b, h, pl.ds(c * sc, sc), pl.ds(0, gp)], mk, 0.0)
        o = masked_load(o_ref.at[b, h, pl.ds(c * sc, sc), pl.ds(0, gp), :], mk[:, :, None],
                        0.0)
        mx_new = jnp.maximum(mx, jnp.max(m, axis=0))
        corr = jnp.exp(mx - mx_new)
        w = jnp.exp(m - mx_new[None, :])  # [sc, gp]
        den = den * corr + jnp.sum(w * ls, axis=0)
        num = num * corr[:, None] + jnp.sum(w[:, :, None] * o, axis=0)
        return mx_new, den, num

    dv = o_ref.shape[-1]
    init = (jnp.full((gp,), _NEG, jnp.float32), jnp.zeros((gp,), jnp.float32),
            jnp.zeros((gp, dv), jnp.float32))
    _, den, num = jax.lax.fori_loop(0, -(-splits // sc), body, init)
    out = jnp.where(den[:, None] > 0, num / jnp.where(den > 0, den, 1.0)[:, None], 0.0)
    masked_store(out_ref.at[b, h, pl.ds(0, gp), :], out.astype(out_ref.dtype), g_ok[:, None])


def merge_partials_pallas(o: Array, m: Array, den: Array, out_dtype: Any, *,
                          interpret: bool) -> Array:
    """`merge_partials` as one Pallas kernel: [B, H, S, G, Dv], [B, H, S, G] x2 -> [B, H, G, Dv].

    One program per (B, H) merges the S partials online, 16 at a time, and writes out_dtype
    (one launch instead of XLA's reduction fusions).
    """
    b, h, splits, g, dv = o.shape
    kernel = functools.partial(_merge_kernel, splits=splits, group=g, gp=_pow2(g))
    return pl.pallas_call(
        kernel,
        grid=(b, h),
        out_shape=jax.ShapeDtypeStruct((b, h, g, dv), out_dtype),
        compiler_params=compiler_params(4, 1),
        interpret=interpret,
        name="decode_merge_partials",
    )(o, m, den)


def merge_splits(o: Array, m: Array, den: Array, merge: str, out_dtype: Any, *,
                 interpret: bool) -> Array:
    """[B, H, S, G, Dv], [B, H, S, G] x2 -> [B, H, G, Dv] of out_dtype, merged by `merge`:
    "xla" (`merge_partials`) or "pallas" (`merge_partials_pallas`)."""
    if merge == "pallas":
        return merge_partials_pallas(o, m, den, out_dtype, interpret=interpret)
    return merge_partials(o, m, den).astype(out_dtype)


@functools.partial(
    jax.jit,
    static_argnames=("scale", "sliding_window", "block_k", "num_splits", "num_warps",
                     "num_stages", "merge", "split_tail", "interpret"),
)
def _decode(q, keys, values, lengths, offsets, kv_positions, q_positions, kv_bias, *, scale,
            sliding_window, block_k, num_splits, num_warps, num_stages, merge, split_tail,
            interpret):
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
        direct=num_splits == 1, split_tail=split_tail,
    )
    if num_splits == 1:
        out_shape = [jax.ShapeDtypeStruct((b, hkv, g, dv), q.dtype)]
    else:
        out_shape = partial_shapes(b, hkv, num_splits, g, dv)
    res = pl.pallas_call(
        kernel,
        grid=(b, hkv, num_splits),
        out_shape=out_shape,
        compiler_params=compiler_params(num_warps, num_stages),
        interpret=interpret,
        name="ragged_decode_attention",
    )(*inputs)
    if num_splits == 1:
        return res[0].reshape(b, hq, dv)
    return merge_splits(*res, merge, q.dtype, interpret=interpret).reshape(b, hq, dv)


# First H100 sweep (docs/benchmarks.md); per-shape defaults come from `decode_config`.
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
    merge: str | None = None,
    split_tail: bool | None = None,
    interpret: bool | None = None,
) -> Array:
    """[B, Hq, Dv] decode attention over per-head ragged caches (layouts in the module doc).

    Args:
      q, keys, values, lengths, offsets, kv_positions, q_positions, kv_bias: see the module
        docstring.
      scale: softmax scale (default D ** -0.5).
      sliding_window: keys with q_pos - pos >= window are masked (needs positions).
      block_k: keys per loop step (power of two >= 16).
      num_splits: split-K pieces per head; 1 normalises in the kernel (no second pass).
      num_warps, num_stages: Triton launch parameters.
      merge: "xla" or "pallas", how several splits' partials are combined.
      split_tail: loop over a piece's full blocks without load masks, then its last block.
        Each launch parameter left None comes from `decode_config` (per shape, H100-tuned).
      interpret: run the Pallas interpreter (default: exactly on CPU).

    Raises ValueError/TypeError on mismatched shapes/dtypes before anything is launched.
    """
    check_inputs(q, keys, values, lengths, offsets, kv_positions, q_positions, sliding_window,
                 kv_bias)
    b, hkv = lengths.shape
    span = keys.shape[1] if offsets is not None else keys.shape[2]  # longest possible head
    d, dv = q.shape[-1], values.shape[-1]
    row_bytes = (d + dv) * keys.dtype.itemsize
    cfg = launch_config(decode_config(b, hkv, span, row_bytes), block_k=block_k,
                        num_warps=num_warps,
                        num_stages=num_stages, merge=merge, split_tail=split_tail)
    check_choice("merge", cfg["merge"], MERGES)
    if cfg["block_k"] > span:  # no full block anywhere: the masked loop covers everything
        cfg["split_tail"] = False
    _check_tiling(d, dv, cfg["block_k"], num_splits, cfg["num_warps"], cfg["num_stages"])
    if num_splits is None:
        num_splits = cfg["num_splits"] if block_k is None else default_splits(
            b, hkv, max(span, 1), cfg["block_k"], _regime(b, hkv)["programs_per_sm"])
    scale = d**-0.5 if scale is None else float(scale)
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")
    return _decode(
        q, keys, values, lengths, offsets, kv_positions, q_positions, kv_bias,
        scale=scale, sliding_window=None if sliding_window is None else int(sliding_window),
        block_k=int(cfg["block_k"]), num_splits=int(num_splits), num_warps=int(cfg["num_warps"]),
        num_stages=int(cfg["num_stages"]), merge=cfg["merge"],
        split_tail=bool(cfg["split_tail"]),
        interpret=resolve_interpret(interpret),
    )
