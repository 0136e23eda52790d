"""Expected Attention: score keys by the attention future queries are expected to pay them.

kvpress ExpectedAttentionPress (Devoto et al. 2025, "Expected Attention: KV Cache Compression by
Estimating Attention from Future Queries Distribution", kvpress). Future queries are modelled
as Gaussian: mean mu and covariance Sigma of the pre-RoPE queries of the prompt (the first
`n_sink` excluded), rotated by the RoPE matrix averaged over the next `n_future` positions
R = mean_p [cos(p f) I + sin(p f) P] (P the rotate_half matrix), mu' = R mu,
Sigma' = R Sigma R^T. Per query head and key k (post-RoPE, sinks excluded):

    z[t] = k.mu' / sqrt(d) + k^T Sigma' k / (2 d)         (log of E[exp(q.k / sqrt(d))])
    s = softmax_t(z),  mean over the KV head's query group,  s = (s + epsilon) * ||v[t]||

and the `n_sink` oldest tokens get max + 1. Defaults are kvpress's (n_future 512, 4 sinks,
covariance and value norms on, epsilon 0).

Statistics use the observed queries (the last chunk with chunked prefill) and the future
positions start after each row's last query. Sigma is [B, Hq, D, D] (the biased estimator, as
kvpress).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from kvjax import rope
from kvjax.cache import LayerCache
from kvjax.compress.base import Compressor, Observation, valid_slots
from kvjax.compress.scorer import (
    check_budget_args,
    check_int,
    from_scorer,
    group_mean,
    last_position,
    oldest_mask,
    protect,
)

Array = jax.Array


def averaged_rope(start: Array, n_future: int, inv_freq: Array) -> Array:
    """float32[B, D, D]: mean over positions start..start+n_future-1 of the RoPE matrix."""
    pos = start[:, None] + jnp.arange(n_future, dtype=jnp.int32)[None, :]  # [B, n]
    cos, sin = rope.cos_sin(pos, inv_freq, jnp.float32)  # [B, 1, n, D]
    c = jnp.mean(cos[:, 0], axis=1)
    s = jnp.mean(sin[:, 0], axis=1)  # [B, D]
    d = c.shape[-1]
    h = d // 2
    eye = jnp.eye(h, dtype=jnp.float32)
    zero = jnp.zeros((h, h), jnp.float32)
    p = jnp.block([[zero, -eye], [eye, zero]])  # rotate_half(x) = P x
    return c[:, :, None] * jnp.eye(d, dtype=jnp.float32) + s[:, :, None] * p


def query_statistics(obs: Observation, n_sink: int, use_covariance: bool):
    """Mean float32[B, Hq, D] and covariance [B, Hq, D, D] (or None) of the pre-RoPE queries."""
    q = obs.raw_queries.astype(jnp.float32)
    use = (obs.query_positions >= n_sink)[:, None, :, None]  # [B, 1, T, 1]
    count = jnp.maximum(jnp.sum(use, axis=2), 1).astype(jnp.float32)  # [B, 1, 1]
    mu = jnp.sum(jnp.where(use, q, 0.0), axis=2) / count
    cov = None
    if use_covariance:
        c = jnp.where(use, q - mu[:, :, None], 0.0)
        cov = jnp.einsum("bhti,bhtj->bhij", c, c) / count[..., None]
    return mu, cov


def expected_attention_scores(
    cache: LayerCache,
    obs: Observation,
    *,
    n_future: int = 512,
    n_sink: int = 4,
    use_covariance: bool = True,
    use_vnorm: bool = True,
    epsilon: float = 0.0,
) -> Array:
    """float32[B, Hkv, C] expected-attention scores (module docstring)."""
    mu, cov = query_statistics(obs, n_sink, use_covariance)
    r = averaged_rope(last_position(obs) + 1, n_future, obs.inv_freq)  # [B, D, D]
    mu = jnp.einsum("bij,bhj->bhi", r, mu)
    keys = cache.keys.astype(jnp.float32)
    d = keys.shape[-1]
    g = mu.shape[1] // cache.num_heads
    kq = jnp.repeat(keys, g, axis=1)  # [B, Hq, C, D]
    z = jnp.einsum("bhcd,bhd->bhc", kq, mu) / jnp.sqrt(jnp.float32(d))
    if use_covariance:
        cov = jnp.einsum("bij,bhjk,blk->bhil", r, cov, r)
        z = z + jnp.einsum("bhci,bhij,bhcj->bhc", kq, cov, kq) / d / 2
    valid = valid_slots(cache)
    sinks = oldest_mask(cache, n_sink)
    scored = jnp.repeat(valid & ~sinks, g, axis=1)
    z = jnp.where(scored, z, -jnp.inf)
    peak = jnp.max(z, axis=-1, keepdims=True)
    e = jnp.where(scored, jnp.exp(z - jnp.where(jnp.isfinite(peak), peak, 0.0)), 0.0)
    s = e / jnp.maximum(jnp.sum(e, axis=-1, keepdims=True), jnp.finfo(jnp.float32).tiny)
    s = group_mean(s, cache.num_heads)
    if use_vnorm:
        v = cache.values.astype(jnp.float32)
        s = (s + epsilon) * jnp.sqrt(jnp.sum(v * v, axis=-1))
    return protect(s, sinks, valid)


def expected_attention(
    compression_ratio: float | None = None,
    budget: int | None = None,
    *,
    n_future: int = 512,
    n_sink: int = 4,
    use_covariance: bool = True,
    use_vnorm: bool = True,
    epsilon: float = 0.0,
    rerotate: bool = False,
) -> Compressor:
    """Expected-attention eviction at prefill (kvpress ExpectedAttentionPress defaults)."""
    compression_ratio, budget = check_budget_args(compression_ratio, budget)
    n_future = check_int("n_future", n_future, 1)
    n_sink = check_int("n_sink", n_sink, 0)
    if not isinstance(epsilon, (int, float)) or epsilon < 0:
        raise ValueError(f"epsilon must be a float >= 0, got {epsilon!r}")
    return _expected_attention(compression_ratio, budget, n_future, n_sink, bool(use_covariance),
                               bool(use_vnorm), float(epsilon), bool(rerotate))


@functools.cache
def _expected_attention(compression_ratio, budget, n_future, n_sink, use_covariance, use_vnorm,
                        epsilon, rerotate) -> Compressor:
    scorer = functools.partial(
        expected_attention_scores, n_future=n_future, n_sink=n_sink,
        use_covariance=use_covariance, use_vnorm=use_vnorm, epsilon=epsilon,
    )
    return from_scorer(scorer, compression_ratio, budget, keep_sinks=n_sink, rerotate=rerotate)
