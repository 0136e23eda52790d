"""Scissorhands: prefill + decode eviction against a direct simulation of the paper's rule."""

import collections
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kvjax
from kvjax import cache as kvcache
from kvjax.compress.base import Observation
from kvjax.compress.scissorhands import (
    HISTORY,
    push_history,
    scissorhands,
    seed_history,
    unimportance_counts,
)

B, HKV, G, T, D = 2, 2, 2, 20, 8
SCALE = D**-0.5


def _obs(q, qpos):
    return Observation(queries=q, raw_queries=q, query_positions=qpos,
                       hidden=jnp.zeros(qpos.shape + (4,)), inv_freq=jnp.ones((D // 2,)),
                       layer=0, num_layers=1, scale=SCALE)


class Reference:
    """Per (row, head): a list of tokens [position, key, flags deque] in slot order."""

    def __init__(self, cap, w, r, m):
        self.cap, self.w, self.r, self.m = cap, w, r, m
        self.heads = {}

    def observe(self, b, h, queries, qpos):
        """queries [G, D] of one step at position qpos: push each token's unimportance flag."""
        toks = self.heads[(b, h)]
        seen = [t for t in toks if t[0] <= qpos]
        if not seen:
            return
        keys = np.stack([t[1] for t in seen])
        s = queries @ keys.T * SCALE
        p = np.exp(s - s.max(-1, keepdims=True))
        p = (p / p.sum(-1, keepdims=True)).mean(0)
        for tok, pi in zip(seen, p):
            tok[2].append(bool(pi < 1.0 / len(seen)))

    def evict_if_full(self, b, h, now):
        toks = self.heads[(b, h)]
        if len(toks) < self.cap:
            return
        def key(i):
            pos, _, flags = toks[i]
            recent = pos > now - self.r
            return (0 if recent else 1, sum(flags), i)  # forced first, low count, older slot
        keep = sorted(sorted(range(len(toks)), key=key)[: self.cap - self.m])
        self.heads[(b, h)] = [toks[i] for i in keep]

    def positions(self):
        return [[[t[0] for t in self.heads[(b, h)]] for h in range(HKV)] for b in range(B)]


def _positions(layer):
    pos, lens = np.asarray(layer.positions), np.asarray(layer.lengths)
    return [[pos[b, h, : lens[b, h]].tolist() for h in range(HKV)] for b in range(B)]


@pytest.mark.parametrize("w,r,m", [(3, 2, 1), (40, 3, 2)])
def test_prefill_and_decode_match_the_simulation(w, r, m):
    rng = np.random.default_rng(w)
    cap = 10
    k = rng.standard_normal((B, HKV, T, D)).astype(np.float32)
    q = (rng.standard_normal((B, HKV * G, T, D)) * 2).astype(np.float32)
    layer = kvcache.write(kvcache.init_layer(B, HKV, T, D), jnp.asarray(k), jnp.asarray(k),
                          jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T)))
    qpos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    comp = scissorhands(budget=cap, history_window=w, recent_window=r, drop_amount=m)
    prefill = jax.jit(lambda c, qq, qp: comp.prefill(c, _obs(qq, qp), ()))
    decode = jax.jit(lambda c, qq, qp: comp.decode(c, _obs(qq, qp), ()))
    out, _ = prefill(layer, jnp.asarray(q), qpos)
    assert out.capacity == cap

    ref = Reference(cap, w, r, m)
    for b in range(B):
        for h in range(HKV):
            ref.heads[(b, h)] = [[t, k[b, h, t], collections.deque(maxlen=w)] for t in range(T)]
            for t in range(max(0, T - w), T):
                ref.observe(b, h, q[b, h * G:(h + 1) * G, t], t)
            ref.evict_if_full(b, h, T - 1)
    assert _positions(out) == ref.positions()

    for step in range(8):
        pos = T + step
        nk = rng.standard_normal((B, HKV, D)).astype(np.float32)
        nq = (rng.standard_normal((B, HKV * G, 1, D)) * 2).astype(np.float32)
        out = kvcache.append(out, jnp.asarray(nk), jnp.asarray(nk), jnp.full((B,), pos))
        out, _ = decode(out, jnp.asarray(nq), jnp.full((B, 1), pos, jnp.int32))
        for b in range(B):
            for h in range(HKV):
                ref.heads[(b, h)].append([pos, nk[b, h], collections.deque(maxlen=w)])
                ref.observe(b, h, nq[b, h * G:(h + 1) * G, 0], pos)
                ref.evict_if_full(b, h, pos)
        assert _positions(out) == ref.positions(), step
        assert (np.asarray(out.lengths) <= cap - 1).all()  # room for the next append
        # kept slots hold the right keys (a subset of what was written)
        for b in range(B):
            want = np.stack([t[1] for t in ref.heads[(b, 0)]])
            np.testing.assert_array_equal(np.asarray(out.keys)[b, 0, : len(want)], want)
    counts = np.asarray(unimportance_counts(out.slot_data[HISTORY]))
    for b in range(B):
        for h in range(HKV):
            want = [sum(t[2]) for t in ref.heads[(b, h)]]
            assert counts[b, h, : len(want)].tolist() == want


def test_history_bits_are_a_sliding_window():
    rng = np.random.default_rng(0)
    w = 45  # two uint32 words
    flags = rng.random((1, 1, 60, 3)) < 0.5  # 60 steps, 3 slots
    hist = seed_history(jnp.asarray(flags[:, :, :50]), w)
    window = [collections.deque(flags[0, 0, :50, c][-w:], maxlen=w) for c in range(3)]
    assert np.asarray(unimportance_counts(hist))[0, 0].tolist() == [sum(x) for x in window]
    for step in range(50, 60):
        hist = push_history(hist, jnp.asarray(flags[:, :, step]), w)
        for c in range(3):
            window[c].append(flags[0, 0, step, c])
        assert np.asarray(unimportance_counts(hist))[0, 0].tolist() == [sum(x) for x in window]


def test_generate_stays_within_budget_without_recompiling():
    from flax import nnx

    from kvjax.models.llama import Llama, LlamaConfig

    model = Llama(LlamaConfig.tiny(), rngs=nnx.Rngs(0))
    gen = sys.modules["kvjax.generate"]._generate_jit
    comp = scissorhands(0.5, recent_window=4)
    tokens = np.random.default_rng(1).integers(0, 256, (2, 32))
    out, cache = kvjax.generate(model, tokens, 12, comp, lengths=np.array([32, 20]),
                                eos_id=-1, return_cache=True)
    assert out.shape == (2, 44)
    for layer in cache.layers:
        assert layer.capacity == 16  # int(32 * 0.5): the budget holds during decoding
        assert (np.asarray(layer.lengths) <= 15).all()
        assert HISTORY in layer.slot_data
        assert (np.asarray(layer.positions).max(-1) == [[42, 42], [30, 30]]).all()
    size = gen._cache_size()
    kvjax.generate(model, np.random.default_rng(2).integers(0, 256, (2, 32)), 12, comp,
                   lengths=np.array([32, 20]), eos_id=-1)
    assert gen._cache_size() == size


def test_bad_input_errors():
    with pytest.raises(ValueError, match="exactly one"):
        scissorhands()
    with pytest.raises(ValueError, match="history_window"):
        scissorhands(budget=16, history_window=0)
    with pytest.raises(ValueError, match="recent_window"):
        scissorhands(budget=16, recent_window=-1)
    with pytest.raises(ValueError, match="drop_amount"):
        scissorhands(budget=16, drop_amount=0)
    with pytest.raises(ValueError, match="recent_window \\+ drop_amount"):
        scissorhands(budget=4, recent_window=4)
    layer = kvcache.init_layer(1, 1, 8, D)
    obs = _obs(jnp.zeros((1, 1, 8, D)), jnp.arange(8, dtype=jnp.int32)[None])
    with pytest.raises(ValueError, match="compression_ratio"):
        scissorhands(0.9, recent_window=8).prefill(layer, obs, ())
    with pytest.raises(ValueError, match="prefilled by scissorhands"):
        scissorhands(budget=16).decode(layer, obs, ())
