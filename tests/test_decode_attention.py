"""Ragged decode attention kernel (interpret mode on CPU) against its jnp reference.

Tolerances: float32 1e-5 (absolute); bfloat16 2e-2 and float16 5e-3 (absolute, outputs are
O(1)): the kernel feeds softmax weights to the PV product in the value dtype, as flash
attention does, while the reference keeps them in float32.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvjax import attention
from kvjax import cache as kvcache
from pallas_kernels import decode_attention as da

TOL = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2, jnp.float16: 5e-3}


def _inputs(seed, b, hkv, g, c, d, dtype, lengths, holes=False):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.standard_normal((b, hkv * g, d)), dtype)
    k = jnp.asarray(rng.standard_normal((b, hkv, c, d)), dtype)
    v = jnp.asarray(rng.standard_normal((b, hkv, c, d)), dtype)
    lengths = jnp.asarray(lengths, jnp.int32)
    pos = np.broadcast_to(np.arange(c), (b, hkv, c)).copy()
    if holes:
        pos[rng.random((b, hkv, c)) < 0.2] = -1
    pos = jnp.asarray(np.where(np.arange(c) < np.asarray(lengths)[..., None], pos, -1), jnp.int32)
    return q, k, v, lengths, pos


def _close(out, ref, dtype):
    assert out.dtype == ref.dtype
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32),
                               atol=TOL[dtype], rtol=0)


@pytest.mark.parametrize(
    "d,g,dtype,lengths,block_k,splits",
    [
        # head dim 64, MHA, lengths not multiples of block_k, an empty head, length 1
        (64, 1, jnp.float32, [[70, 0], [1, 33]], 16, 3),
        # head dim 128, GQA 4, one split (no second-pass merge of several pieces)
        (128, 4, jnp.float32, [[70, 17], [64, 5]], 32, 1),
        # GQA 8 in bf16 and GQA 4 in fp16, default launch config
        (64, 8, jnp.bfloat16, [[70, 1], [0, 50]], None, None),
        (128, 4, jnp.float16, [[3, 70], [69, 0]], 16, 4),
    ],
)
def test_kernel_matches_reference(d, g, dtype, lengths, block_k, splits):
    q, k, v, lengths, _ = _inputs(0, 2, 2, g, 70, d, dtype, lengths)
    out = da.ragged_decode_attention(q, k, v, lengths, block_k=block_k, num_splits=splits)
    ref = da.reference(q, k, v, lengths)
    _close(out, ref, dtype)
    for bi, h in zip(*np.nonzero(np.asarray(lengths) == 0)):  # empty heads give zeros
        assert np.all(np.asarray(out, np.float32)[bi, h * g:(h + 1) * g] == 0)


@pytest.mark.parametrize("g,splits", [(3, 3), (4, 20)])  # 20 splits: two merge chunks
def test_pallas_merge_and_split_tail_match_reference(g, splits):
    q, k, v, lengths, pos = _inputs(5, 2, 2, g, 340, 32, jnp.float32, [[340, 0], [1, 77]],
                                    holes=True)
    qpos = jnp.asarray([400, 400], jnp.int32)
    bias = jnp.asarray(np.random.default_rng(5).random(pos.shape), jnp.float32)
    kw = dict(kv_positions=pos, q_positions=qpos, kv_bias=bias)
    out = da.ragged_decode_attention(q, k, v, lengths, block_k=16, num_splits=splits,
                                     merge="pallas", split_tail=True, **kw)
    _close(out, da.reference(q, k, v, lengths, **kw), jnp.float32)


def test_decode_config_is_valid_for_many_shapes():
    for b, hkv, cap in ((1, 8, 32768), (8, 8, 32768), (32, 8, 4096), (1, 1, 16)):
        cfg = da.decode_config(b, hkv, cap)
        assert 1 <= cfg["num_splits"] <= max(1, cap // cfg["block_k"])
        assert cfg["merge"] in da.MERGES


def test_positions_holes_and_window_match_kvjax_reference():
    q, k, v, lengths, pos = _inputs(1, 2, 2, 4, 40, 64, jnp.float32, [[40, 9], [23, 1]],
                                    holes=True)
    qpos = jnp.asarray([45, 30], jnp.int32)
    out = da.ragged_decode_attention(q, k, v, lengths, kv_positions=pos, q_positions=qpos,
                                     sliding_window=20, scale=0.2, block_k=16, num_splits=2)
    layer = kvcache.LayerCache(k, v, lengths, pos)
    ref = attention.reference_attention(q[:, :, None], qpos[:, None], layer, 0.2, 20)[:, :, 0]
    _close(out, ref, jnp.float32)


def test_pool_layout_matches_dense():
    """Head-wise pooled layout: head h owns [offsets, offsets + lengths) of a shared pool."""
    rng = np.random.default_rng(2)
    b, hkv, g, d = 2, 3, 2, 64
    caps = np.array([[5, 0, 20], [1, 17, 9]], np.int32)
    lengths = np.array([[5, 0, 13], [1, 17, 2]], np.int32)
    offsets = np.cumsum(caps, 1) - caps
    pool = 40
    k = jnp.asarray(rng.standard_normal((b, pool, d)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((b, pool, d)), jnp.float32)
    q = jnp.asarray(rng.standard_normal((b, hkv * g, d)), jnp.float32)
    out = da.ragged_decode_attention(q, k, v, jnp.asarray(lengths), offsets=jnp.asarray(offsets),
                                     block_k=16, num_splits=2)
    # Same tokens as a dense [B, Hkv, C, D] cache.
    c = 20
    kd = np.zeros((b, hkv, c, d), np.float32)
    vd = np.zeros_like(kd)
    for bi in range(b):
        for h in range(hkv):
            n = lengths[bi, h]
            kd[bi, h, :n] = np.asarray(k)[bi, offsets[bi, h]:offsets[bi, h] + n]
            vd[bi, h, :n] = np.asarray(v)[bi, offsets[bi, h]:offsets[bi, h] + n]
    ref = da.reference(q, jnp.asarray(kd), jnp.asarray(vd), jnp.asarray(lengths))
    _close(out, ref, jnp.float32)
    ref_pool = da.reference(q, k, v, jnp.asarray(lengths), offsets=jnp.asarray(offsets))
    _close(ref_pool, ref, jnp.float32)


@settings(max_examples=12, deadline=None)
@given(st.lists(st.integers(0, 37), min_size=4, max_size=4), st.integers(0, 2**31 - 1))
def test_random_lengths(lens, seed):
    q, k, v, lengths, pos = _inputs(seed, 2, 2, 2, 37, 64, jnp.float32,
                                    np.reshape(lens, (2, 2)), holes=True)
    qpos = jnp.asarray([40, 40], jnp.int32)
    bias = jnp.log(jnp.asarray(np.random.default_rng(seed).integers(1, 4, pos.shape), jnp.float32))
    out = da.ragged_decode_attention(q, k, v, lengths, kv_positions=pos, q_positions=qpos,
                                     kv_bias=bias, block_k=16, num_splits=2)
    ref = da.reference(q, k, v, lengths, kv_positions=pos, q_positions=qpos, kv_bias=bias)
    _close(out, ref, jnp.float32)


def test_dense_attend_dispatches_decode_to_kernel(monkeypatch):
    q, k, v, lengths, pos = _inputs(3, 1, 2, 4, 24, 64, jnp.float32, [[24, 7]], holes=True)
    layer = kvcache.LayerCache(k, v, lengths, pos)
    qpos = jnp.asarray([[30]], jnp.int32)
    calls = []
    real = da.ragged_decode_attention
    monkeypatch.setattr(da, "ragged_decode_attention",
                        lambda *a, **kw: calls.append(1) or real(*a, block_k=16, **kw))
    monkeypatch.setattr(attention, "kernel_platform", lambda: "gpu")
    out = attention.attend(q[:, :, None], qpos, layer, sliding_window=12)
    assert calls == [1]
    ref = attention.attend(q[:, :, None], qpos, layer, sliding_window=12, impl="reference")
    assert calls == [1]
    _close(out, ref, jnp.float32)
    # Merged slots: slot_data["log_count"] becomes the kernel's score bias.
    log_count = jnp.log(jnp.arange(1, 25, dtype=jnp.float32))[None, None].repeat(2, 1)
    merged = kvcache.LayerCache(k, v, lengths, pos, {"log_count": log_count})
    out = attention.attend(q[:, :, None], qpos, merged)[:, :, 0]
    assert calls == [1, 1]
    ref = da.reference(q, k, v, lengths, kv_positions=pos, q_positions=qpos[:, 0],
                       kv_bias=log_count)
    _close(out, ref, jnp.float32)
    calls.pop()
    # Prefill (Tq > 1) and odd head dims stay on the reference.
    attention.attend(jnp.concatenate([q[:, :, None]] * 2, 2), jnp.asarray([[29, 30]]), layer)
    assert calls == [1]
    monkeypatch.setattr(attention, "kernel_platform", lambda: "cpu")
    attention.attend(q[:, :, None], qpos, layer)
    assert calls == [1]


def test_bad_inputs_raise_before_launch():
    q, k, v, lengths, pos = _inputs(4, 1, 2, 2, 32, 64, jnp.float32, [[3, 4]])
    f = da.ragged_decode_attention
    with pytest.raises(TypeError, match="dtype"):
        f(q.astype(jnp.bfloat16), k, v, lengths)
    with pytest.raises(TypeError, match="dtype"):
        f(q.astype(jnp.int32), k.astype(jnp.int32), v.astype(jnp.int32), lengths)
    with pytest.raises(ValueError, match="multiple of KV heads"):
        f(q[:, :3], k, v, lengths)
    with pytest.raises(ValueError, match="lengths"):
        f(q, k, v, lengths[:, :1])
    with pytest.raises(ValueError, match="keys"):
        f(q, k[..., :32], v, lengths)
    with pytest.raises(ValueError, match="block_k"):
        f(q, k, v, lengths, block_k=48)
    with pytest.raises(ValueError, match="num_splits"):
        f(q, k, v, lengths, num_splits=0)
    with pytest.raises(ValueError, match="merge"):
        f(q, k, v, lengths, num_splits=2, merge="atomic")
    with pytest.raises(ValueError, match="together"):
        f(q, k, v, lengths, kv_positions=pos)
    with pytest.raises(ValueError, match="sliding_window"):
        f(q, k, v, lengths, sliding_window=4)
    with pytest.raises(ValueError, match="offsets"):
        f(q, k[:, 0], v[:, 0], lengths, offsets=lengths[:, :1])
    with pytest.raises(ValueError, match="kv_bias"):
        f(q, k, v, lengths, kv_bias=jnp.zeros((1, 2, 31)))
    with pytest.raises(ValueError, match="head dim"):
        f(q[..., :48], k[..., :48], v[..., :48], lengths)


@pytest.mark.parametrize("splits,merge", [(1, "xla"), (3, "pallas")])
def test_kernel_lowers_to_triton(splits, merge):
    """The GPU path (direct single-split output, Pallas merge) lowers to Triton on any host."""
    sd = jax.ShapeDtypeStruct
    b, hkv, g, c, d = 2, 2, 4, 256, 128
    shapes = (sd((b, hkv * g, d), jnp.bfloat16), sd((b, hkv, c, d), jnp.bfloat16),
              sd((b, hkv, c, d), jnp.bfloat16), sd((b, hkv), jnp.int32),
              sd((b, hkv, c), jnp.int32), sd((b,), jnp.int32))

    def f(q, k, v, ln, p, qp):
        return da.ragged_decode_attention(q, k, v, ln, kv_positions=p, q_positions=qp,
                                          num_splits=splits, merge=merge,
                                          split_tail=merge == "pallas", interpret=False)

    text = jax.jit(f).trace(*shapes).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("triton") >= (2 if merge == "pallas" else 1)


def test_default_tile_fits_shared_memory_for_float32():
    """The tuned (bf16-sized) default tile is halved for float32 caches: a float32 256-key tile
    at 2 stages asked the H100 for 281 KB of shared memory and did not launch."""
    assert da.fit_block_k(256, 2, 256 * 2) == 256  # bf16, D 128: 128 KB fits
    assert da.fit_block_k(256, 2, 256 * 4) == 128  # float32: halved
    assert da.fit_block_k(128, 3, 256 * 4) == 64
    assert da.fit_block_k(16, 8, 1 << 20) == 16  # never below 16


def test_wrapper_halves_default_tile_for_float32(monkeypatch):
    seen = {}

    def fake(*args, **kwargs):
        seen.update(kwargs)
        return args[0]

    monkeypatch.setattr(da, "_decode", fake)
    monkeypatch.setitem(da.TUNED_DECODE, "few", dict(da.TUNED_DECODE["few"], block_k=256,
                                                      num_stages=2))
    for dtype, want in ((jnp.bfloat16, 256), (jnp.float32, 128)):
        q = jnp.zeros((1, 4, 128), dtype)
        k = jnp.zeros((1, 1, 4096, 128), dtype)
        da.ragged_decode_attention(q, k, k, jnp.full((1, 1), 4096, jnp.int32))
        assert seen["block_k"] == want, (dtype, seen["block_k"])
    da.ragged_decode_attention(q, k, k, jnp.full((1, 1), 4096, jnp.int32), block_k=256)
    assert seen["block_k"] == 256  # an explicit tile is the caller's choice
