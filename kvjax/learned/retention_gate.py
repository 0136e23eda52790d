"""Retention gates: TRIM-KV, "Cache What Lasts: Token Retention for Memory-Bounded KV Cache in
LLMs" (Bui, Sharma, Lamba, Mishra, Ying, 2025; arXiv:2512.03324).

Gate (one per layer, one output per KV head), applied to a token's attention input x (after the
input RMSNorm) when the token is written:

    z = W2 silu(W1 x + b1) + b,   log beta = log_sigmoid(z)          beta in (0, 1)^Hkv

The retention of token i at time t is beta_i^(t - i): it decays with age, slowly for important
tokens. Defaults follow the reference implementation: hidden width 512, W ~ N(0, 0.02), b1 = 0,
bias b initialised to 10 (beta ~ 1, so an untrained gate keeps the model unchanged).

Training (backbone frozen, gates only) uses retention-gated attention, a soft eviction:
  mode "scale" (the paper's equation): s_ti = beta_i^(t-i) * q_t.k_i / sqrt(d)
  mode "log"   (METHODS.md):           s_ti = q_t.k_i / sqrt(d) + (t - i) * log beta_i
loss = KL(teacher || student) over next-token distributions   (the frozen full-cache model)
     + ce_weight * next-token cross-entropy                       (paper: KL + NTP; default 0)
     + capacity_weight * mean_{layer, row, head, t} relu(S_t - M) / M,
where S_t = sum_{i <= t} beta_i^(t-i) is the expected number of retained tokens at time t under
memory bound M. (The capacity term's exact normalisation is not public; ours divides by M.)

Inference under memory bound M (per layer and KV head): the cache keeps the M tokens of highest
retention score (t - i) * log beta_i, evicting the lowest after prefill and at every decode step
(`compressor`); `kvjax.learned.evict.prefill` bounds memory during a chunked prefill too.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from kvjax import cache as kvcache
from kvjax import train as kvtrain
from kvjax.compress.base import Compressor, Observation, keep_topk
from kvjax.compress.scorer import check_budget_args, n_kept
from kvjax.learned import backbone as bb
from kvjax.learned.evict import new_token_slots, newest_position, set_slot_data

Array = jax.Array

KIND = "retention_gate"
SLOT = "retention_log_beta"
MODES = ("scale", "log")


class RetentionGates(nnx.Module):
    """All layers' gates; `gates(layer, hidden [B, T, E]) -> float32[B, Hkv, T]` log beta."""

    def __init__(self, num_layers: int, hidden_size: int, num_kv_heads: int, *,
                 gate_hidden: int = 512, bias_init: float = 10.0, init_std: float = 0.02,
                 rngs: nnx.Rngs):
        for name, v in (("num_layers", num_layers), ("hidden_size", hidden_size),
                        ("num_kv_heads", num_kv_heads), ("gate_hidden", gate_hidden)):
            kvtrain.check_int(name, v, 1)
        shape = (num_layers, hidden_size, gate_hidden)
        self.w1 = nnx.Param(init_std * jax.random.normal(rngs.params(), shape, jnp.float32))
        self.b1 = nnx.Param(jnp.zeros((num_layers, gate_hidden), jnp.float32))
        self.w2 = nnx.Param(init_std * jax.random.normal(
            rngs.params(), (num_layers, gate_hidden, num_kv_heads), jnp.float32))
        self.bias = nnx.Param(jnp.full((num_layers, num_kv_heads), bias_init, jnp.float32))
        self.num_layers = num_layers
        self.num_kv_heads = num_kv_heads

    def __call__(self, layer: int, hidden: Array) -> Array:
        x = hidden.astype(jnp.float32)
        h = jax.nn.silu(x @ self.w1[layer] + self.b1[layer])
        z = h @ self.w2[layer] + self.bias[layer]
        return jax.nn.log_sigmoid(z).transpose(0, 2, 1)


def build(config: dict[str, Any]) -> RetentionGates:
    """Fresh gates from a `component_config` dict (what `load` rebuilds before restoring)."""
    return RetentionGates(
        config["num_layers"], config["hidden_size"], config["num_kv_heads"],
        gate_hidden=config["gate_hidden"], bias_init=config["bias_init"],
        rngs=nnx.Rngs(config["seed"]),
    )


def component_config(model, gate_hidden: int = 512, bias_init: float = 10.0,
                     seed: int = 0) -> dict[str, Any]:
    """The JSON-able constructor arguments of gates for `model` (stored with checkpoints)."""
    c = model.config
    return {"num_layers": c.num_hidden_layers, "hidden_size": c.hidden_size,
            "num_kv_heads": c.num_key_value_heads, "gate_hidden": int(gate_hidden),
            "bias_init": float(bias_init), "seed": int(seed)}


def defaults():
    """Training settings of the gates (the `gate` section of configs/train_gate.py).

    gate_hidden, bias_init: the gate MLP (paper: 512, 10); memory: the bound M of the
    capacity loss (tokens per layer and KV head); mode: "scale" (paper) or "log" (METHODS.md);
    capacity_weight, ce_weight: loss weights (see the module docstring); remat: recompute
    attention in the backward pass (saves the [T, T] activations; off for the CPU variant).
    """
    import ml_collections

    return ml_collections.ConfigDict({"gate_hidden": 512, "bias_init": 10.0, "memory": 512,
                                      "mode": "scale", "capacity_weight": 1.0,
                                      "ce_weight": 0.0, "remat": True})


def init(model, gate_hidden: int = 512, bias_init: float = 10.0, seed: int = 0) -> RetentionGates:
    """Fresh float32 gates for `model` (paper defaults)."""
    return build(component_config(model, gate_hidden, bias_init, seed))


# --- training -------------------------------------------------------------------------------


def gated_attention(log_beta: Array, inputs: bb.LayerInputs, mode: str = "scale"):
    """Retention-gated causal attention of one layer.

    log_beta: float32[B, Hkv, T] of the layer's tokens. Returns the output [B, Hq, T, D] and
    S float32[B, Hkv, T], the expected number of retained tokens at each time t.
    """
    logits = bb.grouped_logits(inputs.queries, inputs.keys, inputs.scale)  # [B, H, G, T, T]
    mask = bb.causal_mask(inputs.positions, inputs.window)  # [B, 1, 1, T, T]
    pos = inputs.positions.astype(jnp.float32)
    age = jnp.maximum(pos[:, :, None] - pos[:, None, :], 0.0)  # [B, T, T] (t, i)
    log_r = age[:, None] * log_beta[:, :, None, :]  # [B, H, T, T]
    if mode == "log":
        logits = logits + log_r[:, :, None]
    else:
        logits = logits * jnp.exp(log_r)[:, :, None]
    out = bb.softmax_attention(logits, mask, inputs.values, inputs.queries.dtype)
    retained = jnp.sum(jnp.where(mask[:, 0], jnp.exp(log_r), 0.0), axis=-1)  # [B, H, T]
    return out, retained


@functools.cache
def loss(memory: int, mode: str = "scale", capacity_weight: float = 1.0,
         ce_weight: float = 0.0, remat: bool = False):
    """The training objective (memoised: same arguments, same function, one compilation).

    Returns `loss_fn(gates, model, batch, rng) -> (loss, metrics)` for `kvjax.train.train`;
    batch = {"tokens": int32[B, T]}. remat: recompute attention in the backward pass.
    """
    kvtrain.check_int("memory", memory, 1)
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    kvtrain.check_float("capacity_weight", capacity_weight, 0.0)
    kvtrain.check_float("ce_weight", ce_weight, 0.0)

    def loss_fn(gates: RetentionGates, model, batch, rng):
        del rng
        tokens = batch["tokens"]
        teacher, _ = bb.forward(model, tokens)
        teacher = jax.lax.stop_gradient(teacher)

        def attend(layer, inputs):
            log_beta = gates(layer, inputs.hidden)
            out, retained = gated_attention(log_beta, inputs, mode)
            return out, (retained, jnp.mean(jnp.exp(log_beta)))

        student, aux = bb.forward(model, tokens, attend, remat=remat)
        retained = jnp.stack([a[0] for a in aux])
        kl = bb.kl_to_teacher(teacher, student)
        capacity = jnp.mean(jax.nn.relu(retained - memory)) / memory
        total = kl + capacity_weight * capacity
        metrics = {"kl": kl, "capacity": capacity,
                   "mean_beta": jnp.mean(jnp.stack([a[1] for a in aux]))}
        if ce_weight:
            nll = bb.next_token_nll(student, tokens)
            total = total + ce_weight * nll
            metrics["nll"] = nll
        return total, metrics

    return loss_fn


# --- inference --------------------------------------------------------------------------------


def retention_scores(layer: kvcache.LayerCache, now: Array) -> Array:
    """float32[B, Hkv, C] log retention (now - i) * log beta_i of every slot (now: int32[B])."""
    age = (now[:, None, None] - layer.positions).astype(jnp.float32)
    return jnp.maximum(age, 0.0) * layer.slot_data[SLOT]


def retention_gate(gates: RetentionGates | str, compression_ratio: float | None = None,
                   budget: int | None = None) -> Compressor:
    """The TRIM-KV compressor: at most `budget` (the memory bound M) tokens per layer and KV
    head, the highest-retention ones.

    gates: trained `RetentionGates`, or the path of gates saved by `save` (so the method can be
      named in an evaluation sweep: "retention_gate('runs/gate/component')").
    Pass exactly one of `budget` (tokens per head, >= 1) or `compression_ratio` (fraction of
    the prompt removed, in [0, 1): M = max(1, int(T * (1 - ratio))) for a prompt of static
    length T, kvpress's rule; the bound then holds through decoding too).
    prefill: scores the observed tokens with the gate, stores log beta per slot, evicts to M.
    decode: scores the new token and, once the cache is full, evicts the lowest retention so
    the capacity stays M + 1. Use with `kvjax.generate` (no chunk_size) or
    `kvjax.learned.evict.generate` (chunked, memory-bounded prefill; needs `budget`). jit
    caches are keyed on the compressor object: build it once (calls naming the same saved path
    and budget return the same object).
    """
    if isinstance(gates, str):
        return _from_path(gates, compression_ratio, budget)
    return _retention_gate(gates, compression_ratio, budget)


@functools.cache
def _from_path(path: str, compression_ratio, budget) -> Compressor:
    return _retention_gate(load(path), compression_ratio, budget)


def _retention_gate(gates, compression_ratio, budget) -> Compressor:
    if (budget is None) == (compression_ratio is None):
        raise ValueError("pass exactly one of budget (the memory bound: tokens kept per head, "
                         f">= 1) or compression_ratio (in [0, 1)); got budget={budget!r}, "
                         f"compression_ratio={compression_ratio!r}")
    if budget is not None:
        memory = kvtrain.check_int("budget", budget, 1)
    else:
        memory = None
        compression_ratio, _ = check_budget_args(compression_ratio, None)
    if not isinstance(gates, RetentionGates):
        raise TypeError(f"gates must be RetentionGates or a saved path, got "
                        f"{type(gates).__name__}")
    return _build_compressor(gates, compression_ratio, memory)


def _build_compressor(gates, compression_ratio, memory) -> Compressor:
    def bound(capacity: int) -> int:
        return memory if memory is not None else n_kept(capacity, compression_ratio)

    def observe(cache: kvcache.LayerCache, obs: Observation) -> kvcache.LayerCache:
        if obs.layer >= gates.num_layers or cache.num_heads != gates.num_kv_heads:
            raise ValueError(
                f"gates were built for {gates.num_layers} layers x {gates.num_kv_heads} KV "
                f"heads; the model has layer {obs.layer} with {cache.num_heads} KV heads"
            )
        slot, _ = new_token_slots(cache, obs.query_positions)
        log_beta = gates(obs.layer, obs.hidden)
        return set_slot_data(cache, SLOT, log_beta, slot)

    def prefill(cache, obs, state):
        cache = observe(cache, obs)
        scores = retention_scores(cache, newest_position(obs.query_positions))
        return keep_topk(cache, scores, bound(cache.capacity)), state

    def decode(cache, obs, state):
        cache = observe(cache, obs)
        # decode_capacity sized the layer to min(prompt + new, memory + 1) slots
        limit = memory if memory is not None else cache.capacity - 1
        if cache.capacity <= limit:
            return cache, state
        scores = retention_scores(cache, newest_position(obs.query_positions))
        cache = kvcache.grow(keep_topk(cache, scores, limit), cache.capacity)
        return cache, state

    def capacity(cap: int, max_new_tokens: int) -> int:
        limit = memory if memory is not None else cap
        return min(cap + max_new_tokens, max(cap, limit) + 1)

    return Compressor(init=lambda cache: (), prefill=prefill, decode=decode,
                      decode_capacity=capacity)


# --- persistence ---------------------------------------------------------------------------


def save(path: str | os.PathLike, gates: RetentionGates, config: dict[str, Any], model) -> None:
    """Saves trained gates (orbax) with their constructor config and the backbone signature."""
    kvtrain.save_component(path, gates, kind=KIND, config=config,
                           backbone=kvtrain.backbone_signature(model))


def load(path: str | os.PathLike, model=None) -> RetentionGates:
    """Loads gates saved by `save`; with `model`, refuses gates made for another shape."""
    sig = None if model is None else kvtrain.backbone_signature(model)
    return kvtrain.load_component(path, build, kind=KIND, backbone=sig)

