"""MiniCache: SLERP / retention against numpy, exact restores, decode after the transform."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import kvjax
from kvjax import cache as kvcache
from kvjax.compress.minicache import minicache, minicache_compressor
from kvjax.compress.minicache import nbytes as minicache_nbytes
from kvjax.eval import methods
from kvjax.models import Llama, LlamaConfig


def _kv(layers, b=2, h=2, c=10, d=8, seed=0, lengths=None):
    rng = np.random.default_rng(seed)
    lengths = np.full((b, h), c, np.int32) if lengths is None else lengths
    pos = np.where(np.arange(c)[None, None] < lengths[..., None], np.arange(c), -1)
    out = []
    for _ in range(layers):
        out.append(kvcache.LayerCache(
            jnp.asarray(rng.standard_normal((b, h, c, d)), jnp.float32),
            jnp.asarray(rng.standard_normal((b, h, c, d)), jnp.float32),
            jnp.asarray(lengths), jnp.asarray(pos, jnp.int32)))
    return kvcache.KVCache(tuple(out), jnp.full((b,), c, jnp.int32))


def _slerp_np(a, b, t):
    ua, ub = a / np.linalg.norm(a), b / np.linalg.norm(b)
    w = np.arccos(np.clip(ua @ ub, -1, 1))
    e = (np.sin((1 - t) * w) * ua + np.sin(t * w) * ub) / np.sin(w)
    return e / np.linalg.norm(e), w


def test_merge_matches_naive():
    cache = _kv(2, lengths=np.array([[10, 7], [10, 10]], np.int32))
    t, gamma = 0.6, 0.3
    out = minicache(cache, start_layer=0, t=t, gamma=gamma, max_retained=0.3)
    lo, hi = out.layers
    r = lo.retained_idx.shape[2]
    assert r == 3 and lo.dir_k is hi.dir_k and lo.retained_idx is hi.retained_idx
    a, b = cache.layers
    for bi in range(2):
        for h in range(2):
            n = int(a.lengths[bi, h])
            dist = np.zeros(n)
            for s in range(n):
                ek, wk = _slerp_np(np.asarray(a.keys[bi, h, s]), np.asarray(b.keys[bi, h, s]), t)
                ev, wv = _slerp_np(np.asarray(a.values[bi, h, s]),
                                   np.asarray(b.values[bi, h, s]), t)
                np.testing.assert_allclose(np.asarray(lo.dir_k[bi, h, s]), ek, atol=1e-5)
                np.testing.assert_allclose(np.asarray(lo.dir_v[bi, h, s]), ev, atol=1e-5)
                np.testing.assert_allclose(float(hi.norm_k[bi, h, s]),
                                           np.linalg.norm(np.asarray(b.keys[bi, h, s])),
                                           rtol=1e-5)
                dist[s] = max(wk, wv) / np.pi
            thr = dist.min() + (dist.max() - dist.min()) * gamma
            cand = sorted([s for s in range(n) if dist[s] > thr], key=lambda s: -dist[s])[:r]
            got = sorted(int(x) for x in np.asarray(lo.retained_idx[bi, h]) if x < 10)
            assert got == sorted(cand)
            # retained tokens are restored exactly in both layers
            for layer, orig in ((lo, a), (hi, b)):
                dense = layer.dense()
                np.testing.assert_allclose(np.asarray(dense.keys[bi, h, cand]),
                                           np.asarray(orig.keys[bi, h, cand]), atol=1e-6)


def test_identical_layers_restore_exactly_and_save_memory():
    cache = _kv(1, d=32)
    cache = cache.replace(layers=cache.layers * 2)  # two identical layers
    out = minicache(cache, start_layer=0, max_retained=0.0)
    for layer, orig in zip(out.layers, cache.layers):
        np.testing.assert_allclose(np.asarray(layer.dense().keys), np.asarray(orig.keys),
                                   atol=1e-5)
        np.testing.assert_allclose(np.asarray(layer.dense().values), np.asarray(orig.values),
                                   atol=1e-5)
    # shared directions counted once: 2 D + 4 norms (+ position) per token for the pair vs
    # 4 D (+ 2 positions) for two dense layers
    b, h, c, d = cache.layers[0].keys.shape
    per_token = (2 * d + 4) * 4 + 4
    assert minicache_nbytes(out.layers) == b * h * (c * per_token + 2 * 4)  # + tail lengths
    assert minicache_nbytes(out.layers) < 0.54 * kvcache.nbytes(cache.layers)
    assert kvcache.nbytes(out.layers) > minicache_nbytes(out.layers)  # naive count double-counts


def test_decode_after_minicache():
    model = Llama(LlamaConfig.tiny(num_hidden_layers=4, eos_token_id=None), rngs=nnx.Rngs(0))
    tokens = np.random.default_rng(1).integers(0, 256, (2, 12))
    cache, logits = kvjax.prefill(model, tokens)
    merged = minicache(cache)
    assert [type(x).__name__ for x in merged.layers] == ["LayerCache", "LayerCache",
                                                         "MiniCacheLayerCache",
                                                         "MiniCacheLayerCache"]
    # the same restored vectors held densely: decoding must agree exactly
    restored = merged.replace(layers=tuple(
        x if isinstance(x, kvcache.LayerCache) else x.dense() for x in merged.layers))

    def grown(c):
        return c.replace(layers=tuple(kvcache.grow(x, x.capacity + 2) for x in c.layers))

    merged, restored = grown(merged), grown(restored)
    step = jax.jit(kvjax.decode_step)
    tok = jnp.argmax(logits, -1).astype(jnp.int32)
    for _ in range(2):
        ref, restored, _ = step(model, restored, tok)
        out, merged, _ = step(model, merged, tok)
        assert np.isfinite(np.asarray(out)).all()
        np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-4)
        tok = jnp.argmax(ref, -1).astype(jnp.int32)
    assert (np.asarray(merged.layers[2].lengths) == 14).all()
    assert (np.asarray(merged.layers[3].positions)[..., -2:] == [12, 13]).all()


def test_minicache_compressor_in_generate():
    """`minicache_compressor` = prefill, whole-cache minicache, grow, decode (by hand)."""
    model = Llama(LlamaConfig.tiny(num_hidden_layers=4, eos_token_id=None), rngs=nnx.Rngs(0))
    tokens = np.random.default_rng(2).integers(0, 256, (2, 12))
    out = kvjax.generate(model, tokens, 4, compressor=minicache_compressor(t=0.5))
    cache, logits = kvjax.prefill(model, tokens)
    cache = minicache(cache, t=0.5)
    cache = cache.replace(layers=tuple(kvcache.grow(x, x.capacity + 4) for x in cache.layers))
    tok, seq = jnp.argmax(logits, -1).astype(jnp.int32), []
    for _ in range(4):
        seq.append(tok)
        logits, cache, _ = kvjax.decode_step(model, cache, tok)
        tok = jnp.argmax(logits, -1).astype(jnp.int32)
    np.testing.assert_array_equal(np.asarray(out)[:, 12:], np.stack(seq, 1))
    comp = methods.build("minicache(t=0.5)", 0.5)
    assert comp is minicache_compressor(t=0.5)
    chained = kvjax.compress.chain(kvjax.compress.streaming_llm(budget=8, n_sink=2),
                                   minicache_compressor())
    cache, _ = kvjax.prefill(model, tokens, chained)
    assert type(cache.layers[3]).__name__ == "MiniCacheLayerCache"
    with pytest.raises(ValueError, match="gamma"):
        minicache_compressor(gamma=2.0)


def test_errors():
    cache = _kv(3)
    with pytest.raises(ValueError, match="start_layer"):
        minicache(cache, start_layer=2)
    for name in ("t", "gamma", "max_retained"):
        with pytest.raises(ValueError, match=name):
            minicache(cache, **{name: 1.5})
    with pytest.raises(TypeError, match="KVCache"):
        minicache(cache.layers[0])
    odd = cache.replace(layers=(cache.layers[0], _kv(1, c=6).layers[0], cache.layers[2]))
    with pytest.raises(ValueError, match="shapes"):
        minicache(odd, start_layer=0)
    merged = minicache(_kv(2), start_layer=0)
    with pytest.raises(TypeError, match="LayerCache"):
        minicache(merged, start_layer=0)
    two = _kv(2)
    counted = two.layers[0].replace(slot_data={"log_count": jnp.zeros((2, 2, 10))})
    with pytest.raises(ValueError, match="merged slots"):
        minicache(two.replace(layers=(counted, two.layers[1])), start_layer=0)
