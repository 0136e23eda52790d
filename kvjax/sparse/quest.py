"""Quest: query-aware page selection for decode attention (Tang et al., ICML 2024).

The cache keeps every token; only attention is sparse. Slots are grouped in pages of
`page_size` consecutive tokens, and the cache keeps, per page and head, the element-wise
minimum and maximum of its keys (`page_min`, `page_max` [B, Hkv, C / page_size, D], key dtype:
min/max of bf16 values are exact). They are updated on every write (append), so a decode step
never rescans the cache. At decode, page p of KV head h gets the upper bound

    U_p = sum_d max(q_d * min_{p,d}, q_d * max_{p,d})  >=  q . k   for every key k in p,

(the per-query-head bounds are combined over the G query heads of the KV head by their max,
our GQA adaptation: the paper's models are MHA), the top `token_budget / page_size` pages are
selected (the page holding the newest token is always kept), and attention reads only those
pages: `pallas_kernels.block_sparse_attention.block_sparse_decode` on GPU, its jnp reference
elsewhere. On GPU the selection itself runs as two Pallas kernels
(`pallas_kernels.quest_select`: fused bounds, then a sort-free exact top-k giving ascending
page lists); elsewhere as jnp (`page_scores` matmuls, `lax.top_k`, sort). Both pick the same
pages (ties to the lower page id). Prefill (Tq > 1) stays dense, and so do the first
`dense_layers` layers (the paper keeps the first two layers dense: their attention is not
sparse).

Defaults as in the paper: page_size=16, dense_layers=2; token_budget 1024 (the paper sweeps
256-4096). Memory: the summaries add 2 / page_size of the key bytes (1/8 at 16-token pages).

    comp = kvjax.sparse.quest(token_budget=1024)
    out = kvjax.generate(model, tokens, max_new_tokens=64, compressor=comp)

`QuestLayerCache` follows the cache-kind protocol of `kvjax.cache` (capacity, lengths,
positions, write, grow; attention registered with `kvjax.attention.register`; save/restore via
`register_cache_type`). Capacities are rounded up to whole pages.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from kvjax import attention
from kvjax import cache as kvcache
from kvjax.cache import LayerCache
from kvjax.compress.base import Compressor, Observation, State

Array = jax.Array


@struct.dataclass
class QuestLayerCache(kvcache.KeysShape):
    keys: Array
    values: Array
    lengths: Array
    positions: Array
    page_min: Array
    page_max: Array
    slot_data: dict[str, Array] = struct.field(default_factory=dict)
    page_size: int = struct.field(pytree_node=False, default=16)
    token_budget: int = struct.field(pytree_node=False, default=1024)

    def __post_init__(self):
        # Static fields must stay hashable Python ints (`kvjax.cache.restore` hands back arrays).
        object.__setattr__(self, "page_size", int(self.page_size))
        object.__setattr__(self, "token_budget", int(self.token_budget))

    @property
    def num_pages(self) -> int:
        return self.capacity // self.page_size

    @property
    def max_pages(self) -> int:
        """Pages attended per head at decode: token_budget // page_size (>= 1)."""
        return max(1, min(self.token_budget // self.page_size, self.num_pages))

    def dense(self) -> LayerCache:
        return LayerCache(self.keys, self.values, self.lengths, self.positions, self.slot_data)

    def write(self, keys: Array, values: Array, positions: Array,
              num_valid: Array | None = None) -> QuestLayerCache:
        """Writes T tokens per head (as `kvjax.cache.write`) and updates the touched pages.

        A page whose first slot is at or past the old length starts fresh; otherwise the new
        tokens are folded into its min/max. Only the T written slots are touched.
        """
        b, h, t, _ = keys.shape
        if num_valid is None:
            num_valid = jnp.full((b,), t, jnp.int32)
        old = self.lengths
        new = kvcache.write(self.dense(), keys, values, positions, num_valid)
        slot = old[:, :, None] + jnp.arange(t, dtype=jnp.int32)[None, None, :]  # [B, H, T]
        ok = (jnp.arange(t)[None, None, :] < num_valid[:, None, None]) & (slot < self.capacity)
        page = slot // self.page_size
        fresh = ok & (page * self.page_size >= old[:, :, None])
        npg = self.num_pages
        bi = jnp.arange(b)[:, None, None]
        hi = jnp.arange(h)[None, :, None]
        k = keys.astype(self.page_min.dtype)
        big = jnp.asarray(jnp.inf, self.page_min.dtype)
        reset = jnp.where(fresh, page, npg)
        pmin = self.page_min.at[bi, hi, reset].set(big, mode="drop")
        pmax = self.page_max.at[bi, hi, reset].set(-big, mode="drop")
        tgt = jnp.where(ok, page, npg)
        pmin = pmin.at[bi, hi, tgt].min(k, mode="drop")
        pmax = pmax.at[bi, hi, tgt].max(k, mode="drop")
        return self.replace(keys=new.keys, values=new.values, lengths=new.lengths,
                            positions=new.positions, slot_data=new.slot_data,
                            page_min=pmin, page_max=pmax)

    def grow(self, capacity: int) -> QuestLayerCache:
        """Room for `capacity` slots per head, rounded up to whole pages."""
        if not isinstance(capacity, (int, np.integer)):
            raise TypeError(f"capacity must be an int, got {type(capacity).__name__}")
        if capacity < self.capacity:
            raise ValueError(f"capacity {capacity} is smaller than the current {self.capacity}")
        cap = -(-int(capacity) // self.page_size) * self.page_size
        if cap == self.capacity:
            return self
        dense = kvcache.grow(self.dense(), cap)
        extra = cap // self.page_size - self.num_pages
        pad = ((0, 0), (0, 0), (0, extra), (0, 0))
        return self.replace(
            keys=dense.keys, values=dense.values, lengths=dense.lengths,
            positions=dense.positions, slot_data=dense.slot_data,
            page_min=jnp.pad(self.page_min, pad, constant_values=jnp.inf),
            page_max=jnp.pad(self.page_max, pad, constant_values=-jnp.inf),
        )


kvcache.register_cache_type(QuestLayerCache)


def page_summaries(layer: LayerCache, page_size: int) -> tuple[Array, Array]:
    """(min, max) [B, Hkv, C / page_size, D] of the valid keys of each page (+-inf if none)."""
    b, h, c, d = layer.keys.shape
    valid = (jnp.arange(c)[None, None, :] < layer.lengths[:, :, None])[..., None]
    k = layer.keys.reshape(b, h, c // page_size, page_size, d)
    v = valid.reshape(b, h, c // page_size, page_size, 1)
    big = jnp.asarray(jnp.inf, layer.keys.dtype)
    return jnp.min(jnp.where(v, k, big), axis=3), jnp.max(jnp.where(v, k, -big), axis=3)


def from_layer(layer: LayerCache, *, page_size: int = 16,
               token_budget: int = 1024) -> QuestLayerCache:
    """A QuestLayerCache holding `layer`'s tokens (capacity rounded up to whole pages)."""
    if not isinstance(layer, LayerCache):
        raise TypeError(f"quest needs a dense LayerCache, got {type(layer).__name__}")
    _check_params(page_size, token_budget)
    cap = -(-layer.capacity // page_size) * page_size
    layer = kvcache.grow(layer, max(cap, page_size))
    pmin, pmax = page_summaries(layer, page_size)
    return QuestLayerCache(
        keys=layer.keys, values=layer.values, lengths=layer.lengths, positions=layer.positions,
        page_min=pmin, page_max=pmax, slot_data=layer.slot_data, page_size=int(page_size),
        token_budget=int(token_budget),
    )


def page_scores(q: Array, page_min: Array, page_max: Array, lengths: Array,
                page_size: int, impl: str = "jnp") -> Array:
    """float32[B, Hkv, NP] Quest upper bounds (max over each KV head's G query heads).

    q [B, Hq, D] (scale omitted: it does not change the ranking). Pages past the head's length
    get -inf; the page holding the newest token gets +inf (always kept). impl "jnp": two
    batched matmuls (exact for bf16 q and summaries, float32 accumulation); "pallas": the same
    bound in one fused kernel (`pallas_kernels.quest_select.page_scores`).
    """
    from pallas_kernels import quest_select as qs

    _check_impl(impl)
    if impl == "pallas":
        return qs.page_scores(q, page_min, page_max, lengths, page_size)
    return qs.reference_page_scores(q, page_min, page_max, lengths, page_size)


def select_pages(q: Array, layer: QuestLayerCache, impl: str = "jnp") -> tuple[Array, Array]:
    """(int32[B, Hkv, K] selected page ids, ascending; int32[B, Hkv] counts), K = max_pages.

    impl "jnp": `page_scores` + `lax.top_k` + sort; "pallas": the fused score kernel and the
    sort-free top-k kernel of `pallas_kernels.quest_select` (same pages; heads of more than
    `MAX_SELECT_PAGES` pages use `lax.top_k`).
    """
    from pallas_kernels import quest_select as qs

    score = page_scores(q, layer.page_min, layer.page_max, layer.lengths, layer.page_size, impl)
    k = layer.max_pages
    if impl == "pallas" and 1 << max(0, layer.num_pages - 1).bit_length() <= qs.MAX_SELECT_PAGES:
        return qs.top_pages(score, k)
    return qs.reference_top_pages(score, k)


def _check_impl(impl: str) -> None:
    if impl not in ("jnp", "pallas"):
        raise ValueError(f"impl must be 'jnp' or 'pallas', got {impl!r}")


def quest_attend(
    q: Array,
    q_positions: Array,
    layer: QuestLayerCache,
    scale: float | None = None,
    sliding_window: int | None = None,
    impl: str = "auto",
) -> Array:
    """Attention over a QuestLayerCache: dense for Tq > 1, top-k pages at decode (Tq == 1).

    impl="auto" on GPU (power-of-two head dims, one dtype among bf16/fp16/fp32) selects pages
    with the Pallas kernels of `pallas_kernels.quest_select` and attends with the block-sparse
    decode kernel (launch parameters from `quest_select.TUNED_QUEST`); on TPU where
    `kvjax.attention.TPU_DECODE_KERNEL` is set, the jnp selection and
    `block_sparse_attention_tpu`; "reference" (and any other call) the jnp selection and the
    jnp block-sparse reference.
    """
    if q.shape[-1] != layer.head_dim:
        raise ValueError(f"q head dim {q.shape[-1]} != cache head dim {layer.head_dim}")
    if q.shape[2] != 1:
        return attention.dense_attend(q, q_positions, layer.dense(), scale, sliding_window,
                                      impl)
    from pallas_kernels import block_sparse_attention as bsa
    from pallas_kernels import block_sparse_attention_tpu as bt
    from pallas_kernels import quest_select as qs

    kernel = impl == "auto" and attention.use_decode_kernel(q, layer.dense())
    tpu = (impl == "auto" and not kernel and attention.use_tpu_decode_kernel(q, layer.dense())
           and bt.supported(q, layer.keys, layer.values, layer.page_size))
    idx, count = select_pages(q[:, :, 0], layer, "pallas" if kernel else "jnp")
    kwargs = dict(block_size=layer.page_size, kv_positions=layer.positions,
                  q_positions=q_positions[:, 0], kv_bias=layer.slot_data.get("log_count"),
                  scale=scale, sliding_window=sliding_window)
    args = (q[:, :, 0], layer.keys, layer.values, layer.lengths, idx, count)
    if kernel:
        out = bsa.block_sparse_decode(*args, block_k=qs.TUNED_QUEST["block_k"],
                                      list_mode=qs.TUNED_QUEST["list_mode"], **kwargs)
    elif tpu:
        out = bt.block_sparse_decode_tpu(*args, **kwargs)
    else:
        out = bsa.reference_decode(*args, **kwargs)
    return out[:, :, None]


attention.register(QuestLayerCache, quest_attend)


def _check_params(page_size, token_budget):
    if not isinstance(page_size, (int, np.integer)) or page_size < 1 or page_size & (page_size - 1):
        raise ValueError(f"page_size must be a power of two, got {page_size!r}")
    if not isinstance(token_budget, (int, np.integer)) or token_budget < page_size:
        raise ValueError(
            f"token_budget must be an int >= page_size ({page_size}), got {token_budget!r}"
        )


@functools.cache
def quest(token_budget: int = 1024, page_size: int = 16, dense_layers: int = 2) -> Compressor:
    """Quest as a Compressor: after prefill, layers >= `dense_layers` become QuestLayerCaches.

    Nothing is evicted (the cache keeps every token); decode attention reads the
    `token_budget // page_size` pages with the highest upper-bound scores per KV head.
    """
    _check_params(page_size, token_budget)
    if not isinstance(dense_layers, (int, np.integer)) or dense_layers < 0:
        raise ValueError(f"dense_layers must be an int >= 0, got {dense_layers!r}")

    def prefill(cache, obs: Observation, state: State):
        if obs.layer < dense_layers or isinstance(cache, QuestLayerCache):
            return cache, state
        return from_layer(cache, page_size=page_size, token_budget=token_budget), state

    def decode(cache, obs: Observation, state: State):
        return cache, state  # summaries are kept current by QuestLayerCache.write

    return Compressor(init=lambda cache: (), prefill=prefill, decode=decode)
