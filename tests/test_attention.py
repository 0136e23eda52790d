"""Reference attention against a direct per-head numpy loop."""

import jax.numpy as jnp
import numpy as np
import pytest

from kvjax import cache as kvcache
from kvjax.attention import attend, attention_probs


def _naive(q, qpos, keys, values, lengths, positions, scale, window=None):
    b, hq, t, d = q.shape
    hkv = keys.shape[1]
    g = hq // hkv
    out = np.zeros((b, hq, t, values.shape[-1]))
    for bi in range(b):
        for h in range(hq):
            kh = h // g
            for ti in range(t):
                ok = [
                    s for s in range(lengths[bi, kh])
                    if 0 <= positions[bi, kh, s] <= qpos[bi, ti]
                    and (window is None or qpos[bi, ti] - positions[bi, kh, s] < window)
                ]
                if not ok:
                    continue
                s = np.array([q[bi, h, ti] @ keys[bi, kh, j] for j in ok]) * scale
                p = np.exp(s - s.max())
                p /= p.sum()
                out[bi, h, ti] = p @ values[bi, kh, ok]
    return out


@pytest.mark.parametrize("g", [1, 4])
@pytest.mark.parametrize("window", [None, 3])
def test_attend_matches_naive(g, window):
    rng = np.random.default_rng(0)
    b, hkv, c, d, t = 2, 2, 9, 8, 4
    keys = rng.standard_normal((b, hkv, c, d)).astype(np.float32)
    values = rng.standard_normal((b, hkv, c, d)).astype(np.float32)
    lengths = np.array([[9, 5], [0, 7]], np.int32)  # includes an empty head
    positions = np.where(np.arange(c)[None, None] < lengths[..., None],
                         np.sort(rng.choice(20, (b, hkv, c)), -1), -1).astype(np.int32)
    layer = kvcache.LayerCache(jnp.asarray(keys), jnp.asarray(values), jnp.asarray(lengths),
                               jnp.asarray(positions))
    q = rng.standard_normal((b, hkv * g, t, d)).astype(np.float32)
    qpos = np.array([[3, 8, 12, 19], [0, 5, 10, 25]], np.int32)
    out = attend(jnp.asarray(q), jnp.asarray(qpos), layer, scale=0.3, sliding_window=window)
    ref = _naive(q, qpos, keys, values, lengths, positions, 0.3, window)
    np.testing.assert_allclose(np.asarray(out), ref, atol=1e-5)
    assert np.isfinite(np.asarray(out)).all()
    probs = np.asarray(attention_probs(jnp.asarray(q), jnp.asarray(qpos), layer, 0.3, window))
    sums = probs.sum(-1)
    assert np.all((np.abs(sums - 1) < 1e-5) | (sums == 0))


def test_attend_rejects_bad_impl_and_dims():
    layer = kvcache.init_layer(1, 1, 4, 8)
    with pytest.raises(ValueError, match="impl"):
        attend(jnp.zeros((1, 1, 1, 8)), jnp.zeros((1, 1), jnp.int32), layer, impl="fast")
    with pytest.raises(ValueError, match="head dim"):
        attend(jnp.zeros((1, 1, 1, 4)), jnp.zeros((1, 1), jnp.int32), layer)
    with pytest.raises(ValueError, match="multiple of KV heads"):
        two_heads = kvcache.init_layer(1, 2, 4, 8)
        attend(jnp.zeros((1, 3, 1, 8)), jnp.zeros((1, 1), jnp.int32), two_heads)


def test_query_blocking_matches_unblocked(monkeypatch):
    import kvjax.attention as attn

    rng = np.random.default_rng(1)
    b, hkv, c, d, t = 1, 2, 40, 8, 37
    keys = jnp.asarray(rng.standard_normal((b, hkv, c, d)), jnp.float32)
    layer = kvcache.write(kvcache.init_layer(b, hkv, c, d), keys, keys, jnp.arange(c)[None])
    q = jnp.asarray(rng.standard_normal((b, 4, t, d)), jnp.float32)
    qpos = jnp.arange(3, 3 + t)[None]
    full = attend(q, qpos, layer)
    monkeypatch.setattr(attn, "QUERY_BLOCK", 8)
    blocked = attn.reference_attention(q, qpos, layer)
    np.testing.assert_allclose(np.asarray(blocked), np.asarray(full), atol=1e-6)
