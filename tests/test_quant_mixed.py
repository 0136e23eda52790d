"""Mixed-precision cache: importance split, both parts read by attention, generation, restore."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import kvjax
from kvjax.cache import LayerCache
from kvjax.compress.knorm import knorm_scores
from kvjax.models import Llama, LlamaConfig
from kvjax.quant import MixedPrecisionLayerCache, QuantizedLayerCache, kivi, mixed_precision
from kvjax.quant.mixed import split_by_importance


def _dense(seed, b, h, c, d, lengths):
    rng = np.random.default_rng(seed)
    keys = jnp.asarray(rng.normal(size=(b, h, c, d)) * 2, jnp.float32)
    values = jnp.asarray(rng.normal(size=(b, h, c, d)), jnp.float32)
    lengths = jnp.asarray(lengths, jnp.int32)
    slot = jnp.arange(c)[None, None]
    pos = jnp.where(slot < lengths[..., None], slot, -1).astype(jnp.int32)
    return LayerCache(keys, values, lengths, pos)


def test_split_by_importance_is_a_partition():
    c, g, r, budget = 40, 4, 8, 6
    dense = _dense(0, 2, 2, c, 8, [[40, 13], [5, 0]])
    scores = jnp.asarray(np.random.default_rng(1).normal(size=(2, 2, c)), jnp.float32)
    high, low = split_by_importance(dense, scores, budget, g, r)
    assert high.capacity == budget and low.capacity == c - budget
    for bi in range(2):
        for hi in range(2):
            n = int(dense.lengths[bi, hi])
            older = g * -(-max(n - r, 0) // g)  # outside the residual window
            hp = np.asarray(high.positions[bi, hi, : int(high.lengths[bi, hi])])
            lp = np.asarray(low.positions[bi, hi, : int(low.lengths[bi, hi])])
            want = np.argsort(-np.asarray(scores[bi, hi, :older]), kind="stable")[:budget]
            np.testing.assert_array_equal(hp, np.sort(want))  # top scores, in order
            assert (np.diff(lp) > 0).all() and (np.diff(hp) > 0).all()
            np.testing.assert_array_equal(np.sort(np.concatenate([hp, lp])), np.arange(n))
            if n > r:  # the window's tokens are the low part's newest
                np.testing.assert_array_equal(lp[-(n - older):], np.arange(older, n))


def key_norm(cache, obs):
    """Any callable scorer works; here large keys (which dominate attention) are important."""
    return -knorm_scores(cache, obs)


def test_attention_reads_both_parts_and_beats_uniform_low_bits(monkeypatch):
    dense = _dense(2, 1, 2, 96, 16, [[96, 80]])
    q = jnp.asarray(np.random.default_rng(3).normal(size=(1, 64, 1, 16)), jnp.float32)
    qpos = jnp.full((1, 1), 96, jnp.int32)
    exact = kvjax.attention.attend(q, qpos, dense)
    mixed = mixed_precision(key_norm, 0.5, 8, 2, 16, 16).prefill(dense, None, ())[0]
    low_only = kivi(2, 16, 16).prefill(dense, None, ())[0]
    assert isinstance(mixed, MixedPrecisionLayerCache)
    assert isinstance(mixed.high, QuantizedLayerCache) and mixed.high.bits == 8
    np.testing.assert_array_equal(np.asarray(mixed.lengths), [[96, 80]])
    pos = np.asarray(mixed.positions[0, 1])
    np.testing.assert_array_equal(np.sort(pos[pos >= 0]), np.arange(80))
    out = kvjax.attention.attend(q, qpos, mixed)
    err = lambda a: float(jnp.linalg.norm(a - exact) / jnp.linalg.norm(exact))  # noqa: E731
    assert err(out) < 0.8 * err(kvjax.attention.attend(q, qpos, low_only))
    # the GPU path (two kernel passes, merged) agrees with the reference, interpreted here
    monkeypatch.setattr(kvjax.attention, "kernel_platform", lambda: "gpu")
    np.testing.assert_allclose(np.asarray(kvjax.attention.attend(q, qpos, mixed)),
                               np.asarray(out), rtol=2e-5, atol=2e-5)
    full_high = mixed_precision(key_norm, 0.5, None, 2, 16, 16).prefill(dense, None, ())[0]
    assert isinstance(full_high.high, LayerCache)
    np.testing.assert_allclose(np.asarray(kvjax.attention.attend(q, qpos, full_high)),
                               np.asarray(kvjax.attention.attend(q, qpos, full_high,
                                                                 impl="reference")),
                               rtol=2e-5, atol=2e-5)


@pytest.fixture(scope="module")
def model():
    return Llama(LlamaConfig.tiny(eos_token_id=None), rngs=nnx.Rngs(1))


def test_generate_with_mixed_precision_and_full_precision_high_part(model):
    tokens = np.random.default_rng(4).integers(0, 256, (2, 72))
    comp = mixed_precision(knorm_scores, high_fraction=0.25, high_bits=8, low_bits=2,
                           group_size=16, residual=16)
    out, cache = kvjax.generate(model, tokens, 6, compressor=comp, return_cache=True)
    layer = cache.layers[0]
    assert isinstance(layer, MixedPrecisionLayerCache) and out.shape == (2, 78)
    np.testing.assert_array_equal(np.asarray(layer.lengths), 72 + 5)
    # high_fraction=1 at full precision: every token outside the window stays exact, so the
    # first decode step equals the dense one (the window holds the rest, nothing is flushed)
    exact = mixed_precision(knorm_scores, 1.0, None, 2, 16, 16)
    dense, logits = kvjax.prefill(model, tokens)
    mixed, logits_m = kvjax.prefill(model, tokens, compressor=exact)
    assert isinstance(mixed.layers[0].high, LayerCache)
    assert int(mixed.layers[0].low.num_quantized.max()) == 0
    tok = jnp.argmax(logits, -1).astype(jnp.int32)
    grow = lambda c: c.replace(layers=tuple(kvjax.cache.grow(x, x.capacity + 1)  # noqa: E731
                                            for x in c.layers))
    a = kvjax.decode_step(model, grow(dense), tok)[0]
    b = kvjax.decode_step(model, grow(mixed), tok, exact)[0]
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


def test_save_restore(tmp_path, model):
    tokens = np.random.default_rng(5).integers(0, 256, (1, 48))
    for high_bits in (8, None):
        comp = mixed_precision(knorm_scores, 0.3, high_bits, 4, 16, 16)
        cache, _ = kvjax.prefill(model, tokens, compressor=comp)
        kvjax.cache.save(tmp_path / str(high_bits), cache)
        back = kvjax.cache.restore(tmp_path / str(high_bits))
        assert type(back.layers[0]) is MixedPrecisionLayerCache
        assert type(back.layers[0].high) is type(cache.layers[0].high)
        for x, y in zip(jax.tree.leaves(cache), jax.tree.leaves(back)):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_bad_arguments():
    assert mixed_precision("knorm") is mixed_precision(knorm_scores)  # a name resolves
    with pytest.raises(ValueError, match="not a kvjax method"):
        mixed_precision("nosuch")
    with pytest.raises(TypeError, match="scorer must be callable"):
        mixed_precision(3)
    with pytest.raises(ValueError, match="high_fraction"):
        mixed_precision(knorm_scores, high_fraction=0.0)
    with pytest.raises(ValueError, match="bits must be one of"):
        mixed_precision(knorm_scores, high_bits=3)
    with pytest.raises(ValueError, match="bits must be one of"):
        mixed_precision(knorm_scores, low_bits=1)
    with pytest.raises(ValueError, match="multiple of group_size"):
        mixed_precision(knorm_scores, group_size=32, residual=40)
    bad = mixed_precision(lambda cache, obs: cache.keys[..., 0, 0], group_size=8, residual=8)
    with pytest.raises(ValueError, match="scorer returned shape"):
        bad.prefill(_dense(0, 1, 1, 16, 8, [[16]]), None, ())
    assert mixed_precision(knorm_scores) is mixed_precision(knorm_scores)
