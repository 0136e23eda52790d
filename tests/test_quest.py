"""Quest: page summaries kept on write, upper-bound scores, page selection, generate."""

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

import kvjax
from kvjax import attention
from kvjax import cache as kvcache
from kvjax.models import Llama, LlamaConfig
from pallas_kernels import block_sparse_attention as bsa

quest_mod = importlib.import_module("kvjax.sparse.quest")


def _layer(rng, b=2, h=2, c=40, d=16, lengths=(40, 23)):
    layer = kvcache.init_layer(b, h, c, d)
    t = max(lengths)
    k = jnp.asarray(rng.standard_normal((b, h, t, d)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((b, h, t, d)), jnp.float32)
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    return kvcache.write(layer, k, v, pos, jnp.asarray(lengths, jnp.int32))


_write = jax.jit(lambda ql, k, pos, n: ql.write(k, k, pos, n))


@settings(max_examples=15, deadline=None)
@given(st.lists(st.integers(0, 9), min_size=1, max_size=6), st.integers(0, 2**31 - 1))
def test_summaries_follow_writes(chunks, seed):
    """After any sequence of writes (partial chunks, page crossings) min/max equal a rescan."""
    rng = np.random.default_rng(seed)
    ql = quest_mod.from_layer(_layer(rng, lengths=(13, 5)), page_size=8, token_budget=16)
    ql = ql.grow(ql.capacity + 64)
    nxt = np.array([13, 5])
    for t in chunks:  # 9-token chunks of which t (row 0) and a random count (row 1) are real
        k = jnp.asarray(rng.standard_normal((2, 2, 9, 16)), jnp.float32)
        num_valid = jnp.asarray([t, rng.integers(0, 10)], jnp.int32)
        pos = jnp.asarray(nxt[:, None] + np.arange(9)[None], jnp.int32)
        ql = _write(ql, k, pos, num_valid)
        nxt = nxt + np.asarray(num_valid)
    mn, mx = quest_mod.page_summaries(ql.dense(), 8)
    np.testing.assert_array_equal(np.asarray(ql.page_min), np.asarray(mn))
    np.testing.assert_array_equal(np.asarray(ql.page_max), np.asarray(mx))


@settings(max_examples=15, deadline=None)
@given(st.integers(0, 2**31 - 1))
def test_page_score_is_an_upper_bound(seed):
    rng = np.random.default_rng(seed)
    layer = _layer(rng, lengths=(40, 23))
    ql = quest_mod.from_layer(layer, page_size=8)
    q = jnp.asarray(rng.standard_normal((2, 4, 16)), jnp.float32)
    score = np.asarray(quest_mod.page_scores(q, ql.page_min, ql.page_max, ql.lengths, 8))
    dots = np.einsum("bhgd,bhsd->bhgs", np.asarray(q).reshape(2, 2, 2, 16),
                     np.asarray(layer.keys)).max(2)  # best query head of each KV head
    for b in range(2):
        for h in range(2):
            n = int(layer.lengths[b, h])
            last = (n - 1) // 8
            for p in range(5):
                if p * 8 >= n:
                    assert score[b, h, p] == -np.inf
                elif p == last:
                    assert score[b, h, p] == np.inf
                else:
                    assert score[b, h, p] >= dots[b, h, p * 8:(p + 1) * 8].max() - 1e-4


def test_select_pages_takes_the_top_bounds():
    rng = np.random.default_rng(0)
    ql = quest_mod.from_layer(_layer(rng, lengths=(40, 3)), page_size=8, token_budget=24)
    q = jnp.asarray(rng.standard_normal((2, 4, 16)), jnp.float32)
    idx, cnt = quest_mod.select_pages(q, ql)
    score = np.asarray(quest_mod.page_scores(q, ql.page_min, ql.page_max, ql.lengths, 8))
    assert idx.shape == (2, 2, 3)
    assert cnt.tolist() == [[3, 3], [1, 1]]  # row 1 has one valid page per head
    for b in range(2):
        for h in range(2):
            sel = np.asarray(idx[b, h, : cnt[b, h]])
            assert list(sel) == sorted(sel)
            assert score[b, h, sel].min() >= np.sort(score[b, h])[-cnt[b, h]]
            assert (int(ql.lengths[b, h]) - 1) // 8 in sel  # the newest page


def test_quest_attend_dense_when_budget_covers_cache_and_kernel_path(monkeypatch):
    rng = np.random.default_rng(1)
    layer = _layer(rng, lengths=(40, 23))
    q = jnp.asarray(rng.standard_normal((2, 4, 1, 16)), jnp.float32)
    qpos = jnp.asarray([[40], [40]], jnp.int32)
    dense = attention.attend(q, qpos, layer)
    full = quest_mod.from_layer(layer, page_size=16, token_budget=64)
    np.testing.assert_allclose(np.asarray(attention.attend(q, qpos, full)), np.asarray(dense),
                               atol=1e-5)
    sparse = quest_mod.from_layer(layer, page_size=16, token_budget=16)
    ref = attention.attend(q, qpos, sparse, impl="reference")
    assert not np.allclose(np.asarray(ref), np.asarray(dense), atol=1e-3)
    # GPU path (the block-sparse kernel, interpreted here) equals the reference path.
    calls = []
    real = bsa.block_sparse_decode
    monkeypatch.setattr(bsa, "block_sparse_decode",
                        lambda *a, **kw: calls.append(1) or real(*a, **kw))
    monkeypatch.setattr(attention, "kernel_platform", lambda: "gpu")
    out = attention.attend(q, qpos, sparse)
    assert calls == [1]
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5)


@pytest.fixture(scope="module")
def model():
    return Llama(LlamaConfig.tiny(eos_token_id=None, num_hidden_layers=3), rngs=nnx.Rngs(0))


def test_generate_with_quest(model):
    tokens = np.random.default_rng(2).integers(0, 256, (2, 37))
    dense = kvjax.generate(model, tokens, 6)
    same, cache = kvjax.generate(model, tokens, 6, kvjax.sparse.quest(token_budget=64),
                                 return_cache=True)
    np.testing.assert_array_equal(np.asarray(same), np.asarray(dense))  # budget >= length
    kinds = [type(layer).__name__ for layer in cache.layers]
    assert kinds == ["LayerCache", "LayerCache", "QuestLayerCache"]  # first 2 layers dense
    ql = cache.layers[2]
    assert ql.capacity % 16 == 0 and ql.capacity >= 37 + 6
    mn, mx = quest_mod.page_summaries(ql.dense(), 16)
    np.testing.assert_array_equal(np.asarray(ql.page_min), np.asarray(mn))
    out = kvjax.generate(model, tokens, 6, kvjax.sparse.quest(token_budget=16, dense_layers=0))
    assert out.shape == (2, 43)
    # The cache keeps every token: summaries add 2 / page_size of the key bytes.
    assert kvcache.nbytes(ql) - kvcache.nbytes(ql.dense()) == 2 * ql.keys.size // 16 * 4


def test_bad_arguments():
    with pytest.raises(ValueError, match="page_size"):
        kvjax.sparse.quest(page_size=12)
    with pytest.raises(ValueError, match="token_budget"):
        kvjax.sparse.quest(token_budget=8, page_size=16)
    with pytest.raises(ValueError, match="dense_layers"):
        kvjax.sparse.quest(dense_layers=-1)
    with pytest.raises(TypeError, match="LayerCache"):
        quest_mod.from_layer(jnp.zeros(3))
    ql = quest_mod.from_layer(kvcache.init_layer(1, 1, 16, 16), page_size=16)
    with pytest.raises(ValueError, match="smaller"):
        ql.grow(8)
    assert jax.tree.structure(ql.grow(20)) == jax.tree.structure(ql)
    assert ql.grow(20).capacity == 32
