"""Quest selection kernels (interpret mode on CPU) against their jnp references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import quest_select as qs


def _summaries(rng, b, hkv, npg, d, page_size, lengths, dtype):
    mn = rng.standard_normal((b, hkv, npg, d))
    mx = mn + np.abs(rng.standard_normal((b, hkv, npg, d)))
    live = (np.arange(npg) * page_size < np.asarray(lengths)[..., None])[..., None]
    return (jnp.asarray(np.where(live, mn, np.inf), dtype),
            jnp.asarray(np.where(live, mx, -np.inf), dtype))


@pytest.mark.parametrize("dtype,g", [(jnp.float32, 4), (jnp.bfloat16, 1)])
def test_page_scores_match_reference(dtype, g):
    rng = np.random.default_rng(0)
    b, hkv, npg, d, ps = 2, 2, 37, 32, 8  # NP not a multiple of block_p
    lengths = jnp.asarray([[296, 100], [1, 0]], jnp.int32)
    mn, mx = _summaries(rng, b, hkv, npg, d, ps, lengths, dtype)
    q = jnp.asarray(rng.standard_normal((b, hkv * g, d)), dtype)
    out = np.asarray(qs.page_scores(q, mn, mx, lengths, ps, block_p=16))
    ref = np.asarray(qs.reference_page_scores(q, mn, mx, lengths, ps))
    np.testing.assert_array_equal(np.isposinf(out), np.isposinf(ref))
    np.testing.assert_array_equal(np.isneginf(out), np.isneginf(ref))
    fin = np.isfinite(ref)
    np.testing.assert_allclose(out[fin], ref[fin], rtol=1e-5, atol=1e-4)


def test_top_pages_equal_lax_top_k_with_ties_and_empty_heads():
    rng = np.random.default_rng(1)
    s = rng.integers(-2, 3, (2, 3, 40)).astype(np.float32)  # many ties
    s[0, 1, :35] = -np.inf  # 5 valid pages
    s[1, 2] = -np.inf  # empty head
    s[0, 0, 3], s[0, 0, 4] = -0.0, np.inf
    s[1, 0] = rng.standard_normal(40)
    for k in (1, 6, 17, 40):
        idx, cnt = qs.top_pages(jnp.asarray(s), k)
        ridx, rcnt = qs.reference_top_pages(jnp.asarray(s), k)
        np.testing.assert_array_equal(np.asarray(cnt), np.asarray(rcnt))
        np.testing.assert_array_equal(np.asarray(idx), np.asarray(ridx))


def test_bad_inputs_raise():
    s = jnp.zeros((1, 2, 8), jnp.float32)
    with pytest.raises(ValueError, match="k must be"):
        qs.top_pages(s, 9)
    with pytest.raises(ValueError, match="scores must be"):
        qs.top_pages(s[0], 2)
    q = jnp.zeros((1, 4, 32), jnp.float32)
    mn = jnp.zeros((1, 2, 8, 32), jnp.float32)
    with pytest.raises(ValueError, match="lengths"):
        qs.page_scores(q, mn, mn, jnp.zeros((1, 3), jnp.int32), 8)
    with pytest.raises(ValueError, match="block_p"):
        qs.page_scores(q, mn, mn, jnp.zeros((1, 2), jnp.int32), 8, block_p=24)


def test_kernels_lower_to_triton():
    sd = jax.ShapeDtypeStruct
    q, mn = sd((2, 8, 64), jnp.bfloat16), sd((2, 2, 37, 64), jnp.bfloat16)
    text = jax.jit(lambda q, a, b, n: qs.page_scores(q, a, b, n, 16, interpret=False)).trace(
        q, mn, mn, sd((2, 2), jnp.int32)).lower(lowering_platforms=("cuda",)).as_text()
    assert "quest_page_scores" in text and "triton" in text
    text = jax.jit(lambda s: qs.top_pages(s, 5, interpret=False)).trace(
        sd((2, 2, 37), jnp.float32)).lower(lowering_platforms=("cuda",)).as_text()
    assert "quest_top_pages" in text and "triton" in text
