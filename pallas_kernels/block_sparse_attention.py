"""Block-sparse attention (prefill and decode) as Pallas kernels, beside their jnp reference.

The KV cache is cut into blocks of `block_size` consecutive slots. Which blocks a query tile
reads is given as a list, not a mask: `block_indices` int32[..., N] holds the active KV block
ids (distinct, any order; ascending is best for locality) and `block_counts` int32[...] how many
leading entries are used. Each program loads its list entries in-kernel (on GPU the lists are
ordinary int32 inputs read by the program, the Triton counterpart of TPU scalar prefetch) and
loops only over those blocks, so time scales with the number of active blocks, not the
capacity. Inside an active block the usual mask still holds: slot < lengths[b, h] and, with
positions, 0 <= kv_pos <= q_pos (and q_pos - kv_pos < sliding_window).

  decode:  q [B, Hq, D]; lists per KV head: block_indices [B, Hkv, N], block_counts [B, Hkv].
           Grid (B, Hkv, S): the G = Hq / Hkv query heads of a KV head share one program (one
           load of each block); the head's list is split into S pieces (split-K, merged by
           `decode_attention.merge_partials`).
  prefill: q [B, Hq, Tq, D] in query blocks of `block_q`; lists per (batch, head, query block):
           block_indices [B, H, Tq / block_q, N], block_counts [B, H, Tq / block_q], where H is
           Hkv (one list per KV head) or Hq (one per query head). Grid (B, Hq, Tq / block_q).

The kernels gather rows: a loop step covers `block_k` consecutive entries of the concatenated
active-block list (block_k may be smaller or larger than block_size), so small pages (Quest's
16 tokens) still make wide tiles. In the decode kernel a step with block_k <= block_size lies
inside one block: it reads one scalar block id and loads a contiguous [block_k, D] tile, as the
dense kernel does. How a decode program reads its list is `list_mode`: "load" (the ids of each
step loaded in that step), "prefetch" (step c+1's ids loaded while step c computes, so the K/V
loads never wait on an id load) or "preload" (the program's <= MAX_PRELOAD ids loaded once
before the loop and picked out of registers). Launch parameters default per shape
(`decode_config`, from the `TUNED_BS` table that `experiments/bench_kernels.py --tune` prints).
Keys/values [B, Hkv, C, D/Dv] (a dense `LayerCache`); C % block_size == 0.

Patterns: `static_pattern` (attention sinks + local window + strided "vertical" blocks, causal)
and `decode_pattern` (the same per head at decode, from the dynamic lengths) build lists;
`mask_to_lists` turns any dynamic block mask (e.g. thresholded scores) into lists; Quest
(`kvjax.sparse.quest`) feeds its top-k pages to `block_sparse_decode`.

Backends: Pallas Triton on GPU (timed on an H100 with jax 0.11.2, docs/benchmarks.md);
`interpret=True` on CPU, chosen automatically (tested against `reference_*` with jax 0.10.2).
TPU: the gathered pointer loads are Triton-only; `block_sparse_attention_tpu` is the Mosaic TPU
variant of the decode kernel (the lists scalar-prefetched into BlockSpec index maps; compiled
for TPU v4 / v5e / v6e by libtpu on a CPU host, checked in the TPU interpreter, not yet run on a
TPU). Prefill has no TPU variant.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from pallas_kernels.decode_attention import (
    _NEG,
    DTYPES,
    MERGES,
    check_choice,
    check_num_splits,
    check_warps_stages,
    compiler_params,
    dot,
    fit_block_k,
    is_pow2,
    launch_config,
    masked_load,
    masked_store,
    merge_splits,
    num_cores,
    partial_shapes,
    regime,
    resolve_interpret,
)

Array = jax.Array

# First H100 sweep; block_sparse_decode now takes its defaults from TUNED_BS / decode_config.
DEFAULT_DECODE = {"block_k": 64, "num_warps": 4, "num_stages": 3}
LIST_MODES = ("load", "prefetch", "preload")
MAX_PRELOAD = 128  # list entries per program held in registers by list_mode="preload"

# Decode launch configs per regime, from `experiments/bench_kernels.py --tune` on an H100
# (paste the "TUNED_BS" line it prints), per `decode_attention.regime` ("few" / "many").
# Splits: ~programs_per_sm programs per SM, each >= min_steps loop steps (`sparse_splits`).
# Re-tuned on an H100, 2026-11-23 (third session, device-time harness; docs/benchmarks.md).
TUNED_BS: dict[str, dict[str, Any]] = {
    "few": {"block_k": 64, "num_warps": 4, "num_stages": 3, "list_mode": "load",
            "programs_per_sm": 2.0, "min_steps": 16, "merge": "xla"},
    "many": {"block_k": 64, "num_warps": 4, "num_stages": 3, "list_mode": "preload",
             "programs_per_sm": 4.0, "min_steps": 16, "merge": "xla"},
}


def _regime(batch: int, kv_heads: int) -> dict[str, Any]:
    return TUNED_BS[regime(batch, kv_heads)]


def _split_params(batch: int, kv_heads: int) -> dict[str, float]:
    t = _regime(batch, kv_heads)
    return {"programs_per_sm": float(t["programs_per_sm"]), "min_steps": int(t["min_steps"])}


def sparse_splits(batch: int, kv_heads: int, max_blocks: int, block_size: int, block_k: int,
                  *, programs_per_sm: float = 2.0, min_steps: int = 16) -> int:
    """Pieces per head's list: ~programs_per_sm programs per SM, >= min_steps steps each.

    max_blocks: the list length N (static); a piece then covers <= ceil(N / S) entries.
    """
    if not programs_per_sm > 0 or min_steps < 1:
        raise ValueError(f"need programs_per_sm > 0 and min_steps >= 1, got "
                         f"{programs_per_sm!r}, {min_steps!r}")
    steps = max(1, max_blocks * block_size // block_k)
    want = -(-int(programs_per_sm * num_cores()) // max(1, batch * kv_heads))
    return int(max(1, min(want, steps // min_steps, max_blocks)))


def decode_config(batch: int, kv_heads: int, max_blocks: int, block_size: int,
                  row_bytes: int = 0) -> dict[str, Any]:
    """Launch config {block_k, num_warps, num_stages, list_mode, merge, num_splits}.

    row_bytes: K + V bytes per key (0: unknown); the tuned tile is halved to fit shared memory
    (`decode_attention.fit_block_k`: float32 caches need half the bf16 tile)."""
    t = _regime(batch, kv_heads)
    bk = fit_block_k(int(t["block_k"]), int(t["num_stages"]), row_bytes)
    return {"block_k": bk, "num_warps": int(t["num_warps"]), "num_stages": int(t["num_stages"]),
            "list_mode": str(t["list_mode"]), "merge": str(t.get("merge", "xla")),
            "num_splits": sparse_splits(batch, kv_heads, max_blocks, block_size, bk,
                                        **_split_params(batch, kv_heads))}
DEFAULT_PREFILL = {"block_q": 64, "block_k": 64, "num_warps": 4, "num_stages": 2}


# --- block lists ---------------------------------------------------------------------------


def mask_to_lists(mask: Array, max_blocks: int | None = None) -> tuple[Array, Array]:
    """bool[..., NB] active blocks -> (int32[..., max_blocks] ascending ids, int32[...] counts).

    Entries past the count are 0. `max_blocks` (static, default NB) bounds the list; active
    blocks beyond it are dropped (the lowest ids are kept).
    """
    nb = mask.shape[-1]
    n = nb if max_blocks is None else int(max_blocks)
    if not 1 <= n <= nb:
        raise ValueError(f"max_blocks must be in [1, {nb}], got {max_blocks}")
    ids = jnp.arange(nb, dtype=jnp.int32)
    key = jnp.where(mask, ids, ids + nb)  # active first, each group ascending
    order = jnp.sort(key, axis=-1)[..., :n]
    active = order < nb
    idx = jnp.where(active, order, 0).astype(jnp.int32)
    return idx, jnp.sum(active, axis=-1).astype(jnp.int32)


def static_pattern(
    num_q_blocks: int,
    num_kv_blocks: int,
    *,
    block_q: int,
    block_size: int,
    sink: int = 1,
    local: int = 2,
    stride: int | None = None,
    q_offset: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Causal sink + local + strided pattern as numpy lists ([NQB, NB] ids, [NQB] counts).

    Query block i holds positions [q_offset + i*block_q, q_offset + (i+1)*block_q); its last
    KV block is d = (q_offset + (i+1)*block_q - 1) // block_size. Active: blocks [0, sink), the
    `local` blocks ending at d, and every block j <= d with j % stride == stride - 1 (global
    "vertical" blocks, as in BigBird / Longformer); none after d.
    """
    for name, v in (("num_q_blocks", num_q_blocks), ("num_kv_blocks", num_kv_blocks),
                    ("block_q", block_q), ("block_size", block_size)):
        if not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if sink < 0 or local < 0 or (stride is not None and stride < 1):
        raise ValueError(f"need sink >= 0, local >= 0, stride >= 1; got {sink}, {local}, {stride}")
    mask = np.zeros((num_q_blocks, num_kv_blocks), bool)
    for i in range(num_q_blocks):
        d = min((q_offset + (i + 1) * block_q - 1) // block_size, num_kv_blocks - 1)
        j = np.arange(num_kv_blocks)
        on = (j < sink) | ((j > d - local) & (j <= d))
        if stride is not None:
            on |= j % stride == stride - 1
        mask[i] = on & (j <= d)
    counts = mask.sum(-1).astype(np.int32)
    n = max(1, int(counts.max()))
    idx = np.zeros((num_q_blocks, n), np.int32)
    for i in range(num_q_blocks):
        ids = np.nonzero(mask[i])[0]
        idx[i, : len(ids)] = ids
    return idx, counts


def decode_pattern(
    lengths: Array,
    num_kv_blocks: int,
    *,
    block_size: int,
    sink: int = 1,
    local: int = 2,
    stride: int | None = None,
) -> tuple[Array, Array]:
    """Per-head decode lists from dynamic lengths int32[B, Hkv] -> ([B, Hkv, N], [B, Hkv]).

    Active: sink blocks, the `local` blocks ending at the head's last block, strided blocks;
    only blocks holding valid slots. N (static) = sink + local + NB // stride, capped at NB.
    """
    nb = int(num_kv_blocks)
    j = jnp.arange(nb, dtype=jnp.int32)
    last = (lengths[..., None] - 1) // block_size  # [B, H, 1]; -1 for empty heads
    on = (j < sink) | ((j > last - local) & (j <= last))
    if stride is not None:
        on = on | (j % stride == stride - 1)
    on = on & (j <= last)
    n = min(nb, sink + local + (nb // stride if stride else 0))
    return mask_to_lists(on, max(1, n))


def lists_to_slot_mask(block_indices: Array, block_counts: Array, num_blocks: int,
                       block_size: int) -> Array:
    """bool[..., num_blocks * block_size]: slots inside the listed blocks (reference helper)."""
    n = block_indices.shape[-1]
    use = jnp.arange(n)[None, :] < block_counts.reshape(-1, 1)
    flat = block_indices.reshape(-1, n)
    target = jnp.where(use, flat, num_blocks)
    blk = jnp.zeros((flat.shape[0], num_blocks), bool)
    blk = blk.at[jnp.arange(flat.shape[0])[:, None], target].set(True, mode="drop")
    blk = blk.reshape(block_counts.shape + (num_blocks,))
    return jnp.repeat(blk, block_size, axis=-1)


# --- checks ----------------------------------------------------------------------------------


def _concrete(x: Any) -> np.ndarray | None:
    """The value of a concrete array, None for a tracer (checked later, inside jit, by clamping)."""
    try:
        return np.asarray(x)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return None


def _check_common(q, keys, values, lengths, block_size, kv_positions, q_positions,
                  sliding_window, q_pos_shape):
    if keys.ndim != 4 or values.ndim != 4 or keys.shape[:3] != values.shape[:3]:
        raise ValueError(
            f"keys/values must be [B, Hkv, C, D] with one C, got {keys.shape}, {values.shape}"
        )
    b, hkv, cap, d = keys.shape
    if q.shape[0] != b or q.shape[-1] != d:
        raise ValueError(f"q {q.shape} does not match keys {keys.shape} (batch, head dim)")
    hq = q.shape[1]
    if hq % hkv:
        raise ValueError(f"query heads ({hq}) must be a multiple of KV heads ({hkv})")
    if lengths.shape != (b, hkv):
        raise ValueError(f"lengths must have shape {(b, hkv)}, got {lengths.shape}")
    if q.dtype != keys.dtype or q.dtype != values.dtype:
        raise TypeError(
            f"q, keys and values must share one dtype, got {q.dtype}, {keys.dtype}, {values.dtype}"
        )
    if q.dtype not in DTYPES:
        raise TypeError(f"dtype must be one of bfloat16, float16, float32, got {q.dtype}")
    if not isinstance(block_size, (int, np.integer)) or not is_pow2(block_size) or block_size < 1:
        raise ValueError(f"block_size must be a power of two, got {block_size!r}")
    if cap % block_size:
        raise ValueError(f"block_size {block_size} does not divide the capacity {cap}")
    for name, v in (("head dim", d), ("value dim", values.shape[-1])):
        if not (is_pow2(v) and 16 <= v <= 512):
            raise ValueError(f"{name} must be a power of two in [16, 512] for the kernel, got {v}")
    if (kv_positions is None) != (q_positions is None):
        raise ValueError("kv_positions and q_positions must be given together")
    if kv_positions is not None:
        if kv_positions.shape != (b, hkv, cap):
            raise ValueError(f"kv_positions must have shape {(b, hkv, cap)}, got "
                             f"{kv_positions.shape}")
        if q_positions.shape != q_pos_shape:
            raise ValueError(f"q_positions must have shape {q_pos_shape}, got {q_positions.shape}")
    if sliding_window is not None:
        if kv_positions is None:
            raise ValueError("sliding_window needs kv_positions and q_positions")
        if not isinstance(sliding_window, (int, np.integer)) or sliding_window < 1:
            raise ValueError(f"sliding_window must be a positive int, got {sliding_window!r}")


def _check_lists(block_indices, block_counts, lead_shapes, num_blocks):
    if block_indices.ndim != len(lead_shapes[0]) + 1 or block_counts.shape not in lead_shapes:
        raise ValueError(
            f"block_indices must be {[s + ('N',) for s in lead_shapes]} and block_counts "
            f"{lead_shapes}, got {block_indices.shape} and {block_counts.shape}"
        )
    if block_indices.shape[:-1] != block_counts.shape:
        raise ValueError(f"block_indices {block_indices.shape} and block_counts "
                         f"{block_counts.shape} disagree")
    for name, a in (("block_indices", block_indices), ("block_counts", block_counts)):
        if not jnp.issubdtype(a.dtype, jnp.integer):
            raise TypeError(f"{name} must be an integer array, got {a.dtype}")
    n = block_indices.shape[-1]
    idx, cnt = _concrete(block_indices), _concrete(block_counts)
    if cnt is not None and cnt.size and (cnt.min() < 0 or cnt.max() > n):
        raise ValueError(f"block_counts must be in [0, {n}], got [{cnt.min()}, {cnt.max()}]")
    if idx is not None and cnt is not None and idx.size:
        used = np.arange(n) < cnt[..., None]
        if used.any():
            u = idx[used]
            if u.min() < 0 or u.max() >= num_blocks:
                raise ValueError(
                    f"block_indices must be in [0, {num_blocks}) (capacity / block_size), "
                    f"got [{u.min()}, {u.max()}]"
                )


def _check_launch(block_k, num_warps, num_stages):
    if not (is_pow2(block_k) and 16 <= block_k <= 1024):
        raise ValueError(f"block_k must be a power of two in [16, 1024], got {block_k}")
    check_warps_stages(num_warps, num_stages)


# --- references ------------------------------------------------------------------------------


def _masked_attention(qg, keys, values, ok, scale, bias=None):
    """qg [B, H, R, D], keys [B, H, C, D], ok bool[B, H, R, C] -> float32 [B, H, R, Dv]."""
    s = jnp.einsum("bhrd,bhsd->bhrs", qg, keys, preferred_element_type=jnp.float32,
                   precision=jax.lax.Precision.HIGHEST) * scale
    if bias is not None:
        s = s + bias.astype(jnp.float32)
    s = jnp.where(ok, s, -jnp.inf)
    m = jnp.max(s, axis=-1, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.exp(s - m)
    den = jnp.sum(p, axis=-1, keepdims=True)
    p = p / jnp.where(den == 0, 1.0, den)
    return jnp.einsum("bhrs,bhsd->bhrd", p, values.astype(jnp.float32),
                      precision=jax.lax.Precision.HIGHEST)


def reference_decode(q, keys, values, lengths, block_indices, block_counts, *, block_size,
                     kv_positions=None, q_positions=None, kv_bias=None, scale=None,
                     sliding_window=None):
    """[B, Hq, Dv]: dense jnp attention restricted to the listed blocks (same semantics)."""
    b, hq, d = q.shape
    _, hkv, cap, _ = keys.shape
    scale = d**-0.5 if scale is None else scale
    ok = lists_to_slot_mask(block_indices, block_counts, cap // block_size, block_size)
    ok = ok & (jnp.arange(cap)[None, None, :] < lengths[:, :, None])
    if kv_positions is not None:
        qp = q_positions[:, None, None]
        ok = ok & (kv_positions >= 0) & (kv_positions <= qp)
        if sliding_window is not None:
            ok = ok & (qp - kv_positions < sliding_window)
    qg = q.reshape(b, hkv, hq // hkv, d)
    bias = None if kv_bias is None else kv_bias[:, :, None, :]
    out = _masked_attention(qg, keys, values, ok[:, :, None, :], scale, bias)
    return out.reshape(b, hq, -1).astype(q.dtype)


def reference_prefill(q, keys, values, lengths, block_indices, block_counts, *, block_size,
                      block_q, kv_positions=None, q_positions=None, scale=None,
                      sliding_window=None):
    """[B, Hq, Tq, Dv]: dense jnp attention restricted to each query block's listed blocks."""
    b, hq, t, d = q.shape
    _, hkv, cap, _ = keys.shape
    g = hq // hkv
    scale = d**-0.5 if scale is None else scale
    blk = lists_to_slot_mask(block_indices, block_counts, cap // block_size, block_size)
    if blk.shape[1] == hkv:
        blk = jnp.repeat(blk, g, axis=1)  # [B, Hq, NQB, C]
    ok = jnp.repeat(blk, block_q, axis=2)[:, :, :t]  # [B, Hq, Tq, C]
    valid = jnp.arange(cap)[None, None, :] < lengths[:, :, None]  # [B, Hkv, C]
    if kv_positions is not None:
        kp = kv_positions[:, :, None, :]
        qp = q_positions[:, None, :, None]
        vis = valid[:, :, None, :] & (kp >= 0) & (kp <= qp)
        if sliding_window is not None:
            vis = vis & (qp - kp < sliding_window)
    else:
        vis = jnp.broadcast_to(valid[:, :, None, :], (b, hkv, t, cap))
    ok = ok & jnp.repeat(vis, g, axis=1)
    qg = q.reshape(b, hkv, g * t, d)
    out = _masked_attention(qg, keys, values, ok.reshape(b, hkv, g * t, cap), scale)
    return out.reshape(b, hq, t, -1).astype(q.dtype)


# --- kernels -------------------------------------------------------------------------------


def _gather_rows(idx_ref, list_at, lo, hi, chunk, block_k, block_size):
    """Slots of loop step `chunk`: entries [lo, hi) of a block list, block_k slots per step.

    Returns (int32[block_k] slot ids (0 where invalid), bool[block_k] in-list).
    """
    r = chunk * block_k + jnp.arange(block_k)
    entry = lo + r // block_size
    inside = entry < hi
    page = masked_load(list_at(jnp.where(inside, entry, 0)), inside, 0)
    return jnp.where(inside, page * block_size + r % block_size, 0), inside


def _attend_step(q, k_ref, v_ref, kpos_ref, slot, ok, qpos, b, h, carry, scale, window,
                 dot_precision, d, dv, bias_ref=None):
    """One online-softmax step over gathered slots; qpos is a scalar or [rows] vector."""
    o, m, den = carry
    cols = jnp.arange(d)[None, :]
    k = masked_load(k_ref.at[b, h, slot[:, None], cols], ok[:, None], 0)
    v = masked_load(v_ref.at[b, h, slot[:, None], jnp.arange(dv)[None, :]], ok[:, None], 0)
    sc = dot(q, k, trans_b=True, precision=dot_precision) * scale  # [rows, block_k]
    if bias_ref is not None:
        sc = sc + masked_load(bias_ref.at[b, h, slot], ok, 0.0)[None, :]
    ok2 = jnp.broadcast_to(ok[None, :], sc.shape)
    if kpos_ref is not None:
        kp = masked_load(kpos_ref.at[b, h, slot], ok, -1)[None, :]
        qp = qpos if jnp.ndim(qpos) == 0 else qpos[:, None]
        ok2 = ok2 & (kp >= 0) & (kp <= qp)
        if window is not None:
            ok2 = ok2 & (qp - kp < window)
    sc = jnp.where(ok2, sc, -jnp.inf)
    m_new = jnp.maximum(m, jnp.max(sc, axis=1))
    corr = jnp.exp(m - m_new)
    p = jnp.exp(sc - m_new[:, None])
    den = den * corr + jnp.sum(p, axis=1)
    pv = dot(p.astype(v.dtype), v, precision=dot_precision)
    return o * corr[:, None] + pv, m_new, den


def _list_slots(idx_at, pages, lo, hi, c, *, block_k, block_size, n, list_mode, per_max,
                nblk):
    """Slot ids int32[block_k] and in-list mask bool[block_k] of decode loop step `c`.

    The step covers entries [lo, hi) of the head's block list, block_k slots per step (entry
    lo + (c * block_k + r) // block_size, offset (c * block_k + r) % block_size). With
    block_k <= block_size a step lies inside one block: one scalar page id, and the slots are
    contiguous (`page * block_size + off + arange`), so the K/V tiles load like dense ones.
    `pages` int32[per_max] holds entries [lo, lo + per_max) when list_mode == "preload"
    (extracted with a one-hot sum: no memory access in the loop); otherwise the ids are loaded
    from the list (`idx_at(entry)`). `c` may be one past the last step (prefetch): entries
    past hi are clamped in range and masked. Ids are clamped to [0, nblk) here, in the kernel
    (a traced list cannot be checked before launch; clamping costs one op per id, where an XLA
    clip of the list was one more kernel launch per call).
    """
    # lax.div / lax.rem (all operands >= 0): jnp's floor-division wrappers do not lower to
    # Triton on a loop index.
    div, rem = jax.lax.div, jax.lax.rem
    ar = jnp.arange(block_k, dtype=jnp.int32)
    c = jnp.asarray(c, jnp.int32)
    if block_k <= block_size:
        e = div(c * block_k, jnp.int32(block_size))
        inside = jnp.broadcast_to(lo + e < hi, (block_k,))
        if list_mode == "preload":
            page = jnp.sum(jnp.where(jnp.arange(per_max) == e, pages, 0))
        else:
            page = jnp.clip(idx_at(jnp.minimum(lo + e, n - 1)), 0, nblk - 1)
        return page * block_size + rem(c * block_k, jnp.int32(block_size)) + ar, inside
    r = c * block_k + ar
    e = div(r, jnp.int32(block_size))
    inside = lo + e < hi
    if list_mode == "preload":
        onehot = e[:, None] == jnp.arange(per_max)[None, :]
        page = jnp.sum(jnp.where(onehot, pages[None, :], 0), axis=1)
    else:
        page = jnp.clip(masked_load(idx_at(jnp.where(inside, lo + e, 0)), inside, 0), 0, nblk - 1)
    return jnp.where(inside, page * block_size + rem(r, jnp.int32(block_size)), 0), inside


def _decode_kernel(*refs, has_pos, has_bias, group, rows, block_k, block_size, scale, window,
                   splits, dot_precision, list_mode, per_max):
    q_ref, k_ref, v_ref, len_ref, idx_ref, cnt_ref = refs[:6]
    kpos_ref = qpos_ref = bias_ref = None
    i = 6
    if has_pos:
        kpos_ref, qpos_ref = refs[6], refs[7]
        i = 8
    if has_bias:
        bias_ref = refs[i]
        i += 1
    o_ref, m_ref, l_ref = refs[i:]
    b, h, s = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    d, dv = k_ref.shape[-1], v_ref.shape[-1]
    n = idx_ref.shape[-1]
    count = cnt_ref[b, h]
    per = (count + splits - 1) // splits
    lo = jnp.minimum(s * per, count)
    hi = jnp.minimum(lo + per, count)
    steps = ((hi - lo) * block_size + block_k - 1) // block_k
    row_ok = jnp.arange(rows) < group
    zero = (jnp.zeros((rows, dv), jnp.float32), jnp.full((rows,), _NEG, jnp.float32),
            jnp.zeros((rows,), jnp.float32))
    # No branch around the loop: an empty piece runs zero steps (no K/V loads).
    q = masked_load(q_ref.at[b, h, pl.ds(0, rows), :], row_ok[:, None], 0)
    length = len_ref[b, h]
    qpos = qpos_ref[b] if has_pos else None
    pages = None
    nblk = k_ref.shape[2] // block_size  # list ids are clamped to [0, nblk) in the kernel
    if list_mode == "preload":  # this piece's list entries, loaded once
        ent = lo + jnp.arange(per_max)
        pages = masked_load(idx_ref.at[b, h, jnp.where(ent < hi, ent, 0)], ent < hi, 0)
        pages = jnp.clip(pages, 0, nblk - 1)

    def idx_at(e):
        return idx_ref[b, h, e] if jnp.ndim(e) == 0 else idx_ref.at[b, h, e]

    slots = functools.partial(_list_slots, idx_at, pages, lo, hi, block_k=block_k,
                              block_size=block_size, n=n, list_mode=list_mode, per_max=per_max,
                              nblk=nblk)

    def attend(slot, inside, carry):
        ok = inside & (slot < length)
        return _attend_step(q, k_ref, v_ref, kpos_ref, slot, ok, qpos, b, h, carry, scale,
                            window, dot_precision, d, dv, bias_ref)

    if list_mode == "prefetch":  # step c+1's ids load while step c computes
        def body(c, carry):
            nxt, _ = slots(c + 1)
            r = c * block_k + jnp.arange(block_k, dtype=jnp.int32)
            inside = lo + jax.lax.div(r, jnp.int32(block_size)) < hi
            return attend(carry[3], inside, carry[:3]) + (nxt,)

        o, m, den, _ = jax.lax.fori_loop(0, steps, body, zero + (slots(0)[0],))
    else:
        def body(c, carry):
            slot, inside = slots(c)
            return attend(slot, inside, carry)

        o, m, den = jax.lax.fori_loop(0, steps, body, zero)
    masked_store(o_ref.at[b, h, s, pl.ds(0, rows), :], o, row_ok[:, None])
    masked_store(m_ref.at[b, h, s, pl.ds(0, rows)], m, row_ok)
    masked_store(l_ref.at[b, h, s, pl.ds(0, rows)], den, row_ok)


def _prefill_kernel(*refs, has_pos, group, per_kv_lists, block_q, block_k, block_size, scale,
                    window, tq, dot_precision):
    q_ref, k_ref, v_ref, len_ref, idx_ref, cnt_ref = refs[:6]
    kpos_ref = qpos_ref = None
    i = 6
    if has_pos:
        kpos_ref, qpos_ref = refs[6], refs[7]
        i = 8
    (o_ref,) = refs[i:]
    b, hq, qb = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    h = hq // group
    hl = h if per_kv_lists else hq
    d, dv = k_ref.shape[-1], v_ref.shape[-1]
    trow = qb * block_q + jnp.arange(block_q)
    row_ok = trow < tq
    count = cnt_ref[b, hl, qb]
    steps = (count * block_size + block_k - 1) // block_k
    zero = (jnp.zeros((block_q, dv), jnp.float32), jnp.full((block_q,), _NEG, jnp.float32),
            jnp.zeros((block_q,), jnp.float32))

    def compute():
        q = masked_load(q_ref.at[b, hq, pl.ds(qb * block_q, block_q), :], row_ok[:, None], 0)
        length = len_ref[b, h]
        qpos = masked_load(qpos_ref.at[b, pl.ds(qb * block_q, block_q)], row_ok, -1) \
            if has_pos else None

        def body(c, carry):
            slot, inside = _gather_rows(
                idx_ref, lambda e: idx_ref.at[b, hl, qb, e], 0, count, c, block_k, block_size
            )
            ok = inside & (slot < length)
            return _attend_step(q, k_ref, v_ref, kpos_ref, slot, ok, qpos, b, h, carry, scale,
                                window, dot_precision, d, dv)

        return jax.lax.fori_loop(0, steps, body, zero)

    o, _, den = jax.lax.cond(steps > 0, compute, lambda: zero)
    o = jnp.where(den[:, None] > 0, o / jnp.where(den > 0, den, 1.0)[:, None], 0.0)
    masked_store(o_ref.at[b, hq, pl.ds(qb * block_q, block_q), :], o.astype(o_ref.dtype),
                 row_ok[:, None])


@functools.partial(
    jax.jit,
    static_argnames=("block_size", "scale", "sliding_window", "block_k", "num_splits",
                     "num_warps", "num_stages", "list_mode", "merge", "interpret"),
)
def _decode(q, keys, values, lengths, block_indices, block_counts, kv_positions, q_positions,
            kv_bias, *, block_size, scale, sliding_window, block_k, num_splits, num_warps,
            num_stages, list_mode, merge, interpret):
    b, hq, d = q.shape
    hkv, dv = keys.shape[1], values.shape[-1]
    g = hq // hkv
    rows = max(16, 1 << max(0, g - 1).bit_length())
    has_pos = kv_positions is not None
    has_bias = kv_bias is not None
    if block_indices.shape[-1] == 0:  # keep the in-kernel list reads in bounds
        block_indices = jnp.zeros(block_counts.shape + (1,), jnp.int32)
    n = block_indices.shape[-1]
    per_max = 1 << max(0, -(-n // num_splits) - 1).bit_length()  # >= entries per piece
    inputs = [q.reshape(b, hkv, g, d), keys, values, lengths.astype(jnp.int32),
              block_indices.astype(jnp.int32),  # clamped in the kernel (`_list_slots`)
              block_counts.astype(jnp.int32)]
    if has_pos:
        inputs += [kv_positions.astype(jnp.int32), q_positions.astype(jnp.int32)]
    if has_bias:
        inputs.append(kv_bias.astype(jnp.float32))
    kernel = functools.partial(
        _decode_kernel, has_pos=has_pos, has_bias=has_bias, group=g, rows=rows, block_k=block_k,
        block_size=block_size, scale=scale, window=sliding_window, splits=num_splits,
        dot_precision=jax.lax.Precision.HIGHEST if q.dtype == jnp.float32 else None,
        list_mode=list_mode, per_max=per_max,
    )
    o, m, den = pl.pallas_call(
        kernel,
        grid=(b, hkv, num_splits),
        out_shape=partial_shapes(b, hkv, num_splits, g, dv),
        compiler_params=compiler_params(num_warps, num_stages),
        interpret=interpret,
        name="block_sparse_decode",
    )(*inputs)
    return merge_splits(o, m, den, merge, q.dtype, interpret=interpret).reshape(b, hq, dv)


def block_sparse_decode(
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
    block_k: int | None = None,
    num_splits: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    list_mode: str | None = None,
    merge: str | None = None,
    interpret: bool | None = None,
) -> Array:
    """[B, Hq, Dv] decode attention over the listed KV blocks of each KV head.

    q [B, Hq, D]; keys/values [B, Hkv, C, D]; lengths int32[B, Hkv]; block_indices
    int32[B, Hkv, N] (distinct ids in [0, C / block_size)); block_counts int32[B, Hkv] in
    [0, N]; optional kv_positions int32[B, Hkv, C] with q_positions int32[B]; optional kv_bias
    float[B, Hkv, C] added to each slot's scaled score (merged slots' log N).
    Launch parameters left None come from `decode_config` (per shape, H100-tuned); list_mode
    is how a program reads its list: "load" (ids loaded in each step), "prefetch" (step c+1's
    ids loaded during step c) or "preload" (the piece's ids loaded once before the loop;
    pieces of more than `MAX_PRELOAD` entries fall back to "load"); merge combines the
    pieces' partials: "xla" (`merge_partials`) or "pallas" (one kernel).
    """
    _check_common(q, keys, values, lengths, block_size, kv_positions, q_positions,
                  sliding_window, (q.shape[0],))
    if q.ndim != 3:
        raise ValueError(f"q must be [B, Hq, D], got {q.shape}")
    b, hkv, cap, _ = keys.shape
    _check_lists(block_indices, block_counts, [(b, hkv)], cap // block_size)
    if kv_bias is not None and (kv_bias.shape != (b, hkv, cap)
                                or not jnp.issubdtype(kv_bias.dtype, jnp.floating)):
        raise ValueError(f"kv_bias must be float[{b}, {hkv}, {cap}], got {kv_bias.dtype}"
                         f"{list(kv_bias.shape)}")
    n = block_indices.shape[-1]
    row_bytes = (keys.shape[-1] + values.shape[-1]) * keys.dtype.itemsize
    cfg = launch_config(decode_config(b, hkv, n, block_size, row_bytes), block_k=block_k,
                        num_warps=num_warps, num_stages=num_stages, list_mode=list_mode,
                        merge=merge)
    _check_launch(cfg["block_k"], cfg["num_warps"], cfg["num_stages"])
    check_choice("list_mode", cfg["list_mode"], LIST_MODES)
    check_choice("merge", cfg["merge"], MERGES)
    if num_splits is None:
        num_splits = cfg["num_splits"] if block_k is None else sparse_splits(
            b, hkv, n, block_size, cfg["block_k"], **_split_params(b, hkv))
    check_num_splits(num_splits)
    mode = cfg["list_mode"]
    if mode == "preload" and -(-n // int(num_splits)) > MAX_PRELOAD:
        mode = "load"
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return _decode(
        q, keys, values, lengths, block_indices, block_counts, kv_positions, q_positions, kv_bias,
        block_size=int(block_size), scale=scale,
        sliding_window=None if sliding_window is None else int(sliding_window),
        block_k=int(cfg["block_k"]), num_splits=int(num_splits),
        num_warps=int(cfg["num_warps"]), num_stages=int(cfg["num_stages"]), list_mode=mode,
        merge=cfg["merge"], interpret=resolve_interpret(interpret),
    )


@functools.partial(
    jax.jit,
    static_argnames=("block_size", "block_q", "scale", "sliding_window", "block_k",
                     "num_warps", "num_stages", "interpret"),
)
def _prefill(q, keys, values, lengths, block_indices, block_counts, kv_positions, q_positions,
             *, block_size, block_q, scale, sliding_window, block_k, num_warps, num_stages,
             interpret):
    b, hq, t, d = q.shape
    hkv, dv = keys.shape[1], values.shape[-1]
    has_pos = kv_positions is not None
    inputs = [q, keys, values, lengths.astype(jnp.int32),
              jnp.clip(block_indices, 0, keys.shape[2] // block_size - 1).astype(jnp.int32),
              block_counts.astype(jnp.int32)]
    if has_pos:
        inputs += [kv_positions.astype(jnp.int32), q_positions.astype(jnp.int32)]
    nqb = block_indices.shape[2]
    kernel = functools.partial(
        _prefill_kernel, has_pos=has_pos, group=hq // hkv,
        per_kv_lists=block_indices.shape[1] == hkv, block_q=block_q, block_k=block_k,
        block_size=block_size, scale=scale, window=sliding_window, tq=t,
        dot_precision=jax.lax.Precision.HIGHEST if q.dtype == jnp.float32 else None,
    )
    return pl.pallas_call(
        kernel,
        grid=(b, hq, nqb),
        out_shape=jax.ShapeDtypeStruct((b, hq, t, dv), q.dtype),
        compiler_params=compiler_params(num_warps, num_stages),
        interpret=interpret,
        name="block_sparse_prefill",
    )(*inputs)


def block_sparse_prefill(
    q: Array,
    keys: Array,
    values: Array,
    lengths: Array,
    block_indices: Array,
    block_counts: Array,
    *,
    block_size: int,
    block_q: int | None = None,
    kv_positions: Array | None = None,
    q_positions: Array | None = None,
    scale: float | None = None,
    sliding_window: int | None = None,
    block_k: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    interpret: bool | None = None,
) -> Array:
    """[B, Hq, Tq, Dv] attention of query blocks over their listed KV blocks.

    q [B, Hq, Tq, D]; keys/values [B, Hkv, C, D]; lengths int32[B, Hkv]; block_indices
    int32[B, H, ceil(Tq / block_q), N] with H = Hkv or Hq; block_counts int32[B, H, NQB];
    optional kv_positions int32[B, Hkv, C] with q_positions int32[B, Tq] (causality comes
    from positions, as in `kvjax.attention`). Query rows that see no key return zeros.
    """
    if q.ndim != 4:
        raise ValueError(f"q must be [B, Hq, Tq, D], got {q.shape}")
    _check_common(q, keys, values, lengths, block_size, kv_positions, q_positions,
                  sliding_window, (q.shape[0], q.shape[2]))
    b, hq, t, _ = q.shape
    hkv, cap = keys.shape[1], keys.shape[2]
    cfg = launch_config(DEFAULT_PREFILL, block_q=block_q, block_k=block_k, num_warps=num_warps,
                        num_stages=num_stages)
    if not (is_pow2(cfg["block_q"]) and 16 <= cfg["block_q"] <= 512):
        raise ValueError(f"block_q must be a power of two in [16, 512], got {cfg['block_q']}")
    nqb = -(-t // cfg["block_q"])
    _check_lists(block_indices, block_counts, [(b, hkv, nqb), (b, hq, nqb)], cap // block_size)
    _check_launch(cfg["block_k"], cfg["num_warps"], cfg["num_stages"])
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return _prefill(
        q, keys, values, lengths, block_indices, block_counts, kv_positions, q_positions,
        block_size=int(block_size), block_q=int(cfg["block_q"]), scale=scale,
        sliding_window=None if sliding_window is None else int(sliding_window),
        block_k=int(cfg["block_k"]), num_warps=int(cfg["num_warps"]),
        num_stages=int(cfg["num_stages"]), interpret=resolve_interpret(interpret),
    )
