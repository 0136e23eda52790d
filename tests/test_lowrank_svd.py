"""SVD low-rank keys/values: truncated SVD reference, exact at full rank (post- and pre-RoPE),
decode projection, memory, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import kvjax
from kvjax import cache as kvcache
from kvjax import rope
from kvjax.attention import attend
from kvjax.compress.base import Observation
from kvjax.lowrank.svd import SVDLayerCache, compress, svd
from kvjax.models import Llama, LlamaConfig


def _layer(rng, b, h, c, d, lengths):
    pos = np.where(np.arange(c)[None, None] < lengths[..., None], np.arange(c), -1)
    return kvcache.LayerCache(
        jnp.asarray(rng.standard_normal((b, h, c, d)), jnp.float32),
        jnp.asarray(rng.standard_normal((b, h, c, d)), jnp.float32),
        jnp.asarray(lengths), jnp.asarray(pos, jnp.int32))


_compress = jax.jit(compress, static_argnums=(1, 2))
_attend = jax.jit(attend)


def test_rank_r_is_the_truncated_svd():
    rng = np.random.default_rng(0)
    b, h, c, d, r = 2, 2, 10, 8, 3
    lengths = np.array([[10, 6], [3, 10]], np.int32)
    layer = _layer(rng, b, h, c, d, lengths)
    low = _compress(layer, r, 2)
    assert isinstance(low, SVDLayerCache) and low.coeffs.shape == (b, h, c, r)
    dense = low.dense()
    for bi in range(b):
        for hi in range(h):
            n = lengths[bi, hi]
            for arr, got, rank in ((layer.keys, dense.keys, r), (layer.values, dense.values, 2)):
                x = np.asarray(arr[bi, hi, :n], np.float64)
                u, s, vt = np.linalg.svd(x, full_matrices=False)
                best = (u[:, :rank] * s[:rank]) @ vt[:rank]
                np.testing.assert_allclose(np.asarray(got[bi, hi, :n]), best, atol=1e-4)
    q = jnp.asarray(rng.standard_normal((b, 2 * h, 1, d)), jnp.float32)
    qpos = jnp.full((b, 1), c, jnp.int32)
    np.testing.assert_allclose(np.asarray(_attend(q, qpos, low)),
                               np.asarray(_attend(q, qpos, dense)), atol=1e-5)


@pytest.mark.parametrize("pre", [False, True])
def test_full_rank_is_exact_and_pre_rope_keys_are_lower_rank(pre):
    rng = np.random.default_rng(1)
    b, h, c, d = 1, 2, 12, 8
    freq = jnp.asarray(rope.inv_freq(d, 10000.0))
    raw = np.repeat(rng.standard_normal((b, h, 1, d)), c, axis=2)  # rank-1 pre-RoPE keys
    raw = raw * rng.random((b, h, c, 1))
    pos = jnp.broadcast_to(jnp.arange(c, dtype=jnp.int32), (b, c))
    keys = rope.apply(jnp.asarray(raw, jnp.float32), pos, freq)
    layer = _layer(rng, b, h, c, d, np.full((b, h), c, np.int32)).replace(keys=keys)
    inv = freq if pre else None
    full = _compress(layer, d, None, inv)
    np.testing.assert_allclose(np.asarray(full.dense().keys), np.asarray(keys), atol=1e-4)
    one = _compress(layer, 1, None, inv)
    err = float(jnp.abs(one.dense().keys - keys).max())
    assert (err < 1e-4) == pre  # pre-RoPE keys are rank 1 here; post-RoPE ones are not


def test_memory():
    rng = np.random.default_rng(2)
    b, h, c, d = 1, 2, 24, 16
    layer = _layer(rng, b, h, c, d, np.full((b, h), c, np.int32))
    low = _compress(layer, 4, 8)
    expect = b * h * ((c + d) * 4 * 4 + (c + d) * 8 * 4)  # keys rank 4, values rank 8, float32
    assert kvcache.nbytes((low.coeffs, low.basis, low.values, low.vbasis)) == expect


def test_generate_full_rank_pre_rope_matches_dense():
    model = Llama(LlamaConfig.tiny(eos_token_id=None), rngs=nnx.Rngs(0))
    tokens = np.random.default_rng(2).integers(0, 256, (2, 12))
    out, cache = kvjax.generate(model, tokens, 4, compressor=svd(rank=16, rope_mode="pre"),
                                return_cache=True)
    ref = kvjax.generate(model, tokens, 4)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(ref))  # full rank: same tokens
    layer = cache.layers[1]
    assert isinstance(layer, SVDLayerCache) and (np.asarray(layer.lengths) == 15).all()
    assert layer.inv_freq is not None


def test_errors():
    for kwargs, match in [
        (dict(), "exactly one"),
        (dict(rank=0), "rank"),
        (dict(rank_ratio=0.0), "rank_ratio"),
        (dict(rank_ratio=1.5), "rank_ratio"),
        (dict(rank=2, value_rank=-1), "value_rank"),
        (dict(rank=2, rope_mode="both"), "rope_mode"),
    ]:
        with pytest.raises(ValueError, match=match):
            svd(**kwargs)
    rng = np.random.default_rng(0)
    layer = _layer(rng, 1, 1, 4, 8, np.full((1, 1), 4, np.int32))
    q = jnp.zeros((1, 1, 1, 8))
    obs = Observation(q, q, jnp.zeros((1, 1), jnp.int32), None, None, 0, 1, 0.5)
    with pytest.raises(ValueError, match="head_dim=8"):
        svd(rank=9).prefill(layer, obs, ())
    with pytest.raises(ValueError, match="value_rank"):
        svd(rank=2, value_rank=12).prefill(layer, obs, ())
