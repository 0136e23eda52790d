"""Mosaic GPU int4 KIVI decode kernel: layout, reference, argument checks, lowering on CPU.

The Mosaic GPU interpreter of jax 0.10.2 cannot run register-A WGMMA or `inline_mgpu`, so the
kernel's numbers are checked on the GPU (`experiments/bench_quant_mgpu.py` compares it with
`quantized_decode_attention.reference` on ragged counts, partial residuals and every group size;
docs/benchmarks_quant.md). Here: `repack_int4` + `reference_mgpu_layout` equal the packed
reference (so the layout the kernel reads is the cache's), and every shape family lowers through
the whole Pallas -> Mosaic GPU pipeline (shape, layout and shared-memory errors surface there).
"""

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import bench_quant_mgpu as bqm
from experiments.bench_quant import QARGS
from pallas_kernels import quantized_decode_attention as qda
from pallas_kernels import quantized_decode_attention_mgpu as qm


@pytest.mark.parametrize("i", range(len(bqm.CHECKS)))
def test_repacked_reference_equals_packed_reference(i):
    b, h, gq, d, g, counts, r, _ = bqm.CHECKS[i]
    q, arrs, mg = bqm.case(jax.random.key(i), b, h, gq, d, g, counts, r)
    want = qda.reference(q, *(arrs[k] for k in QARGS)).astype(jnp.float32)
    got = qm.reference_mgpu_layout(*mg).astype(jnp.float32)
    np.testing.assert_allclose(got, want, rtol=2e-2, atol=2e-2)
    assert float(jnp.abs(got - want).max()) < 2e-2


def test_repack_int4_codes():
    """Token t, channel c of the packed cache is k4[..., t, c] + 8 and v4[..., c, t] + 8."""
    from kvjax.quant import packing

    codes = jax.random.randint(jax.random.key(0), (1, 2, 16, 32, 64), 0, 16, jnp.int32)
    words = packing.pack(codes.astype(jnp.uint32), 4)
    k4, v4 = qm.repack_int4(words, words)
    flat = codes.reshape(1, 2, 16 * 32, 64)
    np.testing.assert_array_equal(k4.astype(jnp.int32) + 8, flat)
    np.testing.assert_array_equal(v4.astype(jnp.int32) + 8, jnp.swapaxes(flat, 2, 3))


def test_window_partials_merge_to_softmax():
    q = jax.random.normal(jax.random.key(1), (2, 4, 64), jnp.float32)
    k = jax.random.normal(jax.random.key(2), (2, 2, 8, 64), jnp.float32)
    v = jax.random.normal(jax.random.key(3), (2, 2, 8, 64), jnp.float32)
    n = jnp.array([[8, 3], [0, 1]], jnp.int32)
    o, m, den = qm.window_partials(q, k, v, n, 0.125)
    out = jnp.where(den[:, :, 0, :, None] > 0, o[:, :, 0] / jnp.maximum(den[:, :, 0, :, None],
                                                                       1e-30), 0.0)
    for bi in range(2):
        for hi in range(2):
            for gi in range(2):
                nn = int(n[bi, hi])
                if nn == 0:
                    np.testing.assert_array_equal(out[bi, hi, gi], 0.0)
                    continue
                p = jax.nn.softmax(k[bi, hi, :nn] @ q[bi, 2 * hi + gi] * 0.125)
                np.testing.assert_allclose(out[bi, hi, gi], p @ v[bi, hi, :nn], rtol=1e-5,
                                           atol=1e-5)


@pytest.mark.parametrize("i", range(len(bqm.CHECKS)))
def test_lowers_for_cuda(i):
    b, h, gq, d, g, counts, r, splits = bqm.CHECKS[i]
    runs = [(4, False, cfg) for cfg in bqm.check_configs(i, g, gq)]
    runs += [(bits, True, cfg) for bits in qm.WORD_BITS for cfg in bqm.words_check_configs(i)]
    for bits, words, cfg in runs:
        _, _, mg = bqm.case(jax.random.key(i), b, h, gq, d, g, counts, r, bits=bits,
                            words=words)
        specs = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in mg]
        f = functools.partial(qm.quantized_decode_attention_mgpu, num_splits=splits, **cfg)
        text = jax.jit(f).trace(*specs).lower(lowering_platforms=("cuda",)).as_text()
        assert "mosaic_gpu" in text


def test_lowered_kernels_issue_the_expected_wgmma():
    """The Mosaic GPU modules (CPU lowering): the words layout issues as many WGMMA as the int4
    layout and unpacks with the 0x43004300 magic (a head dim read off the wrong array once
    made its loops empty, which lowering alone accepts); the fused residual adds WGMMA."""
    from experiments.count_mgpu_ops import module_text

    plain = {"fuse_residual": False}
    texts = {k: module_text(cfg) for k, cfg in (("int4", plain), ("words4", {"words": 4, **plain}),
                                                ("words2", {"words": 2, **plain}),
                                                ("fused", {}))}
    mma = {k: t.count("wgmma.mma_async") for k, t in texts.items()}
    assert mma["int4"] > 0 and mma["words4"] == mma["words2"] == mma["int4"]
    assert mma["fused"] > mma["int4"]
    magic = str(0x43004300)
    assert magic in texts["words4"] and magic in texts["words2"] and magic not in texts["int4"]


def test_fma_option_dequantizes_with_bf16x2_fma():
    """`fma` (the default) puts one `fma.rn.bf16x2` per dequantized register pair into the
    module (16 per 64 x 64 tile: 8 tiles a 128-token step at head dim 128, keys and values;
    the fused residual window is bf16, not dequantized), `fma=False` none."""
    from experiments.count_mgpu_ops import module_text

    for cfg in ({}, {"words": 4}):
        assert module_text(cfg).count("fma.rn.bf16x2") == 8 * 16
        assert module_text({**cfg, "fma": False}).count("fma.rn.bf16x2") == 0


def _prmt(a: np.ndarray, b: np.ndarray, sel: int) -> np.ndarray:
    """PTX prmt.b32 (default mode) on uint32 arrays: result byte i is byte sel[4 i + 3: 4 i] of
    {b, a} (0-3: a's bytes, 4-7: b's); selector nibbles here have no sign bit."""
    src = np.stack([(a >> (8 * k)) & 0xFF for k in range(4)] + [(b >> (8 * k)) & 0xFF
                                                                   for k in range(4)])
    return sum(src[(sel >> (4 * i)) & 0x7].astype(np.uint32) << (8 * i) for i in range(4))


@pytest.mark.parametrize("bits", qm.WORD_BITS)
def test_prmt_unpacking_builds_the_same_pairs(bits):
    """`unpack_words(prmt=True)`'s recipe, emulated with numpy on random words: each register
    pair k (word k // (16 / bits), pair j = k % (16 / bits)) is the same 32 bits as the plain
    recipe's (word >> bits j) & mask | 0x43004300, i.e. `prmt_pairs`' selectors and pair indices
    follow `pack_words`' bit layout."""
    words = np.random.default_rng(bits).integers(0, 2**32, size=(1000, bits), dtype=np.uint32)
    ppw = 16 // bits
    plain = np.stack([((words[:, k // ppw] >> (bits * (k % ppw))) & ((2**bits - 1) * 0x10001))
                      | 0x43004300 for k in range(bits * ppw)], axis=1)
    got = np.zeros_like(plain)
    for word in range(bits):
        for sh in range(8 // bits):
            u = (words[:, word] >> (bits * sh)) & ((2**bits - 1) * 0x01010101)
            for j, sel in qm.prmt_pairs(sh, bits):
                got[:, word * ppw + j] = _prmt(u, np.full_like(u, 0x43434343), sel)
    np.testing.assert_array_equal(got, plain)


def test_prmt_option_lowers_to_byte_permutes():
    """`prmt=True` (words layout) issues one prmt.b32 per dequantized register pair (16 per
    tile, 8 tiles a 128-token step); the int4 layout refuses it."""
    from experiments.count_mgpu_ops import module_text

    assert module_text({"words": 4, "prmt": True}).count("prmt.b32") == 8 * 16
    assert module_text({"words": 2, "prmt": True}).count("prmt.b32") == 8 * 16
    assert module_text({"words": 4}).count("prmt.b32") == 0
    with pytest.raises(ValueError, match="prmt takes the words layout"):
        module_text({"prmt": True})


def test_thread_elements_is_the_mma_fragment_layout():
    """Thread t = 32 w + l holds rows 16 w + l // 4 (+ 8) and columns 2 (l % 4) + 8 k (+ 1):
    the layout `pack_words` writes and each thread reads back (from Mosaic's layout object)."""
    el = qm.thread_elements()
    t = np.arange(128)
    w, lane = t // 32, t % 32
    np.testing.assert_array_equal(el[:, 0, 0, 0], 16 * w + lane // 4)
    np.testing.assert_array_equal(el[:, 0, 0, 1], 2 * (lane % 4))
    offsets = np.broadcast_to(np.array(qm.register_offsets()), (128, 16, 2))
    np.testing.assert_array_equal(el[:, :, 0] - el[:, :1, 0], offsets)
    np.testing.assert_array_equal(el[:, :, 1] - el[:, :, 0], np.broadcast_to([0, 1], (128, 16, 2)))
    assert sorted((el[..., 0] * 64 + el[..., 1]).ravel()) == list(range(4096))


@pytest.mark.parametrize("bits", [4, 2])
def test_pack_words_bit_layout(bits):
    """Decode the words the way `unpack_words` does in the kernel (thread t's words
    t * bits ... of its tile; register k: word k // (16 / bits), shift bits * (k % (16 / bits)),
    low and high half) and find every code at its (row, col) of the tile."""
    codes = jax.random.randint(jax.random.key(bits), (2, 128, 192), 0, 2**bits).astype(
        jnp.uint32)
    words = np.asarray(qm.pack_words(codes, bits))
    assert words.shape == (2, 2, 3, 2 * bits, 64) and words.dtype == np.uint32
    el = qm.thread_elements()
    ppw, mask = 16 // bits, 2**bits - 1
    got = np.zeros(codes.shape, np.uint32)
    for i, tr, tc in np.ndindex(2, 2, 3):
        flat = words[i, tr, tc].reshape(-1)
        for t in range(128):
            for k in range(16):
                w = int(flat[t * bits + k // ppw]) >> (bits * (k % ppw))
                for e, val in enumerate((w & mask, (w >> 16) & mask)):
                    row, col = el[t, k, e]
                    got[i, 64 * tr + row, 64 * tc + col] = val
    np.testing.assert_array_equal(got, np.asarray(codes))
    np.testing.assert_array_equal(qm.unpack_words_reference(jnp.asarray(words), bits), codes)


@pytest.mark.parametrize("bits", [4, 2])
def test_repack_words_holds_the_packed_codes(bits):
    """Key tile (i, j) holds tokens 64 i.., channels 64 j..; value tile (i, j) the same tokens
    and channels, channel-major (rows = channels)."""
    from kvjax.quant import packing

    per = 32 // bits
    codes = jax.random.randint(jax.random.key(5), (1, 2, 2 * per, 32, 128), 0, 2**bits)
    words = packing.pack(codes.astype(jnp.uint32), bits)
    kw, vw = qm.repack_words(words, words, bits)
    flat = codes.reshape(1, 2, -1, 128).astype(jnp.uint32)  # [B, H, C, D] token order
    assert kw.shape == vw.shape == (1, 2, flat.shape[2] // 64, 2, 2 * bits, 64)
    np.testing.assert_array_equal(qm.unpack_words_reference(kw, bits), flat)
    vt = qm.unpack_words_reference(jnp.swapaxes(vw, 2, 3), bits)  # [B, H, D, C]
    np.testing.assert_array_equal(vt, jnp.swapaxes(flat, 2, 3))


def test_rejects_bad_input():
    _, _, mg = bqm.case(jax.random.key(0), 1, 2, 4, 128, 32, ((256, 100),), 8)
    q, k4, ks, kz, v4, vs, vz, n, rk, rv, rn = mg
    f = qm.quantized_decode_attention_mgpu
    with pytest.raises(ValueError, match="q must be bf16"):
        f(q.astype(jnp.float32), *mg[1:8])
    with pytest.raises(ValueError, match="k4 must be int4"):
        f(q, k4.astype(jnp.int8), *mg[2:8])
    with pytest.raises(ValueError, match="v4 must be int4"):
        f(q, k4, ks, kz, jnp.swapaxes(v4, 2, 3), vs, vz, n)
    with pytest.raises(ValueError, match="<= 16"):
        f(jnp.zeros((1, 34, 128), jnp.bfloat16), *mg[1:8])
    with pytest.raises(ValueError, match="G in"):
        f(q, k4, ks[:, :, :3], kz[:, :, :3], v4, vs, vz, n)
    with pytest.raises(ValueError, match="k_scale and k_zero"):
        f(q, k4, ks, kz[..., :64], v4, vs, vz, n)
    with pytest.raises(ValueError, match="v_scale and v_zero"):
        f(q, k4, ks, kz, v4, vs[..., :16], vz, n)
    with pytest.raises(ValueError, match="v_zero must be bf16"):
        f(q, k4, ks, kz, v4, vs, vz.astype(jnp.float32), n)
    with pytest.raises(ValueError, match="num_quantized"):
        f(q, k4, ks, kz, v4, vs, vz, n[:, :1])
    with pytest.raises(ValueError, match="block_tokens must be one of"):
        f(*mg[:8], block_tokens=96)
    with pytest.raises(ValueError, match="multiple of block_tokens"):  # capacity 192
        f(q, k4[:, :, :192], ks[:, :, :6], kz[:, :, :6], v4[..., :192], vs[:, :, :6],
          vz[:, :, :6], n, block_tokens=128)
    with pytest.raises(ValueError, match="num_splits"):
        f(*mg[:8], num_splits=0)
    with pytest.raises(ValueError, match="num_stages"):
        f(*mg[:8], num_stages=0)
    with pytest.raises(ValueError, match="together"):
        f(*mg[:8], rk)
    with pytest.raises(ValueError, match="residual keys/values must have shape"):
        f(*mg[:8], rk[:, :1], rv[:, :1], rn)
    with pytest.raises(ValueError, match="fold_keys needs"):  # 2 key groups x 16 heads > 16
        f(jnp.zeros((1, 32, 128), jnp.bfloat16), *mg[1:8], fold_keys=True)
    with pytest.raises(ValueError, match="fold_values needs"):  # 2 key groups x 8 heads > 8
        f(jnp.zeros((1, 16, 128), jnp.bfloat16), *mg[1:8], fold_keys=True, fold_values=True)
    with pytest.raises(ValueError, match="fold_values needs"):  # value channel group 64
        f(q, k4, ks, kz, v4, vs[:, :, :, :2], vz[:, :, :, :2], n, fold_values=True)
    with pytest.raises(ValueError, match="num_residual must be"):
        f(*mg[:8], rk, rv, rn[:1, :1])
    _, _, mw = bqm.case(jax.random.key(0), 1, 2, 4, 128, 32, ((256, 100),), 8, words=True)
    with pytest.raises(ValueError, match="take the int4 layout"):
        f(*mw[:8], fold_keys=True)
    with pytest.raises(ValueError, match="k4 as words must be"):  # 3 words: no such width
        f(q, mw[1][..., :6, :], *mw[2:8])
    with pytest.raises(ValueError, match="v4 as words must be"):
        f(q, mw[1], ks, kz, mw[4][:, :, :1], vs, vz, n)
    with pytest.raises(ValueError, match="bits of the words layout"):
        qm.pack_words(jnp.zeros((64, 64), jnp.uint32), 8)
    with pytest.raises(ValueError, match="multiples of 64"):
        qm.pack_words(jnp.zeros((32, 64), jnp.uint32), 4)


def test_bench_skips_options_that_failed_their_checks():
    both = frozenset({"fold_keys", "fold_values"})
    assert bqm.runnable({"fold_keys": True, "block_tokens": 128}, set())
    assert not bqm.runnable({"fold_keys": True}, {frozenset({"fold_keys"})})
    assert bqm.runnable({"fold_keys": True}, {both})  # only the pair failed
    assert not bqm.runnable({"fold_keys": True, "fold_values": True}, {both})
    assert not bqm.runnable({}, {frozenset({"hoist_index"})})  # a default option failed
    assert bqm.runnable({"hoist_index": False}, {frozenset({"hoist_index"})})
    assert not bqm.runnable({"hoist_index": False}, {frozenset()})  # no options: all skipped
    assert bqm.runnable({"fold_keys": False}, {frozenset({"fold_keys"})})


def test_bench_cell_and_table_on_cpu():
    """The bench's CPU path: baselines and the Triton kernels (interpreted) are timed and
    checked against the reference; the Mosaic GPU calls fail with a logged line (no GPU); the
    table gives each timed method its bytes and its ratios to the cell's baselines."""
    row = bqm.bench(1, 256, time.time() + 600, grid=({},))
    for name in ("dense", "xla", "triton_int8", "triton_int4", "triton_int2"):
        assert row[name] > 0 and row["bytes"][name] > 0
    for bits in (8, 4, 2):
        assert float(row["err"][f"triton_int{bits}"]) < 1e-2
    assert row["bytes"]["triton_int2"] < row["bytes"]["triton_int4"] < row["bytes"]["dense"]
    assert not any(k.startswith("mgpu") for k in row)  # interpret-only backend: not timed
    lines = bqm.table([row], 3e12)
    assert len(lines) == 2 + len(row["bytes"])
    dense = next(ln for ln in lines if "| dense |" in ln)
    assert "| 1.00x |" in dense and dense.count("|") == lines[0].count("|")
