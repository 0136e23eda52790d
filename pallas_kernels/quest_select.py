"""Quest page selection as two Pallas kernels: fused page bounds, then an exact top-k list.

`kvjax.sparse.quest` selects, per KV head, the pages with the largest upper bounds

    U_p = max_g sum_d max(q_gd * min_pd, q_gd * max_pd)

(g over the G = Hq / Hkv query heads of the KV head) and feeds them to the block-sparse decode
kernel. In plain jnp that is two batched tiny-M matmuls, a max over g, masks, `lax.top_k` and a
sort (five to seven XLA kernels). Here:

  page_scores   grid (B, Hkv, NP / block_p): one program loads the G query rows once and a
                [block_p, D] tile of the min and max summaries, computes both bound terms as
                tensor-core dots (relu(q) . max + min(q, 0) . min, exact for bf16 inputs,
                float32 accumulation), the max over the G rows and the page masks (past the
                head's length -inf, the newest page +inf), and stores float32[block_p]. It
                reads the summaries once: 2 / page_size of the key bytes.
  top_pages     grid (B, Hkv): one program holds the head's NP scores in registers, finds the
                k-th largest by a 32-step bitwise search on order-preserving int32 keys
                (count(key >= candidate) per step), keeps every page above it and the
                lowest-id pages equal to it (as `lax.top_k` does on ties; -0.0 ranks below
                0.0, the float total order `lax.top_k` uses), and writes their ids
                compacted in ascending order (a cumsum gives each selected page its slot),
                zeros after the count (a [B, Hkv, NP] buffer, sliced to k). No sort.

Layouts: q [B, Hq, D]; page_min / page_max [B, Hkv, NP, D] (the cache's dtype; +inf / -inf
for pages holding no key); lengths int32[B, Hkv]; scores float32[B, Hkv, NP].

Backends: Pallas Triton (written for the H100 runs of experiments/bench_kernels.py); on CPU
`interpret=True`, chosen automatically, tested against `reference_page_scores` /
`reference_top_pages` (jax 0.10.2). TPU: not implemented (scattered stores are Triton-only);
Quest on TPU selects with the jnp scores and top-k (`kvjax.sparse.quest.select_pages`).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from pallas_kernels.decode_attention import (
    compiler_params,
    dot,
    is_pow2,
    masked_load,
    masked_store,
    resolve_interpret,
)

Array = jax.Array

# Launch parameters, from `experiments/bench_kernels.py --tune` on an H100 (paste the
# "TUNED_QUEST" line it prints). block_k / list_mode are the block-sparse decode's (None: its
# own per-shape default).
# Re-tuned on an H100, 2026-11-23 (third session, device-time harness; docs/benchmarks.md).
TUNED_QUEST: dict[str, Any] = {
    "block_p": 64, "score_warps": 4, "score_stages": 2, "select_warps": 4,
    "block_k": 128, "list_mode": "prefetch",
}
MAX_SELECT_PAGES = 32768  # top_pages holds a head's scores in registers: NP (padded) <= this


def _pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


# --- references --------------------------------------------------------------------------------


def reference_page_scores(q: Array, page_min: Array, page_max: Array, lengths: Array,
                          page_size: int) -> Array:
    """float32[B, Hkv, NP]: the bounds in plain jnp (two batched matmuls + max over G)."""
    b, hq, d = q.shape
    hkv, npg = page_min.shape[1], page_min.shape[2]
    qg = q.reshape(b, hkv, hq // hkv, d)
    # max(q_d lo_d, q_d hi_d) = relu(q_d) hi_d + min(q_d, 0) lo_d since hi >= lo.
    mm = functools.partial(jnp.einsum, "bhgd,bhpd->bhgp", preferred_element_type=jnp.float32,
                           precision=jax.lax.Precision.HIGHEST)
    dt = page_max.dtype
    bound = mm(jnp.maximum(qg, 0).astype(dt), page_max) + mm(
        jnp.minimum(qg, 0).astype(dt), page_min)  # [B, Hkv, G, NP]
    score = jnp.max(bound, axis=2)
    page = jnp.arange(npg)[None, None, :]
    last = (lengths[:, :, None] - 1) // page_size
    score = jnp.where(page == last, jnp.inf, score)
    return jnp.where(page * page_size < lengths[:, :, None], score, -jnp.inf)


def reference_top_pages(scores: Array, k: int) -> tuple[Array, Array]:
    """(int32[..., k] ids of the k largest finite-or-+inf scores, ascending; int32[...] count).

    Ties go to the lower page id (as `lax.top_k`); entries past the count are 0.
    """
    npg = scores.shape[-1]
    top, idx = jax.lax.top_k(scores, k)
    ok = top > -jnp.inf
    idx = jnp.sort(jnp.where(ok, idx, npg), axis=-1)  # unused entries last
    count = jnp.sum(ok, axis=-1).astype(jnp.int32)
    return jnp.where(idx < npg, idx, 0).astype(jnp.int32), count


# --- kernels -----------------------------------------------------------------------------------


def _score_kernel(q_ref, mn_ref, mx_ref, len_ref, o_ref, *, group, rows, block_p, page_size,
                  npg, dot_precision):
    b, h, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    row_ok = jnp.arange(rows) < group
    q = masked_load(q_ref.at[b, h, pl.ds(0, rows), :], row_ok[:, None], 0)
    page = j * block_p + jnp.arange(block_p)
    pin = page < npg
    mx = masked_load(mx_ref.at[b, h, pl.ds(j * block_p, block_p), :], pin[:, None], 0)
    mn = masked_load(mn_ref.at[b, h, pl.ds(j * block_p, block_p), :], pin[:, None], 0)
    dt = mx.dtype
    bound = dot(jnp.maximum(q, 0).astype(dt), mx, trans_b=True, precision=dot_precision) + dot(
        jnp.minimum(q, 0).astype(dt), mn, trans_b=True, precision=dot_precision)
    score = jnp.max(jnp.where(row_ok[:, None], bound, -jnp.inf), axis=0)  # [block_p]
    length = len_ref[b, h]
    score = jnp.where(page == (length - 1) // page_size, jnp.inf, score)
    score = jnp.where(page * page_size < length, score, -jnp.inf)
    masked_store(o_ref.at[b, h, pl.ds(j * block_p, block_p)], score, pin)


@functools.partial(jax.jit, static_argnames=("page_size", "block_p", "num_warps", "num_stages",
                                             "interpret"))
def _scores(q, page_min, page_max, lengths, *, page_size, block_p, num_warps, num_stages,
            interpret):
    b, hq, d = q.shape
    hkv, npg = page_min.shape[1], page_min.shape[2]
    g = hq // hkv
    kernel = functools.partial(
        _score_kernel, group=g, rows=max(16, _pow2(g)), block_p=block_p, page_size=page_size,
        npg=npg, dot_precision=jax.lax.Precision.HIGHEST if page_max.dtype == jnp.float32
        else None,
    )
    return pl.pallas_call(
        kernel,
        grid=(b, hkv, -(-npg // block_p)),
        out_shape=jax.ShapeDtypeStruct((b, hkv, npg), jnp.float32),
        compiler_params=compiler_params(num_warps, num_stages),
        interpret=interpret,
        name="quest_page_scores",
    )(q.reshape(b, hkv, g, d), page_min, page_max, lengths.astype(jnp.int32))


def page_scores(q: Array, page_min: Array, page_max: Array, lengths: Array, page_size: int,
                *, block_p: int | None = None, num_warps: int | None = None,
                num_stages: int | None = None, interpret: bool | None = None) -> Array:
    """float32[B, Hkv, NP] Quest bounds (as `reference_page_scores`) in one Pallas kernel."""
    _check_scores(q, page_min, page_max, lengths, page_size)
    block_p = int(TUNED_QUEST["block_p"] if block_p is None else block_p)
    if not (is_pow2(block_p) and 16 <= block_p <= 1024):
        raise ValueError(f"block_p must be a power of two in [16, 1024], got {block_p}")
    return _scores(
        q, page_min, page_max, lengths, page_size=int(page_size), block_p=block_p,
        num_warps=int(TUNED_QUEST["score_warps"] if num_warps is None else num_warps),
        num_stages=int(TUNED_QUEST["score_stages"] if num_stages is None else num_stages),
        interpret=resolve_interpret(interpret),
    )


_INT_MIN = -(2**31)


def _top_kernel(s_ref, o_ref, c_ref, *, npg, npp, k):
    b, h = pl.program_id(0), pl.program_id(1)
    j = jnp.arange(npp, dtype=jnp.int32)
    s = masked_load(s_ref.at[b, h, pl.ds(0, npp)], j < npg, -jnp.inf)
    valid = s > -jnp.inf
    kk = jnp.minimum(k, jnp.sum(valid.astype(jnp.int32)))
    bits = jax.lax.bitcast_convert_type(s, jnp.int32)
    key = jnp.where(bits >= 0, bits, bits ^ jnp.int32(0x7FFFFFFF))  # float order as int32

    def count_ge(t):
        return jnp.sum((key >= t).astype(jnp.int32))

    # Largest t with count(key >= t) >= kk, i.e. the kk-th largest key: sign bit first, then
    # bits 30..0 greedily (for a fixed sign bit the int32 value grows with the low bits).
    thr0 = jnp.where(count_ge(jnp.int32(0)) >= kk, jnp.int32(0), jnp.int32(_INT_MIN))

    def body(i, t):
        cand = t | jax.lax.shift_left(jnp.int32(1), jnp.int32(30) - i)
        return jnp.where(count_ge(cand) >= kk, cand, t)

    thr = jax.lax.fori_loop(0, 31, body, thr0)
    gt = key > thr
    eq = key == thr
    need = kk - jnp.sum(gt.astype(jnp.int32))
    take = gt | (eq & (jnp.cumsum(eq.astype(jnp.int32)) <= need))
    take = take & valid & (kk > 0)
    # A permutation of [0, npp): selected pages first (ascending), then the rest, which are
    # written as 0. Every lane stores to its own address.
    cs = jnp.cumsum(take.astype(jnp.int32))
    cnt = jnp.sum(take.astype(jnp.int32))
    dest = jnp.where(take, cs - 1, cnt + j - cs)
    masked_store(o_ref.at[b, h, dest], jnp.where(take, j, 0), j >= 0)
    c_ref[b, h] = cnt


@functools.partial(jax.jit, static_argnames=("k", "num_warps", "interpret"))
def _top(scores, *, k, num_warps, interpret):
    b, h, npg = scores.shape
    npp = _pow2(max(npg, 16))
    kernel = functools.partial(_top_kernel, npg=npg, npp=npp, k=k)
    idx, cnt = pl.pallas_call(
        kernel,
        grid=(b, h),
        out_shape=[jax.ShapeDtypeStruct((b, h, npp), jnp.int32),
                   jax.ShapeDtypeStruct((b, h), jnp.int32)],
        compiler_params=compiler_params(num_warps, 1),
        interpret=interpret,
        name="quest_top_pages",
    )(scores.astype(jnp.float32))
    return idx[..., :k], cnt


def top_pages(scores: Array, k: int, *, num_warps: int | None = None,
              interpret: bool | None = None) -> tuple[Array, Array]:
    """(int32[B, H, k] ascending ids, int32[B, H] counts) as `reference_top_pages`, no sort.

    scores float32[B, H, NP] with NP <= MAX_SELECT_PAGES; k in [1, NP].
    """
    if scores.ndim != 3:
        raise ValueError(f"scores must be [B, H, NP], got shape {scores.shape}")
    npg = scores.shape[-1]
    if not isinstance(k, (int, np.integer)) or not 1 <= k <= npg:
        raise ValueError(f"k must be an int in [1, {npg}], got {k!r}")
    if _pow2(npg) > MAX_SELECT_PAGES:
        raise ValueError(f"top_pages holds at most {MAX_SELECT_PAGES} pages, got {npg}")
    return _top(scores, k=int(k),
                num_warps=int(TUNED_QUEST["select_warps"] if num_warps is None else num_warps),
                interpret=resolve_interpret(interpret))


def _check_scores(q, page_min, page_max, lengths, page_size):
    if q.ndim != 3 or page_min.ndim != 4 or page_min.shape != page_max.shape:
        raise ValueError(f"need q [B, Hq, D] and page_min/page_max [B, Hkv, NP, D] of one "
                         f"shape, got {q.shape}, {page_min.shape}, {page_max.shape}")
    b, hq, d = q.shape
    hkv = page_min.shape[1]
    if page_min.shape[0] != b or page_min.shape[-1] != d or hq % hkv:
        raise ValueError(f"q {q.shape} does not match the summaries {page_min.shape}")
    if lengths.shape != (b, hkv):
        raise ValueError(f"lengths must have shape {(b, hkv)}, got {lengths.shape}")
    if not (is_pow2(d) and 16 <= d <= 512):
        raise ValueError(f"head dim must be a power of two in [16, 512], got {d}")
    if page_min.dtype != page_max.dtype:
        raise TypeError(f"page_min {page_min.dtype} and page_max {page_max.dtype} differ")
    if not isinstance(page_size, (int, np.integer)) or page_size < 1:
        raise ValueError(f"page_size must be a positive int, got {page_size!r}")
