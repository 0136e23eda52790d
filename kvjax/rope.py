"""Rotary position embeddings (Hugging Face "rotate_half" layout) with Llama-3 and linear scaling.

`inv_freq` is a float32[D/2] array computed once from the model config; `apply` rotates
[B, H, T, D] vectors by their positions int32[B, T]; `rerotate` moves already rotated keys from
their old positions to new ones (used when evicted caches are re-indexed contiguously).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


def inv_freq(head_dim: int, theta: float, scaling: Mapping[str, Any] | None = None) -> np.ndarray:
    """float32[head_dim // 2] inverse frequencies, as transformers computes them."""
    exponents = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
    freq = (1.0 / (np.float32(theta) ** exponents)).astype(np.float32)
    scaling = scaling or {}
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type == "default":
        return freq
    if rope_type == "linear":
        return (freq / np.float32(scaling["factor"])).astype(np.float32)
    if rope_type == "llama3":
        factor = float(scaling["factor"])
        low = float(scaling["low_freq_factor"])
        high = float(scaling["high_freq_factor"])
        old_len = float(scaling["original_max_position_embeddings"])
        wavelen = 2 * math.pi / freq
        low_wavelen, high_wavelen = old_len / low, old_len / high
        scaled = np.where(wavelen > low_wavelen, freq / factor, freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return np.where(medium, smoothed, scaled).astype(np.float32)
    raise ValueError(
        f"unsupported rope_scaling type {rope_type!r}; supported: {SUPPORTED_ROPE_TYPES}"
    )


def cos_sin(positions: Array, freq: Array, dtype: Any) -> tuple[Array, Array]:
    """cos, sin of shape [B, 1, T, D] for positions int32[B, T]."""
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(freq, jnp.float32)
    emb = jnp.concatenate([angles, angles], axis=-1)[:, None]
    return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def rotate_half(x: Array) -> Array:
    half = x.shape[-1] // 2
    return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def apply(x: Array, positions: Array, freq: Array) -> Array:
    """Rotates x [B, H, T, D] by positions int32[B, T] (negative positions are treated as 0)."""
    cos, sin = cos_sin(jnp.maximum(positions, 0), freq, x.dtype)
    return x * cos + rotate_half(x) * sin


def rerotate(keys: Array, old_positions: Array, new_positions: Array, freq: Array) -> Array:
    """Moves rotated keys [B, H, C, D] from old to new positions (both int32[B, H, C]).

    A rotation by delta = new - old, computed in float32: R(new) k_raw = R(delta) R(old) k_raw.
    """
    delta = (new_positions - old_positions).astype(jnp.float32)
    angles = delta[..., None] * jnp.asarray(freq, jnp.float32)
    emb = jnp.concatenate([angles, angles], axis=-1)
    k32 = keys.astype(jnp.float32)
    out = k32 * jnp.cos(emb) + rotate_half(k32) * jnp.sin(emb)
    return out.astype(keys.dtype)
