"""CAKE: preference and token score against the paper's formulas, allocation, calibration."""

import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kvjax
from kvjax import cache as kvcache
from kvjax.compress.base import Observation
from kvjax.compress.cake import allocate, cake, cake_calibrate, cake_preference, cake_scores

B, HKV, G, T, D, W = 2, 2, 2, 24, 8, 6
SCALE = D**-0.5


def _obs(q, qpos, layer=0, num_layers=1):
    return Observation(queries=q, raw_queries=q, query_positions=qpos,
                       hidden=jnp.zeros(qpos.shape + (4,)), inv_freq=jnp.ones((D // 2,)),
                       layer=layer, num_layers=num_layers, scale=SCALE)


def _setup(seed):
    rng = np.random.default_rng(seed)
    k = rng.standard_normal((B, HKV, T, D)).astype(np.float32)
    q = (rng.standard_normal((B, HKV * G, T, D)) * 2).astype(np.float32)
    layer = kvcache.write(kvcache.init_layer(B, HKV, T, D), jnp.asarray(k), jnp.asarray(k),
                          jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T)))
    qpos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    return layer, jnp.asarray(q), qpos, k, q


def _window_attention(k, q):
    """numpy A [B, Hq, W, T]: the last W queries over all keys, causal."""
    kk = np.repeat(k, G, axis=1)
    s = np.einsum("bhtd,bhsd->bhts", q[:, :, T - W:], kk) * SCALE
    qp = np.arange(T - W, T)
    s = np.where(np.arange(T)[None, None, None] <= qp[None, None, :, None], s, -np.inf)
    a = np.exp(s - s.max(-1, keepdims=True))
    return a / a.sum(-1, keepdims=True)


def test_preference_matches_the_formula():
    layer, qj, qpos, k, q = _setup(0)
    a = _window_attention(k.astype(np.float64), q.astype(np.float64))[..., : T - W]
    h = -(a * np.log(a + 1e-10)).sum((1, 2, 3))
    v = a.var(axis=2, ddof=1).sum((1, 2))
    pref = jax.jit(lambda c, qq, qp, t1, t2: cake_preference(c, _obs(qq, qp), W, t1, t2))
    for tau1, tau2 in ((1.0, 1.0), (1.6, 0.4)):
        got = np.asarray(pref(layer, qj, qpos, tau1, tau2))
        np.testing.assert_allclose(got, h ** (1 / tau1) * v ** (1 / tau2), rtol=1e-4)


def test_token_scores_and_kept_set_match_the_formula():
    layer, qj, qpos, k, q = _setup(1)
    gamma = 200.0
    a = _window_attention(k.astype(np.float64), q.astype(np.float64))
    s = a.mean(2) + gamma * a.var(axis=2, ddof=1)
    s[..., T - W:] = 0.0
    s = np.pad(s, ((0, 0), (0, 0), (2, 2)))
    s = sum(s[..., i: i + T] for i in range(5)) / 5  # avg pool, kernel 5, zero padding
    s = s.reshape(B, HKV, G, T).mean(2)[..., : T - W]
    got = np.asarray(jax.jit(lambda c, qq, qp: cake_scores(c, _obs(qq, qp), W, gamma, 5))(
        layer, qj, qpos))
    np.testing.assert_allclose(got[..., : T - W], s, rtol=1e-4, atol=1e-7)
    assert np.isinf(got[..., T - W:]).all()  # the window is always kept
    comp = cake(budget=14, window_size=W)
    prefill = jax.jit(lambda c, qq, qp: comp.prefill(c, _obs(qq, qp), ()))
    out, _ = prefill(layer, qj, qpos)
    assert out.capacity == 14
    pos = np.asarray(out.positions)
    for b in range(B):
        for h in range(HKV):
            want = sorted(np.argsort(-s[b, h], kind="stable")[: 14 - W].tolist()
                          + list(range(T - W, T)))
            assert pos[b, h].tolist() == want
    layer2, qj2, *_ = _setup(2)
    prefill(layer2, qj2, qpos)
    assert prefill._cache_size() == 1  # new contents, same shapes: no recompilation


def test_allocation():
    assert allocate([1.0, 1.0, 2.0], 40, 100) == (10, 10, 20)
    got = allocate([1.0, 1.0, 8.0], 40, 16)  # layer 2 is capped, its excess re-divided
    assert got == (12, 12, 16)
    rng = np.random.default_rng(0)
    for _ in range(20):
        p = rng.random(6) ** 3
        total, cap = int(rng.integers(1, 200)), int(rng.integers(1, 60))
        got = np.asarray(allocate(p, total, cap))
        assert got.sum() == min(total, 6 * cap) and (got <= cap).all() and (got >= 0).all()
        if total <= cap:  # nothing capped: proportional up to rounding
            assert np.abs(got - p / p.sum() * total).max() < 1.0
    with pytest.raises(ValueError, match="preferences"):
        allocate([1.0, -1.0], 10, 10)


def _tiny_model(layers=3):
    from flax import nnx

    from kvjax.models.llama import Llama, LlamaConfig

    return Llama(LlamaConfig.tiny(num_hidden_layers=layers), rngs=nnx.Rngs(0))


def test_calibrated_layer_budgets_in_generate():
    model = _tiny_model(3)
    rng = np.random.default_rng(3)
    tokens = rng.integers(0, 256, (2, 40))
    budgets = cake_calibrate(model, tokens, budget=16, window_size=8)
    assert len(budgets) == 3 and sum(budgets) == 3 * 16
    assert all(8 <= b <= 40 for b in budgets)
    assert cake_calibrate(model, tokens, 0.6, window_size=8) == budgets  # int(40 * 0.4) = 16
    gen = sys.modules["kvjax.generate"]._generate_jit
    comp = cake(layer_budgets=budgets, window_size=8)
    out, cache = kvjax.generate(model, tokens, 4, comp, eos_id=-1, return_cache=True)
    assert [layer.capacity for layer in cache.layers] == [b + 4 for b in budgets]
    uniform = kvcache.init(3, 2, 2, [16 + 4] * 3, 16)
    assert kvcache.nbytes(cache.layers) == kvcache.nbytes(uniform.layers)  # same total memory
    for layer, b in zip(cache.layers, budgets):
        pos = np.asarray(layer.positions)
        assert (np.asarray(layer.lengths) == b + 3).all()
        assert ((pos >= 32) & (pos < 40)).sum(-1).tolist() == [[8, 8], [8, 8]]  # window kept
    size = gen._cache_size()
    kvjax.generate(model, rng.integers(0, 256, (2, 40)), 4, comp, eos_id=-1)
    assert gen._cache_size() == size


def test_bad_input_errors():
    with pytest.raises(ValueError, match="exactly one"):
        cake()
    with pytest.raises(ValueError, match="not both"):
        cake(0.5, layer_budgets=(4, 4))
    with pytest.raises(ValueError, match="layer_budgets"):
        cake(layer_budgets=(4, 0))
    with pytest.raises(ValueError, match="kernel_size"):
        cake(budget=8, kernel_size=4)
    with pytest.raises(ValueError, match="window_size"):
        cake(budget=8, window_size=0)
    with pytest.raises(ValueError, match="gamma"):
        cake(budget=8, gamma=-1.0)
    layer, qj, qpos, *_ = _setup(0)
    with pytest.raises(ValueError, match="layer_budgets has 2 entries"):
        cake(layer_budgets=(8, 8)).prefill(layer, _obs(qj, qpos, 0, 3), ())
    model = _tiny_model(2)
    tokens = np.zeros((1, 12), np.int32)
    with pytest.raises(ValueError, match="window_size"):
        cake_calibrate(model, tokens, budget=8, window_size=12)
    with pytest.raises(ValueError, match="tau1"):
        cake_calibrate(model, tokens, budget=8, window_size=4, tau1=0.0)
