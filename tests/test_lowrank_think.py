"""ThinK key-channel pruning: scores vs the formula, attention vs zeroed channels, kvpress
parity, real memory savings, decode, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import kvjax
from kvjax import cache as kvcache
from kvjax.attention import attend
from kvjax.compress import chain
from kvjax.compress.base import Observation
from kvjax.lowrank.think import ThinKLayerCache, channel_scores, prune, think
from kvjax.models import Llama, LlamaConfig


def _layer(rng, b, h, c, d, lengths):
    pos = np.where(np.arange(c)[None, None] < lengths[..., None], np.arange(c), -1)
    return kvcache.LayerCache(
        jnp.asarray(rng.standard_normal((b, h, c, d)), jnp.float32),
        jnp.asarray(rng.standard_normal((b, h, c, d)), jnp.float32),
        jnp.asarray(lengths), jnp.asarray(pos, jnp.int32))


def test_scores_and_attention_match_formula():
    rng = np.random.default_rng(0)
    b, h, g, c, d, t = 2, 2, 2, 9, 16, 4
    lengths = np.array([[9, 5], [7, 9]], np.int32)
    layer = _layer(rng, b, h, c, d, lengths)
    q = rng.standard_normal((b, h * g, t, d)).astype(np.float32)
    qpos = np.array([[5, 6, 7, 8], [-1, 6, 7, 8]], np.int32)  # row 1 has a padding query
    s = np.asarray(channel_scores(layer, jnp.asarray(q), jnp.asarray(qpos)))
    keys = np.asarray(layer.keys)
    for bi in range(b):
        real = qpos[bi] >= 0
        for hi in range(h):
            qq = q[bi, hi * g:(hi + 1) * g][:, real]
            k = keys[bi, hi, :lengths[bi, hi]]
            np.testing.assert_allclose(s[bi, hi], (qq**2).mean((0, 1)) * (k**2).mean(0),
                                       rtol=1e-5)
    keep = 10
    pruned = prune(layer, jnp.asarray(s), keep)
    assert pruned.keys.shape == (b, h, c, keep)
    top = np.sort(np.argsort(-s, axis=-1, kind="stable")[..., :keep], -1)
    np.testing.assert_array_equal(np.asarray(pruned.channels), top)
    # attention over the pruned cache == attention over keys with the other channels zeroed
    zeroed = np.zeros_like(keys)
    for bi in range(b):
        for hi in range(h):
            zeroed[bi, hi][:, top[bi, hi]] = keys[bi, hi][:, top[bi, hi]]
    ref = layer.replace(keys=jnp.asarray(zeroed))
    qd = jnp.asarray(q)
    qp = jnp.full((b, t), c, jnp.int32)
    np.testing.assert_allclose(np.asarray(attend(qd, qp, pruned)), np.asarray(attend(qd, qp, ref)),
                               atol=1e-5)
    np.testing.assert_array_equal(np.asarray(pruned.dense().keys), zeroed)


def test_kvpress_parity(tmp_path):
    """Kept channels == the channels kvpress's ThinKPress leaves non-zero."""
    import torch
    from hf_models import save_tiny
    from kvpress import ThinKPress
    from transformers import DynamicCache

    tm = save_tiny("llama", str(tmp_path))
    ids = np.random.default_rng(0).integers(0, 128, (1, 20))
    press = ThinKPress(key_channel_compression_ratio=0.5, window_size=8)
    cache = DynamicCache()
    with torch.no_grad(), press(tm):
        tm(torch.tensor(ids), past_key_values=cache)
    model = kvjax.models.hf.load(str(tmp_path))
    ours, _ = kvjax.prefill(model, ids, compressor=think(0.5, window=8))
    for i, layer in enumerate(ours.layers):
        tk = cache.layers[i].keys.numpy()  # [1, Hkv, T, D]
        kept_tp = np.abs(tk).sum(2) > 0  # [1, Hkv, D]
        mine = np.zeros_like(kept_tp)
        np.put_along_axis(mine, np.asarray(layer.channels), True, axis=-1)
        np.testing.assert_array_equal(mine, kept_tp)
        np.testing.assert_allclose(np.asarray(layer.dense().keys), tk, atol=1e-4)


def test_generate_memory_and_decode():
    model = Llama(LlamaConfig.tiny(eos_token_id=None), rngs=nnx.Rngs(0))
    tokens = np.random.default_rng(1).integers(0, 256, (2, 12))
    comp = think(key_channel_compression_ratio=0.5, window=4)
    cache, _ = kvjax.prefill(model, tokens, compressor=comp)
    dense, _ = kvjax.prefill(model, tokens)
    for layer, full in zip(cache.layers, dense.layers):
        assert isinstance(layer, ThinKLayerCache) and layer.keys.shape[-1] == 8
        assert kvcache.nbytes(layer.keys) == kvcache.nbytes(full.keys) // 2
        ratio = kvcache.nbytes(layer) / kvcache.nbytes(full)
        assert ratio < 0.8  # keys halved, values and bookkeeping unchanged
    out, cache = kvjax.generate(model, tokens, 4, compressor=chain(comp), return_cache=True)
    assert out.shape == (2, 16)
    layer = cache.layers[0]
    assert isinstance(layer, ThinKLayerCache) and (np.asarray(layer.lengths) == 15).all()
    # decode-time keys are stored with the same channels as the prompt's
    np.testing.assert_array_equal(np.asarray(layer.dense().keys[..., 12:, :] != 0).any(-2),
                                  np.asarray(layer.dense().keys[..., :12, :] != 0).any(-2))


def test_errors():
    for kwargs, match in [
        (dict(key_channel_compression_ratio=1.0), "key_channel_compression_ratio"),
        (dict(key_channel_compression_ratio=-0.5), "key_channel_compression_ratio"),
        (dict(), "exactly one"),
        (dict(keep_channels=0), "keep_channels"),
        (dict(keep_channels=4, window=0), "window"),
    ]:
        with pytest.raises(ValueError, match=match):
            think(**kwargs)
    rng = np.random.default_rng(0)
    layer = _layer(rng, 1, 1, 4, 8, np.full((1, 1), 4, np.int32))
    q = jnp.zeros((1, 1, 2, 8))
    obs = Observation(q, q, jnp.zeros((1, 2), jnp.int32), None, None, 0, 1, 0.5)
    with pytest.raises(ValueError, match="head_dim=8"):
        think(keep_channels=9).prefill(layer, obs, ())
    pruned, _ = think(keep_channels=4).prefill(layer, obs, ())
    with pytest.raises(TypeError, match="LayerCache"):
        think(keep_channels=2).prefill(pruned, obs, ())
    with pytest.raises(ValueError, match="head dim"):
        jax.jit(attend)(jnp.zeros((1, 1, 1, 4)), jnp.zeros((1, 1), jnp.int32), pruned)


def test_merged_counts_are_honoured():
    """kvmerger then ThinK (all channels kept) / SVD (full rank): attention == the original."""
    from kvjax.compress.kvmerger import kvmerger
    from kvjax.lowrank.svd import svd

    rng = np.random.default_rng(3)
    b, h, g, d = 1, 2, 2, 8
    reps = np.array([2, 1, 4, 3])
    keys = np.repeat(rng.standard_normal((b, h, 4, d)).astype(np.float32), reps, axis=2)
    values = np.repeat(rng.standard_normal((b, h, 4, d)).astype(np.float32), reps, axis=2)
    c = keys.shape[2]
    pos = np.broadcast_to(np.arange(c), (b, h, c)).astype(np.int32)
    layer = kvcache.LayerCache(jnp.asarray(keys), jnp.asarray(values),
                               jnp.full((b, h), c, jnp.int32), jnp.asarray(pos))
    q = jnp.asarray(rng.standard_normal((b, h * g, 2, d)), jnp.float32)
    qpos = jnp.full((b, 2), c, jnp.int32)
    obs = Observation(q, q, qpos, None, None, 0, 1, d**-0.5)
    ref = np.asarray(jax.jit(attend)(q, qpos, layer))
    merge = kvmerger(budget=4, threshold=0.999, window=0)
    for kind in (think(keep_channels=d, window=2), svd(rank=d)):
        out, _ = jax.jit(chain(merge, kind).prefill)(layer, obs, (None, None))
        assert out.capacity == 4
        np.testing.assert_allclose(np.asarray(jax.jit(attend)(q, qpos, out)), ref, atol=1e-5)
