"""Locret: "Enhancing Eviction in Long-Context LLM Inference with Trained Retaining Heads"
(Huang et al., 2024; arXiv:2410.01805; reference code huangyuxiang03/Locret).

Retaining head (one per layer): a two-layer MLP on the concatenated pre-RoPE query, key and value
of a token (all heads flattened), one score per KV head:

    score = W2 silu(W1 [q; k; v]),   W1: (Hq + 2 Hkv) D -> 1024,  W2: 1024 -> Hkv,  no biases

(reference defaults; weights N(0, 0.02)). The score predicts the token's causal importance.

Targets (from the frozen model, one forward, no generation): the last `query_window` tokens of a
training sequence play the part of the question/response; for every earlier token i and KV head
h the target is the maximum, over those queries and the GQA group, of the attention the token
receives. The reference code regresses the *pre-softmax* scaled scores q.k / sqrt(d)
(`target="logits"`, default); METHODS.md describes attention probabilities (`target="probs"`).
Loss (reference): smooth L1 (beta 1) between predicted scores and targets over the earlier
tokens, plus 0.0025 x the mean squared difference of adjacent predicted scores (smoothness).
Reference optimiser: AdamW lr 5e-4, betas (0.9, 0.95), linear warmup/decay, grad clip 0.5.

Inference: chunked prefill; after every chunk each head keeps the `budget` cached tokens of
highest score, always keeping the `stabilizers` most recent tokens (the end of the chunk), and
scores persist in `slot_data` across chunks (`kvjax.learned.evict.prefill` / `generate`). The
compressor also works for a one-shot eviction after `kvjax.generate`'s unchunked prefill. As in
the reference, decoding does not evict (the cache grows by the generated tokens). The reference
additionally prefills a final `local_len` tokens without eviction and drops the stabilizer at the
last evicting chunk; here every chunk evicts with the stabilizer (set `stabilizers` >= the
question length to keep it).
"""

from __future__ import annotations

import functools
import os
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from kvjax import cache as kvcache
from kvjax import rope
from kvjax import train as kvtrain
from kvjax.compress.base import Compressor, Observation, keep_topk
from kvjax.compress.scorer import check_budget_args, n_kept
from kvjax.learned import backbone as bb
from kvjax.learned.evict import new_token_slots, newest_position, set_slot_data

Array = jax.Array

KIND = "locret"
SLOT = "locret_score"
TARGETS = ("logits", "probs")


class RetainingHeads(nnx.Module):
    """All layers' retaining heads.

    `heads(layer, raw_q [B, Hq, T, D], raw_k [B, Hkv, T, D], v [B, Hkv, T, D])`
    -> float32[B, Hkv, T] predicted importance.
    """

    def __init__(self, num_layers: int, num_heads: int, num_kv_heads: int, head_dim: int, *,
                 head_hidden: int = 1024, init_std: float = 0.02, rngs: nnx.Rngs):
        for name, v in (("num_layers", num_layers), ("num_heads", num_heads),
                        ("num_kv_heads", num_kv_heads), ("head_dim", head_dim),
                        ("head_hidden", head_hidden)):
            kvtrain.check_int(name, v, 1)
        width = (num_heads + 2 * num_kv_heads) * head_dim
        self.w1 = nnx.Param(init_std * jax.random.normal(
            rngs.params(), (num_layers, width, head_hidden), jnp.float32))
        self.w2 = nnx.Param(init_std * jax.random.normal(
            rngs.params(), (num_layers, head_hidden, num_kv_heads), jnp.float32))
        self.num_layers = num_layers
        self.num_kv_heads = num_kv_heads

    def __call__(self, layer: int, raw_q: Array, raw_k: Array, values: Array) -> Array:
        def flat(x: Array) -> Array:  # [B, H, T, D] -> [B, T, H*D]
            b, h, t, d = x.shape
            return x.transpose(0, 2, 1, 3).reshape(b, t, h * d).astype(jnp.float32)

        x = jnp.concatenate([flat(raw_q), flat(raw_k), flat(values)], axis=-1)
        return (jax.nn.silu(x @ self.w1[layer]) @ self.w2[layer]).transpose(0, 2, 1)


def build(config: dict[str, Any]) -> RetainingHeads:
    """Fresh heads from a `component_config` dict (what `load` rebuilds before restoring)."""
    return RetainingHeads(
        config["num_layers"], config["num_heads"], config["num_kv_heads"], config["head_dim"],
        head_hidden=config["head_hidden"], rngs=nnx.Rngs(config["seed"]),
    )


def component_config(model, head_hidden: int = 1024, seed: int = 0) -> dict[str, Any]:
    """The JSON-able constructor arguments of heads for `model`."""
    c = model.config
    return {"num_layers": c.num_hidden_layers, "num_heads": c.num_attention_heads,
            "num_kv_heads": c.num_key_value_heads, "head_dim": c.head_dim,
            "head_hidden": int(head_hidden), "seed": int(seed)}


def defaults():
    """Training settings of the heads (the `locret` section of configs/train_locret.py).

    head_hidden: MLP width (reference 1024); query_window: trailing tokens whose attention
    defines the targets; target: "logits" (reference) or "probs"; smooth_weight: 0.0025.
    """
    import ml_collections

    return ml_collections.ConfigDict({"head_hidden": 1024, "query_window": 128,
                                      "target": "logits", "smooth_weight": 0.0025})


def init(model, head_hidden: int = 1024, seed: int = 0) -> RetainingHeads:
    """Fresh float32 retaining heads for `model`."""
    return build(component_config(model, head_hidden, seed))


# --- training ---------------------------------------------------------------------------------


def importance_targets(inputs: bb.LayerInputs, query_window: int,
                       target: str = "logits") -> Array:
    """float32[B, Hkv, T] causal importance of each token (valid for t < T - query_window).

    The maximum over the last `query_window` queries and the GQA group of the scaled score
    (target="logits") or attention probability (target="probs") each token receives.
    """
    t = inputs.queries.shape[2]
    q = inputs.queries[:, :, t - query_window:]
    logits = bb.grouped_logits(q, inputs.keys, inputs.scale)  # [B, H, G, w, T]
    mask = bb.causal_mask(inputs.positions, inputs.window)[:, :, :, t - query_window:]
    if target == "probs":
        logits = jax.nn.softmax(jnp.where(mask, logits, -jnp.inf), axis=-1)
    values = jnp.where(mask, logits, -jnp.inf)
    return jnp.max(values, axis=(2, 3))


@functools.cache
def loss(query_window: int, target: str = "logits", smooth_weight: float = 0.0025):
    """The training objective (memoised). Returns `loss_fn(heads, model, batch, rng)`."""
    kvtrain.check_int("query_window", query_window, 1)
    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
    kvtrain.check_float("smooth_weight", smooth_weight, 0.0)

    def loss_fn(heads: RetainingHeads, model, batch, rng):
        del rng
        tokens = batch["tokens"]
        if tokens.shape[1] <= query_window:
            raise ValueError(
                f"seq_len ({tokens.shape[1]}) must exceed query_window ({query_window})"
            )

        def attend(layer, inputs):
            feats = jax.lax.stop_gradient((inputs.raw_queries, inputs.raw_keys, inputs.values))
            target_ = jax.lax.stop_gradient(importance_targets(inputs, query_window, target))
            out, _ = bb.plain_attention(layer, inputs)
            return out, (heads(layer, *feats), target_)

        _, aux = bb.forward(model, tokens, attend)
        preds = [a[0] for a in aux]
        targets = [a[1] for a in aux]
        n = tokens.shape[1] - query_window
        pred = jnp.stack(preds)[..., :n]  # [L, B, H, n]
        tgt = jnp.stack(targets)[..., :n]
        seen = jnp.isfinite(tgt)  # a sliding window can hide a token from every query
        tgt = jnp.where(seen, tgt, 0.0)
        huber = jnp.where(seen, optax.huber_loss(pred, tgt, delta=1.0), 0.0)
        regression = jnp.sum(huber) / jnp.maximum(jnp.sum(seen), 1)
        smooth = jnp.mean(jnp.square(pred[..., 1:] - pred[..., :-1]))
        total = regression + smooth_weight * smooth
        k = max(1, n // 10)  # top-10% overlap, the reference's accuracy metric
        top_p = jax.lax.top_k(pred, k)[1]
        top_t = jax.lax.top_k(tgt, k)[1]
        overlap = jnp.mean(jnp.sum(top_p[..., :, None] == top_t[..., None, :], axis=(-1, -2)) / k)
        return total, {"regression": regression, "smooth": smooth, "top10_overlap": overlap}

    return loss_fn


# --- inference ---------------------------------------------------------------------------------


def locret(heads: RetainingHeads | str, compression_ratio: float | None = None,
           budget: int | None = None, stabilizers: int = 0) -> Compressor:
    """The Locret compressor: evicts to `budget` tokens per layer and KV head by predicted
    importance.

    heads: trained `RetainingHeads`, or the path of heads saved by `save` (so the method can be
      named in an evaluation sweep: "locret('runs/locret/component', stabilizers=64)").
    Pass exactly one of `budget` (tokens per head, >= 1) or `compression_ratio` (fraction of the
    prompt removed, in [0, 1), kvpress's rule max(1, int(T * (1 - ratio))); not for the chunked
    `evict.prefill`, which needs `budget`).
    stabilizers: the most recent tokens always kept (reference: 2500 with budget 6000; must be
    below the budget). Scores of surviving tokens persist across calls in `slot_data`. jit
    caches are keyed on the compressor object: build it once (calls naming the same saved path
    and arguments return the same object).
    """
    if isinstance(heads, str):
        return _from_path(heads, compression_ratio, budget, stabilizers)
    return _locret(heads, compression_ratio, budget, stabilizers)


@functools.cache
def _from_path(path: str, compression_ratio, budget, stabilizers) -> Compressor:
    return _locret(load(path), compression_ratio, budget, stabilizers)


def _locret(heads, compression_ratio, budget, stabilizers) -> Compressor:
    compression_ratio, budget = check_budget_args(compression_ratio, budget)
    kvtrain.check_int("stabilizers", stabilizers, 0, None if budget is None else budget - 1)
    if not isinstance(heads, RetainingHeads):
        raise TypeError(f"heads must be RetainingHeads or a saved path, got "
                        f"{type(heads).__name__}")

    def prefill(cache: kvcache.LayerCache, obs: Observation, state):
        if obs.layer >= heads.num_layers or cache.num_heads != heads.num_kv_heads:
            raise ValueError(
                f"heads were built for {heads.num_layers} layers x {heads.num_kv_heads} KV "
                f"heads; the model has layer {obs.layer} with {cache.num_heads} KV heads"
            )
        slot, _ = new_token_slots(cache, obs.query_positions)
        take = jnp.clip(slot, 0, cache.capacity - 1)[..., None]
        keys = jnp.take_along_axis(cache.keys, take, axis=2)
        values = jnp.take_along_axis(cache.values, take, axis=2)
        pos = jnp.take_along_axis(cache.positions, take[..., 0], axis=2)
        raw_keys = rope.rerotate(keys, jnp.maximum(pos, 0), jnp.zeros_like(pos), obs.inv_freq)
        scores = heads(obs.layer, obs.raw_queries, raw_keys, values)
        cache = set_slot_data(cache, SLOT, scores, slot)
        ranked = cache.slot_data[SLOT]
        if stabilizers:
            now = newest_position(obs.query_positions)
            recent = cache.positions > (now[:, None, None] - stabilizers)
            ranked = jnp.where(recent, jnp.inf, ranked)
        keep = budget if budget is not None else n_kept(cache.capacity, compression_ratio)
        if stabilizers >= keep:
            raise ValueError(f"stabilizers ({stabilizers}) must be below the budget ({keep}, "
                             f"compression_ratio={compression_ratio} of {cache.capacity})")
        return keep_topk(cache, ranked, keep), state

    def decode(cache, obs, state):
        return cache, state

    return Compressor(init=lambda cache: (), prefill=prefill, decode=decode)


# --- persistence ---------------------------------------------------------------------------


def save(path: str | os.PathLike, heads: RetainingHeads, config: dict[str, Any], model) -> None:
    """Saves trained heads (orbax) with their constructor config and the backbone signature."""
    kvtrain.save_component(path, heads, kind=KIND, config=config,
                           backbone=kvtrain.backbone_signature(model))


def load(path: str | os.PathLike, model=None) -> RetainingHeads:
    """Loads heads saved by `save`; with `model`, refuses heads made for another shape."""
    sig = None if model is None else kvtrain.backbone_signature(model)
    return kvtrain.load_component(path, build, kind=KIND, backbone=sig)
