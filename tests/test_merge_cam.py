"""CaM value merging against a direct per-head numpy implementation of the paper's rule."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvjax import cache as kvcache
from kvjax.compress.base import Observation
from kvjax.compress.cam import cam, cam_merge
from kvjax.compress.snapkv import snapkv_scores


def _layer(keys, values, lengths):
    c = keys.shape[2]
    pos = np.where(np.arange(c)[None, None] < lengths[..., None], np.arange(c), -1)
    return kvcache.LayerCache(jnp.asarray(keys), jnp.asarray(values), jnp.asarray(lengths),
                              jnp.asarray(pos, jnp.int32))


@functools.partial(jax.jit, static_argnames=("keep", "merge_budget"))
def _cam(layer, scores, keep, merge_budget, window):
    return cam_merge(layer, scores, keep, merge_budget, window)


def _naive_head(v, s, n, keep, m, window):
    sel = np.where(np.arange(n) >= n - window, np.inf, s[:n])
    kept = sorted(sorted(range(n), key=lambda i: (-sel[i], i))[:keep])
    out = {j: v[j].astype(np.float64).copy() for j in kept}
    for e in range(n):
        if e in kept:
            continue
        succ = [j for j in kept if j > e][:m]
        if not succ:
            continue
        mean = np.mean(s[succ])
        p = min(max(s[e] / mean, 0.0), 1.0) if mean > 0 else float(s[e] > 0)
        for j in succ:
            out[j] += p * v[e] / len(succ)
    return kept, [out[j] for j in kept]


@pytest.mark.parametrize("m", [1, 3])
def test_matches_naive(m):
    rng = np.random.default_rng(0)
    b, h, c, d = 2, 2, 13, 5
    keys = rng.standard_normal((b, h, c, d)).astype(np.float32)
    values = rng.standard_normal((b, h, c, d)).astype(np.float32)
    lengths = np.array([[13, 7], [4, 10]], np.int32)
    scores = rng.random((b, h, c)).astype(np.float32)
    scores[0, 0, 3] = 0.0  # zero-attention tokens merge with probability 0
    keep = 6
    out = _cam(_layer(keys, values, lengths), jnp.asarray(scores), keep, m, 2)
    for bi in range(b):
        for hi in range(h):
            kept, vals = _naive_head(values[bi, hi], scores[bi, hi], lengths[bi, hi], keep, m, 2)
            assert int(out.lengths[bi, hi]) == len(kept)
            np.testing.assert_array_equal(np.asarray(out.positions[bi, hi, :len(kept)]), kept)
            np.testing.assert_allclose(np.asarray(out.values[bi, hi, :len(kept)]), vals,
                                       atol=1e-5)
            # keys are never changed
            np.testing.assert_array_equal(np.asarray(out.keys[bi, hi, :len(kept)]),
                                          keys[bi, hi, kept])


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 10_000), window=st.integers(0, 3))
def test_properties(seed, window):
    rng = np.random.default_rng(seed)
    b, h, c, d, keep = 2, 2, 10, 4, 4
    values = rng.standard_normal((b, h, c, d)).astype(np.float32)
    lengths = rng.integers(0, c + 1, (b, h)).astype(np.int32)
    scores = jnp.asarray(rng.random((b, h, c)), jnp.float32)
    layer = _layer(values, values, lengths)
    out = _cam(layer, scores, keep, 2, window)
    n = np.asarray(out.lengths)
    assert out.capacity == keep and (n == np.minimum(lengths, keep)).all()
    assert np.isfinite(np.asarray(out.values)).all()
    # merged mass is bounded: each kept value moves by at most the evicted values' norm sum
    ev = np.linalg.norm(values, axis=-1).sum(-1)
    kept_v = np.asarray(out.values)
    kept_orig = np.take_along_axis(values, np.maximum(np.asarray(out.positions), 0)[..., None],
                                   axis=2)
    delta = np.linalg.norm(kept_v - kept_orig, axis=-1).sum(-1)
    assert (delta <= ev + 1e-4).all()


def test_compressor_prefill_and_errors():
    rng = np.random.default_rng(3)
    b, h, g, c, d = 1, 2, 2, 9, 4
    layer = _layer(rng.standard_normal((b, h, c, d)).astype(np.float32),
                   rng.standard_normal((b, h, c, d)).astype(np.float32),
                   np.full((b, h), c, np.int32))
    q = jnp.asarray(rng.standard_normal((b, h * g, 3, d)), jnp.float32)
    obs = Observation(q, q, jnp.asarray([[6, 7, 8]], jnp.int32), None, None, 0, 1, 0.5)
    out, _ = jax.jit(cam(compression_ratio=0.5, merge_budget=2, window=1).prefill)(layer, obs, ())
    assert out.capacity == 4 and np.isfinite(np.asarray(out.values)).all()
    # any project scorer plugs in (SnapKV's scores, window tokens protected by the scorer)
    snap = functools.partial(snapkv_scores, window=2, kernel=3)
    out, _ = jax.jit(cam(budget=5, merge_budget=2, window=0, scores=snap).prefill)(layer, obs, ())
    assert out.capacity == 5 and (np.asarray(out.positions)[..., -2:] == [7, 8]).all()
    for kwargs, match in [
        (dict(budget=4, merge_budget=0), "merge_budget"),
        (dict(budget=4, window=-2), "window"),
        (dict(budget=-1), "budget"),
        (dict(compression_ratio=-0.1), "compression_ratio"),
    ]:
        with pytest.raises(ValueError, match=match):
            cam(**kwargs)
