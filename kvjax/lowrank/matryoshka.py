"""MatryoshkaKV: "Adaptive KV Compression via Trainable Orthogonal Projection"
(Lin et al., 2024; arXiv:2410.14731; reference code The-kamisato/MatryoshkaKV-cache).

Per layer and KV head, an orthogonal D x D matrix U for keys and one for values, and a mean mu.
The cache stores the first r coordinates of the centred, projected vectors,

    k' = (k - mu_k) U_k[:, :r_k]   [r_k numbers per token]     v' = (v - mu_v) U_v[:, :r_v]

with keys taken after RoPE (as the reference does). Attention reads them exactly as the
rank-r reconstruction k_hat = k' U_k[:, :r]^T + mu_k would be read:

    score_ti = (q_t U_k[:, :r_k]) . k'_i + q_t . mu_k
    out_t = (A_t V') U_v[:, :r_v]^T + mu_v

(the second identity uses sum_i A_ti = 1). Any prefix of the basis is valid, so one trained
projection serves every rank, and ranks may differ per layer (`matryoshka(key_rank=[...])`).

Parameterisation: U = U0 @ cayley(X - X^T), cayley(A) = (I - A/2)^(-1) (I + A/2), where U0 is a
fixed PCA basis (eigenvectors of the key/value covariance, descending) and X a trainable D x D
matrix initialised to 0, so training starts at PCA and U stays exactly orthogonal. (The reference
trains X with U0 folded in by an inverse Cayley map; same family of matrices.) Means are trained
too, as in the reference.

Training (backbone frozen): each step samples one key rank and one value rank from
`rank_fractions` x D (reference: {32, 64, 96, 128} of 128, i.e. 1/4 .. 1) and minimises
KL(full model || model reading rank-truncated keys/values) over next-token distributions.
Untrained PCA bases (`pca_init`) are the plain PCA truncation baseline.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from kvjax import attention as kvattention
from kvjax import cache as kvcache
from kvjax import train as kvtrain
from kvjax.compress.base import Compressor, Observation
from kvjax.learned import backbone as bb

Array = jax.Array

KIND = "matryoshka"


# --- the projections ---------------------------------------------------------------------------


class Basis(nnx.Variable):
    """A fixed (not trained) variable: the PCA starting basis U0."""


def cayley(x: Array) -> Array:
    """Orthogonal matrices (I - A/2)^(-1) (I + A/2), A = x - x^T, for x [..., D, D]."""
    a = x - jnp.swapaxes(x, -1, -2)
    eye = jnp.eye(x.shape[-1], dtype=x.dtype)
    return jnp.linalg.solve(eye - 0.5 * a, eye + 0.5 * a)


class MatryoshkaProjections(nnx.Module):
    """Key and value projections of every layer and KV head.

    Variables: key_base/value_base Basis [L, Hkv, D, D]; key_skew/value_skew Param
    [L, Hkv, D, D] (zeros: U = U0); key_mean/value_mean Param [L, Hkv, D].
    """

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int):
        for name, v in (("num_layers", num_layers), ("num_kv_heads", num_kv_heads),
                        ("head_dim", head_dim)):
            kvtrain.check_int(name, v, 1)
        shape = (num_layers, num_kv_heads, head_dim, head_dim)
        eye = jnp.broadcast_to(jnp.eye(head_dim, dtype=jnp.float32), shape)
        self.key_base = Basis(eye)
        self.value_base = Basis(eye)
        self.key_skew = nnx.Param(jnp.zeros(shape, jnp.float32))
        self.value_skew = nnx.Param(jnp.zeros(shape, jnp.float32))
        self.key_mean = nnx.Param(jnp.zeros(shape[:3], jnp.float32))
        self.value_mean = nnx.Param(jnp.zeros(shape[:3], jnp.float32))
        self.num_layers = num_layers
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim

    def bases(self, layer: int) -> tuple[Array, Array]:
        """Orthogonal (U_k, U_v), each float32[Hkv, D, D]; column j is basis vector j."""
        uk = self.key_base[layer] @ cayley(self.key_skew[layer])
        uv = self.value_base[layer] @ cayley(self.value_skew[layer])
        return uk, uv


def build(config: dict[str, Any]) -> MatryoshkaProjections:
    """Fresh projections from a `component_config` dict (what `load` rebuilds before restoring)."""
    return MatryoshkaProjections(config["num_layers"], config["num_kv_heads"], config["head_dim"])


def component_config(model) -> dict[str, Any]:
    c = model.config
    return {"num_layers": c.num_hidden_layers, "num_kv_heads": c.num_key_value_heads,
            "head_dim": c.head_dim}


def defaults():
    """Training settings (the `matryoshka` section of configs/train_matryoshka.py).

    rank_fractions: the nested ranks sampled per step, as fractions of head_dim (reference
    1/4, 1/2, 3/4, 1); ce_weight: optional next-token loss weight; pca_batches: calibration
    batches for the PCA initialisation; remat: recompute attention in the backward pass.
    """
    import ml_collections

    return ml_collections.ConfigDict({"rank_fractions": (0.25, 0.5, 0.75, 1.0),
                                      "ce_weight": 0.0, "pca_batches": 8, "remat": True})


def pca_init(model, token_batches: Iterable[Any]) -> MatryoshkaProjections:
    """Projections initialised to PCA of the model's post-RoPE keys and values.

    token_batches: int[B, T] calibration batches. Bases are the covariance eigenvectors in
    descending eigenvalue order; means are the per-head means.
    """
    stats = None
    count = 0

    @jax.jit
    def moments(model, tokens):
        out = []

        def attend(layer, inputs):
            row = []
            for x in (inputs.keys, inputs.values):
                x = x.astype(jnp.float32)
                row.append((jnp.sum(x, axis=(0, 2)), jnp.einsum("bhtd,bhte->hde", x, x)))
            out.append(row)
            return bb.plain_attention(layer, inputs)

        bb.forward(model, tokens, attend)
        return out

    for tokens in token_batches:
        tokens = jnp.asarray(tokens, jnp.int32)
        m = moments(model, tokens)
        stats = m if stats is None else jax.tree.map(jnp.add, stats, m)
        count += tokens.shape[0] * tokens.shape[1]
    if stats is None:
        raise ValueError("pca_init needs at least one calibration batch")
    proj = init(model)
    for name in ("key", "value"):
        bases, means = [], []
        for layer_stats in stats:
            s, ss = layer_stats[0 if name == "key" else 1]
            mean = s / count
            cov = ss / count - mean[:, :, None] * mean[:, None, :]
            _, vecs = jnp.linalg.eigh(cov)  # ascending
            bases.append(vecs[..., ::-1])
            means.append(mean)
        getattr(proj, f"{name}_base").set_value(jnp.stack(bases).astype(jnp.float32))
        getattr(proj, f"{name}_mean").set_value(jnp.stack(means).astype(jnp.float32))
    return proj


def init(model) -> MatryoshkaProjections:
    """Identity projections for `model` (use `pca_init` to start from PCA)."""
    return build(component_config(model))


# --- training ----------------------------------------------------------------------------------


def reconstruct(x: Array, basis: Array, mean: Array, keep: Array) -> Array:
    """Rank-truncated reconstruction of x [B, Hkv, T, D]: ((x - mu) U diag(keep)) U^T + mu.

    basis: [Hkv, D, D]; mean: [Hkv, D]; keep: float32[D] 0/1 mask of the kept coordinates.
    """
    centred = x.astype(jnp.float32) - mean[None, :, None, :]
    coords = jnp.einsum("bhtd,hdr->bhtr", centred, basis) * keep
    return jnp.einsum("bhtr,hdr->bhtd", coords, basis) + mean[None, :, None, :]


def rank_choices(head_dim: int, rank_fractions: Sequence[float]) -> tuple[int, ...]:
    """Ranks round(f * head_dim) (at least 1) for the given fractions in (0, 1]."""
    for f in rank_fractions:
        kvtrain.check_float("rank fraction", f, 0.0, 1.0, low_open=True)
    return tuple(sorted({max(1, int(round(f * head_dim))) for f in rank_fractions}))


def truncated_attention(proj: MatryoshkaProjections, layer: int, inputs: bb.LayerInputs,
                        key_keep: Array, value_keep: Array):
    """A layer's attention reading rank-truncated keys and values (training path)."""
    uk, uv = proj.bases(layer)
    keys = reconstruct(inputs.keys, uk, proj.key_mean[layer], key_keep)
    values = reconstruct(inputs.values, uv, proj.value_mean[layer], value_keep)
    logits = bb.grouped_logits(inputs.queries.astype(jnp.float32), keys, inputs.scale)
    mask = bb.causal_mask(inputs.positions, inputs.window)
    return bb.softmax_attention(logits, mask, values, inputs.queries.dtype), None


@functools.cache
def loss(rank_fractions: tuple[float, ...] = (0.25, 0.5, 0.75, 1.0), ce_weight: float = 0.0,
         remat: bool = False):
    """Matryoshka distillation objective (memoised). Returns `loss_fn(proj, model, batch, rng)`.

    Each call samples a key rank and a value rank uniformly from `rank_fractions` x head_dim
    (shared by all layers and heads, as in the reference) and returns KL(teacher || student).
    remat: recompute attention in the backward pass.
    """
    if not rank_fractions:
        raise ValueError("rank_fractions must name at least one fraction in (0, 1]")
    kvtrain.check_float("ce_weight", ce_weight, 0.0)

    def loss_fn(proj: MatryoshkaProjections, model, batch, rng):
        tokens = batch["tokens"]
        ranks = jnp.asarray(rank_choices(proj.head_dim, rank_fractions), jnp.int32)
        k_rng, v_rng = jax.random.split(rng)
        key_rank = jax.random.choice(k_rng, ranks)
        value_rank = jax.random.choice(v_rng, ranks)
        dims = jnp.arange(proj.head_dim)
        key_keep = (dims < key_rank).astype(jnp.float32)
        value_keep = (dims < value_rank).astype(jnp.float32)
        teacher, _ = bb.forward(model, tokens)
        teacher = jax.lax.stop_gradient(teacher)
        student, _ = bb.forward(model, tokens, lambda layer, inputs: truncated_attention(
            proj, layer, inputs, key_keep, value_keep), remat=remat)
        kl = bb.kl_to_teacher(teacher, student)
        total = kl
        metrics = {"kl": kl, "key_rank": key_rank.astype(jnp.float32),
                   "value_rank": value_rank.astype(jnp.float32)}
        if ce_weight:
            nll = bb.next_token_nll(student, tokens)
            total = total + ce_weight * nll
            metrics["nll"] = nll
        return total, metrics

    return loss_fn


# --- the low-rank cache --------------------------------------------------------------------


@struct.dataclass
class LowRankLayerCache(kvcache.KeysShape):
    """One layer's cache of projected keys and values.

    keys [B, Hkv, C, Rk], values [B, Hkv, C, Rv]: leading coordinates of the centred projected
    vectors; lengths int32[B, Hkv]; positions int32[B, Hkv, C] (as in `LayerCache`);
    key_basis [Hkv, D, Rk], value_basis [Hkv, D, Rv], key_mean / value_mean [Hkv, D] float32.
    """

    keys: Array
    values: Array
    lengths: Array
    positions: Array
    key_basis: Array
    value_basis: Array
    key_mean: Array
    value_mean: Array

    @property
    def head_dim(self) -> int:  # the model's head dim, not the projected width of keys
        return self.key_basis.shape[1]

    @property
    def key_rank(self) -> int:
        return self.keys.shape[3]

    @property
    def value_rank(self) -> int:
        return self.values.shape[3]

    def project(self, keys: Array, values: Array) -> tuple[Array, Array]:
        """Full [B, Hkv, T, D] keys/values -> stored coordinates (cache dtype)."""
        kp = jnp.einsum("bhtd,hdr->bhtr", keys.astype(jnp.float32) - self.key_mean[:, None],
                        self.key_basis)
        vp = jnp.einsum("bhtd,hdr->bhtr", values.astype(jnp.float32) - self.value_mean[:, None],
                        self.value_basis)
        return kp.astype(self.keys.dtype), vp.astype(self.values.dtype)

    def _dense(self) -> kvcache.LayerCache:
        return kvcache.LayerCache(self.keys, self.values, self.lengths, self.positions)

    def _with(self, dense: kvcache.LayerCache) -> LowRankLayerCache:
        return self.replace(keys=dense.keys, values=dense.values, lengths=dense.lengths,
                            positions=dense.positions)

    def write(self, keys: Array, values: Array, positions: Array,
              num_valid: Array | None = None) -> LowRankLayerCache:
        """Projects full keys/values [B, Hkv, T, D] and writes them (see `kvjax.cache.write`)."""
        kp, vp = self.project(keys, values)
        return self._with(kvcache.write(self._dense(), kp, vp, positions, num_valid))

    def grow(self, capacity: int) -> LowRankLayerCache:
        return self._with(kvcache.grow(self._dense(), capacity))


kvcache.register_cache_type(LowRankLayerCache)


def from_dense(layer: kvcache.LayerCache, key_basis: Array, value_basis: Array,
               key_mean: Array, value_mean: Array) -> LowRankLayerCache:
    """Projects a dense LayerCache (post-RoPE keys) onto the given bases and means."""
    empty = LowRankLayerCache(
        keys=jnp.zeros((), layer.keys.dtype), values=jnp.zeros((), layer.values.dtype),
        lengths=layer.lengths, positions=layer.positions,
        key_basis=jnp.asarray(key_basis, jnp.float32),
        value_basis=jnp.asarray(value_basis, jnp.float32),
        key_mean=jnp.asarray(key_mean, jnp.float32),
        value_mean=jnp.asarray(value_mean, jnp.float32),
    )
    kp, vp = empty.project(layer.keys, layer.values)
    return empty.replace(keys=kp.astype(layer.keys.dtype), values=vp.astype(layer.values.dtype))


def lowrank_attend(q: Array, q_positions: Array, layer: LowRankLayerCache,
                   scale: float | None = None, sliding_window: int | None = None,
                   impl: str = "auto") -> Array:
    """Reference attention of q [B, Hq, Tq, D] over a LowRankLayerCache -> [B, Hq, Tq, D]."""
    del impl  # no kernel yet: the reference path always
    b, hq, t, d = q.shape
    if d != layer.head_dim:
        raise ValueError(f"q head dim {d} != cache head dim {layer.head_dim}")
    h = layer.num_heads
    scale = d**-0.5 if scale is None else scale
    qg = q.astype(jnp.float32).reshape(b, h, hq // h, t, d)
    qp = jnp.einsum("bhgtd,hdr->bhgtr", qg, layer.key_basis)
    scores = jnp.einsum("bhgtr,bhsr->bhgts", qp, layer.keys.astype(jnp.float32))
    scores = (scores + jnp.einsum("bhgtd,hd->bhgt", qg, layer.key_mean)[..., None]) * scale
    mask = kvattention.attention_mask(q_positions, layer, sliding_window)[:, :, None]
    probs = jax.nn.softmax(jnp.where(mask, scores, -jnp.inf), axis=-1)
    probs = jnp.where(mask, probs, 0.0)
    coords = jnp.einsum("bhgts,bhsr->bhgtr", probs, layer.values.astype(jnp.float32))
    seen = jnp.any(mask, axis=-1, keepdims=True)  # rows without keys return zeros
    out = jnp.einsum("bhgtr,hdr->bhgtd", coords, layer.value_basis)
    out = out + jnp.where(seen, layer.value_mean[None, :, None, None, :], 0.0)
    return out.reshape(b, hq, t, d).astype(q.dtype)


kvattention.register(LowRankLayerCache, lowrank_attend)


# --- inference -------------------------------------------------------------------------------


def _ranks(name: str, rank: int | Sequence[int], num_layers: int, head_dim: int) -> tuple:
    ranks = [rank] * num_layers if isinstance(rank, (int, np.integer)) else list(rank)
    if len(ranks) != num_layers:
        raise ValueError(f"{name} has {len(ranks)} entries, expected one per layer ({num_layers})")
    return tuple(kvtrain.check_int(name, r, 1, head_dim) for r in ranks)


def matryoshka(proj: MatryoshkaProjections | str, compression_ratio: float | None = None,
               key_rank: int | Sequence[int] | None = None,
               value_rank: int | Sequence[int] | None = None) -> Compressor:
    """The MatryoshkaKV compressor: each layer's cache becomes a LowRankLayerCache keeping the
    leading `key_rank` / `value_rank` coordinates.

    proj: trained `MatryoshkaProjections`, or the path of projections saved by `save` (so the
      method can be named in an evaluation sweep: "matryoshka('runs/matryoshka/component')";
      the untrained PCA start saved as ".../pca" is the plain PCA truncation baseline).
    Pass either `compression_ratio` in [0, 1) (the fraction of channels removed: both ranks
    are max(1, int(head_dim * (1 - ratio)))), or `key_rank` and `value_rank` (an int in
    [1, head_dim] or one per layer). After prefill the cache stores key_rank + value_rank
    numbers per token and head instead of 2 x head_dim; decoded tokens are projected as they
    are written. jit caches are keyed on the compressor object: build it once (calls naming
    the same saved path and ranks return the same object).
    """
    if isinstance(key_rank, list):
        key_rank = tuple(key_rank)
    if isinstance(value_rank, list):
        value_rank = tuple(value_rank)
    if isinstance(proj, str):
        return _from_path(proj, compression_ratio, key_rank, value_rank)
    return _matryoshka(proj, compression_ratio, key_rank, value_rank)


@functools.cache
def _from_path(path: str, compression_ratio, key_rank, value_rank) -> Compressor:
    return _matryoshka(load(path), compression_ratio, key_rank, value_rank)


def _matryoshka(proj, compression_ratio, key_rank, value_rank) -> Compressor:
    if not isinstance(proj, MatryoshkaProjections):
        raise TypeError(f"proj must be MatryoshkaProjections or a saved path, got "
                        f"{type(proj).__name__}")
    if compression_ratio is not None:
        if key_rank is not None or value_rank is not None:
            raise ValueError("pass compression_ratio or key_rank/value_rank, not both")
        kvtrain.check_float("compression_ratio", compression_ratio, 0.0, 1.0)
        if compression_ratio >= 1.0:
            raise ValueError(f"compression_ratio must be in [0, 1), got {compression_ratio}")
        key_rank = value_rank = max(1, int(proj.head_dim * (1 - compression_ratio)))
    elif key_rank is None or value_rank is None:
        raise ValueError("pass compression_ratio, or both key_rank and value_rank")
    k_ranks = _ranks("key_rank", key_rank, proj.num_layers, proj.head_dim)
    v_ranks = _ranks("value_rank", value_rank, proj.num_layers, proj.head_dim)
    per_layer = []
    for layer in range(proj.num_layers):
        uk, uv = proj.bases(layer)
        per_layer.append(tuple(np.asarray(jax.device_get(x)) for x in (
            uk[..., :k_ranks[layer]], uv[..., :v_ranks[layer]], proj.key_mean[layer],
            proj.value_mean[layer])))

    def prefill(cache, obs: Observation, state):
        if isinstance(cache, LowRankLayerCache):
            return cache, state
        if obs.layer >= proj.num_layers or cache.num_heads != proj.num_kv_heads \
                or cache.head_dim != proj.head_dim:
            raise ValueError(
                f"projections were built for {proj.num_layers} layers x {proj.num_kv_heads} KV "
                f"heads x head_dim {proj.head_dim}; got layer {obs.layer} with "
                f"{cache.num_heads} KV heads x head_dim {cache.head_dim}"
            )
        return from_dense(cache, *per_layer[obs.layer]), state

    def decode(cache, obs, state):
        return cache, state

    return Compressor(init=lambda cache: (), prefill=prefill, decode=decode)


# --- persistence ---------------------------------------------------------------------------


def save(path: str | os.PathLike, proj: MatryoshkaProjections, model) -> None:
    """Saves projections (bases, skews, means) with the backbone signature."""
    kvtrain.save_component(path, proj, kind=KIND, config=component_config(model),
                           backbone=kvtrain.backbone_signature(model))


def load(path: str | os.PathLike, model=None) -> MatryoshkaProjections:
    """Loads projections saved by `save`; with `model`, refuses another backbone shape."""
    sig = None if model is None else kvtrain.backbone_signature(model)
    return kvtrain.load_component(path, build, kind=KIND, backbone=sig)
