"""EMS: global-local score and evict-then-merge against direct numpy implementations."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvjax import cache as kvcache
from kvjax.attention import attention_probs
from kvjax.compress.base import Observation
from kvjax.compress.ems import ems, ems_merge, global_local_scores
from kvjax.compress.kvmerger import LOG_COUNT


def _layer(keys, values, lengths):
    c = keys.shape[2]
    pos = np.where(np.arange(c)[None, None] < lengths[..., None], np.arange(c), -1)
    return kvcache.LayerCache(jnp.asarray(keys), jnp.asarray(values), jnp.asarray(lengths),
                              jnp.asarray(pos, jnp.int32))


@functools.partial(jax.jit, static_argnames=("keep",))
def _ems(layer, scores, keep, merge_ratio, threshold, window):
    return ems_merge(layer, scores, keep, merge_ratio, threshold, window)


def _naive_head(k, v, s, n, keep, ratio, thr, window):
    sel = np.where(np.arange(n) >= n - window, np.inf, s[:n])
    kept = sorted(sorted(range(n), key=lambda i: (-sel[i], i))[:keep - 1])
    rest = sorted([i for i in range(n) if i not in kept], key=lambda i: (-s[i], i))
    merging = rest[:int(np.floor(len(rest) * ratio))]
    members = {j: [t] for j, t in enumerate(kept)}
    zero = []
    unit = k / np.maximum(np.linalg.norm(k, axis=-1, keepdims=True), 1e-12)
    for t in merging:
        sims = [unit[t] @ unit[c] for c in kept]
        j = int(np.argmax(sims))
        (members[j] if sims[j] >= thr else zero).append(t)
    return kept, members, zero


def test_merge_matches_naive():
    rng = np.random.default_rng(0)
    b, h, c, d, keep = 2, 2, 12, 4, 5
    keys = rng.standard_normal((b, h, c, d)).astype(np.float32)
    values = rng.standard_normal((b, h, c, d)).astype(np.float32)
    lengths = np.array([[12, 6], [9, 1]], np.int32)
    scores = rng.random((b, h, c)).astype(np.float32)
    out = _ems(_layer(keys, values, lengths), jnp.asarray(scores), keep, 0.6, 0.2, 1)
    assert out.capacity == keep
    lc = np.asarray(out.slot_data[LOG_COUNT])
    for bi in range(b):
        for hi in range(h):
            kept, members, zero = _naive_head(keys[bi, hi], values[bi, hi], scores[bi, hi],
                                              lengths[bi, hi], keep, 0.6, 0.2, 1)
            assert int(out.lengths[bi, hi]) == 1 + len(kept)
            for j, t in enumerate(kept):
                m = members[j]
                assert int(out.positions[bi, hi, j + 1]) == t
                np.testing.assert_allclose(np.asarray(out.keys[bi, hi, j + 1]),
                                           keys[bi, hi, m].mean(0), atol=1e-5)
                np.testing.assert_allclose(np.asarray(out.values[bi, hi, j + 1]),
                                           values[bi, hi, m].mean(0), atol=1e-5)
                np.testing.assert_allclose(lc[bi, hi, j + 1], np.log(len(m)), atol=1e-5)
            if zero:
                np.testing.assert_allclose(np.asarray(out.keys[bi, hi, 0]),
                                           keys[bi, hi, zero].mean(0), atol=1e-5)
                assert int(out.positions[bi, hi, 0]) == max(zero)
                np.testing.assert_allclose(lc[bi, hi, 0], np.log(len(zero)), atol=1e-5)
            else:
                assert int(out.positions[bi, hi, 0]) == -1


def test_global_local_scores():
    rng = np.random.default_rng(1)
    b, h, g, c, d, t = 1, 2, 2, 8, 4, 6
    layer = _layer(rng.standard_normal((b, h, c, d)).astype(np.float32),
                   rng.standard_normal((b, h, c, d)).astype(np.float32),
                   np.array([[8, 5]], np.int32))
    q = jnp.asarray(rng.standard_normal((b, h * g, t, d)), jnp.float32)
    qpos = jnp.asarray([[2, 3, 4, 5, 6, 7]], jnp.int32)
    obs = Observation(q, q, qpos, None, None, 0, 1, 0.5)
    s = np.asarray(jax.jit(global_local_scores, static_argnums=2)(layer, obs, 2))
    p = np.asarray(attention_probs(q, qpos, layer, 0.5)).reshape(b, h, g, t, c).mean(2)
    glo, loc = p.sum(2), p[:, :, -2:].sum(2)
    for hi, n in enumerate([8, 5]):
        gm, lm = glo[0, hi, :n].mean(), loc[0, hi, :n].mean()
        np.testing.assert_allclose(s[0, hi, :n], np.maximum(glo[0, hi, :n] * lm / gm,
                                                            loc[0, hi, :n]), rtol=1e-5)


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 10_000), ratio=st.floats(0, 1), thr=st.floats(-1, 1))
def test_properties(seed, ratio, thr):
    rng = np.random.default_rng(seed)
    b, h, c, d, keep = 2, 2, 10, 4, 4
    lengths = rng.integers(0, c + 1, (b, h)).astype(np.int32)
    layer = _layer(rng.standard_normal((b, h, c, d)).astype(np.float32),
                   rng.standard_normal((b, h, c, d)).astype(np.float32), lengths)
    scores = jnp.asarray(rng.random((b, h, c)), jnp.float32)
    out = _ems(layer, scores, keep, ratio, thr, 1)
    n = np.asarray(out.lengths)
    assert (n == 1 + np.minimum(lengths, keep - 1)).all()
    valid = (np.arange(keep)[None, None] < n[..., None]) & (np.asarray(out.positions) >= 0)
    counts = np.where(valid, np.exp(np.asarray(out.slot_data[LOG_COUNT])), 0).sum(-1)
    kept = np.minimum(lengths, keep - 1)
    merged = np.floor((lengths - kept) * ratio)
    np.testing.assert_allclose(counts, kept + merged, rtol=1e-5)  # evicted tokens are gone
    assert np.isfinite(np.asarray(out.keys)).all() and np.isfinite(np.asarray(out.values)).all()


def test_errors():
    for kwargs, match in [
        (dict(budget=4, merge_ratio=1.5), "merge_ratio"),
        (dict(budget=4, threshold=2.0), "threshold"),
        (dict(budget=4, local_window=0), "local_window"),
        (dict(budget=4, window=-1), "window"),
        (dict(budget=0), "budget"),
    ]:
        with pytest.raises(ValueError, match=match):
            ems(**kwargs)
    layer = _layer(np.zeros((1, 1, 4, 4), np.float32), np.zeros((1, 1, 4, 4), np.float32),
                   np.full((1, 1), 4, np.int32))
    with pytest.raises(ValueError, match="budget >= 2"):
        ems_merge(layer, jnp.zeros((1, 1, 4)), 1)
