"""The quantized decode kernel (interpret mode on CPU) against its jnp reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import quantized_decode_attention as qda

ARGS = ("k_codes", "k_scale", "k_zero", "v_codes", "v_scale", "v_zero", "num_quantized",
        "residual_keys", "residual_values", "num_residual")


def _cache(seed, b, h, d, bits, g, nb, r, vg=None, full=False):
    """Random packed codes and scales (independent of kvjax.quant), ragged counts."""
    vg = g if vg is None else vg
    per = 32 // bits
    ng = nb * per
    rng = np.random.default_rng(seed)
    u32 = lambda s: jnp.asarray(rng.integers(0, 2**32, s, dtype=np.uint64).astype(np.uint32))  # noqa: E731
    sc = lambda s: jnp.asarray(rng.uniform(0.5, 2.0, s) / (2**bits - 1), jnp.bfloat16)  # noqa: E731
    zp = lambda s: jnp.asarray(rng.uniform(-1.0, 0.0, s), jnp.bfloat16)  # noqa: E731
    nq = rng.integers(0, ng * g + 1, (b, h))
    nr = rng.integers(0, r + 1, (b, h))
    if full:
        nq[:], nr[:] = ng * g, r
    nq.flat[0] = ng * g  # one full head, one partial block, one empty head when possible
    if nq.size > 1:
        nq.flat[-1] = 0
    return dict(
        k_codes=u32((b, h, nb, g, d)), k_scale=sc((b, h, ng, d)), k_zero=zp((b, h, ng, d)),
        v_codes=u32((b, h, nb, g, d)), v_scale=sc((b, h, ng, d // vg, g)),
        v_zero=zp((b, h, ng, d // vg, g)), num_quantized=jnp.asarray(nq, jnp.int32),
        residual_keys=jnp.asarray(rng.normal(size=(b, h, r, d)), jnp.float32),
        residual_values=jnp.asarray(rng.normal(size=(b, h, r, d)), jnp.float32),
        num_residual=jnp.asarray(nr, jnp.int32),
    )


def _q(seed, b, hq, d, dtype=jnp.float32):
    return jnp.asarray(2 * np.random.default_rng(seed).normal(size=(b, hq, d)), dtype)


# bits, (batch, kv heads, query heads per kv head, head dim, group, blocks, residual, splits);
# each bit width gets a different shape (interpret-mode compiles dominate the test time).
CASES = [
    (8, (2, 2, 3, 32, 16, 2, 32, 2)),
    (4, (1, 3, 1, 16, 16, 3, 16, None)),
    (2, (2, 1, 4, 64, 32, 1, 32, 1)),
    (2, (1, 2, 2, 16, 16, 2, 48, 3)),
]


@pytest.mark.parametrize("bits,shape", CASES)
def test_kernel_matches_reference(bits, shape):
    b, h, gq, d, g, nb, r, splits = shape
    arrs = _cache(bits * 10 + d, b, h, d, bits, g, nb, r)
    q = _q(bits, b, h * gq, d)
    args = [arrs[k] for k in ARGS]
    out = qda.quantized_decode_attention(q, *args, num_splits=splits)
    ref = qda.reference(q, *args)
    assert out.shape == (b, h * gq, d) and out.dtype == q.dtype
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=2e-5, atol=2e-5)
    # the empty head (no quantized token, some or no residual) is finite
    assert np.isfinite(np.asarray(out)).all()


@pytest.mark.parametrize("kw,gq", [
    (dict(variant="tile"), 2),
    (dict(dequant=False, unroll=True, prefetch=True), 2),
    (dict(dequant=False, zero_in_codes=False, prefetch=True), 2),
    (dict(dequant=False), 2), (dict(dequant=True), 8),
    (dict(dequant=True, prefetch=True), 2),
    (dict(dequant=True, unroll=True), 2),
    (dict(dequant=True, reload=True), 2),
    (dict(dequant=True, fields=2, reload=True), 2),
    (dict(dequant=True, fields=4), 3),
    (dict(dequant=True, fields=2, unroll=True, fast_unpack=True), 2),
    (dict(variant="stack"), 2), (dict(variant="stack"), 3),
    (dict(variant="stack", fields=2), 8),
])
def test_variants_match_reference(kw, gq):
    """The "tile" and "stack" kernels and the other "fold" options (the default, "fold" with
    dequant, is checked above), over a ragged cache with five blocks in three splits; "stack"
    with 8 fields of 2 query heads, 4 (padded) of 3, and 2 of 8."""
    bits, b, h, d, g, nb, r = 4, 2, 2, 32, 16, 5, 16
    arrs = _cache(21, b, h, d, bits, g, nb, r)
    q = _q(22, b, h * gq, d)
    args = [arrs[k] for k in ARGS]
    out = qda.quantized_decode_attention(q, *args, num_splits=3, **kw)
    np.testing.assert_allclose(np.asarray(out), np.asarray(qda.reference(q, *args)),
                               rtol=2e-5, atol=2e-5)


def test_zero_scales_stay_finite():
    """Constant groups have scale 0 (every code decodes to the zero point); the "fold" and
    "stack" kernels divide the zero point by the scale and must stand in a tiny one instead."""
    bits, b, h, gq, d, g, nb, r = 2, 1, 2, 2, 32, 16, 1, 16
    arrs = _cache(23, b, h, d, bits, g, nb, r, full=True)
    arrs["k_scale"] = arrs["k_scale"].at[:, :, ::2].set(0)
    arrs["v_scale"] = arrs["v_scale"].at[:, :, 1::2].set(0)
    q = _q(24, b, h * gq, d)
    args = [arrs[k] for k in ARGS]
    for kw in (dict(variant="fold"), dict(variant="stack"), dict(dequant=False)):
        out = np.asarray(qda.quantized_decode_attention(q, *args, **kw))
        assert np.isfinite(out).all()
        np.testing.assert_allclose(out, np.asarray(qda.reference(q, *args)), rtol=2e-5,
                                   atol=2e-5)


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_every_variant_lowers_to_triton(bits):
    """Each variant and option lowers to Triton IR on any host (compiled only on the GPU)."""
    sd = jax.ShapeDtypeStruct
    b, h, gq, d, g, r, nb = 1, 2, 4, 128, 32, 128, 2
    ng = nb * 32 // bits
    bf, u32, i32 = jnp.bfloat16, jnp.uint32, jnp.int32
    shapes = (sd((b, h * gq, d), bf), sd((b, h, nb, g, d), u32), sd((b, h, ng, d), bf),
              sd((b, h, ng, d), bf), sd((b, h, nb, g, d), u32), sd((b, h, ng, d // g, g), bf),
              sd((b, h, ng, d // g, g), bf), sd((b, h), i32), sd((b, h, r, d), bf),
              sd((b, h, r, d), bf), sd((b, h), i32))
    for kw in (dict(), dict(unroll=True), dict(prefetch=True), dict(dequant=False),
               dict(dequant=False, zero_in_codes=False),
               dict(dequant=True), dict(dequant=True, fast_unpack=False),
               dict(dequant=True, reload=True), dict(dequant=True, fields=2, fast_unpack=False),
               dict(variant="tile"), dict(variant="stack"),
               dict(variant="stack", fields=2)):
        def f(*a, kw=kw):
            return qda.quantized_decode_attention(*a, interpret=False, **kw)

        text = jax.jit(f).trace(*shapes).lower(lowering_platforms=("cuda",)).as_text()
        assert f"quantized_decode_attention_int{bits}" in text and "triton" in text


@pytest.mark.parametrize("block_tokens,splits,value_split", [(16, 2, True), (32, 1, False),
                                                             (64, 2, True)])
def test_tile_sizes_and_clamped_last_tile(block_tokens, splits, value_split):
    """Tiles of 1, 2 and 4 blocks over 5 blocks: the last tile of a split is moved back inside
    the array and re-reads blocks an earlier tile already counted (they must be masked).
    Both value paths (one [T, D] tile, or D / Gv tiles)."""
    bits, b, h, gq, d, g, nb, r = 4, 1, 2, 2, 16, 16, 5, 16
    arrs = _cache(bits + block_tokens, b, h, d, bits, g, nb, r)
    arrs["num_quantized"] = jnp.asarray([[nb * 8 * g, 3 * 8 * g + 5]], jnp.int32)
    q = _q(bits + 1, b, h * gq, d)
    args = [arrs[k] for k in ARGS]
    out = qda.quantized_decode_attention(q, *args, variant="tile", block_tokens=block_tokens,
                                         num_splits=splits, value_split=value_split)
    np.testing.assert_allclose(np.asarray(out), np.asarray(qda.reference(q, *args)),
                               rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("fast", [False, True])
def test_field_extraction_is_exact(fast):
    """Every code field of random words, read by the unpack plan, decodes exactly:
    f * a - b == code (the kernel computes f * (scale * a) + (zero - scale * b))."""
    words = jnp.asarray(np.random.default_rng(0).integers(0, 2**32, (64,), dtype=np.uint64)
                        .astype(np.uint32))
    for bits in (2, 4, 8):
        for multiple in (1, qda.fields_per_shift(bits, fast)):  # fields per softmax step
            plan = qda.unpack_plan(bits, fast, multiple)
            assert sorted(j for _, fields in plan for j, _ in fields) == list(range(32 // bits))
            assert all(len(fields) % multiple == 0 for _, fields in plan)
            for shift, fields in plan:
                for j, pos in fields:
                    assert (qda.FAST_WINDOW if fast else 0) <= pos <= 23 - bits
                    f, a, b = qda._field(qda._shift(words, shift), bits, pos, fast)
                    want = (np.asarray(words) >> (bits * j)) & (2**bits - 1)
                    got = np.asarray(f, np.float64) * a - b
                    np.testing.assert_array_equal(got, want.astype(np.float64))


def test_fast_unpack_error_is_small():
    """fast_unpack (the default for 16-bit queries; "tile" and "fold" with dequant) against the
    exact path, float32 queries."""
    bits, b, h, gq, d, g, nb, r = 2, 1, 2, 2, 32, 16, 2, 16
    arrs = _cache(11, b, h, d, bits, g, nb, r)
    q = _q(12, b, h * gq, d)
    args = [arrs[k] for k in ARGS]
    ref = np.asarray(qda.reference(q, *args))
    for kw in (dict(variant="tile"), dict(variant="fold", dequant=True)):
        fast = np.asarray(qda.quantized_decode_attention(q, *args, fast_unpack=True, **kw))
        # per element <= scale * 2^-9 on keys and values (scale <= 2/3 here)
        np.testing.assert_allclose(fast, ref, rtol=0, atol=2e-3)
        assert np.abs(fast - ref).max() > 0  # the approximation is really in use


def test_value_groups_narrower_than_token_groups_and_bf16():
    b, h, gq, d, g, nb, r = 2, 2, 2, 32, 16, 2, 32
    arrs = _cache(5, b, h, d, 4, g, nb, r, vg=8)
    arrs["residual_keys"] = arrs["residual_keys"].astype(jnp.bfloat16)
    arrs["residual_values"] = arrs["residual_values"].astype(jnp.bfloat16)
    q = _q(6, b, h * gq, d, jnp.bfloat16)
    args = [arrs[k] for k in ARGS]
    out = qda.quantized_decode_attention(q, *args)
    ref = qda.reference(q.astype(jnp.float32), *args)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref), atol=3e-2)


def _dense(arrs, with_residual):
    """float32 keys, values [B, H, S, D] and validity of a cache, unpacked independently."""
    kc = arrs["k_codes"]
    b, h, nb, g, d = kc.shape
    per = arrs["k_scale"].shape[2] // nb
    bits = 32 // per
    shifts = jnp.arange(per, dtype=jnp.uint32)[:, None, None] * bits

    def unpack(w):
        return ((w[:, :, :, None] >> shifts) & (2**bits - 1)).reshape(b, h, -1, g, d)

    keys = unpack(kc) * arrs["k_scale"][:, :, :, None].astype(jnp.float32)
    keys = keys + arrs["k_zero"][:, :, :, None].astype(jnp.float32)
    ncg = arrs["v_scale"].shape[3]
    vs = jnp.swapaxes(arrs["v_scale"], 3, 4).astype(jnp.float32)[..., None]
    vz = jnp.swapaxes(arrs["v_zero"], 3, 4).astype(jnp.float32)[..., None]
    vals = unpack(arrs["v_codes"]).reshape(b, h, -1, g, ncg, d // ncg) * vs + vz
    keys, vals = keys.reshape(b, h, -1, d), vals.reshape(b, h, -1, d)
    valid = jnp.arange(keys.shape[2])[None, None] < arrs["num_quantized"][..., None]
    if with_residual:
        r = arrs["residual_keys"].shape[2]
        keys = jnp.concatenate([keys, arrs["residual_keys"]], 2)
        vals = jnp.concatenate([vals, arrs["residual_values"]], 2)
        valid = jnp.concatenate(
            [valid, jnp.arange(r)[None, None] < arrs["num_residual"][..., None]], 2
        )
    return keys, vals, valid


def test_without_residual_and_partials_combine_over_two_caches():
    """Partials of an int8 cache (no residual) and an int2 cache (with one) merge into
    attention over the union of their tokens (the mixed-precision read)."""
    b, h, gq, d, g = 2, 2, 2, 32, 16
    a = _cache(1, b, h, d, 8, g, 1, 16)
    c = _cache(2, b, h, d, 2, g, 1, 16)
    q = _q(3, b, h * gq, d)
    pa = qda.quantized_decode_partials(q, *[a[k] for k in ARGS[:7]])
    pc = qda.quantized_decode_partials(q, *[c[k] for k in ARGS])
    out = qda.combine([pa, pc])
    ka, va, ma = _dense(a, False)
    kc, vc, mc = _dense(c, True)
    keys, vals = jnp.concatenate([ka, kc], 2), jnp.concatenate([va, vc], 2)
    valid = jnp.concatenate([ma, mc], 2)
    s = jnp.einsum("bhgd,bhsd->bhgs", q.reshape(b, h, gq, d), keys, precision="highest")
    s = jnp.where(valid[:, :, None], s * d**-0.5, -jnp.inf)
    p = jnp.nan_to_num(jax.nn.softmax(s, axis=-1))
    ref = jnp.einsum("bhgs,bhsd->bhgd", p, vals, precision="highest").reshape(b, h * gq, d)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=2e-5, atol=2e-5)
    # the module's reference agrees with this independent unpacking
    np.testing.assert_allclose(
        np.asarray(qda.reference(q, *[c[k] for k in ARGS])),
        np.asarray(qda.combine([pc])), rtol=2e-5, atol=2e-5,
    )


def test_nothing_valid_gives_zeros():
    arrs = _cache(0, 1, 2, 16, 4, 16, 1, 16)
    arrs["num_quantized"] = jnp.zeros((1, 2), jnp.int32)
    arrs["num_residual"] = jnp.zeros((1, 2), jnp.int32)
    out = qda.quantized_decode_attention(_q(0, 1, 4, 16), *[arrs[k] for k in ARGS])
    np.testing.assert_array_equal(np.asarray(out), 0.0)


def test_bad_inputs():
    arrs = _cache(0, 1, 2, 16, 4, 16, 1, 16)
    args = [arrs[k] for k in ARGS]
    q = _q(0, 1, 4, 16)
    with pytest.raises(TypeError, match="k_codes must be uint32"):
        qda.quantized_decode_attention(q, args[0].astype(jnp.int32), *args[1:])
    with pytest.raises(ValueError, match="q must be"):
        qda.quantized_decode_attention(q[0], *args)
    with pytest.raises(ValueError, match="groups per word"):
        qda.quantized_decode_attention(q, args[0], args[1][:, :, :3], *args[2:])
    with pytest.raises(ValueError, match="go together"):
        qda.quantized_decode_attention(q, *args[:8])
    with pytest.raises(ValueError, match="num_splits"):
        qda.quantized_decode_attention(q, *args, num_splits=0)
    with pytest.raises(ValueError, match="variant"):
        qda.quantized_decode_attention(q, *args, variant="dense")
    with pytest.raises(ValueError, match="fields must be a power of two in"):
        qda.quantized_decode_attention(q, *args, variant="stack", fields=3)
    with pytest.raises(ValueError, match="fields must be a power of two in"):
        qda.quantized_decode_attention(q, *args, variant="stack", fields=16)  # 8 at int4
    with pytest.raises(ValueError, match="needs dequant=True"):
        qda.quantized_decode_attention(q, *args, variant="fold", dequant=False, fields=2)
    with pytest.raises(ValueError, match="at most 2 fields at 4 bits"):  # fast unpack: 2
        qda.quantized_decode_attention(q, *args, dequant=True, fast_unpack=True, fields=4)
    with pytest.raises(ValueError, match='"tile" takes no fields'):
        qda.quantized_decode_attention(q, *args, variant="tile", fields=2)
    with pytest.raises(ValueError, match="multiple must divide"):
        qda.unpack_plan(4, False, 8)
    with pytest.raises(ValueError, match="block_tokens"):
        qda.quantized_decode_attention(q, *args, block_tokens=48)
    with pytest.raises(ValueError, match="block_tokens"):
        qda.quantized_decode_attention(q, *args, block_tokens=8)
    with pytest.raises(ValueError, match="num_warps"):
        qda.quantized_decode_attention(q, *args, num_warps=3)
    with pytest.raises(ValueError, match="num_stages"):
        qda.quantized_decode_attention(q, *args, num_stages=0)
    with pytest.raises(ValueError, match="residual keys/values"):
        qda.quantized_decode_attention(q, *args[:7], args[7][:, :, :8], args[8], args[9])


def test_supported_and_bytes():
    assert qda.supported(128, 32, 128)
    assert not qda.supported(96, 32, 128) and not qda.supported(128, 8, 128)
    # the byte counts the benchmark divides by: 5.3x (int2) and 3.2x (int4) below bf16
    dense = 2 * 32768 * 128 * 2
    assert dense / qda.hbm_bytes(1, 1, 32768, 128, 2) == pytest.approx(512 / 96)
    assert dense / qda.hbm_bytes(1, 1, 32768, 128, 4) == pytest.approx(512 / 160)
