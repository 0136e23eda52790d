"""Mustafar sparse decode kernel (Pallas, interpreted on CPU) == its jnp reference and ==
`kvjax.attention` over the sparse cache kind; input errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kvjax import cache as kvcache
from kvjax.attention import attend
from kvjax.compress.kvmerger import LOG_COUNT
from kvjax.sparse.mustafar import attention_bias, compress, keep_count, sparsify
from pallas_kernels import sparse_decode_attention as sda


def _sparse(rng, b, h, c, d, ks, vs, dtype=jnp.float32):
    keys = jnp.asarray(rng.standard_normal((b, h, c, d)), dtype)
    values = jnp.asarray(rng.standard_normal((b, h, c, d)), dtype)
    kv, kb = sparsify(keys, keep_count(d, ks))
    vv, vb = sparsify(values, keep_count(d, vs))
    return kv, kb, vv, vb


@pytest.mark.parametrize(
    "g, d, ks, vs, bias, splits, dtype, prefetch",
    [
        (1, 16, 0.5, 0.5, False, None, jnp.float32, 1),
        (4, 32, 0.7, 0.3, True, 3, jnp.float32, 0),
        (2, 16, 0.6, 0.6, True, 2, jnp.bfloat16, 2),
        (2, 64, 0.5, 0.75, False, 2, jnp.float32, 2),  # two bitmap words per vector
    ],
)
def test_kernel_matches_reference(g, d, ks, vs, bias, splits, dtype, prefetch):
    rng = np.random.default_rng(d + g)
    b, h, c = 2, 2, 45  # capacity not a multiple of the block
    kv, kb, vv, vb = _sparse(rng, b, h, c, d, ks, vs, dtype)
    q = jnp.asarray(rng.standard_normal((b, h * g, d)), dtype)
    lengths = jnp.asarray([[45, 17], [0, 32]], jnp.int32)  # an empty head
    bb = None
    if bias:
        bb = jnp.asarray(rng.standard_normal((b, h, c)), jnp.float32)
        bb = bb.at[0, 0, 5:30].set(-1e30).at[1, 1, :].set(-1e30)  # holes, a fully masked head
    out = sda.sparse_decode_attention(q, kv, kb, vv, vb, lengths, bias=bb, scale=0.3,
                                      block_size=16, num_splits=splits, prefetch=prefetch,
                                      interpret=True)
    ref = sda.reference(q, kv, kb, vv, vb, lengths, bias=bb, scale=0.3)
    tol = 2e-2 if dtype == jnp.bfloat16 else 1e-5
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32),
                               atol=tol)
    assert np.isfinite(np.asarray(out, np.float32)).all()
    assert (np.asarray(out)[1, :g] == 0).all()  # empty head -> zeros


def test_kernel_matches_attend_with_counts_and_holes():
    """The GPU dispatch path (kernel + attention_bias) agrees with the reference attend."""
    rng = np.random.default_rng(7)
    b, h, g, c, d = 1, 2, 2, 20, 16
    pos = np.broadcast_to(np.arange(c), (b, h, c)).copy()
    pos[0, 1, 3:6] = -1  # holes inside lengths
    layer = kvcache.LayerCache(
        jnp.asarray(rng.standard_normal((b, h, c, d)), jnp.float32),
        jnp.asarray(rng.standard_normal((b, h, c, d)), jnp.float32),
        jnp.asarray([[20, 14]], jnp.int32), jnp.asarray(pos, jnp.int32),
        {LOG_COUNT: jnp.asarray(np.log(rng.integers(1, 5, (b, h, c))), jnp.float32)},
    )
    sp = compress(layer, 0.5, 0.5)
    q = jnp.asarray(rng.standard_normal((b, h * g, d)), jnp.float32)
    qpos = jnp.full((b,), 30, jnp.int32)
    bias = attention_bias(sp, sliding_window=18, q_position=qpos)
    out = sda.sparse_decode_attention(q, sp.k_vals, sp.k_bits, sp.v_vals, sp.v_bits, sp.lengths,
                                      bias=bias, block_size=16, interpret=True)
    ref = attend(q[:, :, None], qpos[:, None], sp, sliding_window=18, impl="reference")[:, :, 0]
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5)


def test_kernel_value_dim_differs():
    """Dv != D: the value bitmap has its own word count (value_dim passed through)."""
    rng = np.random.default_rng(3)
    b, h, g, c, d, dv = 1, 2, 2, 24, 16, 64
    keys = jnp.asarray(rng.standard_normal((b, h, c, d)), jnp.float32)
    values = jnp.asarray(rng.standard_normal((b, h, c, dv)), jnp.float32)
    kv, kb = sparsify(keys, keep_count(d, 0.5))
    vv, vb = sparsify(values, keep_count(dv, 0.7))
    q = jnp.asarray(rng.standard_normal((b, h * g, d)), jnp.float32)
    lengths = jnp.asarray([[24, 9]], jnp.int32)
    out = sda.sparse_decode_attention(q, kv, kb, vv, vb, lengths, value_dim=dv, block_size=16,
                                      interpret=True)
    ref = sda.reference(q, kv, kb, vv, vb, lengths, value_dim=dv)
    assert out.shape == (b, h * g, dv)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5)


@pytest.mark.parametrize("prefetch", [0, 1, 2])
def test_kernel_lowers_to_triton(prefetch):
    """The compiled path lowers for CUDA (Triton IR) on any host: every op has a Triton rule."""
    sd = jax.ShapeDtypeStruct
    b, h, g, c, d = 2, 2, 4, 256, 128
    shapes = (sd((b, h * g, d), jnp.bfloat16), sd((b, h, c, 64), jnp.bfloat16),
              sd((b, h, c, 4), jnp.uint32), sd((b, h, c, 38), jnp.bfloat16),
              sd((b, h, c, 4), jnp.uint32), sd((b, h), jnp.int32), sd((b, h, c), jnp.float32))

    def f(q, kv, kb, vv, vb, ln, bias):
        return sda.sparse_decode_attention(q, kv, kb, vv, vb, ln, bias=bias, prefetch=prefetch,
                                           interpret=False)

    text = jax.jit(f).trace(*shapes).lower(lowering_platforms=("cuda",)).as_text()
    assert "mustafar_sparse_decode_attention" in text and "triton" in text


def test_errors():
    rng = np.random.default_rng(0)
    kv, kb, vv, vb = _sparse(rng, 1, 1, 8, 16, 0.5, 0.5)
    q = jnp.zeros((1, 2, 16))
    ln = jnp.full((1, 1), 8, jnp.int32)
    with pytest.raises(ValueError, match="block_size"):
        sda.sparse_decode_attention(q, kv, kb, vv, vb, ln, block_size=24)
    with pytest.raises(ValueError, match="num_splits"):
        sda.sparse_decode_attention(q, kv, kb, vv, vb, ln, num_splits=0)
    with pytest.raises(ValueError, match="num_warps"):
        sda.sparse_decode_attention(q, kv, kb, vv, vb, ln, num_warps=3)
    with pytest.raises(ValueError, match="num_stages"):
        sda.sparse_decode_attention(q, kv, kb, vv, vb, ln, num_stages=0)
    with pytest.raises(ValueError, match="prefetch"):
        sda.sparse_decode_attention(q, kv, kb, vv, vb, ln, prefetch=3)
    with pytest.raises(ValueError, match="value_dim"):
        sda.sparse_decode_attention(q, kv, kb, vv, vb, ln, value_dim=24)
    with pytest.raises(TypeError, match="k_bits"):
        sda.reference(q, kv, kb.astype(jnp.int32), vv, vb, ln)
    with pytest.raises(ValueError, match="lengths"):
        sda.reference(q, kv, kb, vv, vb, jnp.zeros((2, 1), jnp.int32))
    with pytest.raises(ValueError, match="q must be"):
        sda.reference(jnp.zeros((1, 2, 1, 16)), kv, kb, vv, vb, ln)
    with pytest.raises(ValueError, match="k_bits has shape"):
        sda.reference(jnp.zeros((1, 2, 48)), kv, kb, vv, vb, ln)  # 48 channels: 2 words
    with pytest.raises(ValueError, match="kept counts"):
        sda.reference(jnp.zeros((1, 2, 4)), kv, kb, vv, vb, ln)  # 8 kept > 4 channels
    assert sda.supported(128) and not sda.supported(96) and not sda.supported(8)
