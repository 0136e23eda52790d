"""Decode attention directly over a Mustafar (bitmap words + packed values) sparse KV cache, Pallas.

Format (`kvjax.sparse.mustafar`): per token and KV head, k = D - round(s D) kept entries in
channel order, `vals` [.., k], and a bitmap of 32-bit words `bits` uint32[.., ceil(D / 32)]
(bit j of word i = channel 32 i + j). The i-th set bit of a token's bitmap holds its i-th value,
so the value of a kept channel c = 32 w + j sits at

    rank(c) = popcount(words[0 .. w-1]) + popcount(words[w] & (2^j - 1))

which needs no prefix sum along the channels: one population count per element and one per
word. One query token per row. Each program owns one (row, KV head, split of the tokens) and
all query heads of that KV head (GQA), padded to 16 rows for tensor-core dots. Per block of BS
tokens and per word w (32 channels, a [BS, 32] chunk):

  1. loads word w of each token (one 4-byte load per token and word);
  2. computes bit[t, j] = word & 2^j != 0 and rank[t, j] as above (ands and a popc);
  3. gathers the packed values at row * k + rank where the bit is set (a predicated load: the
     pruned lanes issue no request; they read as 0). Only the k values per token are read from
     memory, the rest of the chunk is zeros in registers;
  4. q . k^T is the sum over chunks of q[:, chunk] . K_chunk^T on tensor cores; the optional
     per-slot bias (merged-slot log counts, holes, sliding window: -1e30 masks) is added, slots
     >= lengths are masked, and a float32 online softmax runs; values are decompressed the same
     way and p . V_chunk accumulates into the matching column chunk of the output.

The step's loads can be issued ahead (`prefetch`): 1 (default) carries the next block's words
through the loop, 2 also gathers the next block's values one step early (a register double
buffer), so gather latency overlaps the current block's dots and softmax; 0 loads in place.

Split partials (unnormalised output, running max, denominator) are merged by `combine`
(log-sum-exp). Every stored token is taken to precede the query (true at decode); other
masking goes through `bias`.

This replaces a first version (uint8 bitmap, per-element gathered bitmap bytes and a 128-wide
integer cumsum per token) that was correct but 14-16x slower than dense decode on an H100.

Bytes read per token and KV head at D = 128 (bf16): dense 512 (K + V); s = 0.5: 288; s = 0.7:
184 (+4 with a bias). `reference` is the plain jnp version (densify, mask, float32 softmax);
tests compare the kernel with it on CPU in interpret mode (automatic there) and lower it for
CUDA on the CPU host (Triton IR). Measured on an H100 (2026-11-23, 32k x batch 8, bf16,
`experiments/bench_mustafar.py`): 1052 / 894 us at 50% / 70% sparsity vs 406 us for the dense
kernel (0.39x / 0.45x: the per-element rank/gather work, not the bytes, bounds it); the launch
sweep (`--tune`) has not run yet, so block size/warps/prefetch are untuned (docs/benchmarks.md).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.decode_attention import (
    check_choice,
    check_num_splits,
    check_warps_stages,
    combine_splits,
    launch_config,
    launch_params,
    pad_query_groups,
    partial_shapes,
    partial_specs,
    resolve_interpret,
    whole_head,
)

Array = jax.Array

NEG = -1e30
MIN_ROWS = 16  # tensor-core dots need >= 16 rows: query heads of a KV head are padded to this
WORD = 32  # bits per bitmap word
TARGET_PROGRAMS = 264  # ~2 programs per SM on an H100 (132 SMs); bench_mustafar sweeps splits
# Launch defaults (block_size, num_warps, num_stages, prefetch depth: see `_kernel`);
# `experiments/bench_mustafar.py --tune` sweeps them on the GPU.
DEFAULT_CONFIG = {"block_size": 64, "num_warps": 4, "num_stages": 2, "prefetch": 1}
PREFETCH = (0, 1, 2)


def _pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def num_words(d: int) -> int:
    """Bitmap words per vector of d channels."""
    return -(-d // WORD)


def supported(head_dim: int, value_dim: int | None = None) -> bool:
    """Whether the compiled (GPU) kernel handles these head dims; otherwise use `reference`."""
    value_dim = head_dim if value_dim is None else value_dim
    return all(_pow2(x) and 16 <= x <= 256 for x in (head_dim, value_dim))


def _precision(dtype) -> lax.Precision | None:
    """float32 dots at full precision (Triton's default for them is tf32)."""
    return lax.Precision.HIGHEST if dtype == jnp.float32 else None


def _dot_nt(a: Array, b: Array) -> Array:  # a [M, K] . b [N, K]^T -> float32 [M, N]
    return lax.dot_general(a, b, (((1,), (1,)), ((), ())), precision=_precision(a.dtype),
                           preferred_element_type=jnp.float32)


def _dot_nn(a: Array, b: Array) -> Array:  # a [M, K] . b [K, N] -> float32 [M, N]
    return lax.dot_general(a, b, (((1,), (0,)), ((), ())), precision=_precision(a.dtype),
                           preferred_element_type=jnp.float32)


def _masked_gather(ref, offsets: Array, mask: Array) -> Array:
    """ref[offsets] where mask, 0 elsewhere (a predicated Triton load; interpretable on CPU)."""
    from jax.experimental.pallas import triton as pltriton

    return pltriton.load(ref.at[offsets], mask=mask, other=0)


def _popc(x: Array) -> Array:
    """Set bits of uint32 x as int32 (through int32: Triton's `__nv_popc` on CUDA)."""
    return lax.population_count(lax.bitcast_convert_type(x, jnp.int32))


def _load_words(words_ref, rows: Array, d: int) -> tuple[Array, ...]:
    """The bitmap words (uint32[BS] each, ceil(d / 32) of them) of the rows int32[BS]."""
    return tuple(words_ref[rows, w] for w in range(num_words(d)))


def _gather(vals_ref, words: tuple[Array, ...], rows: Array, keep: int,
            d: int) -> tuple[Array, ...]:
    """Dense chunks [BS, min(32, d)] (channel order) of the rows from their bitmap words.

    vals_ref: flat [C * keep] packed values. Chunk w holds channels [32 w, 32 w + 32): value of
    channel 32 w + j = vals[row * keep + popc(words before w) + popc(word_w & (2^j - 1))] where
    bit j of word_w is set, else 0 (a predicated gather: pruned lanes read nothing).
    """
    cw = min(WORD, d)
    sel = jnp.uint32(1) << lax.broadcasted_iota(jnp.uint32, (1, cw), 1)  # bit of channel j
    below = sel - jnp.uint32(1)  # the bits under it
    base = rows * keep  # int32[BS]: where the row's packed values start
    chunks = []
    for w, word in enumerate(words):
        wb = word[:, None]
        rank = _popc(wb & below)
        chunks.append(_masked_gather(vals_ref, base[:, None] + rank, (wb & sel) != 0))
        if w + 1 < len(words):
            base = base + _popc(word)
    return tuple(chunks)


def _kernel(len_ref, q_ref, kv_ref, kw_ref, vv_ref, vw_ref, *rest, block: int,
            blocks_per_split: int, capacity: int, key_keep: int, value_keep: int,
            sm_scale: float, has_bias: bool, prefetch: int):
    """One (row, KV head, split). prefetch 0: each step loads its block's words, then gathers;
    1: the next block's words are loaded one step ahead (carried); 2: the next block's values
    are gathered one step ahead and its successor's words two steps ahead (register double
    buffer), so a step's loads overlap the previous block's dots and softmax."""
    if has_bias:
        bias_ref, o_ref, m_ref, l_ref = rest
    else:
        o_ref, m_ref, l_ref = rest
    split = pl.program_id(2)
    gp, d = q_ref.shape
    dv = o_ref.shape[-1]
    kcw, vcw = min(WORD, d), min(WORD, dv)
    qs = [q_ref[:, pl.ds(w * kcw, kcw)] for w in range(d // kcw)]
    ddt = qs[0].dtype
    n = len_ref[()]
    iota = lax.broadcasted_iota(jnp.int32, (block,), 0)

    def rows_of(blk):  # in-range rows (clamped: blocks past the end load valid memory)
        return jnp.minimum(blk * block + iota, capacity - 1)

    def words_of(blk):
        rows = rows_of(blk)
        return _load_words(kw_ref, rows, d), _load_words(vw_ref, rows, dv)

    def tiles_of(blk, words):
        rows = rows_of(blk)
        return (_gather(kv_ref, words[0], rows, key_keep, d),
                _gather(vv_ref, words[1], rows, value_keep, dv))

    def attend(blk, tiles, m, den, accs):
        ks, vs = tiles
        slot = blk * block + iota
        s = _dot_nt(qs[0], ks[0].astype(ddt))
        for qc, kc in zip(qs[1:], ks[1:]):
            s = s + _dot_nt(qc, kc.astype(ddt))
        s = s * sm_scale  # [gp, BS]
        if has_bias:
            s = s + bias_ref[rows_of(blk)][None, :]
        valid = (slot < n)[None, :] & (s > 0.5 * NEG)  # bias <= -1e30 masks a slot
        s = jnp.where(valid, s, NEG)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        alpha = jnp.exp(m - m_new)
        p = jnp.where(valid, jnp.exp(s - m_new[:, None]), 0.0).astype(ddt)
        accs = tuple(a * alpha[:, None] + _dot_nn(p, vc.astype(ddt)) for a, vc in zip(accs, vs))
        return m_new, den * alpha + jnp.sum(p.astype(jnp.float32), axis=1), accs

    def body(blk, carry):
        m, den, accs, ahead = carry
        if prefetch == 0:
            tiles = tiles_of(blk, words_of(blk))
        elif prefetch == 1:
            words = ahead
            ahead = words_of(blk + 1)  # issued first: overlaps this step
            tiles = tiles_of(blk, words)
        else:
            tiles, words = ahead
            ahead = (tiles_of(blk + 1, words), words_of(blk + 2))
        return (*attend(blk, tiles, m, den, accs), ahead)

    nblk = (n + block - 1) // block
    start = split * blocks_per_split
    stop = jnp.maximum(jnp.minimum(start + blocks_per_split, nblk), start)
    if prefetch == 0:
        ahead = ()
    elif prefetch == 1:
        ahead = words_of(start)
    else:
        ahead = (tiles_of(start, words_of(start)), words_of(start + 1))
    carry = (
        jnp.full((gp,), NEG, jnp.float32),
        jnp.zeros((gp,), jnp.float32),
        tuple(jnp.zeros((gp, vcw), jnp.float32) for _ in range(dv // vcw)),
        ahead,
    )
    m, den, accs, _ = lax.fori_loop(start, stop, body, carry)
    for w, acc in enumerate(accs):
        o_ref[:, pl.ds(w * vcw, vcw)] = acc
    m_ref[...] = m
    l_ref[...] = den


def _check(q, k_vals, k_bits, v_vals, v_bits, lengths, bias, value_dim=None):
    if q.ndim != 3:
        raise ValueError(f"q must be [batch, query_heads, head_dim], got shape {q.shape}")
    b, hq, d = q.shape
    dv = d if value_dim is None else value_dim
    if k_vals.ndim != 4:
        raise ValueError(f"k_vals must be [B, Hkv, C, k], got shape {k_vals.shape}")
    _, h, c, _ = k_vals.shape
    if hq % h or k_vals.shape[0] != b:
        raise ValueError(f"q {q.shape} does not match k_vals {k_vals.shape} (GQA needs Hq % Hkv)")
    for name, arr in (("k_bits", k_bits), ("v_bits", v_bits)):
        if arr.dtype != jnp.uint32:
            raise TypeError(f"{name} must be uint32 bitmap words, got {arr.dtype}")
    if k_bits.shape != (b, h, c, num_words(d)):
        raise ValueError(f"k_bits has shape {k_bits.shape}, expected {(b, h, c, num_words(d))}")
    if v_bits.shape != (b, h, c, num_words(dv)) or v_vals.shape[:3] != (b, h, c):
        raise ValueError(f"v_vals {v_vals.shape} / v_bits {v_bits.shape} do not match "
                         f"{(b, h, c)} and value_dim {dv}")
    if not (1 <= k_vals.shape[3] <= d and 1 <= v_vals.shape[3] <= dv):
        raise ValueError(f"kept counts {k_vals.shape[3]}, {v_vals.shape[3]} must be in "
                         f"[1, head dim] ({d}, {dv})")
    if lengths.shape != (b, h):
        raise ValueError(f"lengths must have shape {(b, h)}, got {lengths.shape}")
    if bias is not None and bias.shape != (b, h, c):
        raise ValueError(f"bias must have shape {(b, h, c)}, got {bias.shape}")
    return b, hq, h, c, d, dv


def default_splits(batch: int, num_kv_heads: int, num_blocks: int) -> int:
    """Token splits so that about TARGET_PROGRAMS programs run."""
    return max(1, min(num_blocks, -(-TARGET_PROGRAMS // (batch * num_kv_heads))))


@functools.partial(
    jax.jit,
    static_argnames=("value_dim", "scale", "block_size", "num_splits", "num_warps",
                     "num_stages", "prefetch", "interpret"),
)
def _partials(q, k_vals, k_bits, v_vals, v_bits, lengths, bias, *, value_dim, scale,
              block_size, num_splits, num_warps, num_stages, prefetch, interpret):
    b, hq, h, c, d, dv = _check(q, k_vals, k_bits, v_vals, v_bits, lengths, bias, value_dim)
    qg, gq, gp = pad_query_groups(q, h, MIN_ROWS)
    kk, vk = k_vals.shape[3], v_vals.shape[3]
    nblocks = -(-c // block_size)
    splits = default_splits(b, h, nblocks) if num_splits is None else min(num_splits, nblocks)
    bps = -(-nblocks // splits)
    splits = -(-nblocks // bps)
    inputs = [
        lengths.astype(jnp.int32), qg,
        k_vals.reshape(b, h, c * kk), k_bits, v_vals.reshape(b, h, c * vk), v_bits,
    ]
    in_specs = [
        pl.BlockSpec((None, None), lambda i, j, s: (i, j)),
        whole_head((gp, d)),
        whole_head((c * kk,)), whole_head(k_bits.shape[2:]),
        whole_head((c * vk,)), whole_head(v_bits.shape[2:]),
    ]
    if bias is not None:
        inputs.append(bias.astype(jnp.float32))
        in_specs.append(whole_head((c,)))
    kernel = functools.partial(
        _kernel, block=block_size, blocks_per_split=bps, capacity=c, key_keep=kk,
        value_keep=vk, sm_scale=scale, has_bias=bias is not None, prefetch=prefetch,
    )
    o, m, den = pl.pallas_call(
        kernel,
        grid=(b, h, splits),
        in_specs=in_specs,
        out_specs=partial_specs(gp, dv),
        out_shape=partial_shapes(b, h, splits, gp, dv),
        interpret=interpret,
        name="mustafar_sparse_decode_attention",
        **launch_params(num_warps, num_stages, interpret),
    )(*inputs)
    return o[:, :, :, :gq], m[..., :gq], den[..., :gq]


def combine(o: Array, m: Array, den: Array, dtype=jnp.float32) -> Array:
    """Merges split partials (o [B, H, S, G, Dv], m, den [B, H, S, G]) into [B, H * G, Dv].

    Rows that saw no valid slot return zeros.
    """
    return combine_splits(o, m, den, dtype)


def sparse_decode_attention(
    q: Array,
    k_vals: Array,
    k_bits: Array,
    v_vals: Array,
    v_bits: Array,
    lengths: Array,
    *,
    bias: Array | None = None,
    scale: float | None = None,
    value_dim: int | None = None,
    block_size: int | None = None,
    num_splits: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    prefetch: int | None = None,
    interpret: bool | None = None,
) -> Array:
    """Decode attention [B, Hq, Dv] of q [B, Hq, D] over a Mustafar cache.

    Args:
      q: one query per row; query head j reads KV head j // (Hq / Hkv).
      k_vals, v_vals: [B, Hkv, C, k] packed kept entries (channel order);
        k_bits, v_bits: uint32[B, Hkv, C, ceil(D / 32)] bitmap words.
      lengths: int32[B, Hkv]; slots [0, lengths) are attended.
      bias: optional float32[B, Hkv, C] added to the scaled logits (-1e30 masks a slot).
      scale: softmax scale (default D ** -0.5).
      value_dim: Dv, the value head dim (default D).
      block_size: tokens per inner step, a power of two >= 16 (default `DEFAULT_CONFIG`).
      num_splits: token splits per (row, head) (default: ~TARGET_PROGRAMS programs in all).
      num_warps, num_stages: Triton launch parameters (default `DEFAULT_CONFIG`).
      prefetch: 0, 1 or 2, how far ahead a step issues its loads (`_kernel`; default
        `DEFAULT_CONFIG`).
      interpret: None runs interpreted on CPU and compiled (Triton) elsewhere.
    """
    cfg = launch_config(DEFAULT_CONFIG, block_size=block_size, num_warps=num_warps,
                        num_stages=num_stages, prefetch=prefetch)
    bs = cfg["block_size"]
    if not isinstance(bs, int) or not _pow2(bs) or bs < 16:
        raise ValueError(f"block_size must be a power of two >= 16, got {bs!r}")
    check_warps_stages(cfg["num_warps"], cfg["num_stages"])
    check_choice("prefetch", cfg["prefetch"], PREFETCH)
    check_num_splits(num_splits)
    d = q.shape[-1]
    dv = d if value_dim is None else int(value_dim)
    for name, x in (("head dim", d), ("value_dim", dv)):
        if not (_pow2(x) and x >= 16):
            raise ValueError(f"{name} must be a power of two >= 16 for the kernel, got {x} "
                             "(use `reference`)")
    scale = d**-0.5 if scale is None else float(scale)
    o, m, den = _partials(
        q, k_vals, k_bits, v_vals, v_bits, lengths, bias, value_dim=dv, scale=scale,
        block_size=bs, num_splits=num_splits, num_warps=int(cfg["num_warps"]),
        num_stages=int(cfg["num_stages"]), prefetch=int(cfg["prefetch"]),
        interpret=resolve_interpret(interpret),
    )
    return combine(o, m, den, q.dtype)


def densify(vals: Array, bits: Array, d: int) -> Array:
    """(vals [..., k], uint32 words [..., ceil(d / 32)]) -> float32 [..., d] (zeros pruned)."""
    shifts = jnp.arange(WORD, dtype=jnp.uint32)
    mask = ((bits[..., None] >> shifts) & 1).reshape(bits.shape[:-1] + (-1,))[..., :d] > 0
    rank = jnp.cumsum(mask, axis=-1) - 1
    picked = jnp.take_along_axis(vals, jnp.clip(rank, 0, vals.shape[-1] - 1), axis=-1)
    return jnp.where(mask, picked.astype(jnp.float32), 0.0)


def reference(
    q: Array,
    k_vals: Array,
    k_bits: Array,
    v_vals: Array,
    v_bits: Array,
    lengths: Array,
    *,
    bias: Array | None = None,
    scale: float | None = None,
    value_dim: int | None = None,
) -> Array:
    """Plain jnp: densify, add bias, mask by lengths, float32 softmax -> [B, Hq, Dv]."""
    b, hq, h, c, d, dv = _check(q, k_vals, k_bits, v_vals, v_bits, lengths, bias, value_dim)
    keys = densify(k_vals, k_bits, d)
    values = densify(v_vals, v_bits, dv)
    scale = d**-0.5 if scale is None else scale
    qg = q.reshape(b, h, hq // h, d).astype(jnp.float32)
    s = jnp.einsum("bhgd,bhsd->bhgs", qg, keys, precision="highest") * scale
    if bias is not None:
        s = s + bias[:, :, None, :]
    valid = jnp.arange(c)[None, None, :] < lengths[:, :, None]
    s = jnp.where(valid[:, :, None], s, -jnp.inf)
    peak = jnp.max(s, axis=-1, keepdims=True)
    p = jnp.exp(s - jnp.where(jnp.isfinite(peak), peak, 0.0))
    p = jnp.where(s <= NEG / 2, 0.0, p)  # bias-masked slots contribute nothing
    den = jnp.sum(p, axis=-1, keepdims=True)
    out = jnp.einsum("bhgs,bhsd->bhgd", p, values, precision="highest")
    out = out / jnp.where(den == 0, 1.0, den)
    return out.reshape(b, hq, dv).astype(q.dtype)


def hbm_bytes(batch: int, num_kv_heads: int, tokens: int, head_dim: int, key_keep: int,
              value_keep: int, itemsize: int = 2, value_dim: int | None = None) -> int:
    """Bytes a decode step reads: packed values + bitmap words of K and V for `tokens` tokens."""
    dv = head_dim if value_dim is None else value_dim
    per = (key_keep + value_keep) * itemsize + 4 * (num_words(head_dim) + num_words(dv))
    return batch * num_kv_heads * tokens * per
