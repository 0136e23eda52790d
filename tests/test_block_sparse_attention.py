"""Block-sparse attention kernels (interpret mode on CPU) against their jnp references.

Tolerances: float32 1e-5, bfloat16 2e-2 (absolute; see test_decode_attention.py).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kvjax import attention
from kvjax import cache as kvcache
from pallas_kernels import block_sparse_attention as bsa

TOL = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}


def _cache(rng, b, hkv, c, d, dtype, lengths):
    k = jnp.asarray(rng.standard_normal((b, hkv, c, d)), dtype)
    v = jnp.asarray(rng.standard_normal((b, hkv, c, d)), dtype)
    lengths = jnp.asarray(lengths, jnp.int32)
    pos = np.broadcast_to(np.arange(c), (b, hkv, c)).copy()
    pos[rng.random((b, hkv, c)) < 0.1] = -1  # holes
    pos = jnp.asarray(np.where(np.arange(c) < np.asarray(lengths)[..., None], pos, -1), jnp.int32)
    return k, v, lengths, pos


def _random_lists(rng, lead, nb, n):
    """Distinct random block ids in random order, random counts in [0, n] (0 included)."""
    idx = np.stack([rng.permutation(nb)[:n] for _ in range(int(np.prod(lead)))])
    cnt = rng.integers(0, n + 1, int(np.prod(lead)))
    cnt[0] = 0
    return (jnp.asarray(idx.reshape(lead + (n,)), jnp.int32),
            jnp.asarray(cnt.reshape(lead), jnp.int32))


def _close(out, ref, dtype):
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32),
                               atol=TOL[dtype], rtol=0)


@pytest.mark.parametrize(
    "d,g,dtype,block_size,block_k,lists",
    [
        (64, 1, jnp.float32, 16, 32, "random"),  # a step spans two blocks
        (128, 4, jnp.float32, 32, 16, "pattern"),  # a block spans two steps
        (64, 8, jnp.bfloat16, 16, 16, "pattern"),
    ],
)
def test_decode_matches_reference(d, g, dtype, block_size, block_k, lists):
    rng = np.random.default_rng(0)
    b, hkv, c = 2, 2, 96
    k, v, lengths, pos = _cache(rng, b, hkv, c, d, dtype, [[96, 0], [1, 53]])
    q = jnp.asarray(rng.standard_normal((b, hkv * g, d)), dtype)
    nb = c // block_size
    if lists == "random":
        idx, cnt = _random_lists(rng, (b, hkv), nb, 4)
    else:
        idx, cnt = bsa.decode_pattern(lengths, nb, block_size=block_size, sink=1, local=1,
                                      stride=2)
    qpos = jnp.asarray([100, 60], jnp.int32)
    kw = dict(block_size=block_size, kv_positions=pos, q_positions=qpos, sliding_window=70)
    if lists == "random":  # merged slots' log-count bias
        kw["kv_bias"] = jnp.asarray(rng.random((b, hkv, c)), jnp.float32)
    out = bsa.block_sparse_decode(q, k, v, lengths, idx, cnt, block_k=block_k, num_splits=2, **kw)
    ref = bsa.reference_decode(q, k, v, lengths, idx, cnt, **kw)
    _close(out, ref, dtype)


def test_decode_with_every_block_equals_dense_attention():
    rng = np.random.default_rng(1)
    k, v, lengths, pos = _cache(rng, 1, 2, 64, 64, jnp.float32, [[64, 37]])
    q = jnp.asarray(rng.standard_normal((1, 8, 64)), jnp.float32)
    idx = jnp.broadcast_to(jnp.arange(4, dtype=jnp.int32), (1, 2, 4))
    out = bsa.block_sparse_decode(q, k, v, lengths, idx, jnp.full((1, 2), 4, jnp.int32),
                                  block_size=16, kv_positions=pos, q_positions=jnp.asarray([70]))
    layer = kvcache.LayerCache(k, v, lengths, pos)
    ref = attention.reference_attention(q[:, :, None], jnp.asarray([[70]]), layer)[:, :, 0]
    _close(out, ref, jnp.float32)


@pytest.mark.parametrize("per_query_head", [False, True])
def test_prefill_matches_reference(per_query_head):
    rng = np.random.default_rng(2)
    b, hkv, g, c, d, t = 1, 2, 4, 64, 64, 40  # Tq not a multiple of block_q
    k, v, lengths, pos = _cache(rng, b, hkv, c, d, jnp.float32, [[64, 50]])
    q = jnp.asarray(rng.standard_normal((b, hkv * g, t, d)), jnp.float32)
    qpos = jnp.asarray(np.arange(t)[None] + 20, jnp.int32)
    nqb = 3
    heads = hkv * g if per_query_head else hkv
    if per_query_head:
        idx, cnt = _random_lists(rng, (b, heads, nqb), c // 16, 3)
    else:
        sidx, scnt = bsa.static_pattern(nqb, c // 16, block_q=16, block_size=16, sink=1,
                                        local=2, stride=3, q_offset=20)
        idx = jnp.broadcast_to(jnp.asarray(sidx), (b, heads) + sidx.shape)
        cnt = jnp.broadcast_to(jnp.asarray(scnt), (b, heads, nqb))
    kw = dict(block_size=16, block_q=16, kv_positions=pos, q_positions=qpos)
    out = bsa.block_sparse_prefill(q, k, v, lengths, idx, cnt, block_k=32, **kw)
    ref = bsa.reference_prefill(q, k, v, lengths, idx, cnt, **kw)
    _close(out, ref, jnp.float32)


def test_prefill_reference_with_every_block_equals_dense_attention():
    rng = np.random.default_rng(3)
    k, v, lengths, pos = _cache(rng, 2, 2, 32, 16, jnp.float32, [[32, 7], [0, 20]])
    q = jnp.asarray(rng.standard_normal((2, 4, 12, 16)), jnp.float32)
    qpos = jnp.asarray(np.tile(np.arange(12) + 15, (2, 1)), jnp.int32)
    idx = jnp.broadcast_to(jnp.arange(4, dtype=jnp.int32), (2, 2, 1, 4))
    cnt = jnp.full((2, 2, 1), 4, jnp.int32)
    ref = bsa.reference_prefill(q, k, v, lengths, idx, cnt, block_size=8, block_q=16,
                                kv_positions=pos, q_positions=qpos, sliding_window=9)
    dense = attention.reference_attention(q, qpos, kvcache.LayerCache(k, v, lengths, pos),
                                          sliding_window=9)
    _close(ref, dense, jnp.float32)


def test_patterns_and_lists():
    idx, cnt = bsa.static_pattern(4, 8, block_q=32, block_size=16, sink=1, local=2, stride=4)
    # query block i ends at kv block 2i + 1
    want = [[0, 1], [0, 2, 3], [0, 3, 4, 5], [0, 3, 6, 7]]
    assert cnt.tolist() == [len(w) for w in want]
    assert [idx[i, : cnt[i]].tolist() for i in range(4)] == want
    mask = jnp.asarray([[True, False, True, True], [False] * 4])
    li, lc = bsa.mask_to_lists(mask, 2)
    assert li.tolist() == [[0, 2], [0, 0]] and lc.tolist() == [2, 0]
    di, dc = bsa.decode_pattern(jnp.asarray([[0, 1, 40]]), 4, block_size=16, sink=1, local=1)
    assert dc.tolist() == [[0, 1, 2]]
    assert di[0, 2, :2].tolist() == [0, 2]


def test_bad_inputs_raise_before_launch():
    rng = np.random.default_rng(4)
    k, v, lengths, pos = _cache(rng, 1, 2, 48, 64, jnp.float32, [[48, 3]])
    q = jnp.asarray(rng.standard_normal((1, 4, 64)), jnp.float32)
    idx = jnp.zeros((1, 2, 2), jnp.int32)
    cnt = jnp.ones((1, 2), jnp.int32)
    f = bsa.block_sparse_decode
    with pytest.raises(ValueError, match="does not divide the capacity"):
        f(q, k, v, lengths, idx, cnt, block_size=32)
    with pytest.raises(ValueError, match="power of two"):
        f(q, k, v, lengths, idx, cnt, block_size=12)
    with pytest.raises(ValueError, match=r"block_indices must be in \[0, 3\)"):
        f(q, k, v, lengths, idx.at[0, 1, 0].set(3), cnt, block_size=16)
    with pytest.raises(ValueError, match="block_counts must be in"):
        f(q, k, v, lengths, idx, cnt + 2, block_size=16)
    with pytest.raises(ValueError, match="block_indices"):
        f(q, k, v, lengths, idx[:, :1], cnt, block_size=16)
    with pytest.raises(TypeError, match="dtype"):
        f(q.astype(jnp.bfloat16), k, v, lengths, idx, cnt, block_size=16)
    with pytest.raises(TypeError, match="integer"):
        f(q, k, v, lengths, idx.astype(jnp.float32), cnt, block_size=16)
    with pytest.raises(ValueError, match="together"):
        f(q, k, v, lengths, idx, cnt, block_size=16, kv_positions=pos)
    with pytest.raises(ValueError, match="block_k"):
        f(q, k, v, lengths, idx, cnt, block_size=16, block_k=24)
    with pytest.raises(ValueError, match="list_mode"):
        f(q, k, v, lengths, idx, cnt, block_size=16, list_mode="gather")
    qp = jnp.zeros((1, 4, 20, 64), jnp.float32)
    with pytest.raises(ValueError, match="block_indices"):  # 20 queries need 2 blocks of 16
        bsa.block_sparse_prefill(qp, k, v, lengths, jnp.zeros((1, 2, 1, 2), jnp.int32),
                                 jnp.ones((1, 2, 1), jnp.int32), block_size=16, block_q=16)
    with pytest.raises(ValueError, match="block_q"):
        bsa.block_sparse_prefill(qp, k, v, lengths, jnp.zeros((1, 2, 1, 2), jnp.int32),
                                 jnp.ones((1, 2, 1), jnp.int32), block_size=16, block_q=24)


@pytest.mark.parametrize("list_mode", ["load", "prefetch", "preload"])
@pytest.mark.parametrize("block_size,block_k", [(16, 32), (32, 16)])
def test_decode_list_modes_match_reference(list_mode, block_size, block_k):
    """Every way of reading the block list (per step, one step ahead, preloaded) is exact."""
    rng = np.random.default_rng(5)
    b, hkv, g, c, d = 2, 2, 4, 96, 32
    k, v, lengths, pos = _cache(rng, b, hkv, c, d, jnp.float32, [[96, 0], [9, 70]])
    q = jnp.asarray(rng.standard_normal((b, hkv * g, d)), jnp.float32)
    idx, cnt = _random_lists(rng, (b, hkv), c // block_size, 3)
    kw = dict(block_size=block_size, kv_positions=pos, q_positions=jnp.asarray([100, 60]))
    out = bsa.block_sparse_decode(q, k, v, lengths, idx, cnt, block_k=block_k, num_splits=2,
                                  list_mode=list_mode, merge="pallas", **kw)
    _close(out, bsa.reference_decode(q, k, v, lengths, idx, cnt, **kw), jnp.float32)


@pytest.mark.parametrize("list_mode", ["load", "prefetch", "preload"])
def test_traced_out_of_range_ids_are_clamped_in_the_kernel(list_mode):
    """Ids only known inside jit cannot be checked before launch: the kernel clamps them to
    [0, nblk) (as the reference does for the clamped list), never reading out of bounds."""
    rng = np.random.default_rng(6)
    b, hkv, g, c, d, bs = 1, 2, 2, 64, 16, 16
    k, v, lengths, pos = _cache(rng, b, hkv, c, d, jnp.float32, [[64, 50]])
    q = jnp.asarray(rng.standard_normal((b, hkv * g, d)), jnp.float32)
    idx = jnp.asarray([[[-3, 1, 9], [2, 40, 0]]], jnp.int32)  # -3 -> 0, 9 / 40 -> 3
    cnt = jnp.asarray([[3, 3]], jnp.int32)

    @jax.jit
    def run(idx):
        return bsa.block_sparse_decode(q, k, v, lengths, idx, cnt, block_size=bs, block_k=16,
                                       list_mode=list_mode, num_splits=2)

    ref = bsa.reference_decode(q, k, v, lengths, jnp.clip(idx, 0, c // bs - 1), cnt,
                               block_size=bs)
    _close(run(idx), ref, jnp.float32)


@pytest.mark.parametrize("list_mode", ["load", "prefetch", "preload"])
def test_decode_lowers_to_triton(list_mode):
    """Every list mode, one-block and multi-block steps, lowers to Triton on any host."""
    sd = jax.ShapeDtypeStruct
    b, hkv, g, c, d = 1, 2, 4, 256, 64
    for block_size, block_k in ((64, 64), (16, 64)):
        shapes = (sd((b, hkv * g, d), jnp.bfloat16), sd((b, hkv, c, d), jnp.bfloat16),
                  sd((b, hkv, c, d), jnp.bfloat16), sd((b, hkv), jnp.int32),
                  sd((b, hkv, 3), jnp.int32), sd((b, hkv), jnp.int32))

        def f(q, k, v, ln, idx, cnt, bs=block_size, bk=block_k):
            return bsa.block_sparse_decode(q, k, v, ln, idx, cnt, block_size=bs, block_k=bk,
                                           list_mode=list_mode, num_splits=2, interpret=False)

        text = jax.jit(f).trace(*shapes).lower(lowering_platforms=("cuda",)).as_text()
        assert "block_sparse_decode" in text and "triton" in text


def test_default_tile_fits_shared_memory_for_float32(monkeypatch):
    """The tuned bf16-sized tile is halved for float32 K/V (2 x 128 keys x 1 KB > 200 KB)."""
    monkeypatch.setitem(bsa.TUNED_BS, "many", dict(bsa.TUNED_BS["many"], block_k=128,
                                                    num_stages=3))
    assert bsa.decode_config(8, 8, 512, 64, row_bytes=256 * 2)["block_k"] == 128
    assert bsa.decode_config(8, 8, 512, 64, row_bytes=256 * 4)["block_k"] == 64
