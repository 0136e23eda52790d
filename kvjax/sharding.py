"""Scale-out with JAX's own sharding: a (`data`, `model`) device mesh, PartitionSpecs for model
params and every cache kind, and the helpers data-parallel training needs.

Partitioning (Megatron-style tensor parallelism, Shoeybi et al. 2019, expressed as GSPMD
shardings that XLA partitions; nothing here launches or communicates by hand):

  params (nnx.Linear kernels are [in, out])
    q/k/v_proj.kernel   [E, H*D]  P(None, "model")   heads split over `model` (column parallel)
    q/k/v_proj.bias     [H*D]     P("model")
    o_proj.kernel       [Hq*D, E] P("model", None)   row parallel: one all-reduce per block
    gate/up_proj.kernel [E, F]    P(None, "model")   MLP hidden split over `model`
    down_proj.kernel    [F, E]    P("model", None)   row parallel: one all-reduce per block
    lm_head.kernel      [E, V]    P(None, "model")   vocab-parallel logits (if V % model == 0)
    everything else (embedding, norms, o/down biases)  replicated
  caches (any kind: each array leaf whose leading dims are the kind's `lengths.shape`)
    [B, Hkv, ...]  P("data", "model")    batch over `data`, KV heads over `model`
    [B, ...]       P("data")             e.g. KVCache.next_position, KIVI's quant_positions
                                         shared by the heads [B, 1, N] (replicated over model)
    other          replicated
  inputs
    tokens [B, T] P("data", None); lengths [B] P("data")

Query heads are head-major (`Hq = Hkv * G`, query head j reads KV head j // G), so splitting
q_proj's output and the KV heads into the same number of contiguous blocks keeps every GQA group
on one device: attention and per-head compressors need no communication (docs/scaling.md
lists the ops that would add some).

    mesh = kvjax.sharding.make_mesh(data=2, model=4)          # 8 devices
    model = kvjax.sharding.shard_params(model, mesh)          # once
    out = kvjax.generate(model, tokens, 64, compressor, mesh=mesh)
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from kvjax.cache import KVCache
from kvjax.compress.base import Observation
from kvjax.models.llama import Llama, LlamaConfig

DATA = "data"
MODEL = "model"
AXES = (DATA, MODEL)

# Collective ops in compiled (post-SPMD-partitioning) HLO text.
COLLECTIVES = ("all-reduce", "all-gather", "all-to-all", "collective-permute", "reduce-scatter",
               "collective-broadcast", "ragged-all-to-all")

# --- mesh ---------------------------------------------------------------------------------


def make_mesh(data: int | None = None, model: int = 1, *, devices: Any = None) -> Mesh:
    """A 2-D `Mesh` with axes ("data", "model") of shape (data, model).

    Args:
      data: size of the data-parallel axis; None uses all devices left after `model`.
      model: size of the tensor-parallel axis (must divide the KV heads, see `check_mesh`).
      devices: the devices to use (default `jax.devices()`, every device of every host).
    Axes are `AxisType.Auto` (GSPMD propagation), the same on every jax version.
    """
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    if not isinstance(model, (int, np.integer)) or model < 1:
        raise ValueError(f"model must be a positive int, got {model!r}")
    if data is None:
        if n % model:
            raise ValueError(f"model={model} does not divide the {n} devices")
        data = n // model
    if not isinstance(data, (int, np.integer)) or data < 1:
        raise ValueError(f"data must be a positive int or None, got {data!r}")
    if data * model != n:
        raise ValueError(f"mesh shape data*model = {data}*{model} = {data * model} must equal "
                         f"the number of devices ({n})")
    return jax.make_mesh((int(data), int(model)), AXES, axis_types=(AxisType.Auto,) * 2,
                         devices=devices)


def mesh_from_config(config: Any) -> Mesh:
    """A mesh from a config with optional fields `data` (None/-1: all devices) and `model`.

    Accepts an ml_collections ConfigDict, a dict, or any object with those attributes, e.g.
    `configs/x.py: config.mesh = ConfigDict(dict(data=-1, model=8))`.
    """
    get = config.get if isinstance(config, Mapping) or hasattr(config, "get") else (
        lambda k, d=None: getattr(config, k, d))
    data, model = get("data", None), get("model", 1)
    data = None if data is None or data == -1 else data
    return make_mesh(data, 1 if model is None else model)


def _axis(mesh: Mesh, name: str) -> int:
    return int(dict(mesh.shape).get(name, 1))


def check_mesh(mesh: Any, config: LlamaConfig | None = None, batch: int | None = None) -> None:
    """Raises ValueError/TypeError unless `mesh` can shard this model config and batch."""
    if not isinstance(mesh, Mesh):
        raise TypeError(f"mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}")
    if tuple(mesh.axis_names) != AXES:
        raise ValueError(f"mesh axes must be {AXES}, got {tuple(mesh.axis_names)} "
                         "(use kvjax.sharding.make_mesh)")
    m = _axis(mesh, MODEL)
    if config is not None:
        for name in ("num_key_value_heads", "num_attention_heads", "intermediate_size"):
            value = getattr(config, name)
            if value % m:
                raise ValueError(f"mesh axis 'model' of size {m} must divide {name} ({value}); "
                                 f"use a model axis in {_divisors(value)}")
    if batch is not None and batch % _axis(mesh, DATA):
        d = _axis(mesh, DATA)
        raise ValueError(f"mesh axis 'data' of size {d} must divide the batch size ({batch}); "
                         f"pad the batch to a multiple of {d}")


def _divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


# --- params -------------------------------------------------------------------------------

_COLUMN = re.compile(r"(q_proj|k_proj|v_proj|gate_proj|up_proj)\.(kernel|bias)$")
_ROW = re.compile(r"(o_proj|down_proj)\.kernel$")


def param_spec(name: str, shape: tuple[int, ...], model_size: int) -> P:
    """PartitionSpec of one parameter from its dotted path (e.g. 'layers.0.mlp.up_proj.kernel').

    Dimensions that `model_size` does not divide stay replicated.
    """
    def split(dim: int) -> P:
        if shape[dim] % model_size:
            return P()
        return P(*([None] * dim + [MODEL] + [None] * (len(shape) - dim - 1)))

    if _COLUMN.search(name) or name.endswith("lm_head.kernel"):
        return split(len(shape) - 1)
    if _ROW.search(name):
        return split(0)
    return P()


def _path_name(path: tuple) -> str:
    parts = []
    for key in path:
        if isinstance(key, jax.tree_util.GetAttrKey) and key.name == "value":
            continue
        parts.append(str(getattr(key, "key", getattr(key, "name", getattr(key, "idx", key)))))
    return ".".join(parts)


def param_shardings(model: Llama, mesh: Mesh) -> nnx.State:
    """`nnx.state(model)` with a NamedSharding in place of every array (see the module doc)."""
    m = _axis(mesh, MODEL)
    return jax.tree_util.tree_map_with_path(
        lambda path, x: NamedSharding(mesh, param_spec(_path_name(path), x.shape, m)),
        nnx.state(model),
    )


def shard_params(model: Llama, mesh: Mesh) -> Llama:
    """A copy of `model` with its params placed on `mesh` (tensor parallel over "model").

    Arrays already placed this way are not copied, so calling it again is cheap.
    """
    check_mesh(mesh, model.config)
    graphdef, state = nnx.split(model)
    return nnx.merge(graphdef, jax.device_put(state, param_shardings(model, mesh)))


def init_sharded(make_model: Callable[[], Llama], mesh: Mesh) -> Llama:
    """Builds `make_model()` with every param created directly in its shard (no host copy).

    For models too large for one device or the host, e.g.
    `init_sharded(lambda: Llama(config, rngs=nnx.Rngs(0), dtype=jnp.bfloat16), mesh)`.
    """
    abstract = nnx.eval_shape(make_model)
    check_mesh(mesh, abstract.config)
    graphdef, _ = nnx.split(abstract)
    shardings = param_shardings(abstract, mesh)
    state = jax.jit(lambda: nnx.state(make_model()), out_shardings=shardings)()
    return nnx.merge(graphdef, state)


# --- caches -------------------------------------------------------------------------------


def _leaf_spec(x: Any, lead: tuple[int, ...]) -> P:
    shape = np.shape(x)
    if len(shape) >= 2 and tuple(shape[:2]) == lead:
        return P(DATA, MODEL)
    if len(shape) >= 1 and shape[0] == lead[0]:
        return P(DATA)
    return P()


def cache_specs(cache: Any) -> Any:
    """PartitionSpecs (same pytree) for a KVCache or one layer cache of any kind.

    A layer cache's arrays laid out [B, Hkv, ...] (its `lengths.shape` leads) get
    P("data", "model"), arrays [B, ...] get P("data"), others are replicated.
    """
    if isinstance(cache, KVCache):
        return KVCache(layers=tuple(cache_specs(layer) for layer in cache.layers),
                       next_position=P(DATA))
    lengths = getattr(cache, "lengths", None)
    if lengths is None or len(np.shape(lengths)) != 2:
        raise TypeError(f"cache must be a KVCache or a layer cache with lengths [B, Hkv], got "
                        f"{type(cache).__name__}")
    lead = tuple(np.shape(lengths))
    return jax.tree.map(lambda x: _leaf_spec(x, lead), cache)


def cache_shardings(cache: Any, mesh: Mesh) -> Any:
    """NamedShardings (same pytree) for `cache` on `mesh` (see `cache_specs`)."""
    return jax.tree.map(lambda s: NamedSharding(mesh, s), cache_specs(cache))


def shard_cache(cache: Any, mesh: Mesh) -> Any:
    """Places a cache (KVCache or layer cache) on `mesh`: batch over data, KV heads over model."""
    _check_cache(cache, mesh)
    return jax.device_put(cache, cache_shardings(cache, mesh))


def constrain_cache(cache: Any, mesh: Mesh | None) -> Any:
    """`with_sharding_constraint` of a cache inside jit (identity when `mesh` is None)."""
    if mesh is None:
        return cache
    return jax.lax.with_sharding_constraint(cache, cache_shardings(cache, mesh))


def _check_cache(cache: Any, mesh: Mesh) -> None:
    layers = cache.layers if isinstance(cache, KVCache) else (cache,)
    for layer in layers:
        b, h = np.shape(layer.lengths)
        if b % _axis(mesh, DATA) or h % _axis(mesh, MODEL):
            raise ValueError(f"mesh {dict(mesh.shape)} does not divide the cache's batch ({b}) "
                             f"and KV heads ({h}): 'data' must divide the batch, 'model' the "
                             "heads")


# --- data-parallel helpers ----------------------------------------------------------------


def shard_batch(batch: Any, mesh: Mesh, axis: int = 0, *, process_local: bool = False) -> Any:
    """Places every array of `batch` with its batch dim `axis` split over "data".

    `axis=1` suits batches with a leading gradient-accumulation axis [A, B, ...].
    process_local: False (default): `batch` is the global batch, the same on every process
      (deterministic data, e.g. `batch_fn(step)`); True (multi-host data loaders): each process
      passes only its own rows and gets the global array
      (`jax.make_array_from_process_local_data`). The two agree on a single process.
    """
    check_mesh(mesh)
    d = _axis(mesh, DATA)
    procs = jax.process_count() if process_local else 1

    def put(x: Any) -> jax.Array:
        shape = np.shape(x)
        if not -len(shape) <= axis < len(shape):
            raise ValueError(f"shard_batch: axis {axis} is out of range for a leaf of shape "
                             f"{shape}")
        rows = shape[axis] * procs
        if rows % d:
            raise ValueError(f"mesh axis 'data' of size {d} must divide the batch size ({rows}); "
                             "see pad_batch")
        spec = [None] * len(shape)
        spec[axis] = DATA
        sharding = NamedSharding(mesh, P(*spec))
        if procs > 1:
            return jax.make_array_from_process_local_data(sharding, np.asarray(x))
        return jax.device_put(x, sharding)

    return jax.tree.map(put, batch)


def pad_batch(batch: Any, mesh: Mesh, axis: int = 0) -> tuple[Any, int]:
    """Pads dim `axis` of every leaf to a multiple of the "data" axis by repeating its first row.

    Returns (padded batch, original row count): run the padded batch, keep the first rows.
    Repeating a real row keeps the padding valid input (token ids, lengths >= 1).
    """
    check_mesh(mesh)
    d = _axis(mesh, DATA)
    rows = {np.shape(x)[axis] for x in jax.tree.leaves(batch)}
    if len(rows) != 1:
        raise ValueError(f"pad_batch: leaves disagree on the batch size along axis {axis}: {rows}")
    (n,) = rows
    extra = -n % d

    def pad(x: Any) -> Any:
        if not extra:
            return x
        first = np.take(np.asarray(x), [0] * extra, axis=axis)
        return np.concatenate([np.asarray(x), first], axis=axis)

    return jax.tree.map(pad, batch), n


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Places every array of `tree` (params, optimizer state, an nnx Module) on every device."""
    sharding = NamedSharding(mesh, P())
    if isinstance(tree, nnx.Module):
        graphdef, state = nnx.split(tree)
        return nnx.merge(graphdef, jax.device_put(state, sharding))
    return jax.device_put(tree, sharding)


# --- compressor checks ----------------------------------------------------------------------


def shard_observation(obs: Observation, mesh: Mesh) -> Observation:
    """Places an Observation's arrays as inside sharded prefill: queries [B, Hq, T, D] over
    ("data", "model") (head-major, so each device holds the query heads of its KV heads),
    query_positions and hidden over "data", inv_freq replicated."""
    heads, rows = NamedSharding(mesh, P(DATA, MODEL)), NamedSharding(mesh, P(DATA))
    return obs._replace(
        queries=jax.device_put(obs.queries, heads),
        raw_queries=jax.device_put(obs.raw_queries, heads),
        query_positions=jax.device_put(obs.query_positions, rows),
        hidden=jax.device_put(obs.hidden, rows),
        inv_freq=jax.device_put(obs.inv_freq, NamedSharding(mesh, P())),
    )



def collectives(fn: Callable[..., Any], *args: Any) -> dict[str, int]:
    """{op: count} of the cross-device collectives in `jax.jit(fn)(*args)`'s compiled HLO.

    Only the jax.Array leaves of `args` are traced (their shardings decide the partitioning, so
    place them on a mesh, e.g. `shard_cache`, `shard_observation`); other leaves (an
    Observation's layer index, scale, ...) stay static Python values. A per-head compressor
    must give {} (no communication).
    """
    leaves, treedef = jax.tree.flatten(args)
    is_array = [isinstance(x, jax.Array) for x in leaves]

    def traced(*arrays: jax.Array) -> Any:
        it = iter(arrays)
        full = [next(it) if a else x for a, x in zip(is_array, leaves)]
        return fn(*jax.tree.unflatten(treedef, full))

    arrays = [x for a, x in zip(is_array, leaves) if a]
    text = jax.jit(traced).lower(*arrays).compile().as_text()
    found = {}
    for op in COLLECTIVES:
        n = len(re.findall(rf"\b{op}(?:-start)?\(", text))
        if n:
            found[op] = n
    return found
