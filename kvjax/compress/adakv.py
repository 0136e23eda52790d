"""AdaKV: adaptive head-wise budgets by a joint top-k over the heads of a layer.

Feng et al., "Ada-KV: Optimizing KV Cache Eviction by Adaptive Budget Allocation for Efficient
LLM Inference" (arXiv:2407.11550). Per layer, with a per-head average budget n_kept, a scorer's
scores s[b, h, t] (higher = keep) and the safeguard alpha:

  n_safe  = int(alpha * n_kept)  (at least 1 when alpha > 0 and n_kept > 0)
  s'      = s with each head's top n_safe scores raised to float32 max (the safeguard floor)
  kept    = top (Hkv * n_kept) of s' over all heads of the row jointly

so head h keeps between n_safe and min(C, Hkv * n_kept - (Hkv - 1) * n_safe) tokens. This is
kvpress's `AdaKVPress` rule (the parity reference: n_kept = max(1, int(C * (1 - ratio))),
safeguard via float max), which prunes the bottom Hkv * (C - n_kept) instead of taking the top:
the same set up to ties at the boundary. Defaults: alpha_safeguard = 0.2 (paper and kvpress).

Unlike kvpress, which keeps every token and masks pruned ones at decode time, the result is a
`kvjax.headwise.HeadwiseLayerCache` with a pool of exactly Hkv * n_kept slots: the layer's
memory is that of a dense cache of capacity n_kept (+ 8 bytes of offsets/capacities per head).
Decode appends go to per-head regions that `generate` grows by max_new_tokens per head.

AdaKV must be the last compressor of a `chain` (later members see a head-wise cache).
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from kvjax.cache import LayerCache
from kvjax.compress.base import Compressor, Observation, State, valid_slots
from kvjax.compress.scorer import check_budget_args, resolve_budget
from kvjax.headwise import HeadwiseLayerCache, from_mask

Array = jax.Array
Scorer = Callable[..., Array]


def resolve_scorer(scorer_or_name: str | Scorer) -> Scorer:
    """A scorer callable, or the name of a method module exporting `<name>_scores`."""
    if callable(scorer_or_name):
        return scorer_or_name
    if not isinstance(scorer_or_name, str):
        raise TypeError(
            f"scorer_or_name must be a callable or a method name, got {type(scorer_or_name)}"
        )
    name = scorer_or_name
    try:
        module = importlib.import_module(f"kvjax.compress.{name}")
        return getattr(module, f"{name}_scores")
    except (ImportError, AttributeError):
        raise ValueError(
            f"scorer_or_name {name!r} is not a kvjax method with a `{name}_scores` function "
            "(e.g. 'snapkv', 'knorm', 'expected_attention')"
        ) from None


def adakv_keep_mask(
    scores: Array, valid: Array, n_kept: int, alpha_safeguard: float
) -> Array:
    """bool[B, Hkv, C]: the AdaKV selection of the valid slots (see module docstring)."""
    b, h, c = scores.shape
    total = h * n_kept
    if total >= h * c:
        return valid
    s = jnp.where(valid, scores.astype(jnp.float32), -jnp.inf)
    n_safe = int(n_kept * alpha_safeguard)
    if alpha_safeguard > 0:
        n_safe = max(1, n_safe) if n_kept > 0 else 0
    if n_safe > 0:
        _, top = jax.lax.top_k(s, min(n_safe, c))
        floor = jnp.zeros_like(valid).at[
            jnp.arange(b)[:, None, None], jnp.arange(h)[None, :, None], top
        ].set(True)
        s = jnp.where(floor & valid, jnp.finfo(jnp.float32).max, s)
    _, idx = jax.lax.top_k(s.reshape(b, h * c), total)
    keep = jnp.zeros((b, h * c), bool).at[jnp.arange(b)[:, None], idx].set(True)
    return keep.reshape(b, h, c) & valid


def adakv(
    scorer_or_name: str | Scorer,
    compression_ratio: float | None = None,
    *,
    budget: int | None = None,
    alpha_safeguard: float = 0.2,
    **scorer_params: Any,
) -> Compressor:
    """AdaKV around any scorer (a `*_scores(cache, obs, **params)` function or its name).

    Args:
      scorer_or_name: e.g. "snapkv", "knorm", "expected_attention", or a callable
        `(cache, obs, **scorer_params) -> float32[B, Hkv, C]` (higher = keep).
      compression_ratio: fraction of the layer's tokens removed (kvpress semantics); or
      budget: average tokens kept per head (the pool holds Hkv x budget).
      alpha_safeguard: fraction of the per-head budget every head keeps, in [0, 1].
      **scorer_params: forwarded to the scorer (hashable values: the factory is memoised).
    """
    compression_ratio, budget = check_budget_args(compression_ratio, budget)
    if not (isinstance(alpha_safeguard, (int, float)) and 0 <= alpha_safeguard <= 1):
        raise ValueError(f"alpha_safeguard must be in [0, 1], got {alpha_safeguard!r}")
    scorer = resolve_scorer(scorer_or_name)
    params = tuple(sorted(scorer_params.items()))
    try:
        hash(params)
    except TypeError:
        raise TypeError("scorer_params values must be hashable (use tuples)") from None
    return _adakv(scorer, compression_ratio, budget, float(alpha_safeguard), params)


@functools.cache
def _adakv(
    scorer: Scorer,
    compression_ratio: float | None,
    budget: int | None,
    alpha_safeguard: float,
    params: tuple[tuple[str, Any], ...],
) -> Compressor:
    def init(cache: Any) -> State:
        return ()

    def prefill(cache: LayerCache, obs: Observation, state: State):
        if not isinstance(cache, LayerCache):
            raise TypeError(f"adakv needs a dense LayerCache, got {type(cache).__name__}")
        c = cache.capacity
        n_kept = min(resolve_budget(c, compression_ratio, budget, allow_larger=True), c)
        scores = scorer(cache, obs, **dict(params))
        keep = adakv_keep_mask(scores, valid_slots(cache), n_kept, alpha_safeguard)
        return from_mask(cache, keep, cache.num_heads * n_kept), state

    def decode(cache: HeadwiseLayerCache, obs: Observation, state: State):
        return cache, state

    return Compressor(init=init, prefill=prefill, decode=decode)
