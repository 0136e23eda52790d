"""Cache pytrees: write/append/gather/grow keep positions consistent; nbytes; save/restore."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvjax import cache as kvcache

SETTINGS = settings(max_examples=20, deadline=None)


def _filled(rng, b, h, c, d, lengths):
    layer = kvcache.init_layer(b, h, c, d)
    t = int(max(lengths))
    k = rng.standard_normal((b, h, t, d)).astype(np.float32)
    v = rng.standard_normal((b, h, t, d)).astype(np.float32)
    pos = np.broadcast_to(np.arange(t), (b, t)).astype(np.int32)
    return kvcache.write(layer, k, v, pos, jnp.asarray(lengths, jnp.int32)), k, v


@SETTINGS
@given(
    b=st.integers(1, 3), h=st.integers(1, 3), c=st.integers(1, 12), d=st.sampled_from([2, 4]),
    seed=st.integers(0, 1000),
)
def test_write_then_append_positions(b, h, c, d, seed):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(0, c, size=b)  # leave room for one append
    layer, k, v = _filled(rng, b, h, c, d, np.maximum(lengths, 0))
    lens = np.asarray(layer.lengths)
    np.testing.assert_array_equal(lens, np.repeat(lengths[:, None], h, 1))
    pos = np.asarray(layer.positions)
    for bi in range(b):
        n = lengths[bi]
        np.testing.assert_array_equal(pos[bi, :, :n], np.broadcast_to(np.arange(n), (h, n)))
        assert (pos[bi, :, n:] == -1).all()
        np.testing.assert_array_equal(np.asarray(layer.keys)[bi, :, :n], k[bi, :, :n])
    new_k = rng.standard_normal((b, h, d)).astype(np.float32)
    layer2 = kvcache.append(layer, new_k, new_k, jnp.asarray(lengths + 100, jnp.int32))
    pos2 = np.asarray(layer2.positions)
    for bi in range(b):
        n = lengths[bi]
        assert (pos2[bi, :, n] == n + 100).all()
        np.testing.assert_array_equal(np.asarray(layer2.keys)[bi, :, n], new_k[bi])
    np.testing.assert_array_equal(np.asarray(layer2.lengths), lens + 1)


@SETTINGS
@given(b=st.integers(1, 2), h=st.integers(1, 3), c=st.integers(2, 10), seed=st.integers(0, 1000))
def test_gather_keeps_positions_consistent(b, h, c, seed):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, c + 1, size=b)
    layer, k, _ = _filled(rng, b, h, c, 4, lengths)
    keep = int(rng.integers(1, c + 1))
    idx = np.stack([
        np.stack([np.sort(rng.choice(c, size=keep, replace=False)) for _ in range(h)])
        for _ in range(b)
    ]).astype(np.int32)
    new_len = rng.integers(0, keep + 1, size=(b, h)).astype(np.int32)
    out = kvcache.gather(layer, jnp.asarray(idx), jnp.asarray(new_len))
    assert out.capacity == keep
    pos, old = np.asarray(out.positions), np.asarray(layer.positions)
    for bi in range(b):
        for hi in range(h):
            n = new_len[bi, hi]
            np.testing.assert_array_equal(pos[bi, hi, :n], old[bi, hi, idx[bi, hi, :n]])
            assert (pos[bi, hi, n:] == -1).all()
            np.testing.assert_array_equal(
                np.asarray(out.keys)[bi, hi, :n], np.asarray(layer.keys)[bi, hi, idx[bi, hi, :n]]
            )


def test_grow_and_slot_data():
    rng = np.random.default_rng(0)
    layer, _, _ = _filled(rng, 2, 2, 5, 4, np.array([3, 5]))
    layer = layer.replace(slot_data={"score": jnp.ones((2, 2, 5))})
    grown = kvcache.grow(layer, 8)
    assert grown.capacity == 8 and grown.slot_data["score"].shape == (2, 2, 8)
    assert (np.asarray(grown.positions)[:, :, 5:] == -1).all()
    np.testing.assert_array_equal(np.asarray(grown.lengths), np.asarray(layer.lengths))
    written = kvcache.append(grown, jnp.ones((2, 2, 4)), jnp.ones((2, 2, 4)), jnp.array([9, 9]))
    assert float(written.slot_data["score"][0, 0, 3]) == 0.0  # new slots get zeros
    with pytest.raises(ValueError, match="smaller"):
        kvcache.grow(layer, 4)


def test_write_past_capacity_is_dropped_not_wrapped():
    layer = kvcache.init_layer(1, 1, 3, 2)
    k = jnp.arange(10, dtype=jnp.float32).reshape(1, 1, 5, 2)
    out = kvcache.write(layer, k, k, jnp.arange(5)[None])
    np.testing.assert_array_equal(np.asarray(out.positions)[0, 0], [0, 1, 2])
    np.testing.assert_array_equal(np.asarray(out.keys)[0, 0], np.asarray(k)[0, 0, :3])
    assert int(out.lengths[0, 0]) == 3


def test_nbytes_matches_arrays():
    cache = kvcache.init(3, 2, 4, [16, 8, 4], 32, jnp.bfloat16)
    expected = 0
    for c in (16, 8, 4):
        expected += 2 * (2 * 4 * c * 32 * 2)  # keys + values, bf16
        expected += 2 * 4 * 4 + 2 * 4 * c * 4  # lengths + positions, int32
    expected += 2 * 4  # next_position
    assert kvcache.nbytes(cache) == expected
    assert kvcache.nbytes(cache) == sum(x.nbytes for x in jax.tree.leaves(cache))


def test_jit_and_vmap_safe():
    layer = kvcache.init_layer(2, 2, 6, 4)
    k = jnp.ones((2, 2, 3, 4))
    f = jax.jit(lambda lc, k: kvcache.write(lc, k, k, jnp.zeros((2, 3), jnp.int32)))
    out = f(layer, k)
    assert out.capacity == 6
    # vmap over a leading axis of stacked caches
    stacked = jax.tree.map(lambda x: jnp.stack([x, x]), layer)
    out = jax.vmap(lambda lc: kvcache.append(lc, k[:, :, 0], k[:, :, 0], jnp.zeros(2, jnp.int32)))(
        stacked
    )
    assert out.lengths.shape == (2, 2, 2)


def test_save_restore_roundtrip(tmp_path):
    rng = np.random.default_rng(1)
    layers = []
    for c in (6, 4):
        layer, _, _ = _filled(rng, 2, 2, c, 4, np.array([c, c - 1]))
        layers.append(layer)
    layers[1] = layers[1].replace(slot_data={"score": jnp.arange(16.0).reshape(2, 2, 4)})
    cache = kvcache.KVCache(layers=tuple(layers), next_position=jnp.array([6, 5], jnp.int32))
    kvcache.save(tmp_path / "c", cache)
    back = kvcache.restore(tmp_path / "c")
    assert jax.tree.structure(back) == jax.tree.structure(cache)
    for a, b in zip(jax.tree.leaves(cache), jax.tree.leaves(back)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(FileNotFoundError, match="not a kvjax cache"):
        kvcache.restore(tmp_path)


def test_init_rejects_bad_sizes():
    with pytest.raises(ValueError, match="num_heads"):
        kvcache.init_layer(1, 0, 4, 8)
    with pytest.raises(ValueError, match="capacity has 2 entries"):
        kvcache.init(3, 1, 1, [4, 4], 8)
