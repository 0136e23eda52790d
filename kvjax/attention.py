"""Reference attention over a LayerCache (prefill and decode are the same function).

A query at position p sees slot s of KV head h iff s < lengths[b, h] and
0 <= positions[b, h, s] <= p (and p - positions < sliding_window when set). Causality therefore
follows from the stored original positions, so prefill (the chunk is written first, then
attended), decode, and compressed caches with holes all use one mask.

Merged slots: a slot that stands for N identical tokens carries `slot_data["log_count"]` =
log N, added to its logit (exact attention of N copies; see docs/design_merging.md).

Shapes: q [B, Hq, Tq, D] with Hq = G * Hkv (query head j uses KV head j // G, as in
transformers), q_positions int32[B, Tq], the cache as in `kvjax.cache`. Scores and softmax are
float32; the output has q's dtype. Rows that see no key return zeros (never NaN).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from kvjax.cache import LayerCache

Array = jax.Array


def attention_mask(
    q_positions: Array, layer: LayerCache, sliding_window: int | None = None
) -> Array:
    """bool[B, Hkv, Tq, C]: which cache slots each query may attend to."""
    slot = jnp.arange(layer.capacity)
    valid = (slot[None, None, :] < layer.lengths[:, :, None]) & (layer.positions >= 0)
    kpos = layer.positions[:, :, None, :]
    qpos = q_positions[:, None, :, None]
    mask = valid[:, :, None, :] & (kpos <= qpos)
    if sliding_window is not None:
        mask = mask & (qpos - kpos < sliding_window)
    return mask


def _grouped(q: Array, num_kv_heads: int) -> Array:
    b, hq, t, d = q.shape
    if hq % num_kv_heads:
        raise ValueError(f"query heads ({hq}) must be a multiple of KV heads ({num_kv_heads})")
    return q.reshape(b, num_kv_heads, hq // num_kv_heads, t, d)


def masked_softmax(scores: Array, mask: Array) -> Array:
    """float32 softmax over the last axis of `scores` where `mask`; rows with no key give 0."""
    scores = jnp.where(mask, scores, -jnp.inf)
    peak = jnp.max(scores, axis=-1, keepdims=True)
    peak = jnp.where(jnp.isfinite(peak), peak, 0.0)
    p = jnp.exp(scores - peak)
    denom = jnp.sum(p, axis=-1, keepdims=True)
    return p / jnp.where(denom == 0, 1.0, denom)


def attention_probs(
    q: Array,
    q_positions: Array,
    layer: LayerCache,
    scale: float | None = None,
    sliding_window: int | None = None,
) -> Array:
    """float32[B, Hq, Tq, C]: softmax attention probabilities of queries over the cache slots."""
    b, hq, t, d = q.shape
    scale = d**-0.5 if scale is None else scale
    qg = _grouped(q, layer.num_heads)
    scores = jnp.einsum(
        "bhgtd,bhsd->bhgts", qg, layer.keys, preferred_element_type=jnp.float32
    ) * scale
    log_count = layer.slot_data.get("log_count")
    if log_count is not None:  # a merged slot standing for N tokens gets + log N
        scores = scores + log_count[:, :, None, None, :].astype(jnp.float32)
    mask = attention_mask(q_positions, layer, sliding_window)[:, :, None]
    return masked_softmax(scores, mask).reshape(b, hq, t, layer.capacity)


QUERY_BLOCK = 512


def _reference_block(q, q_positions, layer, scale, sliding_window):
    b, hq, t, _ = q.shape
    probs = attention_probs(q, q_positions, layer, scale, sliding_window)
    pg = probs.reshape(b, layer.num_heads, hq // layer.num_heads, t, layer.capacity)
    out = jnp.einsum(
        "bhgts,bhsd->bhgtd", pg, layer.values.astype(jnp.float32),
        preferred_element_type=jnp.float32,
    )
    return out.reshape(b, hq, t, -1).astype(q.dtype)


def reference_attention(
    q: Array,
    q_positions: Array,
    layer: LayerCache,
    scale: float | None = None,
    sliding_window: int | None = None,
) -> Array:
    """[B, Hq, Tq, Dv] attention output; plain jnp, float32 softmax.

    Long query sets are processed QUERY_BLOCK queries at a time (`lax.map`), so the float32
    score matrix held at once is [B, Hq, QUERY_BLOCK, C] rather than [B, Hq, Tq, C].
    """
    return in_query_blocks(
        lambda qb, pb: _reference_block(qb, pb, layer, scale, sliding_window), q, q_positions)


def in_query_blocks(fn: Callable[[Array, Array], Array], q: Array, q_positions: Array) -> Array:
    """`fn(q_block, positions_block) -> [B, Hq, blk, Dv]` over QUERY_BLOCK queries at a time.

    q: [B, Hq, Tq, D], q_positions: int32[B, Tq]; one call when Tq <= QUERY_BLOCK, else a
    `lax.map` over padded blocks (padding queries get position -1). Returns [B, Hq, Tq, Dv].
    """
    b, hq, t, d = q.shape
    if t <= QUERY_BLOCK:
        return fn(q, q_positions)
    n = -(-t // QUERY_BLOCK)
    pad = n * QUERY_BLOCK - t
    qb = jnp.pad(q, ((0, 0), (0, 0), (0, pad), (0, 0)))
    qb = qb.reshape(b, hq, n, QUERY_BLOCK, d).transpose(2, 0, 1, 3, 4)
    pb = jnp.pad(q_positions, ((0, 0), (0, pad)), constant_values=-1)
    pb = pb.reshape(b, n, QUERY_BLOCK).transpose(1, 0, 2)
    out = jax.lax.map(lambda xs: fn(xs[0], xs[1]), (qb, pb))
    out = out.transpose(1, 2, 0, 3, 4).reshape(b, hq, n * QUERY_BLOCK, -1)
    return out[:, :, :t]


IMPLS = ("auto", "reference")


def kernel_platform() -> str:
    """Platform whose kernels `impl="auto"` may use ("cpu", "gpu", "tpu"); tests patch it."""
    return jax.default_backend()


def use_decode_kernel(q: Array, layer: LayerCache) -> bool:
    """Whether `impl="auto"` runs the Pallas ragged decode kernel for this call.

    Decode (Tq == 1) on a GPU, with power-of-two head dims in [16, 512] and q, keys and values
    of one dtype among bf16/fp16/fp32 (the kernel's domain); everything else, and every
    CPU call, takes the reference (TPU: `use_tpu_decode_kernel`).
    """
    from pallas_kernels import decode_attention as da

    d, dv = layer.keys.shape[-1], layer.values.shape[-1]
    return (
        kernel_platform() == "gpu"
        and q.shape[2] == 1
        and da.is_pow2(d) and 16 <= d <= 512
        and da.is_pow2(dv) and 16 <= dv <= 512
        and q.dtype == layer.keys.dtype == layer.values.dtype
        and q.dtype in da.DTYPES
    )


# `pallas_kernels.decode_attention_tpu` is compiled for TPU v4 / v5e / v6e by libtpu (ahead of
# time, on a CPU host) and checked in the Pallas TPU interpreter, but has not run or been timed
# on a TPU; decode on TPU takes the reference unless this is set.
TPU_DECODE_KERNEL = False


def use_tpu_decode_kernel(q: Array, layer: LayerCache) -> bool:
    """Whether `impl="auto"` runs the TPU ragged decode kernel: decode (Tq == 1) on a TPU where
    `TPU_DECODE_KERNEL` is set, q, keys and values of one dtype among bf16 / float32."""
    from pallas_kernels import decode_attention_tpu as dt

    return (TPU_DECODE_KERNEL and kernel_platform() == "tpu" and q.shape[2] == 1
            and dt.supported(q, layer.keys, layer.values))


def dense_attend(
    q: Array,
    q_positions: Array,
    layer: LayerCache,
    scale: float | None = None,
    sliding_window: int | None = None,
    impl: str = "auto",
) -> Array:
    """Attention over a dense LayerCache.

    impl="auto" runs `pallas_kernels.decode_attention.ragged_decode_attention` for decode
    (Tq == 1) on GPU (see `use_decode_kernel`), and `decode_attention_tpu` on TPU where
    `TPU_DECODE_KERNEL` is set, with the cache positions so the mask equals the reference's
    exactly and `slot_data["log_count"]` (merged slots) as the per-slot score bias; otherwise
    (and with impl="reference") the jnp reference.
    """
    if q.shape[-1] != layer.head_dim:
        raise ValueError(f"q head dim {q.shape[-1]} != cache head dim {layer.head_dim}")
    kernel = None
    if impl == "auto" and use_decode_kernel(q, layer):
        from pallas_kernels.decode_attention import ragged_decode_attention as kernel
    elif impl == "auto" and use_tpu_decode_kernel(q, layer):
        from pallas_kernels.decode_attention_tpu import ragged_decode_attention_tpu as kernel
    if kernel is None:
        return reference_attention(q, q_positions, layer, scale, sliding_window)
    out = kernel(
        q[:, :, 0], layer.keys, layer.values, layer.lengths,
        kv_positions=layer.positions, q_positions=q_positions[:, 0],
        kv_bias=layer.slot_data.get("log_count"), scale=scale, sliding_window=sliding_window,
    )
    return out[:, :, None]


AttendFn = Callable[..., Array]
_ATTEND: dict[type, AttendFn] = {LayerCache: dense_attend}


def register(kind: type, fn: AttendFn) -> None:
    """Registers `fn(q, q_positions, layer, scale, sliding_window, impl) -> out` for a kind."""
    _ATTEND[kind] = fn


def attend(
    q: Array,
    q_positions: Array,
    layer: Any,
    scale: float | None = None,
    sliding_window: int | None = None,
    impl: str = "auto",
) -> Array:
    """Attention of q [B, Hq, Tq, D] over any registered cache kind -> [B, Hq, Tq, Dv].

    impl: "auto" uses a Pallas kernel where one exists for the kind, backend and shape, else
    the reference; "reference" forces the plain jnp path (used on CPU and to check kernels).
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    fn = _ATTEND.get(type(layer))
    if fn is None:
        raise TypeError(f"no attention registered for cache kind {type(layer).__name__}")
    return fn(q, q_positions, layer, scale, sliding_window, impl)
