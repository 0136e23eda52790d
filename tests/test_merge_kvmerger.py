"""KVMerger against a direct per-head numpy implementation; merged-count attention soundness."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvjax import cache as kvcache
from kvjax.attention import attend
from kvjax.compress import chain
from kvjax.compress.base import Observation, keep_topk
from kvjax.compress.kvmerger import (
    LOG_COUNT,
    kvmerger,
    kvmerger_merge,
    window_attention_scores,
)


def _layer(keys, values, lengths, log_count=None):
    b, h, c, _ = keys.shape
    pos = np.where(np.arange(c)[None, None] < lengths[..., None], np.arange(c), -1)
    data = {} if log_count is None else {LOG_COUNT: jnp.asarray(log_count, jnp.float32)}
    return kvcache.LayerCache(jnp.asarray(keys), jnp.asarray(values), jnp.asarray(lengths),
                              jnp.asarray(pos, jnp.int32), data)


def _runs_keys(rng, b, h, c, d, noise=0.05):
    """Keys made of runs of near-identical vectors, so merging sets are non-trivial."""
    keys = np.zeros((b, h, c, d), np.float32)
    for bi in range(b):
        for hi in range(h):
            t = 0
            while t < c:
                n = rng.integers(1, 4)
                base = rng.standard_normal(d)
                for j in range(t, min(c, t + n)):
                    keys[bi, hi, j] = base + noise * rng.standard_normal(d)
                t += n
    return keys


@functools.partial(jax.jit, static_argnames=("budget", "sigma"))
def _merge_topk(layer, scores, threshold, window, budget, sigma=None):
    merged, set_scores = kvmerger_merge(layer, scores, threshold, sigma, window)
    return merged, keep_topk(merged, set_scores, budget)


@jax.jit
def _attend(q, qpos, layer):
    return attend(q, qpos, layer)


def _naive_head(k, v, n, s, lc, threshold, sigma, window):
    """One head: list of (key, value, log_count, position, score) of the merged sets."""
    kn = k / np.maximum(np.linalg.norm(k, axis=-1, keepdims=True), 1e-12)
    protect = np.arange(n) >= n - window
    sets, cur = [], [0] if n else []
    for t in range(1, n):
        same = kn[t] @ kn[t - 1] >= threshold and not protect[t] and not protect[t - 1]
        if same:
            cur.append(t)
        else:
            sets.append(cur)
            cur = [t]
    if cur:
        sets.append(cur)
    out = []
    for members in sets:
        sc = np.where(protect[members], np.inf, s[members])
        p = members[int(np.argmax(sc))]
        d2 = np.array([np.sum((k[i] - k[p]) ** 2) for i in members])
        if sigma is None:
            others = [np.sqrt(d2[j]) for j, i in enumerate(members) if i != p]
            sig = max(np.mean(others), 1e-6) if others else 1e-6
        else:
            sig = sigma
        w = np.exp(lc[members]) * np.exp(-d2 / (2 * sig**2))
        out.append((w @ k[members] / w.sum(), w @ v[members] / w.sum(),
                    np.log(np.exp(lc[members]).sum()), p, sc.max()))
    return out


@pytest.mark.parametrize("sigma", [None, 0.7])
def test_matches_naive(sigma):
    rng = np.random.default_rng(0)
    b, h, c, d = 2, 2, 14, 6
    keys = _runs_keys(rng, b, h, c, d)
    values = rng.standard_normal((b, h, c, d)).astype(np.float32)
    lengths = np.array([[14, 9], [11, 0]], np.int32)
    lc = np.log(rng.integers(1, 4, (b, h, c))).astype(np.float32)
    scores = rng.random((b, h, c)).astype(np.float32)
    layer = _layer(keys, values, lengths, lc)
    budget = 5
    merged, out = _merge_topk(layer, jnp.asarray(scores), 0.9, 2, budget, sigma)
    for bi in range(b):
        for hi in range(h):
            n = lengths[bi, hi]
            sets = _naive_head(keys[bi, hi, :n], values[bi, hi, :n], n, scores[bi, hi, :n],
                               lc[bi, hi, :n], 0.9, sigma, 2)
            assert int(merged.lengths[bi, hi]) == len(sets)
            order = sorted(range(len(sets)), key=lambda j: (-sets[j][4], j))[:budget]
            order = sorted(order)
            assert int(out.lengths[bi, hi]) == len(order)
            for slot, j in enumerate(order):
                kk, vv, lcc, p, _ = sets[j]
                np.testing.assert_allclose(np.asarray(out.keys[bi, hi, slot]), kk, atol=1e-5)
                np.testing.assert_allclose(np.asarray(out.values[bi, hi, slot]), vv, atol=1e-5)
                np.testing.assert_allclose(float(out.slot_data[LOG_COUNT][bi, hi, slot]), lcc,
                                           atol=1e-5)
                assert int(out.positions[bi, hi, slot]) == p


def test_duplicate_runs_give_exact_attention():
    """Runs of identical tokens merged with log-count logits reproduce full attention."""
    rng = np.random.default_rng(1)
    b, h, g, d = 2, 2, 2, 8
    base_k = rng.standard_normal((b, h, 5, d)).astype(np.float32)
    base_v = rng.standard_normal((b, h, 5, d)).astype(np.float32)
    reps = np.array([3, 1, 2, 4, 2])
    keys, values = np.repeat(base_k, reps, axis=2), np.repeat(base_v, reps, axis=2)
    c = keys.shape[2]
    layer = _layer(keys, values, np.full((b, h), c, np.int32))
    q = jnp.asarray(rng.standard_normal((b, h * g, 3, d)), jnp.float32)
    qpos = jnp.full((b, 3), c, jnp.int32)
    obs = Observation(q, q, qpos, None, None, 0, 1, d**-0.5)
    out, _ = jax.jit(kvmerger(budget=5, threshold=0.999, window=0).prefill)(layer, obs, ())
    assert out.capacity == 5 and (np.asarray(out.lengths) == 5).all()
    np.testing.assert_allclose(np.exp(np.asarray(out.slot_data[LOG_COUNT][0, 0])), reps,
                               rtol=1e-5)
    np.testing.assert_allclose(np.asarray(attend(q, qpos, out)),
                               np.asarray(attend(q, qpos, layer)), atol=1e-5)
    # without the count the merged cache would give different attention
    plain = out.replace(slot_data={})
    diff = np.asarray(attend(q, qpos, plain)) - np.asarray(attend(q, qpos, layer))
    assert np.abs(diff).max() > 1e-3


@pytest.mark.parametrize("budget", [4, 12])
@settings(max_examples=10, deadline=None)
@given(threshold=st.floats(-1, 1), window=st.integers(0, 4), seed=st.integers(0, 1000))
def test_properties(budget, threshold, window, seed):
    rng = np.random.default_rng(seed)
    b, h, c, d, g = 2, 2, 12, 4, 2
    keys = _runs_keys(rng, b, h, c, d)
    values = rng.standard_normal((b, h, c, d)).astype(np.float32)
    lengths = rng.integers(0, c + 1, (b, h)).astype(np.int32)
    layer = _layer(keys, values, lengths)
    scores = jnp.asarray(rng.random((b, h, c)), jnp.float32)
    merged, out = _merge_topk(layer, scores, threshold, window, budget)
    assert out.capacity == min(budget, c)
    n = np.asarray(out.lengths)
    assert (n <= np.minimum(budget, lengths)).all() and (n >= np.minimum(lengths, 1)).all()
    cnt = np.exp(np.asarray(merged.slot_data[LOG_COUNT]))
    valid = np.arange(c)[None, None] < np.asarray(merged.lengths)[..., None]
    # before the budget cut every token is counted exactly once
    np.testing.assert_allclose(np.where(valid, cnt, 0).sum(-1), lengths, rtol=1e-5)
    q = jnp.asarray(rng.standard_normal((b, h * g, 2, d)), jnp.float32)
    qpos = jnp.full((b, 2), c, jnp.int32)
    for arr in (out.keys, out.values, _attend(q, qpos, out)):
        assert np.isfinite(np.asarray(arr)).all()
    valid_out = np.arange(out.capacity)[None, None] < n[..., None]
    assert ((np.asarray(out.positions) >= 0) == valid_out).all()


def test_window_attention_scores_and_chain():
    rng = np.random.default_rng(2)
    b, h, g, c, d = 1, 2, 2, 10, 4
    layer = _layer(_runs_keys(rng, b, h, c, d), rng.standard_normal((b, h, c, d)).astype(
        np.float32), np.full((b, h), c, np.int32))
    q = jnp.asarray(rng.standard_normal((b, h * g, 4, d)), jnp.float32)
    qpos = jnp.asarray([[-1, 7, 8, 9]], jnp.int32)  # one padding query
    obs = Observation(q, q, qpos, None, None, 0, 1, 0.5)
    s = np.asarray(window_attention_scores(layer, obs, window=4))
    from kvjax.attention import attention_probs

    p = np.asarray(attention_probs(q[:, :, 1:], qpos[:, 1:], layer, 0.5))
    np.testing.assert_allclose(s, p.reshape(b, h, g, 3, c).mean(axis=(2, 3)), atol=1e-6)
    comp = chain(kvmerger(budget=6, window=2), kvmerger(budget=4, window=1))
    out, _ = jax.jit(comp.prefill)(layer, obs, (None, None))
    assert out.capacity == 4
    cnt = np.exp(np.asarray(out.slot_data[LOG_COUNT]))
    assert cnt.max() >= 1 and np.isfinite(cnt).all()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(budget=4, threshold=1.5), "threshold"),
        (dict(budget=4, threshold=-2.0), "threshold"),
        (dict(budget=0), "budget"),
        (dict(), "exactly one"),
        (dict(budget=4, compression_ratio=0.5), "exactly one"),
        (dict(compression_ratio=1.0), "compression_ratio"),
        (dict(budget=4, sigma=0.0), "sigma"),
        (dict(budget=4, window=-1), "window"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        kvmerger(**kwargs)
    with pytest.raises(TypeError, match="scores"):
        kvmerger(budget=4, scores="snapkv")
