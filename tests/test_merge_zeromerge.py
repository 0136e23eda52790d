"""ZeroMerge: residual slot against a numpy reference, exactness of the compensated logit,
decode-time merging inside `generate`."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import kvjax
from kvjax import cache as kvcache
from kvjax.attention import attend
from kvjax.compress.base import Observation
from kvjax.compress.kvmerger import LOG_COUNT
from kvjax.compress.zeromerge import zeromerge, zeromerge_prefill
from kvjax.models import Llama, LlamaConfig


def _layer(keys, values, lengths):
    c = keys.shape[2]
    pos = np.where(np.arange(c)[None, None] < lengths[..., None], np.arange(c), -1)
    return kvcache.LayerCache(jnp.asarray(keys), jnp.asarray(values), jnp.asarray(lengths),
                              jnp.asarray(pos, jnp.int32))


@functools.partial(jax.jit, static_argnames=("keep",))
def _prefill(layer, scores, keep, window):
    return zeromerge_prefill(layer, scores, keep, window)


def test_prefill_matches_naive():
    rng = np.random.default_rng(0)
    b, h, c, d, keep, window = 2, 2, 11, 4, 5, 1
    keys = rng.standard_normal((b, h, c, d)).astype(np.float32)
    values = rng.standard_normal((b, h, c, d)).astype(np.float32)
    lengths = np.array([[11, 3], [8, 0]], np.int32)
    scores = rng.random((b, h, c)).astype(np.float32)
    out = _prefill(_layer(keys, values, lengths), jnp.asarray(scores), keep, window)
    assert out.capacity == keep
    for bi in range(b):
        for hi in range(h):
            n = lengths[bi, hi]
            sel = np.where(np.arange(n) >= n - window, np.inf, scores[bi, hi, :n])
            kept = sorted(sorted(range(n), key=lambda i: (-sel[i], i))[:keep - 1])
            ev = [i for i in range(n) if i not in kept]
            assert int(out.lengths[bi, hi]) == 1 + len(kept)
            np.testing.assert_array_equal(np.asarray(out.positions[bi, hi, 1:1 + len(kept)]),
                                          kept)
            np.testing.assert_allclose(np.asarray(out.keys[bi, hi, 1:1 + len(kept)]),
                                       keys[bi, hi, kept])
            if ev:
                np.testing.assert_allclose(np.asarray(out.keys[bi, hi, 0]),
                                           keys[bi, hi, ev].mean(0), atol=1e-5)
                np.testing.assert_allclose(np.asarray(out.values[bi, hi, 0]),
                                           values[bi, hi, ev].mean(0), atol=1e-5)
                assert int(out.positions[bi, hi, 0]) == max(ev)
                np.testing.assert_allclose(float(out.slot_data[LOG_COUNT][bi, hi, 0]),
                                           np.log(len(ev)), atol=1e-5)
            else:
                assert int(out.positions[bi, hi, 0]) == -1


def test_identical_evicted_tokens_give_exact_attention():
    rng = np.random.default_rng(1)
    b, h, g, d, c = 1, 2, 2, 8, 12
    keys = np.repeat(rng.standard_normal((b, h, 1, d)), c, axis=2).astype(np.float32)
    values = np.repeat(rng.standard_normal((b, h, 1, d)), c, axis=2).astype(np.float32)
    special = [2, 7, 11]
    keys[:, :, special] = rng.standard_normal((b, h, 3, d))
    values[:, :, special] = rng.standard_normal((b, h, 3, d))
    scores = np.zeros((b, h, c), np.float32)
    scores[:, :, special] = 1.0
    layer = _layer(keys, values, np.full((b, h), c, np.int32))
    out = _prefill(layer, jnp.asarray(scores), 4, 0)
    q = jnp.asarray(rng.standard_normal((b, h * g, 2, d)), jnp.float32)
    qpos = jnp.full((b, 2), c, jnp.int32)
    np.testing.assert_allclose(np.asarray(jax.jit(attend)(q, qpos, out)),
                               np.asarray(jax.jit(attend)(q, qpos, layer)), atol=1e-5)


def test_decode_keeps_budget_and_counts_every_token():
    model = Llama(LlamaConfig.tiny(eos_token_id=None), rngs=nnx.Rngs(0))
    tokens = np.random.default_rng(2).integers(0, 256, (2, 14))
    budget, new = 6, 5
    out, cache = kvjax.generate(model, tokens, new, compressor=zeromerge(budget=budget, window=2),
                                return_cache=True)
    assert out.shape == (2, 14 + new)
    for layer in cache.layers:
        assert layer.capacity == budget + 1
        n = np.asarray(layer.lengths)
        assert (n <= budget).all()
        valid = (np.arange(layer.capacity)[None, None] < n[..., None]) & (
            np.asarray(layer.positions) >= 0)
        counts = np.where(valid, np.exp(np.asarray(layer.slot_data[LOG_COUNT])), 0).sum(-1)
        np.testing.assert_allclose(counts, 14 + new - 1, rtol=1e-5)  # last token not fed back
        assert np.isfinite(np.asarray(layer.keys)).all()


def test_errors():
    for kwargs, match in [
        (dict(budget=4, window=3), "window"),
        (dict(budget=4, window=-1), "window"),
        (dict(), "exactly one"),
    ]:
        with pytest.raises(ValueError, match=match):
            zeromerge(**kwargs)
    with pytest.raises(TypeError, match="decode_merge"):
        zeromerge(budget=4, window=1, decode_merge=1)
    comp = zeromerge(budget=4, window=1)
    layer = _layer(np.zeros((1, 1, 6, 4), np.float32), np.zeros((1, 1, 6, 4), np.float32),
                   np.full((1, 1), 6, np.int32))
    q = jnp.zeros((1, 1, 1, 4))
    obs = Observation(q, q, jnp.zeros((1, 1), jnp.int32), None, None, 0, 1, 0.5)
    with pytest.raises(TypeError, match="LayerCache"):
        comp.decode(layer, obs, ())  # decode without ZeroMerge's prefill
    with pytest.raises(ValueError, match="window"):
        zeromerge(compression_ratio=0.5, window=2).prefill(layer, obs, ())
    # a budget above the prompt keeps every token and leaves the residual empty
    out, _ = zeromerge(budget=20, window=1).prefill(layer, obs, ())
    assert out.capacity == 7 and int(out.lengths[0, 0]) == 7
    assert int(out.positions[0, 0, 0]) == -1 and (np.asarray(out.positions[0, 0, 1:]) >= 0).all()
