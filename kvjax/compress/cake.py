"""CAKE: layer budgets from attention preferences, tokens scored by mean + variance.

Qin et al., "CAKE: Cascading and Adaptive KV Cache Eviction with Layer Preferences" (ICLR 2025;
reference code github.com/antgroup/cakekv). With A the softmax attention of the last w prompt
queries (the observation window) over the cache, restricted to the prefix (the tokens before
the window):

  spatial dispersion  H_l = -sum A log(A + 1e-10)          (over heads, window queries, prefix)
  temporal shift      V_l = sum over heads and prefix of Var_queries(A)   (unbiased variance)
  layer preference    P_l = H_l^(1 / tau1) * V_l^(1 / tau2)
  layer budget        B_l = P_l / sum_k P_k * total, capped at the prefix length, the excess
                      handed to the other layers (total = L * (budget - w))
  token score         s = avg_pool_k(Mean_queries(A) + gamma * Var_queries(A)), GQA-group mean
  keep                the top B_l prefix tokens of each head by s, plus the observation window

Defaults (reference scripts): w = 32, tau1 = tau2 = 1, gamma = 200, pooling kernel 5 (avg,
zero padded).

Static capacities: kvjax caches have static shapes, but B_l depends on every layer's attention
on the prompt. The paper's cascading management (re-allocating budgets as each new layer is
prefilled, so the running total never exceeds the budget) exists because budgets are unknown
until the last layer; here they are fixed before the compressing pass instead:

  1. `cake_calibrate(model, tokens, budget=...)` runs one prefill with `cake_probe` (which
     keeps the cache and returns each row's P_l as its state), averages the normalised
     preferences over the rows and allocates `layer_budgets`: a tuple of Python ints, one per
     layer, each budget_l = B_l + w, summing to L * budget (the uniform total).
  2. `cake(layer_budgets=...)` gives layer l a dense LayerCache of static capacity
     layer_budgets[l]: the memory of the whole cache is exactly that of a uniform budget,
     re-divided between layers by preference; no layer ever stores more than its share.

Calibrating on a representative prompt set gives one budget vector, hence one compilation, for
all later prompts; calibrating on each prompt reproduces the per-prompt allocation of the
paper at the cost of one extra prefill and a compilation per distinct budget vector. Without
`layer_budgets`, `cake` is the CAKE token score under a uniform budget. Decode-time eviction of
the reference (re-scoring with the newest query) is not implemented: decode appends grow the
cache as usual.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from kvjax.cache import LayerCache
from kvjax.compress.base import Compressor, Observation, State, valid_slots
from kvjax.compress.scorer import (
    check_budget_args,
    check_int,
    group_mean,
    resolve_budget,
    window_attention,
)
from kvjax.headwise import dense_from_mask

Array = jax.Array


def _window_probs(cache: LayerCache, obs: Observation, window_size: int) -> tuple[Array, Array]:
    """(float32[B, Hq, w, C] window attention, bool[B, C] prefix slots of head 0)."""
    qpos = obs.query_positions[:, -window_size:]
    probs = window_attention(cache, obs, window_size)
    first = jnp.min(jnp.where(qpos >= 0, qpos, jnp.iinfo(jnp.int32).max), axis=1)
    prefix = valid_slots(cache)[:, 0] & (cache.positions[:, 0] < first[:, None])
    return probs, prefix


def _query_stats(probs: Array, qpos: Array) -> tuple[Array, Array]:
    """Mean and unbiased variance over the real window queries: float32[B, Hq, C] each."""
    real = (qpos >= 0)[:, None, :, None]
    n = jnp.sum(real, axis=2)
    mean = jnp.sum(jnp.where(real, probs, 0.0), axis=2) / jnp.maximum(n, 1)
    sq = jnp.sum(jnp.where(real, (probs - mean[:, :, None]) ** 2, 0.0), axis=2)
    return mean, sq / jnp.maximum(n - 1, 1)


def cake_preference(
    cache: LayerCache,
    obs: Observation,
    window_size: int = 32,
    tau1: float = 1.0,
    tau2: float = 1.0,
) -> Array:
    """float32[B]: the layer preference P_l of each row (module docstring)."""
    probs, prefix = _window_probs(cache, obs, window_size)
    qpos = obs.query_positions[:, -window_size:]
    on = prefix[:, None, None, :] & (qpos >= 0)[:, None, :, None]
    a = jnp.where(on, probs, 0.0)
    entropy = -jnp.sum(a * jnp.log(a + 1e-10), axis=(1, 2, 3))
    _, var = _query_stats(probs, qpos)
    variance = jnp.sum(jnp.where(prefix[:, None, :], var, 0.0), axis=(1, 2))
    return entropy ** (1.0 / tau1) * variance ** (1.0 / tau2)


def cake_scores(
    cache: LayerCache,
    obs: Observation,
    window_size: int = 32,
    gamma: float = 200.0,
    kernel_size: int = 5,
) -> Array:
    """float32[B, Hkv, C]: CAKE's token score; window tokens +inf, invalid slots -inf."""
    probs, prefix = _window_probs(cache, obs, window_size)
    qpos = obs.query_positions[:, -window_size:]
    mean, var = _query_stats(probs, qpos)
    s = jnp.where(prefix[:, None, :], mean + gamma * var, 0.0)
    pad = kernel_size // 2
    sp = jnp.pad(s, ((0, 0), (0, 0), (pad, pad)))
    c = cache.capacity
    s = sum(sp[..., i : i + c] for i in range(kernel_size)) / kernel_size
    s = group_mean(s, cache.num_heads)
    valid = valid_slots(cache)
    s = jnp.where(prefix[:, None, :], s, jnp.inf)
    return jnp.where(valid, s, -jnp.inf)


def allocate(preferences: Sequence[float], total: int, cap: int) -> tuple[int, ...]:
    """Integer budgets proportional to `preferences`, each <= cap, summing to min(total, L*cap).

    Budgets above the cap are clipped and the excess is re-divided among the other layers in
    proportion to their preferences (repeated until nothing exceeds the cap); the rounding
    remainder goes to the layers with the largest fractional parts. (The reference's
    `adjust_budgets` floors, then spreads the excess evenly over the uncapped layers.)
    """
    p = np.asarray(preferences, np.float64)
    if p.ndim != 1 or p.size == 0 or not np.all(np.isfinite(p)) or np.any(p < 0):
        raise ValueError(f"preferences must be a non-empty list of finite floats >= 0, got {p}")
    if p.sum() == 0:
        p = np.ones_like(p)
    total = int(min(total, cap * p.size))
    share = np.zeros_like(p)
    fixed = np.zeros(p.size, bool)
    left = float(total)
    while True:
        free = ~fixed
        weights = np.where(free, p, 0.0)
        if weights.sum() == 0:
            weights = free.astype(np.float64)
        share = np.where(fixed, cap, weights / weights.sum() * left)
        over = free & (share > cap)
        if not over.any():
            break
        fixed |= over
        left = total - cap * fixed.sum()
    out = np.minimum(np.floor(share), cap).astype(np.int64)
    rest = total - int(out.sum())
    order = np.argsort(-(share - np.floor(share)), kind="stable")
    for i in order:
        if rest <= 0:
            break
        if out[i] < cap:
            out[i] += 1
            rest -= 1
    return tuple(int(x) for x in out)


def cake(
    compression_ratio: float | None = None,
    *,
    budget: int | None = None,
    layer_budgets: tuple[int, ...] | None = None,
    window_size: int = 32,
    gamma: float = 200.0,
    kernel_size: int = 5,
) -> Compressor:
    """CAKE eviction (see the module docstring).

    Args:
      compression_ratio / budget: the uniform per-layer budget (tokens kept per head,
        window included) when `layer_budgets` is not given.
      layer_budgets: static tokens kept per head for each layer (from `cake_calibrate`).
      window_size: observation window w; gamma: weight of the variance; kernel_size: pooling.
    """
    if layer_budgets is None:
        compression_ratio, budget = check_budget_args(compression_ratio, budget)
    else:
        if compression_ratio is not None or budget is not None:
            raise ValueError("give layer_budgets or compression_ratio/budget, not both")
        layer_budgets = tuple(layer_budgets)
        if not layer_budgets:
            raise ValueError("layer_budgets must be a non-empty tuple of ints >= 1")
        layer_budgets = tuple(check_int("layer_budgets[i]", b, 1) for b in layer_budgets)
    window_size = check_int("window_size", window_size, 1)
    kernel_size = check_int("kernel_size", kernel_size, 1)
    if kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be an odd int >= 1, got {kernel_size}")
    if not isinstance(gamma, (int, float)) or gamma < 0:
        raise ValueError(f"gamma must be a float >= 0, got {gamma!r}")
    return _cake(compression_ratio, budget, layer_budgets, window_size, float(gamma), kernel_size)


@functools.cache
def _cake(
    compression_ratio: float | None,
    budget: int | None,
    layer_budgets: tuple[int, ...] | None,
    window_size: int,
    gamma: float,
    kernel_size: int,
) -> Compressor:
    def init(cache: Any) -> State:
        return ()

    def prefill(cache: LayerCache, obs: Observation, state: State):
        if not isinstance(cache, LayerCache):
            raise TypeError(f"cake needs a dense LayerCache, got {type(cache).__name__}")
        c = cache.capacity
        if layer_budgets is not None:
            if len(layer_budgets) != obs.num_layers:
                raise ValueError(
                    f"layer_budgets has {len(layer_budgets)} entries, the model has "
                    f"{obs.num_layers} layers"
                )
            n = min(layer_budgets[obs.layer], c)
        else:
            n = resolve_budget(c, compression_ratio, budget, allow_larger=True)
        scores = cake_scores(cache, obs, window_size, gamma, kernel_size)
        _, idx = jax.lax.top_k(scores, n)
        b, h = cache.lengths.shape
        keep = jnp.zeros(scores.shape, bool).at[
            jnp.arange(b)[:, None, None], jnp.arange(h)[None, :, None], idx
        ].set(True)
        return dense_from_mask(cache, keep, n), state

    def decode(cache: LayerCache, obs: Observation, state: State):
        return cache, state

    return Compressor(init=init, prefill=prefill, decode=decode)


@functools.cache
def cake_probe(window_size: int = 32, tau1: float = 1.0, tau2: float = 1.0) -> Compressor:
    """Keeps the cache; the state after prefill is each row's layer preference, float32[B]."""

    def prefill(cache: LayerCache, obs: Observation, state: State):
        return cache, cake_preference(cache, obs, window_size, tau1, tau2)

    def keep(cache: Any, obs: Observation, state: State):
        return cache, state

    return Compressor(init=lambda cache: jnp.zeros((cache.batch,), jnp.float32),
                      prefill=prefill, decode=keep)


def cake_calibrate(
    model: Any,
    tokens: Any,
    compression_ratio: float | None = None,
    *,
    budget: int | None = None,
    window_size: int = 32,
    tau1: float = 1.0,
    tau2: float = 1.0,
    lengths: Any = None,
) -> tuple[int, ...]:
    """Static per-layer budgets (tokens kept per head, window included) for `cake`.

    Runs one prefill of `tokens` (int[B, T], left-padded with `lengths` as in `prefill`),
    normalises each row's preferences over layers, averages them over rows and divides
    L * (budget - w) prefix tokens between layers (each capped at T - w); every layer then
    gets its share + w. The budget comes from `budget` or `compression_ratio` of T.
    """
    from kvjax.generate import prefill

    compression_ratio, budget = check_budget_args(compression_ratio, budget)
    for name, v in (("tau1", tau1), ("tau2", tau2)):
        if not isinstance(v, (int, float)) or v <= 0:
            raise ValueError(f"{name} must be a float > 0, got {v!r}")
    t = int(np.shape(tokens)[1])
    per_layer = resolve_budget(t, compression_ratio, budget, allow_larger=True)
    if per_layer < window_size or t <= window_size:
        raise ValueError(
            f"cake_calibrate: the budget ({per_layer}) and the prompt length ({t}) must be >= "
            f"window_size ({window_size}) (the prompt strictly longer)"
        )
    probe = cake_probe(int(window_size), float(tau1), float(tau2))
    _, _, states = prefill(model, tokens, compressor=probe, lengths=lengths, return_state=True)
    prefs = np.stack([np.asarray(s, np.float64) for s in states])  # [L, B]
    norm = prefs / np.maximum(prefs.sum(axis=0, keepdims=True), 1e-30)
    share = norm.mean(axis=1)
    num_layers = prefs.shape[0]
    prefix = allocate(share, num_layers * (per_layer - window_size), t - window_size)
    return tuple(b + window_size for b in prefix)
