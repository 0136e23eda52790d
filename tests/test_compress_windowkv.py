"""WindowKV: window selection against a direct numpy reference, budgets, sharing, jit, errors."""

import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kvjax
from kvjax import cache as kvcache
from kvjax.compress.base import Observation
from kvjax.compress.windowkv import layer_budget, windowkv

B, HKV, G, T, D = 2, 2, 2, 40, 8


def _setup(seed, lengths=(T, T)):
    """A prefilled cache of T slots and the (right-aligned) observation of the whole prompt."""
    rng = np.random.default_rng(seed)
    k = rng.standard_normal((B, HKV, T, D)).astype(np.float32)
    q = rng.standard_normal((B, HKV * G, T, D)).astype(np.float32) * 2.0
    lengths = np.asarray(lengths)
    layer = kvcache.write(kvcache.init_layer(B, HKV, T, D), jnp.asarray(k), jnp.asarray(k),
                          jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T)),
                          jnp.asarray(lengths, jnp.int32))
    # right-aligned queries: row b's last query (position len-1) is at index T-1
    qpos = np.stack([np.arange(T) - (T - n) for n in lengths]).astype(np.int32)
    qpos = np.where(qpos >= 0, qpos, -1)
    return layer, _obs(jnp.asarray(q), jnp.asarray(qpos)), k, q, lengths


def _obs(q, qpos, layer=0, num_layers=1):
    return Observation(queries=q, raw_queries=q, query_positions=qpos,
                       hidden=jnp.zeros((B, T, 4)), inv_freq=jnp.ones((D // 2,)), layer=layer,
                       num_layers=num_layers, scale=D**-0.5)


def _jit_prefill(comp):
    """comp.prefill under jit with the observation's static fields kept static."""
    return jax.jit(lambda cache, q, qpos: comp.prefill(cache, _obs(q, qpos), comp.init(cache)))


def _numpy_windowkv(k, q, lengths, budget, w, r, strategy):
    """Kept positions per row, straight from the paper's description."""
    out = []
    for b in range(B):
        n = lengths[b]
        qb = q[b, :, T - w:]  # the row's last w queries: positions n-w..n-1
        qp = np.arange(n - w, n)
        kb = np.repeat(k[b, :, :n], G, axis=0)  # [Hq, n, D]
        s = np.einsum("htd,hsd->hts", qb, kb) * D**-0.5
        s = np.where(np.arange(n)[None, None] <= qp[None, :, None], s, -np.inf)
        a = np.exp(s - s.max(-1, keepdims=True))
        a = (a / a.sum(-1, keepdims=True)).sum(1)  # [Hq, n]
        review = n - w
        scores = []
        for i in range(-(-review // r)):
            win = a[:, i * r: min((i + 1) * r, review)]
            if strategy == "average":
                scores.append(win.mean())
            else:
                top = np.sort(win, axis=-1)[:, ::-1][:, : r // 2]
                scores.append(top.mean())
        n_keep = (budget - w) // r
        chosen = np.argsort(-np.asarray(scores), kind="stable")[:n_keep]
        kept = {p for i in chosen for p in range(i * r, min((i + 1) * r, review))}
        out.append(sorted(kept | set(range(review, n))))
    return out


def _positions(layer):
    pos, lens = np.asarray(layer.positions), np.asarray(layer.lengths)
    return [[pos[b, h, : lens[b, h]].tolist() for h in range(pos.shape[1])]
            for b in range(pos.shape[0])]


@pytest.mark.parametrize("strategy", ["max", "average"])
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_direct_reference(strategy, seed):
    budget, w, r = 24, 8, 4
    layer, obs, k, q, lengths = _setup(seed, lengths=(T, 33))
    comp = windowkv(budget=budget, strategy=strategy, window_size=w, review_size=r)
    prefill = _jit_prefill(comp)
    out, state = prefill(layer, obs.queries, obs.query_positions)
    want = _numpy_windowkv(k, q, lengths, budget, w, r, strategy)
    got = _positions(out)
    for b in range(B):
        assert got[b][0] == got[b][1] == want[b]  # one selection shared by the heads
    assert out.capacity == budget
    assert (np.asarray(out.lengths) <= budget).all()
    # kept keys are the input's keys at those positions (a subset of the input)
    for b in range(B):
        np.testing.assert_array_equal(np.asarray(out.keys)[b, 0, : len(want[b])],
                                      k[b, 0, want[b]])
    # new prompt contents, same shapes: no recompilation
    layer2, obs2, *_ = _setup(seed + 10, lengths=(T, 33))
    prefill(layer2, obs2.queries, obs2.query_positions)
    assert prefill._cache_size() == 1


def test_partial_last_window_and_short_rows():
    layer, obs, k, q, lengths = _setup(3, lengths=(T, 15))
    comp = windowkv(budget=20, window_size=6, review_size=5)
    out, _ = _jit_prefill(comp)(layer, obs.queries, obs.query_positions)
    want = _numpy_windowkv(k, q, lengths, 20, 6, 5, "max")
    assert _positions(out)[0][0] == want[0]
    assert _positions(out)[1][0] == want[1]
    assert len(want[0]) <= 20


def test_group_budgets_follow_the_reference_schedule():
    # reference: last = budget * shared // beta, first = 2 * budget - last, arithmetic steps
    got = [layer_budget(64, layer, 32, 8, 14) for layer in range(32)]
    assert got == [92] * 8 + [74] * 8 + [56] * 8 + [36] * 8
    assert [layer_budget(64, layer, 32, 8, None) for layer in range(32)] == [64] * 32


def _tiny_model(layers=4):
    from flax import nnx

    from kvjax.models.llama import Llama, LlamaConfig

    return Llama(LlamaConfig.tiny(num_hidden_layers=layers), rngs=nnx.Rngs(0))


def test_index_sharing_within_layer_groups_through_prefill():
    model = _tiny_model(4)
    tokens = np.random.default_rng(5).integers(0, 256, (2, 48))
    lengths = np.array([48, 40])
    jitted = sys.modules["kvjax.generate"]._prefill_jit
    comp = windowkv(budget=24, window_size=8, review_size=4, shared_layers=2)
    cache, _ = kvjax.prefill(model, tokens, comp, lengths=lengths)
    pos = [_positions(layer) for layer in cache.layers]
    assert pos[0] == pos[1] and pos[2] == pos[3]
    assert pos[0] != pos[2]  # the second group selects again
    alone = windowkv(budget=24, window_size=8, review_size=4)
    cache1, _ = kvjax.prefill(model, tokens, alone, lengths=lengths)
    assert _positions(cache1.layers[0]) == pos[0]  # the group's first layer selects itself
    assert _positions(cache1.layers[1]) != pos[1]
    size = jitted._cache_size()
    other = np.random.default_rng(6).integers(0, 256, (2, 48))
    kvjax.prefill(model, other, comp, lengths=lengths)
    assert jitted._cache_size() == size  # new prompt contents: no recompilation


def test_bad_input_errors():
    with pytest.raises(ValueError, match="strategy"):
        windowkv(budget=16, strategy="median")
    with pytest.raises(ValueError, match="exactly one"):
        windowkv(0.5, budget=16)
    with pytest.raises(ValueError, match="compression_ratio"):
        windowkv(1.0)
    with pytest.raises(ValueError, match="window_size"):
        windowkv(budget=16, window_size=0)
    with pytest.raises(ValueError, match="review_size"):
        windowkv(budget=16, review_size=-1)
    with pytest.raises(ValueError, match="shared_layers"):
        windowkv(budget=16, shared_layers=0)
    with pytest.raises(ValueError, match="beta"):
        windowkv(budget=16, beta=0)
    layer, obs, *_ = _setup(0)
    with pytest.raises(ValueError, match="window_size"):
        windowkv(budget=6, window_size=8).prefill(layer, obs, None)
    with pytest.raises(TypeError, match="dense LayerCache"):
        windowkv(budget=16).prefill(object(), obs, None)
