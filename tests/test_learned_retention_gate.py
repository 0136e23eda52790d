"""TRIM-KV retention gates: gated attention, training, eviction, chunked memory-bounded prefill."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import kvjax
from kvjax import train as kvtrain
from kvjax.learned import backbone as bb
from kvjax.learned import evict, retention_gate
from kvjax.models import Llama, LlamaConfig


@pytest.fixture(scope="module")
def model():
    return Llama(LlamaConfig.tiny(), rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def gates(model):
    """Gates whose beta varies a lot across tokens (so eviction order is informative)."""
    g = retention_gate.init(model, gate_hidden=8, seed=1)
    g.w1.set_value(g.w1[...] * 100.0)
    g.bias.set_value(jnp.full_like(g.bias[...], 1.0))
    return g


def _tokens(b, t, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (b, t)).astype(np.int32)


def _log_beta(model, gates, tokens):
    """Per-layer log beta of every prompt token from full-cache layer inputs [L][B, H, T]."""

    @jax.jit
    def run(tokens):
        out = []

        def attend(layer, inputs):
            out.append(gates(layer, inputs.hidden))
            return bb.plain_attention(layer, inputs)

        bb.forward(model, tokens, attend)
        return out

    return [np.asarray(x) for x in run(jnp.asarray(tokens))]


def test_gate_shapes_and_init(model):
    g = retention_gate.init(model, gate_hidden=8)
    h = jnp.ones((2, 5, model.config.hidden_size))
    log_beta = g(1, h)
    assert log_beta.shape == (2, 2, 5) and log_beta.dtype == jnp.float32
    assert np.all(np.exp(np.asarray(log_beta)) > 0.999)  # bias 10: beta ~ 1 at init
    with pytest.raises(ValueError, match="gate_hidden must be in"):
        retention_gate.init(model, gate_hidden=0)


@pytest.mark.parametrize("mode", ["scale", "log"])
def test_gated_attention_matches_numpy(model, mode):
    rng = np.random.default_rng(1)
    b, t = 2, 6
    x = jnp.asarray(rng.normal(size=(b, t, model.config.hidden_size)), jnp.float32)
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    inputs = bb.layer_inputs(model, 0, x, pos)
    log_beta = jnp.asarray(-rng.uniform(0.0, 0.7, size=(b, 2, t)), jnp.float32)
    out, retained = retention_gate.gated_attention(log_beta, inputs, mode)
    q, k, v = (np.asarray(a, np.float64) for a in (inputs.queries, inputs.keys, inputs.values))
    lb = np.asarray(log_beta, np.float64)
    ref = np.zeros(out.shape)
    ref_s = np.zeros(retained.shape)
    for bi in range(b):
        for hq in range(4):
            h = hq // 2
            for ti in range(t):
                age = ti - np.arange(ti + 1)
                r = np.exp(age * lb[bi, h, :ti + 1])
                s = q[bi, hq, ti] @ k[bi, h, :ti + 1].T * inputs.scale
                s = s * r if mode == "scale" else s + np.log(r)
                p = np.exp(s - s.max())
                ref[bi, hq, ti] = (p / p.sum()) @ v[bi, h, :ti + 1]
                ref_s[bi, h, ti] = r.sum()
    np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(retained), ref_s, rtol=1e-5)
    # beta = 1: plain attention, every token retained
    same, count = retention_gate.gated_attention(jnp.zeros_like(log_beta), inputs, mode)
    np.testing.assert_allclose(np.asarray(same), np.asarray(bb.plain_attention(0, inputs)[0]),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(count[0, 0]), np.arange(1, t + 1))


def test_training_reduces_loss_and_keeps_backbone(model):
    gates = retention_gate.init(model, gate_hidden=8, bias_init=3.0)
    loss_fn = retention_gate.loss(6)
    batch = {"tokens": jnp.asarray(_tokens(2, 24))}
    before_backbone = kvtrain.flatten(nnx.state(model))
    fixed = {"tokens": batch["tokens"][None]}
    result = kvtrain.train(gates, model, loss_fn, lambda step: fixed, steps=6, log_every=1,
                           optimizer=kvtrain.optimizer(3e-2), progress=False)
    losses = [h["loss"] for h in result.history]  # each before that step's update
    assert losses[-1] < 0.9 * losses[0]
    assert {"kl", "capacity", "mean_beta"} <= set(result.history[0])
    for k, v in kvtrain.flatten(nnx.state(model)).items():
        assert np.array_equal(np.asarray(v), np.asarray(before_backbone[k]))


def test_loss_arguments_are_checked():
    with pytest.raises(ValueError, match="memory must be in"):
        retention_gate.loss(0)
    with pytest.raises(ValueError, match="mode must be one of"):
        retention_gate.loss(4, mode="mul")
    with pytest.raises(ValueError, match="capacity_weight"):
        retention_gate.loss(4, capacity_weight=-1.0)


def test_prefill_keeps_highest_retention(model, gates):
    tokens = _tokens(2, 20, seed=3)
    memory = 7
    comp = retention_gate.retention_gate(gates, budget=memory)
    cache, _ = kvjax.prefill(model, tokens, compressor=comp)
    log_beta = _log_beta(model, gates, tokens)
    for layer, lc in enumerate(cache.layers):
        assert lc.capacity == memory
        assert np.all(np.asarray(lc.lengths) == memory)
        score = (19 - np.arange(20)) * log_beta[layer]  # [B, H, T], now = 19
        for bi in range(2):
            for h in range(2):
                want = np.sort(np.argsort(-score[bi, h], kind="stable")[:memory])
                got = np.asarray(lc.positions[bi, h])
                np.testing.assert_array_equal(got, want)
                np.testing.assert_allclose(np.asarray(lc.slot_data[retention_gate.SLOT][bi, h]),
                                           log_beta[layer][bi, h, want], rtol=1e-4, atol=1e-6)


def test_decode_stays_within_memory(model, gates):
    tokens = _tokens(2, 12, seed=4)
    small = retention_gate.retention_gate(gates, compression_ratio=0.5)  # int(12 * 0.5) = 6 kept
    out, cache = kvjax.generate(model, tokens, 5, compressor=small, return_cache=True)
    assert out.shape == (2, 17)
    for lc in cache.layers:
        assert lc.capacity == 7 and np.all(np.asarray(lc.lengths) <= 6)
        assert np.all(np.asarray(lc.positions).max(axis=2) >= 15)  # newest tokens kept


def test_decode_evicts_the_lowest_retention(model, gates):
    comp = retention_gate.retention_gate(gates, budget=4)
    lc = kvjax.cache.init_layer(1, 1, 5, 2)
    lc = lc.replace(lengths=jnp.array([[5]], jnp.int32),
                    positions=jnp.arange(5, dtype=jnp.int32)[None, None],
                    slot_data={retention_gate.SLOT: jnp.array([[[-0.01, -0.5, -0.02, -0.1,
                                                                 0.0]]])})
    obs_hidden = jnp.zeros((1, 1, model.config.hidden_size))
    obs = kvjax.compress.Observation(
        queries=jnp.zeros((1, 2, 1, 16)), raw_queries=jnp.zeros((1, 2, 1, 16)),
        query_positions=jnp.array([[4]], jnp.int32), hidden=obs_hidden,
        inv_freq=jnp.zeros(8), layer=0, num_layers=2, scale=0.25)
    with pytest.raises(ValueError, match="KV heads"):  # 2-head gates, 1-head cache
        comp.decode(lc, obs, ())
    one_head = retention_gate.RetentionGates(2, model.config.hidden_size, 1, gate_hidden=8,
                                             rngs=nnx.Rngs(0))
    out, _ = retention_gate.retention_gate(one_head, budget=4).decode(lc, obs, ())
    assert out.capacity == 5 and int(out.lengths[0, 0]) == 4
    # scores (4 - i) * log beta: [-0.04, -1.5, -0.04, -0.1, 0]: token 1 goes
    np.testing.assert_array_equal(np.asarray(out.positions[0, 0]), [0, 2, 3, 4, -1])


def test_chunked_prefill_bounds_memory_and_matches_simulation(model, gates):
    tokens = _tokens(2, 21, seed=5)
    budget, chunk = 6, 5
    comp = retention_gate.retention_gate(gates, budget=budget)
    cache, logits = evict.prefill(model, tokens, comp, budget=budget, chunk_size=chunk)
    assert logits.shape == (2, 256)
    for lc in cache.layers:
        assert lc.capacity == budget + chunk and np.all(np.asarray(lc.lengths) == budget)
    # layer 0's gate inputs do not depend on the cache: simulate chunk-wise eviction
    log_beta = _log_beta(model, gates, tokens)[0]
    for bi in range(2):
        for h in range(2):
            kept = []
            for start in range(0, 21, chunk):
                kept += list(range(start, min(start + chunk, 21)))
                now = min(start + chunk, 21) - 1
                score = np.array([(now - i) * log_beta[bi, h, i] for i in kept])
                order = np.argsort(-score, kind="stable")[:budget]
                kept = sorted(kept[j] for j in order)
            got = np.asarray(cache.layers[0].positions[bi, h, :budget])
            np.testing.assert_array_equal(got, kept)
    # with a budget above the prompt, chunked prefill equals the full-cache prefill
    full = retention_gate.retention_gate(gates, budget=64)
    _, logits_big = evict.prefill(model, tokens, full, budget=64, chunk_size=chunk)
    _, ref = kvjax.prefill(model, tokens)
    np.testing.assert_allclose(np.asarray(logits_big), np.asarray(ref), rtol=1e-4, atol=1e-4)


def test_chunked_generate(model, gates):
    tokens = _tokens(1, 14, seed=6)
    comp = retention_gate.retention_gate(gates, budget=64)
    out = evict.generate(model, tokens, 4, comp, budget=64, chunk_size=4)
    np.testing.assert_array_equal(np.asarray(out),
                                  np.asarray(kvjax.generate(model, tokens, 4, eos_id=-1)))


def test_bad_inputs(model, gates):
    with pytest.raises(ValueError, match="budget must be in"):
        retention_gate.retention_gate(gates, budget=0)
    with pytest.raises(ValueError, match="exactly one of budget"):
        retention_gate.retention_gate(gates)
    with pytest.raises(ValueError, match="compression_ratio must be in"):
        retention_gate.retention_gate(gates, compression_ratio=1.0)
    with pytest.raises(TypeError, match="RetentionGates"):
        retention_gate.retention_gate(object(), budget=4)
    comp = retention_gate.retention_gate(gates, budget=4)
    with pytest.raises(ValueError, match="budget must be a positive int"):
        evict.prefill(model, _tokens(1, 8), comp, budget=0, chunk_size=4)
    with pytest.raises(ValueError, match="more than budget"):
        evict.prefill(model, _tokens(1, 8), comp, budget=2, chunk_size=4)
    with pytest.raises(ValueError, match="token ids"):
        evict.prefill(model, np.full((1, 8), 999), comp, budget=4, chunk_size=4)
    with pytest.raises(TypeError, match="Compressor"):
        evict.generate(model, _tokens(1, 8), 2, gates, budget=4, chunk_size=4)
    with pytest.raises(ValueError, match="max_new_tokens"):
        evict.generate(model, _tokens(1, 8), 0, comp, budget=4, chunk_size=4)


def test_remat_gives_the_same_gradients(model):
    gates = retention_gate.init(model, gate_hidden=8, bias_init=3.0)
    graphdef, params, rest = nnx.split(gates, nnx.Param, ...)
    batch = {"tokens": jnp.asarray(_tokens(1, 16))}

    def grads(remat):
        loss_fn = retention_gate.loss(5, remat=remat)
        return jax.jit(jax.grad(
            lambda p: loss_fn(nnx.merge(graphdef, p, rest), model, batch, None)[0]))(params)

    for a, b in zip(jax.tree.leaves(grads(False)), jax.tree.leaves(grads(True))):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-8)
