"""Head-wise pooled cache: heads of a layer keep different numbers of tokens, stored densely.

A dense `LayerCache` gives every KV head the same static capacity, so a layer whose heads keep
k_0, ..., k_{H-1} tokens (AdaKV, CAKE) would pay H * max_h k_h slots. `HeadwiseLayerCache`
stores one flat token pool per layer and row instead; head h owns the contiguous region
[offsets[b, h], offsets[b, h] + capacities[b, h]) of the pool, and its valid tokens are the
first lengths[b, h] slots of that region. Regions are laid out in head order with no gaps
(offsets = exclusive cumsum of capacities); pool slots after the last region are unused slack.

Shapes (B batch, Hkv KV heads, P static pool size, D head dim):
  keys, values   [B, P, D]         keys post-RoPE, like LayerCache
  offsets        int32[B, Hkv]     start of each head's region
  capacities     int32[B, Hkv]     region size of each head (its kept tokens + decode room)
  lengths        int32[B, Hkv]     valid tokens per head (<= capacities)
  positions      int32[B, P]       original token position of each slot; -1 for empty slots
  slot_data      {name: [B, P, ...]} per-slot method data, moved along like the keys

Memory: P * (2 * D * itemsize + 4) + 3 * 4 * Hkv bytes per row, i.e. exactly the total kept
tokens of the layer plus 12 bytes per head; nothing is stored at the largest head's length.
`capacity` is P // Hkv: the head-wise cache takes the memory of a dense cache of that capacity.

Cache-kind protocol (see `kvjax.cache`): `.capacity`, `.lengths`, `.positions`, `.write`,
`.grow(capacity)` (every head gets capacity - self.capacity more slots: the pool grows by Hkv
times that and the regions move apart), attention registered with `kvjax.attention.register`,
save/restore with `kvjax.cache.register_cache_type`.

Reading it: the jnp reference (`headwise_attend`) scores the query heads of KV head h against
the whole pool and masks slots outside h's region, so it reads only the stored tokens; a kernel
reads, per (row, head), the ragged segment [offsets, offsets + lengths) (varlen attention with
per-head sequence starts).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from kvjax import attention
from kvjax.cache import LayerCache, gather, grow, register_cache_type

Array = jax.Array


def _exclusive_cumsum(x: Array) -> Array:
    return (jnp.cumsum(x, axis=-1) - x).astype(jnp.int32)


def _owner(offsets: Array, capacities: Array, pool_size: int) -> tuple[Array, Array]:
    """(int32[B, P] head owning each pool slot or -1 for slack, int32[B, P] index in region)."""
    slot = jnp.arange(pool_size, dtype=jnp.int32)[None, :, None]
    starts = offsets[:, None, :]
    head = jnp.sum(slot >= starts, axis=-1).astype(jnp.int32) - 1  # last head starting <= slot
    head = jnp.maximum(head, 0)
    off = jnp.take_along_axis(offsets, head, axis=1)
    cap = jnp.take_along_axis(capacities, head, axis=1)
    local = slot[:, :, 0] - off
    inside = local < cap
    return jnp.where(inside, head, -1), jnp.where(inside, local, 0)


@struct.dataclass
class HeadwiseLayerCache:
    keys: Array
    values: Array
    offsets: Array
    capacities: Array
    lengths: Array
    positions: Array
    slot_data: dict[str, Array] = struct.field(default_factory=dict)

    @property
    def batch(self) -> int:
        return self.keys.shape[0]

    @property
    def num_heads(self) -> int:
        return self.lengths.shape[1]

    @property
    def pool_size(self) -> int:
        return self.keys.shape[1]

    @property
    def capacity(self) -> int:
        """Average slots per head (P // Hkv): the dense capacity with the same memory."""
        return self.pool_size // self.num_heads

    @property
    def head_dim(self) -> int:
        return self.keys.shape[2]

    def slot_heads(self) -> tuple[Array, Array]:
        """(int32[B, P] owning head of each slot, -1 for slack; int32[B, P] index in region)."""
        return _owner(self.offsets, self.capacities, self.pool_size)

    def valid(self) -> Array:
        """bool[B, P]: slots holding a token."""
        head, local = self.slot_heads()
        length = jnp.take_along_axis(self.lengths, jnp.maximum(head, 0), axis=1)
        return (head >= 0) & (local < length) & (self.positions >= 0)

    def write(
        self,
        keys: Array,
        values: Array,
        positions: Array,
        num_valid: Array | None = None,
        slot_data: dict[str, Array] | None = None,
    ) -> HeadwiseLayerCache:
        """Writes T tokens per head at the end of each head's valid region.

        keys, values: [B, Hkv, T, D]; positions: int32[B, T]; num_valid: int32[B] real tokens
        per row (default T; the rest are written as empty slots past the new length). Writes
        beyond a head's region are dropped and its length saturates at its capacity, so a head
        never spills into the next head's region (see `grow`).
        """
        b, h, t, _ = keys.shape
        if h != self.num_heads:
            raise ValueError(f"keys have {h} heads, the cache has {self.num_heads}")
        if num_valid is None:
            num_valid = jnp.full((b,), t, jnp.int32)
        local = self.lengths[:, :, None] + jnp.arange(t, dtype=jnp.int32)[None, None, :]
        fits = local < self.capacities[:, :, None]
        dest = jnp.where(fits, self.offsets[:, :, None] + local, self.pool_size)  # P: dropped
        bi = jnp.arange(b)[:, None, None]
        real = jnp.arange(t)[None, :] < num_valid[:, None]
        pos = jnp.broadcast_to(jnp.where(real, positions, -1)[:, None, :], (b, h, t))
        new_data = {}
        for name, arr in self.slot_data.items():
            upd = (slot_data or {}).get(name)
            if upd is None:
                upd = jnp.zeros((b, h, t) + arr.shape[2:], arr.dtype)
            new_data[name] = arr.at[bi, dest].set(upd.astype(arr.dtype), mode="drop")
        return HeadwiseLayerCache(
            keys=self.keys.at[bi, dest].set(keys.astype(self.keys.dtype), mode="drop"),
            values=self.values.at[bi, dest].set(values.astype(self.values.dtype), mode="drop"),
            offsets=self.offsets,
            capacities=self.capacities,
            lengths=jnp.minimum(self.lengths + num_valid[:, None], self.capacities).astype(
                jnp.int32
            ),
            positions=self.positions.at[bi, dest].set(pos.astype(jnp.int32), mode="drop"),
            slot_data=new_data,
        )

    def grow(self, capacity: int) -> HeadwiseLayerCache:
        """Gives every head `capacity - self.capacity` more slots (pool += Hkv x that)."""
        if not isinstance(capacity, (int, np.integer)):
            raise TypeError(f"capacity must be an int, got {type(capacity).__name__}")
        extra = int(capacity) - self.capacity
        if extra < 0:
            raise ValueError(f"capacity {capacity} is smaller than the current {self.capacity}")
        if extra == 0:
            return self
        new_pool = self.pool_size + self.num_heads * extra
        caps = self.capacities + extra
        offs = _exclusive_cumsum(caps)
        head, local = _owner(offs, caps, new_pool)
        h0 = jnp.maximum(head, 0)
        old_cap = jnp.take_along_axis(self.capacities, h0, axis=1)
        has_src = (head >= 0) & (local < old_cap)
        src = jnp.where(has_src, jnp.take_along_axis(self.offsets, h0, axis=1) + local, 0)

        def move(arr: Array, fill: Any = 0) -> Array:
            ix = src.reshape(src.shape + (1,) * (arr.ndim - 2))
            taken = jnp.take_along_axis(arr, ix, axis=1)
            ok = has_src.reshape(has_src.shape + (1,) * (arr.ndim - 2))
            return jnp.where(ok, taken, jnp.asarray(fill, arr.dtype))

        return HeadwiseLayerCache(
            keys=move(self.keys),
            values=move(self.values),
            offsets=offs,
            capacities=caps.astype(jnp.int32),
            lengths=self.lengths,
            positions=move(self.positions, -1),
            slot_data={n: move(a) for n, a in self.slot_data.items()},
        )

    def to_dense(self, capacity: int | None = None) -> LayerCache:
        """The equivalent dense LayerCache [B, Hkv, capacity, D] (default capacity: P).

        Head h's tokens keep their region order at slots [0, lengths); heads longer than
        `capacity` are truncated. A reference and debugging view: it allocates H x capacity.
        """
        cap = self.pool_size if capacity is None else int(capacity)
        j = jnp.arange(cap, dtype=jnp.int32)[None, None, :]
        inside = j < jnp.minimum(self.lengths, self.capacities)[:, :, None]
        src = jnp.where(inside, self.offsets[:, :, None] + j, 0)  # [B, H, cap]
        b, h = self.lengths.shape

        def take(arr: Array, fill: Any = 0) -> Array:
            flat = src.reshape(b, h * cap)
            ix = flat.reshape(flat.shape + (1,) * (arr.ndim - 2))
            out = jnp.take_along_axis(arr, ix, axis=1).reshape((b, h, cap) + arr.shape[2:])
            ok = inside.reshape(inside.shape + (1,) * (arr.ndim - 2))
            return jnp.where(ok, out, jnp.asarray(fill, arr.dtype))

        return LayerCache(
            keys=take(self.keys),
            values=take(self.values),
            lengths=jnp.minimum(self.lengths, cap).astype(jnp.int32),
            positions=take(self.positions, -1),
            slot_data={n: take(a) for n, a in self.slot_data.items()},
        )


register_cache_type(HeadwiseLayerCache)


# --- converters -----------------------------------------------------------------------------


def from_mask(layer: LayerCache, keep: Array, pool_size: int) -> HeadwiseLayerCache:
    """Packs the slots `keep` (bool[B, Hkv, C]) of each head of a dense cache into a pool.

    Only valid slots are kept. Head h's kept tokens go, in slot order, to its region; regions
    are exactly as large as the kept counts (use `grow` for decode room). `pool_size` (static)
    must hold every row's total kept count; tokens past it (in head-major order) are dropped
    and not counted, so the result is always consistent.
    """
    if not isinstance(layer, LayerCache):
        raise TypeError(f"layer must be a LayerCache, got {type(layer).__name__}")
    if not isinstance(pool_size, (int, np.integer)) or pool_size < 1:
        raise ValueError(f"pool_size must be a positive int, got {pool_size!r}")
    b, h, c = layer.positions.shape
    if keep.shape != (b, h, c):
        raise ValueError(f"keep must have shape {(b, h, c)}, got {keep.shape}")
    slot = jnp.arange(c)[None, None, :]
    valid = (slot < layer.lengths[:, :, None]) & (layer.positions >= 0)
    keep = (keep & valid).reshape(b, h * c)
    dest = jnp.cumsum(keep, axis=1) - 1  # head-major order: regions come out in head order
    keep = keep & (dest < pool_size)
    dest = jnp.where(keep, dest, pool_size).astype(jnp.int32)
    counts = jnp.sum(keep.reshape(b, h, c), axis=2).astype(jnp.int32)
    bi = jnp.arange(b)[:, None]

    def pack(arr: Array, fill: Any = 0) -> Array:
        flat = arr.reshape((b, h * c) + arr.shape[3:])
        out = jnp.full((b, pool_size) + arr.shape[3:], fill, arr.dtype)
        return out.at[bi, dest].set(flat, mode="drop")

    return HeadwiseLayerCache(
        keys=pack(layer.keys),
        values=pack(layer.values),
        offsets=_exclusive_cumsum(counts),
        capacities=counts,
        lengths=counts,
        positions=pack(layer.positions, -1),
        slot_data={n: pack(a) for n, a in layer.slot_data.items()},
    )


def dense_from_mask(layer: LayerCache, keep: Array, capacity: int) -> LayerCache:
    """The dense counterpart of `from_mask`: kept valid slots, in slot order, per head.

    Returns a LayerCache of static `capacity` (padded with empty slots when the input is
    smaller); heads keeping more than `capacity` slots keep their first `capacity` ones.
    """
    if not isinstance(capacity, (int, np.integer)) or capacity < 1:
        raise ValueError(f"capacity must be a positive int, got {capacity!r}")
    c = layer.capacity
    slot = jnp.arange(c)[None, None, :]
    keep = keep & (slot < layer.lengths[:, :, None]) & (layer.positions >= 0)
    k = min(int(capacity), c)
    order = jnp.argsort(~keep, axis=-1, stable=True)[..., :k].astype(jnp.int32)
    out = gather(layer, order, jnp.minimum(jnp.sum(keep, axis=-1), k))
    return grow(out, int(capacity))


def from_indices(
    layer: LayerCache, idx: Array, counts: Array, pool_size: int
) -> HeadwiseLayerCache:
    """Keeps, per head, the slots idx[b, h, :counts[b, h]] (int32[B, Hkv, K], int32[B, Hkv]).

    The kept tokens are stored in slot order (not in the order of `idx`). See `from_mask`.
    """
    b, h, k = idx.shape
    c = layer.capacity
    use = jnp.arange(k)[None, None, :] < counts[:, :, None]
    target = jnp.where(use, jnp.clip(idx, 0, c - 1), c)  # c: dropped
    keep = jnp.zeros((b, h, c), bool).at[
        jnp.arange(b)[:, None, None], jnp.arange(h)[None, :, None], target
    ].set(True, mode="drop")
    return from_mask(layer, keep, pool_size)


# --- attention -------------------------------------------------------------------------------


def attention_mask(
    q_positions: Array, layer: HeadwiseLayerCache, sliding_window: int | None = None
) -> Array:
    """bool[B, Hkv, Tq, P]: which pool slots each query of each KV head may attend to."""
    head, _ = layer.slot_heads()
    mine = (head[:, None, :] == jnp.arange(layer.num_heads)[None, :, None]) & layer.valid()[
        :, None, :
    ]
    kpos = layer.positions[:, None, None, :]
    qpos = q_positions[:, None, :, None]
    mask = mine[:, :, None, :] & (kpos <= qpos)
    if sliding_window is not None:
        mask = mask & (qpos - kpos < sliding_window)
    return mask


def attention_probs(
    q: Array,
    q_positions: Array,
    layer: HeadwiseLayerCache,
    scale: float | None = None,
    sliding_window: int | None = None,
) -> Array:
    """float32[B, Hq, Tq, P]: softmax probabilities of each query head over the pool slots."""
    b, hq, t, d = q.shape
    h = layer.num_heads
    if hq % h:
        raise ValueError(f"query heads ({hq}) must be a multiple of KV heads ({h})")
    scale = d**-0.5 if scale is None else scale
    qg = q.reshape(b, h, hq // h, t, d)
    scores = jnp.einsum(
        "bhgtd,bpd->bhgtp", qg, layer.keys, preferred_element_type=jnp.float32
    ) * scale
    mask = attention_mask(q_positions, layer, sliding_window)[:, :, None]
    return attention.masked_softmax(scores, mask).reshape(b, hq, t, layer.pool_size)


def _reference_block(q, q_positions, layer, scale, sliding_window):
    b, hq, t, _ = q.shape
    probs = attention_probs(q, q_positions, layer, scale, sliding_window)
    out = jnp.einsum(
        "bqtp,bpd->bqtd", probs, layer.values.astype(jnp.float32),
        preferred_element_type=jnp.float32,
    )
    return out.astype(q.dtype)


def reference_attention(
    q: Array,
    q_positions: Array,
    layer: HeadwiseLayerCache,
    scale: float | None = None,
    sliding_window: int | None = None,
) -> Array:
    """[B, Hq, Tq, Dv]: plain jnp attention over the pool, float32 softmax.

    Same semantics as `kvjax.attention.reference_attention` on the equivalent dense cache
    (`to_dense`); long query sets run `attention.QUERY_BLOCK` queries at a time.
    """
    return attention.in_query_blocks(
        lambda qb, pb: _reference_block(qb, pb, layer, scale, sliding_window), q, q_positions)


def headwise_attend(
    q: Array,
    q_positions: Array,
    layer: HeadwiseLayerCache,
    scale: float | None = None,
    sliding_window: int | None = None,
    impl: str = "auto",
) -> Array:
    """Attention over a HeadwiseLayerCache (registered with `kvjax.attention.register`).

    impl="auto" runs the Pallas ragged decode kernel over the pool (per-head `offsets`) for
    decode on GPU, gated like dense caches (`kvjax.attention.use_decode_kernel`).
    """
    if q.shape[-1] != layer.head_dim:
        raise ValueError(f"q head dim {q.shape[-1]} != cache head dim {layer.head_dim}")
    if impl == "auto" and attention.use_decode_kernel(q, layer):
        from pallas_kernels.decode_attention import ragged_decode_attention

        out = ragged_decode_attention(
            q[:, :, 0], layer.keys, layer.values, layer.lengths, offsets=layer.offsets,
            kv_positions=layer.positions, q_positions=q_positions[:, 0],
            kv_bias=layer.slot_data.get("log_count"), scale=scale, sliding_window=sliding_window,
        )
        return out[:, :, None]
    return reference_attention(q, q_positions, layer, scale, sliding_window)


attention.register(HeadwiseLayerCache, headwise_attend)
