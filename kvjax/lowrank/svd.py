"""Training-free low-rank keys (and optionally values) from a per-head SVD of the prompt cache.

The baseline MatryoshkaKV is compared against: the plain truncated SVD/PCA projection, computed
per sequence, layer and KV head at prefill (as ShadowKV does online; Palu fits its projections
offline from weights instead). Sun et al., "ShadowKV" (arXiv:2410.21465); Chang et al., "Palu"
(arXiv:2407.21118). For a head with valid keys K [n, D] and K = U S V^T (V from the
eigenvectors of K^T K):

    basis P = V[:, :r]  (D x r, orthonormal columns),   coeffs = K P  (n x r)
    scores  = (q P) . coeffs  ==  q . (coeffs P^T)       (exact use of the rank-r keys)

Two key modes:
  rope="post"  SVD of the cached post-RoPE keys; attention projects the query (no
               reconstruction; the scores above).
  rope="pre"   (ShadowKV) keys are rotated back to position 0 (pre-RoPE keys are much lower
               rank), projected, and reconstructed + re-rotated by their positions when read.
With `value_rank`, values get their own basis the same way (no RoPE) and
out = (A . vcoeffs) Pv^T; otherwise values stay dense. Uncentred SVD (no mean), like the
references; tokens written later (decode) are projected onto the prompt's basis.

Storage (`SVDLayerCache`): coeffs [B, H, C, r] + basis [B, H, D, r] per head (and the same for
values with value_rank), in the cache dtype: for C tokens, (C + D) r numbers instead of C D.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from kvjax import attention as kvattention
from kvjax import cache as kvcache
from kvjax import rope
from kvjax.cache import LayerCache, register_cache_type
from kvjax.compress.base import Compressor, Observation, State, valid_slots
from kvjax.lowrank.think import LOG_COUNT, softmax_attend

Array = jax.Array

ROPE_MODES = ("post", "pre")


@struct.dataclass
class SVDLayerCache:
    """coeffs [B, H, C, r], basis [B, H, D, r]; values dense [B, H, C, Dv] or, with vbasis
    [B, H, Dv, rv], value coefficients [B, H, C, rv]. inv_freq float32[D // 2] in "pre" mode."""

    coeffs: Array
    basis: Array
    values: Array
    vbasis: Array | None
    lengths: Array
    positions: Array
    inv_freq: Array | None = None
    slot_data: dict[str, Array] = struct.field(default_factory=dict)

    @property
    def capacity(self) -> int:
        return self.coeffs.shape[2]

    @property
    def num_heads(self) -> int:
        return self.coeffs.shape[1]

    @property
    def head_dim(self) -> int:
        return self.basis.shape[2]

    @property
    def rank(self) -> int:
        return self.coeffs.shape[3]

    def _view(self) -> LayerCache:
        return LayerCache(self.coeffs, self.values, self.lengths, self.positions, self.slot_data)

    def _with(self, layer: LayerCache) -> SVDLayerCache:
        return self.replace(coeffs=layer.keys, values=layer.values, lengths=layer.lengths,
                            positions=layer.positions, slot_data=layer.slot_data)

    def write(self, keys, values, positions, num_valid=None) -> SVDLayerCache:
        k = keys.astype(jnp.float32)
        if self.inv_freq is not None:  # back to position 0 before projecting
            b, h, t, _ = keys.shape
            pos = jnp.broadcast_to(jnp.maximum(positions, 0)[:, None, :], (b, h, t))
            k = rope.rerotate(k, pos, jnp.zeros_like(pos), self.inv_freq)
        kc = project(k, self.basis)
        v = values if self.vbasis is None else project(values.astype(jnp.float32), self.vbasis)
        return self._with(kvcache.write(self._view(), kc, v, positions, num_valid))

    def grow(self, capacity: int) -> SVDLayerCache:
        return self._with(kvcache.grow(self._view(), capacity))

    def dense_keys(self) -> Array:
        """[B, H, C, D] rank-r keys as attention sees them (post-RoPE)."""
        k = jnp.einsum("bhcr,bhdr->bhcd", self.coeffs.astype(jnp.float32),
                       self.basis.astype(jnp.float32))
        if self.inv_freq is not None:
            pos = jnp.maximum(self.positions, 0)
            k = rope.rerotate(k, jnp.zeros_like(pos), pos, self.inv_freq)
        return k

    def dense_values(self) -> Array:
        if self.vbasis is None:
            return self.values
        return jnp.einsum("bhcr,bhdr->bhcd", self.values.astype(jnp.float32),
                          self.vbasis.astype(jnp.float32))

    def dense(self) -> LayerCache:
        """The rank-r cache as a dense LayerCache (the reference)."""
        return LayerCache(self.dense_keys(), self.dense_values(), self.lengths, self.positions,
                          self.slot_data)


register_cache_type(SVDLayerCache)


def project(x: Array, basis: Array) -> Array:
    """x [B, H, T, D] . basis [B, H, D, r] -> [B, H, T, r] (float32), cast to basis dtype."""
    out = jnp.einsum("bhtd,bhdr->bhtr", x.astype(jnp.float32), basis.astype(jnp.float32))
    return out.astype(basis.dtype)


def _attend(q, q_positions, layer, scale=None, sliding_window=None, impl="auto"):
    """Reference attention over an SVD cache (query projected in "post" mode)."""
    b, hq, t, d = q.shape
    if d != layer.head_dim:
        raise ValueError(f"q head dim {d} != cache head dim {layer.head_dim}")
    h = layer.num_heads
    scale = d**-0.5 if scale is None else scale
    qg = q.reshape(b, h, hq // h, t, d).astype(jnp.float32)
    if layer.inv_freq is None:
        qp = jnp.einsum("bhgtd,bhdr->bhgtr", qg, layer.basis.astype(jnp.float32))
        scores = jnp.einsum("bhgtr,bhsr->bhgts", qp, layer.coeffs.astype(jnp.float32))
    else:
        scores = jnp.einsum("bhgtd,bhsd->bhgts", qg, layer.dense_keys())
    mask = kvattention.attention_mask(q_positions, layer, sliding_window)
    log_count = layer.slot_data.get(LOG_COUNT)
    if layer.vbasis is None:
        return softmax_attend(scores * scale, mask, layer.values, log_count, q.dtype)
    out = softmax_attend(scores * scale, mask, layer.values, log_count, jnp.float32)
    out = out.reshape(b, h, (hq // h) * t, -1)
    out = jnp.einsum("bhtr,bhdr->bhtd", out, layer.vbasis.astype(jnp.float32))
    return out.reshape(b, hq, t, -1).astype(q.dtype)


kvattention.register(SVDLayerCache, _attend)


def svd_basis(x: Array, valid: Array, rank: int) -> Array:
    """float32[B, H, D, rank]: top right singular vectors of the valid rows of x [B, H, C, D].

    Computed as the top eigenvectors of the Gram matrix x^T x (D x D, `eigh`): the same vectors
    as the SVD without its C x C factor, and always a full orthonormal basis of R^D, so with
    fewer tokens than `rank` the extra columns still span directions later tokens may use.
    """
    xm = jnp.where(valid[..., None], x.astype(jnp.float32), 0.0)
    gram = jnp.einsum("bhcd,bhce->bhde", xm, xm, precision="highest")
    _, vecs = jnp.linalg.eigh(gram)  # ascending eigenvalues
    return vecs[..., ::-1][..., :rank]


def compress(cache: LayerCache, rank: int, value_rank: int | None = None,
             inv_freq: Array | None = None) -> SVDLayerCache:
    """The SVD cache of a dense layer (inv_freq given: ShadowKV-style pre-RoPE keys)."""
    valid = valid_slots(cache)
    k = cache.keys.astype(jnp.float32)
    if inv_freq is not None:
        pos = jnp.maximum(cache.positions, 0)
        k = rope.rerotate(k, pos, jnp.zeros_like(pos), inv_freq)
    basis = svd_basis(k, valid, rank).astype(cache.keys.dtype)
    coeffs = jnp.where(valid[..., None], project(k, basis), 0)
    values, vbasis = cache.values, None
    if value_rank is not None:
        vbasis = svd_basis(cache.values, valid, value_rank).astype(cache.values.dtype)
        values = jnp.where(valid[..., None], project(cache.values, vbasis), 0)
    return SVDLayerCache(
        coeffs=coeffs, basis=basis, values=values, vbasis=vbasis, lengths=cache.lengths,
        positions=cache.positions,
        inv_freq=None if inv_freq is None else jnp.asarray(inv_freq, jnp.float32),
        slot_data=dict(cache.slot_data),
    )


def _check_rank(name: str, value: Any) -> None:
    if value is not None and (
        not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1
    ):
        raise ValueError(f"{name} must be an int in [1, head_dim], got {value!r}")


@functools.cache
def svd(
    rank: int | None = None,
    rank_ratio: float | None = None,
    value_rank: int | None = None,
    rope_mode: str = "post",
) -> Compressor:
    """Low-rank keys at prefill (turns the layer into an `SVDLayerCache`).

    Args:
      rank: key rank, an int in [1, head_dim], or
      rank_ratio: rank as a fraction in (0, 1] of head_dim (rounded, >= 1); exactly one.
      value_rank: optional value rank in [1, head_dim] (default: values stay dense).
      rope_mode: "post" (SVD of cached keys) or "pre" (ShadowKV: SVD of pre-RoPE keys).
    """
    if (rank is None) == (rank_ratio is None):
        raise ValueError("give exactly one of rank (int in [1, head_dim]) or rank_ratio in (0, 1]")
    _check_rank("rank", rank)
    _check_rank("value_rank", value_rank)
    if rank_ratio is not None and (
        not isinstance(rank_ratio, (int, float)) or isinstance(rank_ratio, bool)
        or not 0 < rank_ratio <= 1
    ):
        raise ValueError(f"rank_ratio must be a float in (0, 1], got {rank_ratio!r}")
    if rope_mode not in ROPE_MODES:
        raise ValueError(f"rope_mode must be one of {ROPE_MODES}, got {rope_mode!r}")

    def prefill(cache: LayerCache, obs: Observation, state: State):
        if type(cache) is not LayerCache:
            raise TypeError(f"svd projects a dense LayerCache, got {type(cache).__name__}")
        d = cache.head_dim
        r = rank if rank is not None else max(1, round(rank_ratio * d))
        for name, v, dim in (("rank", r, d), ("value_rank", value_rank, cache.values.shape[-1])):
            if v is not None and v > dim:
                raise ValueError(f"{name} must be in [1, head_dim={dim}], got {v}")
        freq = obs.inv_freq if rope_mode == "pre" else None
        return compress(cache, r, value_rank, freq), state

    return Compressor(init=lambda cache: (), prefill=prefill, decode=lambda c, o, s: (c, s))
