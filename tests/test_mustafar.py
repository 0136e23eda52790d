"""Mustafar format: per-token magnitude pruning vs numpy, bitmap-word layout, memory, attention,
decode writes, composition with merging, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

import kvjax
from kvjax import cache as kvcache
from kvjax.attention import attend
from kvjax.compress import chain
from kvjax.compress.base import Observation
from kvjax.compress.kvmerger import LOG_COUNT, kvmerger
from kvjax.models import Llama, LlamaConfig
from kvjax.sparse.mustafar import (
    MustafarLayerCache,
    bytes_per_token,
    compress,
    densify,
    keep_count,
    mustafar,
    num_words,
    sparsify,
)

_sparsify = jax.jit(sparsify, static_argnums=1)
_densify = jax.jit(densify, static_argnums=2)


def _prune_np(x, keep):
    """Keep the `keep` largest |x| per token (ties: lower channel), zero the rest."""
    order = np.argsort(-np.abs(x), axis=-1, kind="stable")[..., :keep]
    out = np.zeros_like(x)
    np.put_along_axis(out, order, np.take_along_axis(x, order, -1), -1)
    return out, order


@settings(max_examples=6, deadline=None)
@given(d=st.sampled_from([8, 12, 40, 64]), s=st.floats(0, 0.95), seed=st.integers(0, 1000))
def test_sparsify_matches_numpy(d, s, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2, 3, 5, d)).astype(np.float32)
    x[0, 0, 0, :3] = 0.0  # ties
    keep = keep_count(d, s)
    assert keep == max(1, d - int(round(s * d)))
    vals, bits = _sparsify(jnp.asarray(x), keep)
    ref, order = _prune_np(x, keep)
    np.testing.assert_array_equal(np.asarray(vals),
                                  np.take_along_axis(x, np.sort(order, -1), -1))
    kept = np.zeros(x.shape, bool)
    np.put_along_axis(kept, order, True, -1)
    assert bits.dtype == jnp.uint32 and bits.shape == x.shape[:-1] + (num_words(d),)
    packed = np.packbits(kept, -1, bitorder="little")  # bytes, little-endian bits
    packed = np.pad(packed, [(0, 0)] * 3 + [(0, 4 * num_words(d) - packed.shape[-1])])
    np.testing.assert_array_equal(np.asarray(bits), packed.view("<u4"))
    np.testing.assert_array_equal(np.asarray(_densify(vals, bits, d)), ref)


@pytest.mark.parametrize("s, ratio", [(0.5, (64 * 2 + 16) / 256), (0.7, (38 * 2 + 16) / 256)])
def test_memory_at_50_and_70_percent(s, ratio):
    b, h, c, d = 1, 2, 16, 128
    layer = kvcache.init_layer(b, h, c, d, jnp.bfloat16)
    sp = compress(layer, s, s)
    assert bytes_per_token(d, s) / (2 * d) == pytest.approx(ratio)
    kv_bytes = kvcache.nbytes((sp.k_vals, sp.k_bits, sp.v_vals, sp.v_bits))
    assert kv_bytes / kvcache.nbytes((layer.keys, layer.values)) == pytest.approx(ratio)
    # whole layer, bitmaps, lengths and positions included
    total = b * h * (2 * c * bytes_per_token(d, s) + 4 * c + 4)
    assert kvcache.nbytes(sp) == total
    assert kvcache.nbytes(sp) / kvcache.nbytes(layer) < ratio + 0.01
    # sparsity 0 keeps every entry: the format is lossless
    x = kvcache.LayerCache(jnp.asarray(np.random.default_rng(0).standard_normal((b, h, c, d)),
                                       jnp.bfloat16), layer.values, layer.lengths,
                           layer.positions)
    np.testing.assert_array_equal(np.asarray(compress(x, 0.0, 0.0).dense().keys, np.float32),
                                  np.asarray(x.keys, np.float32))


def test_attention_and_decode_writes():
    rng = np.random.default_rng(0)
    model = Llama(LlamaConfig.tiny(eos_token_id=None), rngs=nnx.Rngs(0))
    tokens = rng.integers(0, 256, (2, 10))
    out, cache = kvjax.generate(model, tokens, 4, compressor=mustafar(key_sparsity=0.75,
                                                                      value_sparsity=0.5),
                                return_cache=True)
    assert out.shape == (2, 14)
    layer = cache.layers[0]
    assert isinstance(layer, MustafarLayerCache) and (np.asarray(layer.lengths) == 13).all()
    dk, dv = np.asarray(layer.dense().keys), np.asarray(layer.dense().values)
    assert ((dk != 0).sum(-1)[..., :13] <= 4).all()  # decode tokens pruned on write too
    assert ((dv != 0).sum(-1)[..., :13] <= 8).all()
    # attention over the sparse kind == dense reference attention over the pruned vectors
    q = jnp.asarray(rng.standard_normal((2, 4, 1, 16)), jnp.float32)
    qpos = jnp.full((2, 1), 13, jnp.int32)
    np.testing.assert_allclose(np.asarray(jax.jit(attend)(q, qpos, layer)),
                               np.asarray(jax.jit(attend)(q, qpos, layer.dense())), atol=1e-6)


def test_merged_counts_survive_sparsification():
    rng = np.random.default_rng(1)
    b, h, g, c, d = 1, 2, 2, 12, 16
    reps = np.array([1, 3, 2, 6])  # unequal counts: the log-count bias matters
    keys = np.repeat(rng.standard_normal((b, h, 4, d)).astype(np.float32), reps, axis=2)
    values = np.repeat(rng.standard_normal((b, h, 4, d)).astype(np.float32), reps, axis=2)
    pos = np.broadcast_to(np.arange(c), (b, h, c)).astype(np.int32)
    layer = kvcache.LayerCache(jnp.asarray(keys), jnp.asarray(values),
                               jnp.full((b, h), c, jnp.int32), jnp.asarray(pos))
    q = jnp.asarray(rng.standard_normal((b, h * g, 2, d)), jnp.float32)
    qpos = jnp.full((b, 2), c, jnp.int32)
    obs = Observation(q, q, qpos, None, None, 0, 1, d**-0.5)
    comp = chain(kvmerger(budget=4, threshold=0.999, window=0), mustafar(0.0))
    out, _ = jax.jit(comp.prefill)(layer, obs, (None, None))
    assert isinstance(out, MustafarLayerCache)
    np.testing.assert_allclose(np.exp(np.asarray(out.slot_data[LOG_COUNT]))[0, 0], reps,
                               rtol=1e-5)
    np.testing.assert_allclose(np.asarray(jax.jit(attend)(q, qpos, out)),
                               np.asarray(jax.jit(attend)(q, qpos, layer)), atol=1e-5)


def test_errors():
    for kwargs, match in [
        (dict(sparsity=1.0), "key_sparsity"),
        (dict(sparsity=-0.1), "key_sparsity"),
        (dict(key_sparsity=0.5, value_sparsity=1.2), "value_sparsity"),
        (dict(key_sparsity=0.5), "both"),
        (dict(), "sparsity"),
    ]:
        with pytest.raises(ValueError, match=match):
            mustafar(**kwargs)
    layer = kvcache.init_layer(1, 1, 4, 8)
    q = jnp.zeros((1, 1, 1, 8))
    obs = Observation(q, q, jnp.zeros((1, 1), jnp.int32), None, None, 0, 1, 0.5)
    sp, _ = mustafar(0.5).prefill(layer, obs, ())
    with pytest.raises(TypeError, match="LayerCache"):
        mustafar(0.5).prefill(sp, obs, ())
    with pytest.raises(ValueError, match="head dim"):
        attend(jnp.zeros((1, 1, 1, 16)), jnp.zeros((1, 1), jnp.int32), sp)
