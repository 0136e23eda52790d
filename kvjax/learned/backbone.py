"""A functional forward of a frozen kvjax `Llama`, for training learned cache components.

Learned components (retention gates, Locret retaining heads, MatryoshkaKV projections) need the
frozen model's per-layer inputs (hidden state, queries, keys, values) and sometimes a modified
attention. `forward` re-runs the model's own submodules (`model.layers[i].self_attn.q_proj`,
norms, MLP, `kvjax.rope`) with full causal attention over the sequence, no cache, and lets the
caller replace each layer's attention:

    logits, aux = forward(model, tokens)                          # plain causal attention
    logits, aux = forward(model, tokens, attend_fn=my_attention)  # my_attention(layer, inputs)

`attend_fn(layer, inputs) -> (out [B, Hq, T, Dv], aux)` receives a `LayerInputs`; `aux` is
collected per layer. Numerics follow `kvjax.models.llama` (float32 softmax and logits); the
output matches `kvjax.prefill(..., return_all_logits=True)` up to float rounding.

Shapes: tokens int32[B, T]; E hidden size; Hq query heads; Hkv key/value heads; G = Hq / Hkv;
D head dim. Rows are never padded here (training batches are full sequences).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from kvjax import rope
from kvjax.models.llama import Llama

Array = jax.Array


class LayerInputs(NamedTuple):
    """One layer's attention inputs.

    hidden: [B, T, E] attention input (after the input RMSNorm).
    raw_queries: [B, Hq, T, D] queries before RoPE (after QK-norm where the model has it).
    raw_keys: [B, Hkv, T, D] keys before RoPE (after QK-norm).
    values: [B, Hkv, T, D].
    queries, keys: post-RoPE queries [B, Hq, T, D] and keys [B, Hkv, T, D].
    positions: int32[B, T].
    scale: softmax scale; window: the layer's sliding window or None; inv_freq: RoPE
    frequencies float32[D // 2].
    """

    hidden: Array
    raw_queries: Array
    raw_keys: Array
    values: Array
    queries: Array
    keys: Array
    positions: Array
    scale: float
    window: int | None
    inv_freq: Any


AttendFn = Callable[[int, LayerInputs], tuple[Array, Any]]


def layer_inputs(model: Llama, layer: int, x: Array, positions: Array) -> LayerInputs:
    """Projections of layer `layer` for the normed hidden state x [B, T, E]."""
    c = model.config
    attn = model.layers[layer].self_attn
    b, t, _ = x.shape

    def heads(y: Array, n: int) -> Array:
        return y.reshape(b, t, n, c.head_dim).transpose(0, 2, 1, 3)

    q = heads(attn.q_proj(x), c.num_attention_heads)
    k = heads(attn.k_proj(x), c.num_key_value_heads)
    v = heads(attn.v_proj(x), c.num_key_value_heads)
    if c.qk_norm:
        q, k = attn.q_norm(q), attn.k_norm(k)
    freq = rope.inv_freq(c.head_dim, c.rope_theta, c.rope_scaling_dict)
    return LayerInputs(
        hidden=x,
        raw_queries=q,
        raw_keys=k,
        values=v,
        queries=rope.apply(q, positions, freq),
        keys=rope.apply(k, positions, freq),
        positions=positions,
        scale=c.head_dim**-0.5,
        window=c.layer_window(layer),
        inv_freq=freq,
    )


def causal_mask(positions: Array, window: int | None = None) -> Array:
    """bool[B, 1, 1, T, T]: query t sees key s iff s <= t (and t - s < window)."""
    qpos = positions[:, None, None, :, None]
    kpos = positions[:, None, None, None, :]
    mask = kpos <= qpos
    if window is not None:
        mask = mask & (qpos - kpos < window)
    return mask


def grouped_logits(queries: Array, keys: Array, scale: float) -> Array:
    """float32[B, Hkv, G, Tq, Tk] scaled scores; query head j uses KV head j // G."""
    b, hq, t, d = queries.shape
    hkv = keys.shape[1]
    qg = queries.reshape(b, hkv, hq // hkv, t, d)
    return jnp.einsum("bhgtd,bhsd->bhgts", qg, keys, preferred_element_type=jnp.float32) * scale


def softmax_attention(logits: Array, mask: Array, values: Array, out_dtype: Any) -> Array:
    """Masked float32 softmax of logits [B, Hkv, G, T, S] over values [B, Hkv, S, Dv].

    Returns [B, Hq, T, Dv] in `out_dtype`.
    """
    b, hkv, g, t, _ = logits.shape
    probs = jax.nn.softmax(jnp.where(mask, logits, -jnp.inf), axis=-1)
    probs = jnp.where(mask, probs, 0.0)
    out = jnp.einsum("bhgts,bhsd->bhgtd", probs, values.astype(jnp.float32))
    return out.reshape(b, hkv * g, t, -1).astype(out_dtype)


def plain_attention(layer: int, inputs: LayerInputs) -> tuple[Array, None]:
    """The model's own causal attention (an `AttendFn`)."""
    del layer
    logits = grouped_logits(inputs.queries, inputs.keys, inputs.scale)
    mask = causal_mask(inputs.positions, inputs.window)
    return softmax_attention(logits, mask, inputs.values, inputs.queries.dtype), None


def forward(
    model: Llama,
    tokens: Array,
    attend_fn: AttendFn | None = None,
    positions: Array | None = None,
    remat: bool = False,
) -> tuple[Array, list[Any]]:
    """float32[B, T, V] next-token logits of every position, and each layer's `aux`.

    attend_fn: replaces each layer's attention (default `plain_attention`); it must be free of
      side effects (return what it wants to keep as `aux`).
    positions: int32[B, T] RoPE positions (default 0..T-1).
    remat: recompute each layer's attention in the backward pass (`jax.checkpoint`) instead of
      storing its [T, T] scores: much less memory for long training sequences.
    """
    b, t = tokens.shape
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    attend_fn = plain_attention if attend_fn is None else attend_fn
    x = model.embed_tokens(tokens)
    aux = []
    for i, block in enumerate(model.layers):
        inputs = layer_inputs(model, i, block.input_layernorm(x), positions)
        attend = functools.partial(attend_fn, i)
        out, layer_aux = (jax.checkpoint(attend) if remat else attend)(inputs)
        out = out.astype(x.dtype).transpose(0, 2, 1, 3).reshape(b, t, -1)
        x = x + block.self_attn.o_proj(out)
        x = x + block.mlp(block.post_attention_layernorm(x))
        aux.append(layer_aux)
    return model.logits(model.norm(x)), aux


def kl_to_teacher(teacher_logits: Array, student_logits: Array, mask: Array | None = None) -> Array:
    """Mean forward KL(teacher || student) over positions of float32 logits [B, T, V]."""
    t_logp = jax.nn.log_softmax(teacher_logits.astype(jnp.float32), axis=-1)
    s_logp = jax.nn.log_softmax(student_logits.astype(jnp.float32), axis=-1)
    kl = jnp.sum(jnp.exp(t_logp) * (t_logp - s_logp), axis=-1)  # [B, T]
    if mask is None:
        return jnp.mean(kl)
    mask = mask.astype(jnp.float32)
    return jnp.sum(kl * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def next_token_nll(logits: Array, tokens: Array) -> Array:
    """Mean cross-entropy of logits [B, T, V] predicting tokens[:, 1:]."""
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
    return jnp.mean(nll)
