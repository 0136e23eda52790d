"""HeadwiseLayerCache: packing, write/grow/decode positions, attention == dense, memory, save."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvjax import attention
from kvjax import cache as kvcache
from kvjax import headwise as hw

SETTINGS = settings(max_examples=20, deadline=None)


def _dense(rng, b, h, c, d, lengths):
    layer = kvcache.init_layer(b, h, c, d)
    k = rng.standard_normal((b, h, c, d)).astype(np.float32)
    v = rng.standard_normal((b, h, c, d)).astype(np.float32)
    pos = np.broadcast_to(np.arange(c), (b, c)).astype(np.int32)
    return kvcache.write(layer, k, v, pos, jnp.asarray(lengths, jnp.int32)), k, v


def _expected_heads(keep, lengths):
    """Per (row, head): the kept positions, in order (positions == slots here)."""
    b, h, c = keep.shape
    return [[[p for p in range(c) if keep[bi, hi, p] and p < lengths[bi]] for hi in range(h)]
            for bi in range(b)]


_to_dense = jax.jit(lambda layer: layer.to_dense())


def _head_lists(layer: hw.HeadwiseLayerCache):
    dense = _to_dense(layer)
    pos, lens = np.asarray(dense.positions), np.asarray(dense.lengths)
    return [[pos[bi, hi, : lens[bi, hi]].tolist() for hi in range(pos.shape[1])]
            for bi in range(pos.shape[0])]


# Shapes come from a small fixed set (contents vary) so examples reuse compiled code.
SHAPES = st.sampled_from([(1, 1, 5), (2, 3, 10)])
from_mask = jax.jit(hw.from_mask, static_argnums=2)
from_indices = jax.jit(hw.from_indices, static_argnums=3)


@SETTINGS
@given(shape=SHAPES, seed=st.integers(0, 10**6))
def test_from_mask_packs_each_head_in_order(shape, seed):
    b, h, c = shape
    rng = np.random.default_rng(seed)
    lengths = rng.integers(0, c + 1, size=b)
    layer, k, v = _dense(rng, b, h, c, 4, lengths)
    keep = rng.random((b, h, c)) < rng.random()
    want = _expected_heads(keep, lengths)
    pool = h * c
    out = from_mask(layer, jnp.asarray(keep), pool)
    assert out.pool_size == pool and out.capacity == c
    assert _head_lists(out) == want
    lens, offs, caps = (np.asarray(x) for x in (out.lengths, out.offsets, out.capacities))
    np.testing.assert_array_equal(offs, np.cumsum(caps, 1) - caps)
    keys = np.asarray(out.keys)
    for bi in range(b):
        for hi in range(h):
            got = keys[bi, offs[bi, hi]: offs[bi, hi] + lens[bi, hi]]
            np.testing.assert_array_equal(got, k[bi, hi, want[bi][hi]])
    # from_indices gives the same cache
    idx = np.zeros((b, h, c), np.int32)
    counts = np.zeros((b, h), np.int32)
    for bi in range(b):
        for hi in range(h):
            sel = rng.permutation(want[bi][hi]) if want[bi][hi] else []
            idx[bi, hi, : len(sel)] = sel
            counts[bi, hi] = len(sel)
    out2 = from_indices(layer, jnp.asarray(idx), jnp.asarray(counts), pool)
    assert _head_lists(out2) == want


def test_from_mask_drops_past_pool_consistently():
    rng = np.random.default_rng(0)
    layer, _, _ = _dense(rng, 1, 2, 6, 4, [6])
    out = hw.from_mask(layer, jnp.ones((1, 2, 6), bool), 8)  # 12 kept > pool 8
    assert _head_lists(out) == [[[0, 1, 2, 3, 4, 5], [0, 1]]]


_grow = jax.jit(lambda layer, capacity: layer.grow(capacity), static_argnums=1)
_write = jax.jit(lambda layer, k, p, n: layer.write(k, k, p, n))
_append = jax.jit(lambda layer, k, p: layer.write(k[:, :, None], k[:, :, None], p[:, None]))
_owned = jax.jit(lambda layer: (layer.slot_heads()[0], layer.valid()))


@SETTINGS
@given(
    shape=SHAPES, steps=st.integers(1, 4), extra=st.sampled_from([0, 3]),
    seed=st.integers(0, 10**6),
)
def test_grow_write_and_decode_append_keep_positions(shape, steps, extra, seed):
    b, h, c = shape
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, c + 1, size=b)
    layer, _, _ = _dense(rng, b, h, c, 4, lengths)
    keep = rng.random((b, h, c)) < 0.6
    want = _expected_heads(keep, lengths)
    packed = from_mask(layer, jnp.asarray(keep), h * c)
    out = _grow(packed, packed.capacity + extra)
    assert _head_lists(out) == want  # growing moves regions, not tokens
    np.testing.assert_array_equal(out.capacities, np.asarray(packed.capacities) + extra)
    # a multi-token write with ragged num_valid, then single-token decode appends
    t = 3
    num_valid = rng.integers(0, t + 1, size=b)
    nk = rng.standard_normal((b, h, t, 4)).astype(np.float32)
    pos = (100 + np.arange(t))[None].repeat(b, 0).astype(np.int32)
    out = _write(out, jnp.asarray(nk), jnp.asarray(pos), jnp.asarray(num_valid))
    caps = np.asarray(out.capacities)
    for bi in range(b):
        for hi in range(h):
            room = caps[bi, hi] - len(want[bi][hi])
            want[bi][hi] += pos[bi, : min(num_valid[bi], room)].tolist()
    for s in range(steps):
        k1 = rng.standard_normal((b, h, 4)).astype(np.float32)
        p1 = np.full((b,), 200 + s, np.int32)
        out = _append(out, jnp.asarray(k1), jnp.asarray(p1))
        for bi in range(b):
            for hi in range(h):
                if len(want[bi][hi]) < caps[bi, hi]:
                    want[bi][hi].append(200 + s)
    assert _head_lists(out) == want
    np.testing.assert_array_equal(
        np.asarray(out.lengths), [[len(x) for x in row] for row in want]
    )
    # no head ever writes into another head's region
    head, valid = (np.asarray(x) for x in _owned(out))
    assert (head[valid] >= 0).all()


def _masked_dense(layer, keep):
    return layer.replace(positions=jnp.where(jnp.asarray(keep), layer.positions, -1))


_attend = jax.jit(attention.attend, static_argnums=(3, 4))


@SETTINGS
@given(
    case=st.sampled_from([(1, None, 1), (2, 3, 1), (2, None, 4), (1, 3, 4)]),  # G, window, Tq
    seed=st.integers(0, 10**6),
)
def test_attention_equals_masked_dense_reference(case, seed):
    g, window, t = case
    rng = np.random.default_rng(seed)
    b, h, c, d = 2, 3, 9, 8
    lengths = np.array([9, 6])
    layer, _, _ = _dense(rng, b, h, c, d, lengths)
    keep = rng.random((b, h, c)) < 0.5
    keep[0, 0] = False  # an empty head
    pooled = from_mask(layer, jnp.asarray(keep), h * c)
    q = jnp.asarray(rng.standard_normal((b, h * g, t, d)).astype(np.float32))
    qpos = jnp.asarray(rng.integers(0, 12, size=(b, t)).astype(np.int32))
    out = _attend(q, qpos, pooled, 0.4, window)
    ref = _attend(q, qpos, _masked_dense(layer, keep), 0.4, window)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5)
    dense = _attend(q, qpos, pooled.to_dense(c), 0.4, window)
    np.testing.assert_allclose(np.asarray(out), np.asarray(dense), atol=1e-5)
    assert np.isfinite(np.asarray(out)).all()


def test_long_query_sets_take_the_blocked_path(monkeypatch):
    monkeypatch.setattr(attention, "QUERY_BLOCK", 4)
    rng = np.random.default_rng(1)
    layer, _, _ = _dense(rng, 1, 2, 11, 4, [11])
    keep = rng.random((1, 2, 11)) < 0.5
    pooled = hw.from_mask(layer, jnp.asarray(keep), 22)
    q = jnp.asarray(rng.standard_normal((1, 4, 11, 4)).astype(np.float32))
    qpos = jnp.arange(11, dtype=jnp.int32)[None]
    out = attention.attend(q, qpos, pooled)
    ref = attention.attend(q, qpos, _masked_dense(layer, keep))
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5)


def test_nbytes_counts_only_kept_tokens():
    rng = np.random.default_rng(0)
    b, h, c, d = 2, 4, 64, 16
    layer, _, _ = _dense(rng, b, h, c, d, [c, c])
    counts = np.array([[8, 40, 24, 0], [20, 20, 20, 12]])  # 72 tokens per row = 18 per head
    keep = np.arange(c)[None, None] < counts[..., None]
    pooled = hw.from_mask(layer, jnp.asarray(keep), 72)
    per_slot = 2 * d * 4 + 4  # keys + values (float32) + position
    assert kvcache.nbytes(pooled) == b * (72 * per_slot + 3 * 4 * h)
    # A dense cache for the same selection needs the longest head (40) in every head.
    assert kvcache.nbytes(pooled) < 0.5 * kvcache.nbytes(kvcache.init_layer(b, h, 40, d))


def test_save_restore_roundtrip(tmp_path):
    rng = np.random.default_rng(0)
    layer, _, _ = _dense(rng, 1, 2, 6, 4, [6])
    pooled = hw.from_mask(layer, jnp.asarray(rng.random((1, 2, 6)) < 0.5), 12)
    cache = kvcache.KVCache(layers=(pooled, layer), next_position=jnp.array([6], jnp.int32))
    kvcache.save(tmp_path / "c", cache)
    back = kvcache.restore(tmp_path / "c")
    assert type(back.layers[0]) is hw.HeadwiseLayerCache
    for a, b_ in zip(jax.tree.leaves(cache), jax.tree.leaves(back)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b_))


def test_bad_input_errors():
    rng = np.random.default_rng(0)
    layer, _, _ = _dense(rng, 1, 2, 4, 4, [4])
    with pytest.raises(ValueError, match="pool_size"):
        hw.from_mask(layer, jnp.ones((1, 2, 4), bool), 0)
    with pytest.raises(ValueError, match="keep must have shape"):
        hw.from_mask(layer, jnp.ones((1, 2, 3), bool), 4)
    pooled = hw.from_mask(layer, jnp.ones((1, 2, 4), bool), 8)
    with pytest.raises(TypeError, match="LayerCache"):
        hw.from_mask(pooled, jnp.ones((1, 2, 4), bool), 8)
    with pytest.raises(ValueError, match="capacity 3 is smaller"):
        pooled.grow(3)
    with pytest.raises(TypeError, match="capacity must be an int"):
        pooled.grow(5.0)
    with pytest.raises(ValueError, match="heads"):
        pooled.write(jnp.zeros((1, 3, 1, 4)), jnp.zeros((1, 3, 1, 4)), jnp.zeros((1, 1), int))
    with pytest.raises(ValueError, match="head dim"):
        attention.attend(jnp.zeros((1, 2, 1, 8)), jnp.zeros((1, 1), jnp.int32), pooled)


def test_decode_dispatches_to_pool_kernel(monkeypatch):
    """On GPU, decode over the pool runs the ragged kernel with per-head offsets."""
    from pallas_kernels import decode_attention as da

    rng = np.random.default_rng(3)
    b, h, c, d, g = 1, 2, 24, 16, 2
    layer, _, _ = _dense(rng, b, h, c, d, np.array([20]))
    keep = rng.random((b, h, c)) < 0.6
    pooled = hw.from_mask(layer, jnp.asarray(keep), h * c)
    q = jnp.asarray(rng.standard_normal((b, h * g, 1, d)).astype(np.float32))
    qpos = jnp.asarray([[25]], jnp.int32)
    calls = []
    real = da.ragged_decode_attention
    monkeypatch.setattr(
        da, "ragged_decode_attention", lambda *a, **kw: calls.append(1) or real(*a, **kw)
    )
    monkeypatch.setattr(attention, "kernel_platform", lambda: "gpu")
    out = attention.attend(q, qpos, pooled)
    assert calls == [1]
    ref = attention.attend(q, qpos, _masked_dense(layer, keep), impl="reference")
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5)
