"""Shared plumbing of score-based eviction: budgets, protected tokens, `from_scorer`.

A scorer is a pure function `scorer(cache, obs) -> float32[B, Hkv, C]` (higher = keep; values
of invalid slots are ignored). Every score-based method file exports `<name>_scores` with that
signature (extra parameters are keyword arguments bound by the factory) and a factory built on
`from_scorer`, which turns a scorer into a `Compressor`:

    comp = from_scorer(knorm_scores, compression_ratio=0.5)
    comp = from_scorer(functools.partial(snapkv_scores, window=32), budget=1024, keep_window=32)

Budgets (kvpress semantics). `compression_ratio` r in [0, 1) is the fraction removed:
n_kept = max(1, int(C * (1 - r))) with C the static capacity the compressor sees at prefill
(the padded prompt length T unless `prefill(capacity=...)` says otherwise), exactly
`kvpress.utils.compute_n_kept`. An absolute `budget` (int >= 1) keeps that many slots per head.
Budgets are resolved from static shapes at trace time, so a budget change recompiles and a
change of prompt contents does not. Rows shorter than the budget (left-padded batches) keep
all their tokens.

Protected tokens. kvpress pads the scores of an observation window (or sinks) with
`max(scores) + 1` so top-k keeps them; scorers here do the same (per row instead of over the
whole batch, which is the same for kvpress's batch of one) via `protect`. `from_scorer` adds
`keep_window` / `keep_sinks` on top (+inf) and validates that the budget can hold them.

Decode time (`decode=True`). After each generated token is appended, a head holding more than
the budget evicts its lowest-scoring unprotected slot: the newest token (at slot length - 1) is
moved into the evicted slot, so a step costs O(C) for the argmin and O(D) for the move, and the
layer needs only budget + 1 slots (`decode_capacity`). Slot order is then no longer position
order; every method here identifies tokens by `positions`, never by slot index, except the
pooling of SnapKV which smooths over slot neighbours (position order after any prefill). With
`rerotate` as well, the tokens older than the evicted one move one position later, so the kept
keys stay contiguous (StreamingLLM's positions-within-the-cache).

Key re-rotation (`rerotate=True`, kvpress KeyRerotationPress). Kept keys are re-rotated to
contiguous positions. kvpress renumbers them 0..n-1 and continues generation at position n;
here they get positions L-n..L-1 (L = the row's prompt length), so the next token keeps
position L = `cache.next_position` and every query/key distance is exactly kvpress's (RoPE
depends only on distances). `LayerCache.positions` then holds the new positions.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from kvjax import rope
from kvjax.attention import attention_probs
from kvjax.cache import LayerCache, grow
from kvjax.compress.base import Compressor, Observation, State, keep_topk, valid_slots

Array = jax.Array
Scorer = Callable[[LayerCache, Observation], Array]

_BIG = jnp.iinfo(jnp.int32).max

# --- argument checks ------------------------------------------------------------------------


def check_int(name: str, value: Any, low: int, high: int | None = None) -> int:
    """`value` as an int in [low, high]; ValueError naming `name` otherwise (bools rejected)."""
    ok = isinstance(value, (int, np.integer)) and not isinstance(value, bool)
    if not ok or value < low or (high is not None and value > high):
        rng = f"[{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be an int {rng}, got {value!r}")
    return int(value)


def check_budget_args(
    compression_ratio: float | None, budget: int | None
) -> tuple[float | None, int | None]:
    """Factory-time check: exactly one of `compression_ratio` in [0, 1) or `budget` >= 1."""
    if (compression_ratio is None) == (budget is None):
        raise ValueError(
            "pass exactly one of compression_ratio (fraction removed, in [0, 1)) or budget "
            f"(tokens kept per head, >= 1); got compression_ratio={compression_ratio!r}, "
            f"budget={budget!r}"
        )
    if compression_ratio is not None:
        ok = isinstance(compression_ratio, (int, float, np.floating)) and not isinstance(
            compression_ratio, bool
        )
        if not ok or not 0.0 <= float(compression_ratio) < 1.0:
            raise ValueError(f"compression_ratio must be in [0, 1), got {compression_ratio!r}")
        return float(compression_ratio), None
    return None, check_int("budget", budget, 1)


def n_kept(length: int, compression_ratio: float) -> int:
    """kvpress `compute_n_kept`: max(1, int(length * (1 - compression_ratio)))."""
    return max(1, int(length * (1 - compression_ratio)))


def resolve_budget(
    capacity: int,
    compression_ratio: float | None,
    budget: int | None,
    *,
    reserved: int = 0,
    reserved_name: str = "",
    allow_larger: bool = False,
) -> int:
    """Trace-time budget for a layer of static `capacity`; checks it against the reserved count.

    `reserved` tokens (window + sinks) must fit: a budget below them raises ValueError naming
    `reserved_name`. An explicit budget larger than the capacity raises unless `allow_larger`
    (decode-time methods may keep a prompt shorter than their budget).
    """
    if budget is not None:
        if budget > capacity and not allow_larger:
            raise ValueError(
                f"budget ({budget}) is larger than the prompt (static cache capacity {capacity}); "
                f"use budget <= {capacity} or compression_ratio"
            )
        n = budget
    else:
        n = n_kept(capacity, compression_ratio)
    if n < reserved:
        what = f"budget ({budget})" if budget is not None else (
            f"compression_ratio={compression_ratio} (keeps {n} of {capacity})"
        )
        raise ValueError(f"{what} is below {reserved_name} ({reserved}); it must keep them all")
    return n


def check_window(window: int, obs: Observation, name: str = "window") -> None:
    """Trace-time check that the observation holds more than `window` queries (kvpress asserts)."""
    t = obs.queries.shape[2]
    if window >= t:
        raise ValueError(
            f"{name} ({window}) must be smaller than the observed prompt ({t} queries); "
            f"use a shorter {name} or a longer prompt (with chunked prefill, a larger chunk)"
        )


SCORER_NAMES = ("snapkv", "knorm", "tova", "h2o", "expected_attention", "streaming_llm")


def resolve_scorer(scorer: Scorer | str) -> Scorer:
    """A scorer function, or the default-parameter `<name>_scores` of a name in SCORER_NAMES."""
    if isinstance(scorer, str):
        if scorer not in SCORER_NAMES:
            raise ValueError(f"scorer must be a callable or one of {SCORER_NAMES}, got {scorer!r}")
        import importlib

        module = importlib.import_module(f"kvjax.compress.{scorer}")
        return getattr(module, f"{scorer}_scores")
    if not callable(scorer):
        raise TypeError(f"scorer must be callable (cache, obs) -> scores, got {scorer!r}")
    return scorer


# --- token masks ----------------------------------------------------------------------------


def last_position(obs: Observation) -> Array:
    """int32[B]: position of each row's last query (observations are right-aligned)."""
    return obs.query_positions[:, -1]


def recent_mask(cache: LayerCache, obs: Observation, n: int) -> Array:
    """bool[B, Hkv, C]: valid slots among the row's last `n` positions (the observation window)."""
    if n <= 0:
        return jnp.zeros(cache.positions.shape, bool)
    start = last_position(obs) - (n - 1)
    return valid_slots(cache) & (cache.positions >= start[:, None, None])


def oldest_mask(cache: LayerCache, n: int) -> Array:
    """bool[B, Hkv, C]: the `n` valid slots of lowest position per head (attention sinks).

    Rank based, so sinks stay sinks after key re-rotation renumbers positions; on a fresh
    prefill cache this is `positions < n`.
    """
    valid = valid_slots(cache)
    if n <= 0:
        return jnp.zeros(valid.shape, bool)
    k = min(n, cache.capacity)
    neg = jnp.where(valid, -cache.positions, -_BIG)
    kth = -jnp.sort(neg, axis=-1)[..., -k]  # n-th smallest valid position (no collectives)
    return valid & (cache.positions <= kth[..., None])


def protect(scores: Array, mask: Array, valid: Array) -> Array:
    """kvpress padding: masked slots get (max of the head's other valid scores) + 1.

    scores float32[B, Hkv, C]; mask/valid bool[B, Hkv, C]. kvpress takes the max over the whole
    tensor; per head it keeps exactly the same tokens under per-head top-k and needs no
    communication when heads are sharded. Under AdaKV's joint top-k over heads a head's
    protected tokens are still its top scores, so they survive whenever they fit in the head's
    floor (alpha x budget); kvpress's global max would keep them regardless.
    """
    others = valid & ~mask
    peak = jnp.max(jnp.where(others, scores, -jnp.inf), axis=2, keepdims=True)
    peak = jnp.where(jnp.isfinite(peak), peak, 0.0)
    return jnp.where(mask, peak + 1.0, scores)


# --- shared attention statistics --------------------------------------------------------------


def group_mean(x: Array, num_kv_heads: int) -> Array:
    """[B, Hq, ...] -> [B, Hkv, ...]: mean over each KV head's query group (transformers order)."""
    b, hq = x.shape[:2]
    return x.reshape((b, num_kv_heads, hq // num_kv_heads) + x.shape[2:]).mean(axis=2)


def window_attention(cache: LayerCache, obs: Observation, window: int) -> Array:
    """float32[B, Hq, window, C]: softmax attention of the last `window` queries over the cache.

    Same mask as the model (positions, optional sliding window); padding queries give zero rows.
    """
    q = obs.queries[:, :, -window:]
    qpos = obs.query_positions[:, -window:]
    return attention_probs(q, qpos, cache, obs.scale, obs.sliding_window)


# --- eviction -------------------------------------------------------------------------------


def rerotate_contiguous(cache: LayerCache, end: Array, inv_freq: Array) -> LayerCache:
    """Re-rotates kept keys to contiguous positions end-n+1..end (n valid slots per head).

    end: int32[B]. Position order is preserved (rank among valid slots).
    """
    valid = valid_slots(cache)
    key = jnp.where(valid, cache.positions, _BIG)
    rank = jnp.argsort(jnp.argsort(key, axis=-1), axis=-1).astype(jnp.int32)
    count = jnp.sum(valid, axis=-1, keepdims=True).astype(jnp.int32)
    new = jnp.where(valid, end[:, None, None] - count + 1 + rank, -1)
    keys = rope.rerotate(cache.keys, jnp.maximum(cache.positions, 0), jnp.maximum(new, 0),
                         inv_freq)
    keys = jnp.where(valid[..., None], keys, cache.keys)
    return cache.replace(keys=keys, positions=new)


def evict_one(
    cache: LayerCache,
    scores: Array,
    budget: int,
    inv_freq: Array | None = None,
) -> LayerCache:
    """Decode step: every head holding more than `budget` tokens drops its lowest-scoring slot.

    The head's newest token (slot lengths - 1, just appended) moves into the freed slot; with
    `inv_freq` the older tokens than the evicted one are re-rotated one position later so the
    kept keys stay contiguous (streaming re-indexing). scores: float32[B, Hkv, C], +inf protects.
    """
    b, h, c = scores.shape
    valid = valid_slots(cache)
    over = cache.lengths > budget  # [B, H]
    victim = jnp.argmin(jnp.where(valid, scores.astype(jnp.float32), jnp.inf), axis=-1)
    src = jnp.maximum(cache.lengths - 1, 0)
    dst = jnp.where(over, victim, src).astype(jnp.int32)
    bi = jnp.arange(b)[:, None]
    hi = jnp.arange(h)[None, :]
    evicted_pos = cache.positions[bi, hi, dst]
    if inv_freq is not None:
        shift = (over[..., None] & valid & (cache.positions < evicted_pos[..., None])).astype(
            jnp.int32
        )
        moved = rope.rerotate(cache.keys, cache.positions, cache.positions + shift, inv_freq)
        cache = cache.replace(
            keys=jnp.where(shift[..., None] > 0, moved, cache.keys),
            positions=cache.positions + shift,
        )

    def move(arr: Array) -> Array:
        return arr.at[bi, hi, dst].set(arr[bi, hi, src])

    positions = move(cache.positions)
    positions = positions.at[bi, hi, src].set(jnp.where(over, -1, positions[bi, hi, src]))
    return cache.replace(
        keys=move(cache.keys),
        values=move(cache.values),
        positions=positions,
        lengths=jnp.where(over, cache.lengths - 1, cache.lengths).astype(jnp.int32),
        slot_data={n: move(a) for n, a in cache.slot_data.items()},
    )


def compact(cache: LayerCache, scores: Array, budget: int) -> LayerCache:
    """Keeps the `budget` best slots per head in slot order without changing the capacity."""
    if budget >= cache.capacity:
        return cache
    return grow(keep_topk(cache, scores, budget), cache.capacity)


# --- the generic compressor -----------------------------------------------------------------


def _keep(cache: LayerCache, obs: Observation, state: State):
    return cache, state


def from_scorer(
    scorer: Scorer,
    compression_ratio: float | None = None,
    budget: int | None = None,
    *,
    keep_window: int = 0,
    keep_sinks: int = 0,
    rerotate: bool = False,
    decode: bool = False,
) -> Compressor:
    """A Compressor keeping each head's top-scoring tokens (memoised: equal args, same object).

    Args:
      scorer: `scorer(cache, obs) -> float32[B, Hkv, C]`, hashable (a function or a
        functools.partial bound once by a memoised factory).
      compression_ratio, budget: exactly one (see the module docstring).
      keep_window: always keep the last `keep_window` positions (SnapKV's observation window).
      keep_sinks: always keep the `keep_sinks` oldest tokens (StreamingLLM's sinks).
      rerotate: re-rotate kept keys to contiguous positions (module docstring).
      decode: also keep every head within the budget while generating, evicting the lowest
        score after each appended token (the scorer then sees the one new query).
    """
    compression_ratio, budget = check_budget_args(compression_ratio, budget)
    keep_window = check_int("keep_window", keep_window, 0)
    keep_sinks = check_int("keep_sinks", keep_sinks, 0)
    return _from_scorer(scorer, compression_ratio, budget, keep_window, keep_sinks,
                        bool(rerotate), bool(decode))


def _forced(cache: LayerCache, obs: Observation, scores: Array, window: int, sinks: int):
    force = recent_mask(cache, obs, window) | oldest_mask(cache, sinks)
    return jnp.where(force, jnp.inf, scores.astype(jnp.float32))


@functools.cache
def _from_scorer(scorer, compression_ratio, budget, keep_window, keep_sinks, rerotate, decode):
    reserved = keep_window + keep_sinks
    reserved_name = " + ".join(
        n for n, v in (("the window", keep_window), ("the sinks", keep_sinks)) if v
    )

    def prefill(cache: LayerCache, obs: Observation, state: State):
        if keep_window:
            check_window(keep_window, obs, "window")
        n = resolve_budget(cache.capacity, compression_ratio, budget, reserved=reserved,
                           reserved_name=reserved_name, allow_larger=decode)
        if n >= cache.capacity:
            return cache, state
        scores = _forced(cache, obs, scorer(cache, obs), keep_window, keep_sinks)
        cache = keep_topk(cache, scores, n)
        if rerotate:
            cache = rerotate_contiguous(cache, last_position(obs), obs.inv_freq)
        return cache, state

    def decode_fn(cache: LayerCache, obs: Observation, state: State):
        n = budget if budget is not None else cache.capacity - 1
        scores = _forced(cache, obs, scorer(cache, obs), keep_window, keep_sinks)
        return evict_one(cache, scores, n, obs.inv_freq if rerotate else None), state

    def capacity(c: int, max_new_tokens: int) -> int:
        return min(c + max_new_tokens, max(c, budget or 0) + 1)

    if not decode:
        return Compressor(init=lambda cache: (), prefill=prefill, decode=_keep)
    return Compressor(init=lambda cache: (), prefill=prefill, decode=decode_fn,
                      decode_capacity=capacity)
