"""MatryoshkaKV: orthogonal parameterisation, PCA init, low-rank cache kind, training."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

import kvjax
from kvjax import train as kvtrain
from kvjax.learned import backbone as bb
from kvjax.lowrank import matryoshka as mk
from kvjax.models import Llama, LlamaConfig


@pytest.fixture(scope="module")
def model():
    return Llama(LlamaConfig.tiny(), rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def proj(model):
    """PCA projections with trained-looking (non-zero) skews and means."""
    p = mk.pca_init(model, [np.random.default_rng(0).integers(0, 256, (2, 32))])
    rng = np.random.default_rng(1)
    p.key_skew.set_value(jnp.asarray(0.3 * rng.normal(size=p.key_skew.shape), jnp.float32))
    p.value_skew.set_value(jnp.asarray(0.3 * rng.normal(size=p.value_skew.shape), jnp.float32))
    return p


def _tokens(b, t, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (b, t)).astype(np.int32)


@settings(max_examples=10, deadline=None)
@given(d=st.sampled_from([1, 3, 16]), seed=st.integers(0, 2**16), scale=st.floats(0.0, 5.0))
def test_cayley_is_orthogonal(d, seed, scale):
    x = jnp.asarray(scale * np.random.default_rng(seed).normal(size=(2, d, d)), jnp.float32)
    q = np.asarray(mk.cayley(x), np.float64)
    np.testing.assert_allclose(q @ np.swapaxes(q, -1, -2), np.broadcast_to(np.eye(d), q.shape),
                               atol=1e-4)
    assert np.all(np.linalg.det(q) > 0)
    np.testing.assert_array_equal(np.asarray(mk.cayley(jnp.zeros((d, d)))), np.eye(d))


def test_pca_init_orders_variance(model, proj):
    tokens = _tokens(2, 32)
    fresh = mk.pca_init(model, [tokens])

    @jax.jit
    def all_keys(tokens):
        keys = []

        def attend(layer, inputs):
            keys.append(inputs.keys)
            return bb.plain_attention(layer, inputs)

        bb.forward(model, tokens, attend)
        return keys

    keys = all_keys(jnp.asarray(tokens))
    for layer in range(2):
        uk, _ = fresh.bases(layer)
        uk = np.asarray(uk)
        np.testing.assert_allclose(np.swapaxes(uk, -1, -2) @ uk, np.broadcast_to(np.eye(16),
                                   uk.shape), atol=1e-5)
        k = np.asarray(keys[layer], np.float64)  # [B, H, T, D]
        mean = np.asarray(fresh.key_mean[layer])
        np.testing.assert_allclose(mean, k.mean(axis=(0, 2)), rtol=1e-4, atol=1e-5)
        coords = np.einsum("bhtd,hdr->bhtr", k - mean[None, :, None], uk)
        var = coords.var(axis=(0, 2))  # [H, D]
        assert np.all(np.diff(var, axis=-1) <= 1e-4 * var.max())


def test_full_rank_cache_is_exact(model, proj):
    """key_rank = value_rank = head_dim: the low-rank cache reproduces dense generation (the
    decode steps read it through `lowrank_attend`)."""
    tokens = _tokens(2, 10, seed=2)
    comp = mk.matryoshka(proj, key_rank=16, value_rank=16)
    out, cache = kvjax.generate(model, tokens, 4, compressor=comp, return_cache=True)
    assert all(isinstance(lc, mk.LowRankLayerCache) for lc in cache.layers)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(kvjax.generate(model, tokens, 4)))


def test_low_rank_attention_equals_attention_over_reconstruction(model, proj):
    rng = np.random.default_rng(3)
    b, c, d = 2, 9, 16
    layer = kvjax.cache.init_layer(b, 2, c, d)
    keys = jnp.asarray(rng.normal(size=(b, 2, c, d)), jnp.float32)
    values = jnp.asarray(rng.normal(size=(b, 2, c, d)), jnp.float32)
    pos = jnp.broadcast_to(jnp.arange(c, dtype=jnp.int32), (b, c))
    layer = kvjax.cache.write(layer, keys, values, pos, jnp.array([9, 6], jnp.int32))
    uk, uv = proj.bases(1)
    rk, rv = 5, 3
    low = mk.from_dense(layer, uk[..., :rk], uv[..., :rv], proj.key_mean[1], proj.value_mean[1])
    assert low.key_rank == rk and low.value_rank == rv and low.head_dim == d
    keep = lambda r: (jnp.arange(d) < r).astype(jnp.float32)  # noqa: E731
    ref_layer = layer.replace(
        keys=mk.reconstruct(layer.keys, uk, proj.key_mean[1], keep(rk)),
        values=mk.reconstruct(layer.values, uv, proj.value_mean[1], keep(rv)))
    q = jnp.asarray(rng.normal(size=(b, 4, 3, d)), jnp.float32)
    qpos = jnp.array([[6, 7, 8], [-1, 4, 5]], jnp.int32)
    got = kvjax.attention.attend(q, qpos, low, 0.25)
    want = kvjax.attention.attend(q, qpos, ref_layer, 0.25)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-5)
    assert np.all(np.asarray(got[1, :, 0]) == 0)  # a query that sees nothing returns zeros


def test_cache_kind_protocol_and_memory(model, proj, tmp_path):
    tokens = _tokens(1, 64, seed=4)
    dense, _ = kvjax.prefill(model, tokens)
    comp = mk.matryoshka(proj, key_rank=4, value_rank=[8, 2])  # value ranks differ per layer
    low, _ = kvjax.prefill(model, tokens, compressor=comp)
    l0, l1 = low.layers
    assert (l0.key_rank, l0.value_rank, l1.value_rank) == (4, 8, 2)
    payload = lambda lc: lc.keys.nbytes + lc.values.nbytes  # noqa: E731
    assert payload(l0) * 32 == payload(dense.layers[0]) * (4 + 8)
    assert kvjax.cache.nbytes(low) < kvjax.cache.nbytes(dense) * 0.55
    grown = l1.grow(70)
    assert grown.capacity == 70 and np.array_equal(np.asarray(grown.lengths), [[64, 64]])
    new_k = jnp.ones((1, 2, 1, 16))
    written = grown.write(new_k, new_k, jnp.array([[64]], jnp.int32))
    assert np.array_equal(np.asarray(written.lengths), [[65, 65]])
    assert int(written.positions[0, 0, 64]) == 64
    kp, _ = grown.project(new_k, new_k)
    np.testing.assert_allclose(np.asarray(written.keys[0, :, 64]), np.asarray(kp[0, :, 0]))
    kvjax.cache.save(tmp_path / "cache", low)
    back = kvjax.cache.restore(tmp_path / "cache")
    assert isinstance(back.layers[1], mk.LowRankLayerCache)
    np.testing.assert_array_equal(np.asarray(back.layers[1].values), np.asarray(l1.values))


def test_training_reduces_loss_and_full_rank_is_lossless(model):
    tokens = jnp.asarray(_tokens(2, 24, seed=5))
    fresh = mk.pca_init(model, [tokens])
    base = np.asarray(fresh.key_base[...])
    full_loss, _ = jax.jit(mk.loss((1.0,)))(fresh, model, {"tokens": tokens}, jax.random.key(0))
    assert float(full_loss) < 1e-5
    result = kvtrain.train(fresh, model, mk.loss((0.25,)), lambda step: {"tokens": tokens[None]},
                           steps=6, optimizer=kvtrain.optimizer(1e-2), log_every=1,
                           progress=False)
    losses = [h["loss"] for h in result.history]  # each before that step's update
    assert losses[-1] < 0.9 * losses[0]
    assert result.history[0]["key_rank"] == 4.0 and result.history[0]["value_rank"] == 4.0
    assert np.array_equal(np.asarray(result.component.key_base[...]), base)  # not a Param
    assert not np.array_equal(np.asarray(result.component.key_skew[...]), 0.0)
    uk, _ = result.component.bases(0)
    np.testing.assert_allclose(np.asarray(jnp.swapaxes(uk, -1, -2) @ uk),
                               np.broadcast_to(np.eye(16), uk.shape), atol=1e-5)


def test_rank_sampling_uses_the_given_fractions(model):
    assert mk.rank_choices(16, (0.25, 0.5, 1.0)) == (4, 8, 16)
    assert mk.rank_choices(16, (0.01,)) == (1,)
    with pytest.raises(ValueError, match="rank fraction must be in"):
        mk.rank_choices(16, (1.5,))
    loss_fn = jax.jit(mk.loss((0.25, 0.75)))
    tokens = jnp.asarray(_tokens(1, 8))
    proj = mk.init(model)
    seen = {float(loss_fn(proj, model, {"tokens": tokens}, jax.random.key(s))[1]["key_rank"])
            for s in range(12)}
    assert seen == {4.0, 12.0}


def test_save_load_and_bad_inputs(model, proj, tmp_path):
    mk.save(tmp_path / "p", proj, model)
    loaded = mk.load(tmp_path / "p", model)
    np.testing.assert_array_equal(np.asarray(loaded.bases(1)[0]), np.asarray(proj.bases(1)[0]))
    other = Llama(LlamaConfig.tiny(head_dim=8), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="head_dim: 16 .checkpoint. vs 8"):
        mk.load(tmp_path / "p", other)
    with pytest.raises(ValueError, match=r"key_rank must be in \[1, 16\]"):
        mk.matryoshka(proj, key_rank=0, value_rank=4)
    with pytest.raises(ValueError, match=r"value_rank must be in \[1, 16\]"):
        mk.matryoshka(proj, key_rank=4, value_rank=17)
    with pytest.raises(ValueError, match="one per layer"):
        mk.matryoshka(proj, key_rank=[4, 4, 4], value_rank=4)
    with pytest.raises(TypeError, match="MatryoshkaProjections"):
        mk.matryoshka(None, key_rank=4, value_rank=4)
    with pytest.raises(ValueError, match="head_dim 8"):
        kvjax.prefill(other, _tokens(1, 4),
                      compressor=mk.matryoshka(proj, key_rank=4, value_rank=4))
    with pytest.raises(ValueError, match="at least one calibration batch"):
        mk.pca_init(model, [])
    with pytest.raises(ValueError, match="not both"):
        mk.matryoshka(proj, 0.5, key_rank=4)
    with pytest.raises(ValueError, match="both key_rank and value_rank"):
        mk.matryoshka(proj, key_rank=4)
    with pytest.raises(ValueError, match="compression_ratio must be in"):
        mk.matryoshka(proj, 1.0)


def test_by_name_in_an_evaluation_sweep(model, proj, tmp_path):
    """A saved component is a method name for kvjax.eval ("matryoshka('path')" x ratios)."""
    from kvjax.eval import methods

    path = str(tmp_path / "p")
    mk.save(path, proj, model)
    comp = methods.build(f"matryoshka({path!r})", 0.75)  # keeps int(16 * 0.25) = 4 channels
    assert comp is mk.matryoshka(path, 0.75)  # memoised: one jit cache per (path, ratio)
    cache, _ = kvjax.prefill(model, _tokens(1, 6), compressor=comp)
    assert cache.layers[0].key_rank == 4 and cache.layers[1].value_rank == 4


def test_tiny_script_config(tmp_path):
    """configs/train_matryoshka.py:tiny through experiments/train_matryoshka.py (CI variant)."""
    import importlib.util
    import os

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def module(*path):
        spec = importlib.util.spec_from_file_location("_t_" + path[-1][:-3],
                                                      os.path.join(root, *path))
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod

    config = module("configs", "train_matryoshka.py").get_config("tiny")
    config.steps = 2
    out = module("experiments", "train_matryoshka.py").run(config, str(tmp_path))
    assert out["step"] == 2
    model = kvtrain.load_backbone(config.backbone, "float32")
    pca, trained = mk.load(out["pca"], model), mk.load(out["component"], model)
    np.testing.assert_array_equal(np.asarray(pca.key_base[...]), np.asarray(trained.key_base[...]))
    assert not np.array_equal(np.asarray(trained.key_skew[...]), 0.0)
    config.matryoshka.rank_fractions = (0.0,)
    with pytest.raises(ValueError, match="rank fraction must be in"):
        module("experiments", "train_matryoshka.py").run(config, str(tmp_path / "bad"))
