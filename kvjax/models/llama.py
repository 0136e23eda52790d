"""Llama-family decoder (Llama 2/3, Mistral, Qwen2, Qwen3) in Flax NNX.

Plain and explicit: a Python loop over layers; every attention layer writes its new keys and
values into its `LayerCache` first and then attends over the cache (see `kvjax.attention`), so
one code path serves full prefill, chunked prefill, decode and compressed caches. A `hook`
called after each layer's attention lets compressors see the layer's queries (`Observation`)
and return a compressed LayerCache; the model knows nothing about any method.

Shapes: tokens int32[B, T], positions int32[B, T], hidden [B, T, E], caches as in kvjax.cache.
Numerics follow transformers: RMSNorm in float32 and cast back, RoPE angles in float32,
softmax in float32.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kvjax import cache as kvcache
from kvjax import rope
from kvjax.attention import attend
from kvjax.compress.base import Observation

Array = jax.Array

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    model_type: str = "llama"
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: tuple[tuple[str, Any], ...] | None = None  # items of the HF dict
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # q/k/v bias (Qwen2: True)
    mlp_bias: bool = False
    qk_norm: bool = False  # Qwen3
    sliding_window: int | None = None
    sliding_layers: tuple[bool, ...] | None = None  # per layer; None: all layers if window set
    bos_token_id: int | None = None
    eos_token_id: int | None = None

    def __post_init__(self):
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"unknown model_type {self.model_type!r}; supported: {SUPPORTED_MODEL_TYPES}"
            )
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")
        rope.inv_freq(self.head_dim, self.rope_theta, self.rope_scaling_dict)  # validates

    @property
    def rope_scaling_dict(self) -> dict[str, Any] | None:
        return None if self.rope_scaling is None else dict(self.rope_scaling)

    def layer_window(self, layer: int) -> int | None:
        if self.sliding_window is None:
            return None
        if self.sliding_layers is not None and not self.sliding_layers[layer]:
            return None
        return self.sliding_window

    @classmethod
    def tiny(cls, **overrides: Any) -> LlamaConfig:
        """A tiny config for tests and the quickstart."""
        base = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=16)
        base.update(overrides)
        return cls(**base)


@functools.cache
def _inv_freq(config: LlamaConfig) -> np.ndarray:
    return rope.inv_freq(config.head_dim, config.rope_theta, config.rope_scaling_dict)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, dtype: Any):
        self.weight = nnx.Param(jnp.ones((dim,), dtype))
        self.eps = eps

    def __call__(self, x: Array) -> Array:
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.weight[...] * y.astype(x.dtype)


def _linear(n_in: int, n_out: int, bias: bool, dtype: Any, rngs: nnx.Rngs) -> nnx.Linear:
    return nnx.Linear(n_in, n_out, use_bias=bias, dtype=dtype, param_dtype=dtype, rngs=rngs)


Hook = Callable[[int, kvcache.LayerCache, Observation], kvcache.LayerCache]


class Attention(nnx.Module):
    def __init__(self, config: LlamaConfig, layer: int, dtype: Any, rngs: nnx.Rngs):
        c = config
        e, d = c.hidden_size, c.head_dim
        self.config = c
        self.layer = layer
        self.q_proj = _linear(e, c.num_attention_heads * d, c.attention_bias, dtype, rngs)
        self.k_proj = _linear(e, c.num_key_value_heads * d, c.attention_bias, dtype, rngs)
        self.v_proj = _linear(e, c.num_key_value_heads * d, c.attention_bias, dtype, rngs)
        self.o_proj = _linear(c.num_attention_heads * d, e, False, dtype, rngs)
        if c.qk_norm:
            self.q_norm = RMSNorm(d, c.rms_norm_eps, dtype)
            self.k_norm = RMSNorm(d, c.rms_norm_eps, dtype)

    def __call__(
        self,
        x: Array,
        positions: Array,
        num_valid: Array,
        layer_cache: kvcache.LayerCache,
        hook: Hook | None,
    ) -> tuple[Array, kvcache.LayerCache]:
        c = self.config
        b, t, _ = x.shape

        def heads(y: Array, n: int) -> Array:  # [B, T, n*D] -> [B, n, T, D]
            return y.reshape(b, t, n, c.head_dim).transpose(0, 2, 1, 3)

        q = heads(self.q_proj(x), c.num_attention_heads)
        k = heads(self.k_proj(x), c.num_key_value_heads)
        v = heads(self.v_proj(x), c.num_key_value_heads)
        if c.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        freq = _inv_freq(c)
        raw_q = q
        q = rope.apply(q, positions, freq)
        k = rope.apply(k, positions, freq)
        layer_cache = kvcache.write(layer_cache, k, v, positions, num_valid)
        scale = c.head_dim**-0.5
        window = c.layer_window(self.layer)
        out = attend(q, jnp.where(positions >= 0, positions, -1), layer_cache, scale, window)
        if hook is not None:
            valid = jnp.arange(t)[None, :] < num_valid[:, None]
            obs = Observation(
                queries=q,
                raw_queries=raw_q,
                query_positions=jnp.where(valid, positions, -1).astype(jnp.int32),
                hidden=x,
                inv_freq=jnp.asarray(freq),
                layer=self.layer,
                num_layers=c.num_hidden_layers,
                scale=scale,
                sliding_window=window,
            )
            layer_cache = hook(self.layer, layer_cache, obs)
        out = out.transpose(0, 2, 1, 3).reshape(b, t, -1)
        return self.o_proj(out), layer_cache


class MLP(nnx.Module):
    def __init__(self, config: LlamaConfig, dtype: Any, rngs: nnx.Rngs):
        e, f, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = _linear(e, f, bias, dtype, rngs)
        self.up_proj = _linear(e, f, bias, dtype, rngs)
        self.down_proj = _linear(f, e, bias, dtype, rngs)

    def __call__(self, x: Array) -> Array:
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nnx.Module):
    def __init__(self, config: LlamaConfig, layer: int, dtype: Any, rngs: nnx.Rngs):
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.self_attn = Attention(config, layer, dtype, rngs)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.mlp = MLP(config, dtype, rngs)

    def __call__(self, x, positions, num_valid, layer_cache, hook):
        h, layer_cache = self.self_attn(
            self.input_layernorm(x), positions, num_valid, layer_cache, hook
        )
        x = x + h
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x, layer_cache


class Llama(nnx.Module):
    """The decoder. `__call__` returns final-normed hidden states; `logits` projects them."""

    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs, dtype: Any = jnp.float32):
        c = config
        self.config = c
        self.dtype = jnp.dtype(dtype)
        self.embed_tokens = nnx.Embed(
            c.vocab_size, c.hidden_size, dtype=dtype, param_dtype=dtype, rngs=rngs
        )
        self.layers = nnx.List([Block(c, i, dtype, rngs) for i in range(c.num_hidden_layers)])
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps, dtype)
        if not c.tie_word_embeddings:
            self.lm_head = _linear(c.hidden_size, c.vocab_size, False, dtype, rngs)

    def init_cache(self, batch: int, capacity: int | list[int]) -> kvcache.KVCache:
        c = self.config
        return kvcache.init(
            c.num_hidden_layers, batch, c.num_key_value_heads, capacity, c.head_dim, self.dtype
        )

    def __call__(
        self,
        tokens: Array,
        positions: Array,
        cache: kvcache.KVCache,
        num_valid: Array | None = None,
        hook: Hook | None = None,
    ) -> tuple[Array, kvcache.KVCache]:
        """Runs T new tokens per row through the model, appending them to `cache`.

        Args:
          tokens: int32[B, T]; positions: int32[B, T] (their RoPE positions).
          cache: a KVCache with room for T more tokens in every head of every layer.
          num_valid: int32[B], how many leading tokens of each row are real (default T).
          hook: optional `hook(layer, layer_cache, obs) -> layer_cache`, called after each
            layer's attention (compressors).
        Returns:
          hidden [B, T, E] after the final norm, and the updated cache.
        """
        b, t = tokens.shape
        if num_valid is None:
            num_valid = jnp.full((b,), t, jnp.int32)
        x = self.embed_tokens(tokens)
        layers = []
        for block, layer_cache in zip(self.layers, cache.layers):
            x, layer_cache = block(x, positions, num_valid, layer_cache, hook)
            layers.append(layer_cache)
        return self.norm(x), cache.replace(layers=tuple(layers))

    def logits(self, hidden: Array) -> Array:
        """float32[..., V] next-token logits of final-normed hidden states."""
        if self.config.tie_word_embeddings:
            out = self.embed_tokens.attend(hidden)
        else:
            out = self.lm_head(hidden)
        return out.astype(jnp.float32)


def from_hf_config(d: Mapping[str, Any]) -> LlamaConfig:
    """A LlamaConfig from a Hugging Face config.json dict (transformers 4.x and 5.x layouts)."""
    model_type = d.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"config.json: unknown model_type {model_type!r}; supported: {SUPPORTED_MODEL_TYPES}"
        )
    act = d.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"config.json: hidden_act {act!r} is not supported (only 'silu')")
    params = dict(d.get("rope_parameters") or {})
    theta = params.pop("rope_theta", d.get("rope_theta", 10000.0))
    scaling = d.get("rope_scaling") or params or None
    if scaling is not None:
        scaling = {k: v for k, v in scaling.items() if k != "rope_theta"}
        if scaling.get("rope_type", scaling.get("type", "default")) == "default":
            scaling = None
    heads = d["num_attention_heads"]
    head_dim = d.get("head_dim") or d["hidden_size"] // heads
    window = d.get("sliding_window")
    sliding_layers = None
    if model_type in ("qwen2", "qwen3"):
        if not d.get("use_sliding_window", False):
            window = None
        elif d.get("layer_types"):
            sliding_layers = tuple(t == "sliding_attention" for t in d["layer_types"])
    eos = d.get("eos_token_id")
    if isinstance(eos, list):
        eos = eos[0] if eos else None
    return LlamaConfig(
        model_type=model_type,
        vocab_size=d["vocab_size"],
        hidden_size=d["hidden_size"],
        intermediate_size=d["intermediate_size"],
        num_hidden_layers=d["num_hidden_layers"],
        num_attention_heads=heads,
        num_key_value_heads=d.get("num_key_value_heads") or heads,
        head_dim=head_dim,
        rms_norm_eps=d.get("rms_norm_eps", 1e-6),
        rope_theta=float(theta),
        rope_scaling=None if scaling is None else tuple(sorted(scaling.items())),
        max_position_embeddings=d.get("max_position_embeddings", 4096),
        tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
        attention_bias=bool(d.get("attention_bias", model_type == "qwen2")),
        mlp_bias=bool(d.get("mlp_bias", False)),
        qk_norm=model_type == "qwen3",
        sliding_window=window,
        sliding_layers=sliding_layers,
        bos_token_id=d.get("bos_token_id"),
        eos_token_id=eos,
    )


def to_hf_config(c: LlamaConfig, dtype: Any) -> dict[str, Any]:
    """The config.json dict transformers reads for this config."""
    arch = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
            "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}[c.model_type]
    d: dict[str, Any] = {
        "architectures": [arch],
        "model_type": c.model_type,
        "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_hidden_layers,
        "num_attention_heads": c.num_attention_heads,
        "num_key_value_heads": c.num_key_value_heads,
        "head_dim": c.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": c.rms_norm_eps,
        "rope_theta": c.rope_theta,
        "rope_scaling": c.rope_scaling_dict,
        "max_position_embeddings": c.max_position_embeddings,
        "tie_word_embeddings": c.tie_word_embeddings,
        "attention_bias": c.attention_bias,
        "mlp_bias": c.mlp_bias,
        "sliding_window": c.sliding_window,
        "use_sliding_window": c.sliding_window is not None,
        "bos_token_id": c.bos_token_id,
        "eos_token_id": c.eos_token_id,
        "torch_dtype": {"float32": "float32", "bfloat16": "bfloat16",
                        "float16": "float16"}[jnp.dtype(dtype).name],
    }
    return d
