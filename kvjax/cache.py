"""KV-cache pytrees.

A `LayerCache` holds one layer's keys and values with per-head valid lengths and the original
token position of every slot, so head-wise budgets and evicted (non-contiguous) caches are
native. A `KVCache` is one `LayerCache` per layer (capacities may differ per layer) plus the
position the next token of each row gets.

Shapes (B batch, Hkv key/value heads, C static capacity, D head dim):
  keys, values   [B, Hkv, C, D]   keys are stored post-RoPE
  lengths        int32[B, Hkv]    slots [0, lengths) are valid, per head
  positions      int32[B, Hkv, C] original token index of each slot; -1 for empty slots
  slot_data      {name: [B, Hkv, C, ...]} per-slot method data (e.g. H2O scores); gathered,
                 grown and written together with the keys (new slots get zeros).

Other cache kinds (quantized, head-wise pooled, low-rank, sparse) are flax.struct dataclasses
with the same role. The model and `generate` use only this protocol, so a new kind never
touches them:
  .capacity, .lengths, .positions          token slots per head, valid counts, positions
  .write(keys, values, positions, num_valid) -> same kind      (see `write` below)
  .grow(capacity) -> same kind                                  (room for decode appends)
  kvjax.attention.register(kind, attend_fn)                     (how queries read it)
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

Array = jax.Array


class KeysShape:
    """Shape properties of a cache kind whose `keys` array is [B, Hkv, C, D] (LayerCache,
    QuestLayerCache, LowRankLayerCache with its own head_dim): batch, num_heads, capacity,
    head_dim."""

    keys: Array

    @property
    def batch(self) -> int:
        return self.keys.shape[0]

    @property
    def num_heads(self) -> int:
        return self.keys.shape[1]

    @property
    def capacity(self) -> int:
        return self.keys.shape[2]

    @property
    def head_dim(self) -> int:
        return self.keys.shape[3]


@struct.dataclass
class LayerCache(KeysShape):
    keys: Array
    values: Array
    lengths: Array
    positions: Array
    slot_data: dict[str, Array] = struct.field(default_factory=dict)


@struct.dataclass
class KVCache:
    layers: tuple[Any, ...]
    next_position: Array  # int32[B]: position the next token of each row gets

    @property
    def num_layers(self) -> int:
        return len(self.layers)


def init_layer(
    batch: int,
    num_heads: int,
    capacity: int,
    head_dim: int,
    dtype: Any = jnp.float32,
    value_dim: int | None = None,
) -> LayerCache:
    """An empty LayerCache of static `capacity` slots per head."""
    for name, v in (("batch", batch), ("num_heads", num_heads), ("head_dim", head_dim)):
        if int(v) < 1:
            raise ValueError(f"{name} must be >= 1, got {v}")
    if int(capacity) < 0:
        raise ValueError(f"capacity must be >= 0, got {capacity}")
    value_dim = head_dim if value_dim is None else value_dim
    return LayerCache(
        keys=jnp.zeros((batch, num_heads, capacity, head_dim), dtype),
        values=jnp.zeros((batch, num_heads, capacity, value_dim), dtype),
        lengths=jnp.zeros((batch, num_heads), jnp.int32),
        positions=jnp.full((batch, num_heads, capacity), -1, jnp.int32),
    )


def init(
    num_layers: int,
    batch: int,
    num_heads: int,
    capacity: int | Sequence[int],
    head_dim: int,
    dtype: Any = jnp.float32,
) -> KVCache:
    """An empty KVCache; `capacity` is one int or one per layer."""
    caps = [capacity] * num_layers if isinstance(capacity, int) else list(capacity)
    if len(caps) != num_layers:
        raise ValueError(f"capacity has {len(caps)} entries, expected num_layers={num_layers}")
    layers = tuple(init_layer(batch, num_heads, c, head_dim, dtype) for c in caps)
    return KVCache(layers=layers, next_position=jnp.zeros((batch,), jnp.int32))


def _slot_index(lengths: Array, steps: int) -> Array:
    """[B, H, steps] slot index lengths + t."""
    return lengths[:, :, None] + jnp.arange(steps, dtype=jnp.int32)[None, None, :]


def write(
    layer: LayerCache,
    keys: Array,
    values: Array,
    positions: Array,
    num_valid: Array | None = None,
    slot_data: dict[str, Array] | None = None,
) -> LayerCache:
    """Writes T tokens per head at each head's current length.

    Args:
      layer: the cache.
      keys, values: [B, Hkv, T, D] new entries.
      positions: int32[B, T] original positions of the new tokens.
      num_valid: int32[B] how many of the T tokens of each row are real (default T); the rest
        are written as empty slots (position -1) beyond the new length, so later writes
        overwrite them.
      slot_data: optional per-slot data for the new tokens {name: [B, Hkv, T, ...]}; names the
        cache holds but this omits get zeros.

    Writes past the capacity are dropped and the length saturates at the capacity: callers size
    capacities statically (prefill and generate do).

    Other cache kinds implement this as a method `layer.write(keys, values, positions,
    num_valid)`; this function forwards to it.
    """
    if not isinstance(layer, LayerCache):
        return layer.write(keys, values, positions, num_valid)
    b, h, t, _ = keys.shape
    if num_valid is None:
        num_valid = jnp.full((b,), t, jnp.int32)
    slot = _slot_index(layer.lengths, t)
    bi = jnp.arange(b)[:, None, None]
    hi = jnp.arange(h)[None, :, None]
    valid = jnp.arange(t)[None, :] < num_valid[:, None]  # [B, T]
    pos = jnp.where(valid, positions, -1).astype(jnp.int32)
    pos = jnp.broadcast_to(pos[:, None, :], (b, h, t))
    new_data = {}
    for name, arr in layer.slot_data.items():
        upd = (slot_data or {}).get(name)
        if upd is None:
            upd = jnp.zeros((b, h, t) + arr.shape[3:], arr.dtype)
        new_data[name] = arr.at[bi, hi, slot].set(upd.astype(arr.dtype), mode="drop")
    return LayerCache(
        keys=layer.keys.at[bi, hi, slot].set(keys.astype(layer.keys.dtype), mode="drop"),
        values=layer.values.at[bi, hi, slot].set(values.astype(layer.values.dtype), mode="drop"),
        lengths=jnp.minimum(layer.lengths + num_valid[:, None], layer.capacity).astype(jnp.int32),
        positions=layer.positions.at[bi, hi, slot].set(pos, mode="drop"),
        slot_data=new_data,
    )


def append(layer: LayerCache, keys: Array, values: Array, position: Array) -> LayerCache:
    """Decode step: writes one token per head at that head's length.

    keys, values: [B, Hkv, D]; position: int32[B].
    """
    return write(layer, keys[:, :, None], values[:, :, None], position[:, None])


def gather(layer: LayerCache, idx: Array, lengths: Array | None = None) -> LayerCache:
    """Keeps the slots `idx` (int32[B, Hkv, K]) of each head, in that order.

    The result has capacity K. `lengths` (int32[B, Hkv], default K, clipped to [0, K]) says how
    many leading entries of `idx` are valid; slots past it are marked empty (position -1).
    """
    b, h, k = idx.shape
    if lengths is None:
        lengths = jnp.full((b, h), k, jnp.int32)
    lengths = jnp.clip(lengths, 0, k).astype(jnp.int32)
    idx = jnp.clip(idx, 0, max(layer.capacity - 1, 0))

    def take(arr: Array) -> Array:
        ix = idx.reshape(idx.shape + (1,) * (arr.ndim - 3))
        return jnp.take_along_axis(arr, ix, axis=2)

    valid = jnp.arange(k)[None, None, :] < lengths[:, :, None]
    return LayerCache(
        keys=take(layer.keys),
        values=take(layer.values),
        lengths=lengths,
        positions=jnp.where(valid, take(layer.positions), -1),
        slot_data={n: take(a) for n, a in layer.slot_data.items()},
    )


def grow(layer: LayerCache, capacity: int) -> LayerCache:
    """Pads the capacity to `capacity` (>= current) with empty slots (other kinds: `.grow`)."""
    if not isinstance(layer, LayerCache):
        return layer.grow(capacity)
    extra = capacity - layer.capacity
    if extra < 0:
        raise ValueError(f"capacity {capacity} is smaller than the current {layer.capacity}")
    if extra == 0:
        return layer

    def pad(arr: Array, value: Any = 0) -> Array:
        widths = [(0, 0)] * arr.ndim
        widths[2] = (0, extra)
        return jnp.pad(arr, widths, constant_values=value)

    return LayerCache(
        keys=pad(layer.keys),
        values=pad(layer.values),
        lengths=layer.lengths,
        positions=pad(layer.positions, -1),
        slot_data={n: pad(a) for n, a in layer.slot_data.items()},
    )


def array_nbytes(x: Any) -> int:
    """Stored bytes of one array (or shape-dtype struct): sub-byte dtypes (int4) count their
    bits, as XLA packs them on GPU and TPU (numpy's itemsize would say one byte each)."""
    dt = jnp.dtype(x.dtype)
    if jnp.issubdtype(dt, jnp.integer):
        bits = jnp.iinfo(dt).bits
    elif jnp.issubdtype(dt, jnp.floating):
        bits = jnp.finfo(dt).bits
    else:
        bits = 8 * dt.itemsize
    return -(-int(np.prod(x.shape)) * bits // 8)


def nbytes(tree: Any) -> int:
    """True memory of any cache pytree: the bytes of every array it stores."""
    return sum(array_nbytes(x) for x in jax.tree.leaves(tree))


# --- save / restore -------------------------------------------------------------------------

_CACHE_TYPES: dict[str, type] = {"LayerCache": LayerCache}


def register_cache_type(cls: type) -> type:
    """Registers a layer-cache class (a flax.struct dataclass) so `restore` can rebuild it."""
    _CACHE_TYPES[cls.__name__] = cls
    return cls


def _to_tree(obj: Any) -> Any:
    if type(obj).__name__ in _CACHE_TYPES:
        return {f: _to_tree(getattr(obj, f)) for f in obj.__dataclass_fields__}
    if isinstance(obj, dict):
        return {k: _to_tree(v) for k, v in obj.items()}
    return obj


def save(path: str | os.PathLike, cache: KVCache) -> None:
    """Stores a KVCache (any registered layer-cache kinds) with orbax (tensorstore-backed)."""
    import orbax.checkpoint as ocp

    path = os.path.abspath(os.fspath(path))
    tree = {
        "layers": {str(i): _to_tree(layer) for i, layer in enumerate(cache.layers)},
        "next_position": cache.next_position,
    }
    meta = {"layer_types": [type(layer).__name__ for layer in cache.layers]}
    ckpt = ocp.StandardCheckpointer()
    ckpt.save(os.path.join(path, "arrays"), tree, force=True)
    ckpt.wait_until_finished()
    with open(os.path.join(path, "kvjax_cache.json"), "w") as f:
        json.dump(meta, f)


def restore(path: str | os.PathLike) -> KVCache:
    """Loads a KVCache written by `save`."""
    import orbax.checkpoint as ocp

    path = os.path.abspath(os.fspath(path))
    meta_file = os.path.join(path, "kvjax_cache.json")
    if not os.path.exists(meta_file):
        raise FileNotFoundError(f"{path} is not a kvjax cache directory (no kvjax_cache.json)")
    with open(meta_file) as f:
        meta = json.load(f)
    ckptr = ocp.StandardCheckpointer()
    arrays = os.path.join(path, "arrays")
    # restore onto this process's first device: a cache saved on another topology (a GPU, a
    # mesh) must load here too, not fail on the saved sharding
    local = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    meta_tree = ckptr.metadata(arrays)
    for attr in ("item_metadata", "tree"):  # (the metadata object differs across orbax versions)
        meta_tree = getattr(meta_tree, attr, meta_tree)
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=local),
                          meta_tree)
    tree = ckptr.restore(arrays, target)
    layers = []
    for i, type_name in enumerate(meta["layer_types"]):
        if type_name not in _CACHE_TYPES:
            known = sorted(_CACHE_TYPES)
            raise ValueError(f"unknown layer cache type {type_name!r}; known: {known}")
        fields = {k: jax.tree.map(jnp.asarray, v) for k, v in tree["layers"][str(i)].items()}
        layers.append(_CACHE_TYPES[type_name](**fields))
    return KVCache(layers=tuple(layers), next_position=jnp.asarray(tree["next_position"]))
