"""PyramidKV: per-layer budgets that shrink from bottom to top, SnapKV selection within a layer.

Cai et al. 2024, "PyramidKV: Dynamic KV Cache Compression based on Pyramidal Information
Funneling", arXiv:2406.02069. Budgets as kvpress PyramidKVPress (after KVCache-Factory), for a
prompt of T tokens, L layers, average kept a = T (1 - r) (or the given `budget`):

    m = window + a;  min = (m - window) / beta;  max = 2 (m - window) - min
    if max >= T - window: max = T - window; min = 2 (m - window) - max
    budget(l) = round(max - l (max - min) / (L - 1))        (Python round)
    unless not (T >= max >= min >= window): every layer keeps max(1, round(a)) (SnapKV).

Each layer's `LayerCache` gets its own static capacity, so the memory really shrinks; the
total is L a up to rounding. Defaults are kvpress's (window 64, kernel 5, beta 20); with short
prompts (min < window) this falls back to uniform SnapKV.
"""

from __future__ import annotations

import functools

from kvjax.cache import LayerCache
from kvjax.compress.base import Compressor, Observation, State, keep_topk
from kvjax.compress.scorer import (
    check_budget_args,
    check_int,
    check_window,
    last_position,
    rerotate_contiguous,
)
from kvjax.compress.snapkv import check_pooling_args, snapkv_scores


def layer_budget(
    length: int, layer: int, num_layers: int, average: float, window: int, beta: float
) -> int:
    """kvpress `PyramidKVPress.get_layer_budget` for a prompt of `length` and average `average`."""
    top = window + average
    low = (top - window) / beta
    high = (top - window) * 2 - low
    if high >= length - window:
        high = length - window
        low = (top - window) * 2 - high
    if not (length >= high >= low >= window):
        return max(1, round(average))
    steps = (high - low) / (num_layers - 1) if num_layers > 1 else 0.0
    return round(high - layer * steps)


def pyramid_budgets(
    length: int,
    num_layers: int,
    compression_ratio: float | None = None,
    budget: int | None = None,
    *,
    window: int = 64,
    beta: float = 20,
) -> list[int]:
    """Per-layer budgets for a prompt of `length` tokens (see the module docstring)."""
    compression_ratio, budget = check_budget_args(compression_ratio, budget)
    average = budget if budget is not None else length * (1 - compression_ratio)
    return [layer_budget(length, i, num_layers, average, window, beta) for i in range(num_layers)]


def pyramidkv(
    compression_ratio: float | None = None,
    budget: int | None = None,
    *,
    window: int = 64,
    kernel: int = 5,
    pooling: str = "avg",
    beta: float = 20,
    rerotate: bool = False,
) -> Compressor:
    """PyramidKV: SnapKV scores, layer budgets from `layer_budget`.

    Args:
      compression_ratio / budget: exactly one; `budget` is the average per layer.
      window, kernel, pooling: SnapKV's (kvpress 64, 5, "avg").
      beta: pyramid steepness, >= 1 (kvpress 20).
      rerotate: contiguous re-rotation of the kept keys.
    """
    compression_ratio, budget = check_budget_args(compression_ratio, budget)
    window, kernel, pooling = check_pooling_args(window, kernel, pooling)
    if not isinstance(beta, (int, float)) or isinstance(beta, bool) or beta < 1:
        raise ValueError(f"beta must be a number >= 1, got {beta!r}")
    return _pyramidkv(compression_ratio, budget, window, kernel, pooling, float(beta),
                      bool(rerotate))


@functools.cache
def _pyramidkv(compression_ratio, budget, window, kernel, pooling, beta, rerotate) -> Compressor:
    def prefill(cache: LayerCache, obs: Observation, state: State):
        c = cache.capacity
        check_window(window, obs)
        if budget is not None and budget > c:
            raise ValueError(f"budget ({budget}) is larger than the prompt (static capacity {c})")
        average = budget if budget is not None else c * (1 - compression_ratio)
        if budget is None and compression_ratio == 0:
            return cache, state
        n = layer_budget(c, obs.layer, obs.num_layers, average, window, beta)
        check_int("layer budget", n, 1, c)
        if n < window:
            raise ValueError(
                f"layer {obs.layer} budget ({n}) is below the window ({window}); use a larger "
                "budget / smaller compression_ratio or a smaller window"
            )
        if n >= c:
            return cache, state
        scores = snapkv_scores(cache, obs, window=window, kernel=kernel, pooling=pooling)
        cache = keep_topk(cache, scores, n)
        if rerotate:
            cache = rerotate_contiguous(cache, last_position(obs), obs.inv_freq)
        return cache, state

    return Compressor(init=lambda cache: (), prefill=prefill, decode=lambda c, o, s: (c, s))

