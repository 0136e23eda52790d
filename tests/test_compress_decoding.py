"""Decode-time eviction: native StreamingLLM / H2O / score-based (`decode=True`) and
`kvjax.compress.decoding`, against simple numpy simulations, plus end-to-end generation."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_compress_eviction import FREQ, HKV, D, G, kept, synthetic, tiny_model

import kvjax
from kvjax import compress as C
from kvjax import rope
from kvjax.cache import append, grow
from kvjax.compress.base import Observation, decode_capacity

T0 = 14  # prompt length of the synthetic runs


def _steps(seed: int, n: int, b: int):
    """n decode steps of random (key, value, query) [B, H, D] each, pre-RoPE."""
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal((b, HKV, D), np.float32),
             rng.standard_normal((b, HKV, D), np.float32),
             2 * rng.standard_normal((b, HKV * G, D), np.float32)) for _ in range(n)]


@jax.jit
def _append(cache, k, v, q, position):
    k = rope.apply(k[:, :, None], position[:, None], FREQ)[:, :, 0]
    q = rope.apply(q[:, :, None], position[:, None], FREQ)
    return append(cache, k, v, position), q


def _static(obs):
    return dict(layer=obs.layer, num_layers=obs.num_layers, scale=obs.scale,
                sliding_window=obs.sliding_window)


def _decode_run(comp, lengths, n_steps, seed=0):
    """Prefill a synthetic prompt with `comp`, grow the layer as `generate` does, then n_steps
    appends + comp.decode (all jitted, the observation's ints static). Returns the caches
    after every step."""
    cache, obs = synthetic(seed, lengths, t=T0)
    static = _static(obs)
    prefill = jax.jit(lambda c, a: comp.prefill(c, Observation(*a, **static), comp.init(c)))
    decode = jax.jit(lambda c, a, s: comp.decode(c, Observation(*a, **static), s))
    cache, state = prefill(cache, tuple(obs[:5]))
    b = len(lengths)
    cache = grow(cache, decode_capacity(comp, cache.capacity, n_steps))
    position = np.asarray(lengths, np.int32)
    history = []
    for k, v, q in _steps(seed + 1, n_steps, b):
        cache, qr = _append(cache, k, v, q, jnp.asarray(position))
        arrays = (qr, jnp.asarray(q)[:, :, None], jnp.asarray(position)[:, None],
                  jnp.zeros((b, 1, 4)), obs.inv_freq)
        cache, state = decode(cache, arrays, state)
        history.append(cache)
        position = position + 1
    return history


def test_streaming_decode_keeps_sinks_and_window():
    budget, n_sink, steps = 9, 3, 11
    comp = C.streaming_llm(budget=budget, n_sink=n_sink, decode=True)
    history = _decode_run(comp, [T0, 10], steps)
    for i, cache in enumerate(history):
        assert cache.capacity == budget + 1
        for b, length in enumerate([T0, 10]):
            seen = length + i + 1
            want = sorted(set(range(min(n_sink, seen))) | set(range(max(0, seen - budget
                                                                           + n_sink), seen)))
            assert kept(cache)[b] == [want[-budget:] if len(want) > budget else want] * HKV


def test_knorm_decode_keeps_smallest_norms_of_everything_seen():
    budget, steps = 6, 10
    comp = C.knorm(budget=budget, decode=True)
    history = _decode_run(comp, [T0, 9], steps)
    cache0, _ = synthetic(0, [T0, 9], t=T0)
    norms = [np.linalg.norm(np.asarray(cache0.keys), axis=-1)]  # [B, H, T0]
    norms += [np.linalg.norm(k, axis=-1)[..., None] for k, _, _ in _steps(1, steps, 2)]
    for i, cache in enumerate(history):
        for b, length in enumerate([T0, 9]):
            seen = np.concatenate([norms[0][b, :, :length]] + [n[b] for n in norms[1:i + 2]],
                                  axis=-1)  # [H, seen]; prompt positions then T0.. (row b)
            pos = list(range(length)) + list(range(length, length + i + 1))
            for h in range(HKV):
                best = sorted(np.argsort(seen[h], kind="stable")[:budget])
                assert kept(cache)[b][h] == sorted(pos[j] for j in best)


def _h2o_reference(cache0, obs0, steps, budget, recent):
    """numpy H2O: normalised accumulated attention, recent window protected, evict the min."""
    keys = np.asarray(cache0.keys)[0]  # [H, T0, D] (row 0, full)
    qs = np.asarray(obs0.queries)[0]  # [Hq, T0, D]
    logits = np.einsum("qtd,qsd->qts", qs, np.repeat(keys, G, axis=0)) * D**-0.5
    logits = np.where(np.tril(np.ones((T0, T0), bool)), logits, -np.inf)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    sums = p.sum(1).reshape(HKV, G, T0).mean(1)  # [H, T0]
    heads = []
    for h in range(HKV):
        tok = {t: (keys[h, t], sums[h, t]) for t in range(T0)}

        def evict_to(n, last, tok=tok):
            while len(tok) > n:
                cand = [t for t in tok if t <= last - recent]
                t = min(cand, key=lambda t: tok[t][1] / (last - t + 1))
                del tok[t]

        evict_to(budget, T0 - 1)
        history = [sorted(tok)]
        for i, (k, _, q) in enumerate(steps):
            posn = T0 + i
            kk = np.asarray(rope.apply(jnp.asarray(k[:1, h:h + 1, None]),
                                       jnp.array([[posn]]), FREQ))[0, 0, 0]
            qq = np.asarray(rope.apply(jnp.asarray(q[:1, h * G:(h + 1) * G, None]),
                                       jnp.array([[posn]]), FREQ))[0, :, 0]
            tok[posn] = (kk, 0.0)
            order = sorted(tok)
            kmat = np.stack([tok[t][0] for t in order])
            lg = qq @ kmat.T * D**-0.5
            pr = np.exp(lg - lg.max(-1, keepdims=True))
            pr = (pr / pr.sum(-1, keepdims=True)).mean(0)
            for t, a in zip(order, pr):
                tok[t] = (tok[t][0], tok[t][1] + a)
            evict_to(budget, posn)
            history.append(sorted(tok))
        heads.append(history)
    return heads


def test_h2o_decode_matches_numpy_simulation():
    budget, steps = 8, 9
    comp = C.h2o(budget=budget, recent_fraction=0.25, decode=True)
    history = _decode_run(comp, [T0, T0], steps)
    cache0, obs0 = synthetic(0, [T0, T0], t=T0)
    ref = _h2o_reference(cache0, obs0, _steps(1, steps, 2), budget, recent=2)
    for i, cache in enumerate(history):
        assert "h2o" in cache.slot_data and cache.capacity == budget + 1
        for h in range(HKV):
            assert kept(cache)[0][h] == ref[h][i + 1], (i, h)


def test_decoding_compacts_every_interval():
    budget, interval, steps = 10, 4, 13
    comp = C.decoding(C.knorm_scores, budget, interval=interval)
    history = _decode_run(comp, [T0, 11], steps)
    assert history[0].capacity == max(T0, budget) + interval
    expected = np.array([T0, 11])
    for i, cache in enumerate(history):
        expected = expected + 1
        if (i + 1) % interval == 0:
            expected = np.minimum(expected, budget)
        for b in range(2):
            np.testing.assert_array_equal(np.asarray(cache.lengths)[b], expected[b])
    # the protected window of a SnapKV scorer (buffered queries) survives every compression
    snap = functools.partial(C.snapkv_scores, window=3)
    comp = C.decoding(snap, budget, interval=interval, buffer_size=interval)
    for i, cache in enumerate(_decode_run(comp, [T0, 11], 8)):
        if (i + 1) % interval == 0:
            for b, length in enumerate([T0, 11]):
                last = length + i
                for row in kept(cache)[b]:
                    assert {last - 2, last - 1, last} <= set(row)


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def test_generate_with_bounded_caches(model):
    """End to end: the layers are sized budget + 1 and stay within the budget; with
    re-rotation the sinks + window sit at contiguous positions ending at the newest token."""
    tokens = np.random.default_rng(0).integers(0, 256, (2, 24))
    budget, new = 12, 10
    comp = C.streaming_llm(budget=budget, decode=True, rerotate=True)
    out, cache = kvjax.generate(model, tokens, new, compressor=comp, return_cache=True)
    total = 24 + new - 1
    for lc in cache.layers:
        assert lc.capacity == budget + 1
        np.testing.assert_array_equal(np.asarray(lc.lengths), budget)
        for b in range(2):
            for h in range(lc.num_heads):
                pos = np.sort(np.asarray(lc.positions[b, h, :budget]))
                np.testing.assert_array_equal(pos, np.arange(total - budget, total))
    # Layer 0 keys depend only on token and position: compare with a direct rotation.
    full, _ = kvjax.prefill(model, np.asarray(out)[:, :total])
    freq = np.concatenate([_model_freq(model)] * 2)

    def rotate(x, pos):  # numpy RoPE (rotate_half layout)
        half = np.concatenate([-x[..., x.shape[-1] // 2:], x[..., : x.shape[-1] // 2]], -1)
        angle = np.asarray(pos)[..., None] * freq
        return x * np.cos(angle) + half * np.sin(angle)

    keys0 = np.asarray(full.layers[0].keys)
    raw = rotate(keys0, -np.arange(total)[None, None, :])  # back to position 0
    orig = np.array(list(range(4)) + list(range(total - budget + 4, total)))
    lc = cache.layers[0]
    order = np.argsort(np.asarray(lc.positions[:, :, :budget]), axis=-1)
    got = np.take_along_axis(np.asarray(lc.keys[:, :, :budget]), order[..., None], axis=2)
    want = rotate(raw[:, :, orig], np.arange(total - budget, total)[None, None, :])
    np.testing.assert_allclose(got, want, atol=1e-4)
    out_h2o, cache = kvjax.generate(model, tokens, new, compressor=C.h2o(budget=budget,
                                    decode=True, recent_fraction=0.5), return_cache=True)
    assert all(lc.capacity == budget + 1 and (np.asarray(lc.lengths) == budget).all()
               and lc.slot_data["h2o"].shape == lc.positions.shape for lc in cache.layers)


def _model_freq(model):
    c = model.config
    return rope.inv_freq(c.head_dim, c.rope_theta, c.rope_scaling_dict)
