"""Eviction methods at prefill: properties on synthetic caches, budgets, errors, memory,
compilation, and the benchmark's --tiny mode. (kvpress parity: test_kvpress_parity.py.)"""

from __future__ import annotations

import functools
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

import kvjax
from kvjax import compress as C
from kvjax import rope
from kvjax.cache import LayerCache, init_layer, write
from kvjax.compress.base import Observation
from kvjax.compress.scorer import from_scorer
from kvjax.models import Llama, LlamaConfig

B, HKV, G, T, D = 2, 2, 2, 40, 8
FREQ = rope.inv_freq(D, 10000.0)


@functools.partial(jax.jit, static_argnames=("d",))
def _rotate_and_write(raw_k, v, raw_q, pos, qpos, src, lengths, d):
    k = rope.apply(raw_k, pos, FREQ)
    b, hkv, t, _ = raw_k.shape
    cache = write(init_layer(b, hkv, t, d), k, v, pos, lengths)
    q_raw = jnp.take_along_axis(raw_q, src[:, None, :, None], axis=2)
    return cache, rope.apply(q_raw, qpos, FREQ), q_raw


def synthetic(seed: int, lengths, t: int = T, b: int = B, hkv: int = HKV, g: int = G,
              d: int = D, num_layers: int = 2, layer: int = 0) -> tuple[LayerCache, Observation]:
    """A prefilled cache (rows left-aligned, slot i = position i) and its right-aligned
    observation, as `kvjax.generate` hands them to a compressor; post-RoPE keys and queries."""
    rng = np.random.default_rng(seed)
    lengths = np.asarray(lengths, np.int32)
    pos = np.broadcast_to(np.arange(t, dtype=np.int32), (b, t))
    raw_k = rng.standard_normal((b, hkv, t, d), np.float32)
    v = rng.standard_normal((b, hkv, t, d), np.float32)
    raw_q = 2 * rng.standard_normal((b, hkv * g, t, d), np.float32)
    # right-align the queries of each row: query j of row b has position j - (t - L_b)
    qpos = np.arange(t)[None, :] - (t - lengths[:, None])
    qpos = np.where(qpos >= 0, qpos, -1).astype(np.int32)
    cache, q, q_raw = _rotate_and_write(raw_k, v, raw_q, pos, qpos, np.clip(qpos, 0, None),
                                        lengths, d)
    obs = Observation(queries=q, raw_queries=q_raw, query_positions=jnp.asarray(qpos),
                      hidden=jnp.zeros((b, t, 4)), inv_freq=jnp.asarray(FREQ), layer=layer,
                      num_layers=num_layers, scale=d**-0.5)
    return cache, obs


def kept(cache: LayerCache) -> list[list[list[int]]]:
    pos, n = np.asarray(cache.positions), np.asarray(cache.lengths)
    return [[sorted(pos[b, h, : n[b, h]].tolist()) for h in range(pos.shape[1])]
            for b in range(pos.shape[0])]


# (name, compressor, budget of a full row, protected(L) -> positions that must survive)
BUDGET = 20
METHODS = {
    "streaming_llm": (C.streaming_llm(budget=BUDGET), lambda L: set(range(min(4, L)))
                      | set(range(max(0, L - BUDGET + 4), L))),
    "snapkv": (C.snapkv(budget=BUDGET, window=8), lambda L: set(range(max(0, L - 8), L))),
    "tova": (C.tova(budget=BUDGET), lambda L: {L - 1}),
    "knorm": (C.knorm(budget=BUDGET), lambda L: set()),
    "h2o": (C.h2o(budget=BUDGET, recent_fraction=0.5),
            lambda L: set(range(max(0, L - BUDGET // 2), L))),
    "expected_attention": (C.expected_attention(budget=BUDGET, n_future=16),
                           lambda L: set(range(min(4, L)))),
    "snapkv_max_pool": (C.snapkv(budget=BUDGET, window=6, kernel=7, pooling="max"),
                        lambda L: set(range(max(0, L - 6), L))),
}


def _runner(comp, obs):
    """(fn(cache, arrays), arrays): comp.prefill with the observation's ints kept static, as
    `kvjax.generate` builds the observation inside its trace."""
    static = dict(layer=obs.layer, num_layers=obs.num_layers, scale=obs.scale,
                  sliding_window=obs.sliding_window)

    def run(cache, arrays):
        return comp.prefill(cache, Observation(*arrays, **static), comp.init(cache))[0]

    return run, tuple(obs[:5])


def apply(comp, cache, obs):
    """comp.prefill under jit (one compilation instead of many eager op compilations)."""
    run, arrays = _runner(comp, obs)
    key = (comp, obs.layer, obs.num_layers, obs.scale)
    if key not in _JITS:
        _JITS[key] = jax.jit(run)
    return _JITS[key](cache, arrays)


def shapes(comp, cache, obs):
    """comp.prefill traced but not run (trace-time errors and static capacities)."""
    run, arrays = _runner(comp, obs)
    return jax.eval_shape(run, cache, arrays)


_JITS: dict = {}


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**16), short=st.integers(1, T))
@pytest.mark.parametrize("name", sorted(METHODS))
def test_kept_subset_budget_and_protected(name, seed, short):
    """Kept positions are distinct input positions, lengths = min(row length, budget) <= the
    static capacity = budget, and the method's window/sinks survive (padded rows too)."""
    lengths = [T, short]
    cache, obs = synthetic(seed, lengths)
    out = apply(METHODS[name][0], cache, obs)
    assert out.capacity == BUDGET
    protected = METHODS[name][1]
    for b, rows in enumerate(kept(out)):
        for h, row in enumerate(rows):
            assert len(set(row)) == len(row) == min(lengths[b], BUDGET)
            assert set(row) <= set(range(lengths[b]))
            if lengths[b] > BUDGET:
                assert protected(lengths[b]) <= set(row), (b, h)
    # kept keys/values are the input's at those positions
    pos = np.asarray(out.positions)
    valid = pos >= 0
    src = np.asarray(cache.keys)[np.arange(B)[:, None, None], np.arange(HKV)[None, :, None],
                                 np.clip(pos, 0, None)]
    np.testing.assert_array_equal(np.asarray(out.keys)[valid], src[valid])


def test_snapkv_matches_numpy_reference():
    """SnapKV scores against a direct numpy transcription of the formula (one full row)."""
    cache, obs = synthetic(1, [T, T])
    w, k = 8, 5
    got = np.asarray(jax.jit(functools.partial(C.snapkv_scores, window=w, kernel=k))(cache, obs))
    q = np.asarray(obs.queries)[:, :, -w:]
    keys = np.repeat(np.asarray(cache.keys), G, axis=1)
    logits = np.einsum("bhtd,bhsd->bhts", q, keys) * D**-0.5
    causal = np.arange(T)[None, :] <= np.arange(T - w, T)[:, None]
    logits = np.where(causal, logits, -np.inf)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    s = probs[..., : T - w].mean(2)
    s = np.pad(s, ((0, 0), (0, 0), (k // 2, k // 2)))
    s = sum(s[..., j: j + T - w] for j in range(k)) / k  # avg_pool1d, zero padding
    s = s.reshape(B, HKV, G, T - w).mean(2)
    # the window gets (max of the head's other scores) + 1 (per head: no cross-head reduction)
    s = np.concatenate([s, np.broadcast_to(s.max(2, keepdims=True) + 1, (B, HKV, w))], -1)
    np.testing.assert_allclose(got, s, rtol=1e-5, atol=1e-7)


def test_streaming_and_tova_and_chunk_semantics():
    cache, obs = synthetic(2, [T, 25])
    out = apply(C.streaming_llm(budget=10, n_sink=3), cache, obs)
    assert kept(out)[0] == [[0, 1, 2] + list(range(T - 7, T))] * HKV
    assert kept(out)[1] == [[0, 1, 2] + list(range(18, 25))] * HKV
    out = apply(C.tova(budget=10), cache, obs)
    assert kept(out)[0][0] == kept(out)[0][1]  # one selection shared by the layer's heads
    out = apply(C.chunkkv(budget=16, chunk_length=8, scorer=C.knorm_scores), cache, obs)
    assert out.capacity == 16
    for b, rows in enumerate(kept(out)):
        assert rows[0] == rows[1]
        chunks = {p // 8 for p in rows[0]}
        assert len(chunks) == 2
        want = sorted(p for c in chunks for p in range(8 * c, 8 * c + 8) if p < [T, 25][b])
        assert rows[0] == want


def test_duo_attention_head_split():
    from kvjax.headwise import HeadwiseLayerCache

    cache, obs = synthetic(3, [T, 30])
    profile = np.array([[0.9, 0.1], [0.5, 0.7]])  # lowest of the 4 heads: layer 0, head 1
    comp = C.duo_attention(profile, 0.25, sink_size=2, recent_size=5)
    out = apply(comp, cache, obs)
    assert isinstance(out, HeadwiseLayerCache)
    assert out.pool_size == T + 7  # retrieval head: whole prompt; streaming: 2 + 5 slots
    dense = out.to_dense()
    assert kept(dense)[0] == [list(range(T)), [0, 1] + list(range(T - 5, T))]
    assert kept(dense)[1] == [list(range(30)), [0, 1] + list(range(25, 30))]
    all_stream = apply(C.duo_attention(profile, 1.0, sink_size=2, recent_size=5), cache, obs)
    assert isinstance(all_stream, LayerCache) and all_stream.capacity == 7
    assert comp.prefill(cache, obs._replace(layer=1), ())[0] is cache  # no streaming head


def test_rerotation_gives_contiguous_positions_and_rotated_keys():
    cache, obs = synthetic(4, [T, 30])
    raw = np.asarray(rope.rerotate(cache.keys, cache.positions, 0 * cache.positions, FREQ))
    out = apply(C.knorm(budget=12, rerotate=True), cache, obs)
    plain = apply(C.knorm(budget=12), cache, obs)
    for b, length in enumerate([T, 30]):
        for h in range(HKV):
            new = np.asarray(out.positions[b, h])
            np.testing.assert_array_equal(new, np.arange(length - 12, length))
            old = np.asarray(plain.positions[b, h])
            angle = new[:, None] * np.concatenate([FREQ, FREQ])[None, :]
            x = raw[b, h, old]
            half = np.concatenate([-x[:, D // 2:], x[:, : D // 2]], axis=1)
            want = x * np.cos(angle) + half * np.sin(angle)
            np.testing.assert_allclose(np.asarray(out.keys[b, h]), want, atol=1e-5)


def test_budget_resolution_follows_kvpress():
    cache, obs = synthetic(5, [T, T])
    for ratio in (0.0, 0.1, 0.33, 0.5, 0.77, 0.9, 0.99):  # float truncation as kvpress: 0.9 -> 3
        comp = C.knorm(ratio)
        out = shapes(comp, cache, obs)
        assert out.keys.shape[2] == max(1, int(T * (1 - ratio)))
    assert C.knorm(0.0).prefill(cache, obs, ())[0] is cache  # ratio 0: untouched
    assert C.pyramid_budgets(150, 2, 0.5) == [86, 64]
    assert C.pyramid_budgets(100, 4, 0.5) == [50] * 4  # min < window: uniform fallback
    assert C.pyramid_budgets(400, 3, budget=100, window=8, beta=2) == [150, 100, 50]


def test_factories_are_memoised():
    assert C.snapkv(0.5) is C.snapkv(compression_ratio=0.5)
    assert C.snapkv(budget=64) is C.snapkv(None, 64, window=64)
    assert C.snapkv(0.5) is not C.snapkv(0.25)
    assert C.duo_attention(np.ones((2, 2)), 0.5) is C.duo_attention([[1, 1], [1, 1]], 0.5)
    assert C.decoding(C.knorm_scores, 8, interval=4) is C.decoding("knorm", 8, interval=4)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: C.snapkv(1.0), r"compression_ratio must be in \[0, 1\)"),
        (lambda: C.knorm(-0.1), r"compression_ratio must be in \[0, 1\)"),
        (lambda: C.tova(), "exactly one of compression_ratio"),
        (lambda: C.h2o(0.5, 10), "exactly one of compression_ratio"),
        (lambda: C.knorm(budget=0), r"budget must be an int >= 1"),
        (lambda: C.snapkv(0.5, kernel=4), "kernel must be an odd int"),
        (lambda: C.snapkv(0.5, pooling="sum"), "pooling must be one of"),
        (lambda: C.snapkv(0.5, window=0), r"window must be an int >= 1"),
        (lambda: C.h2o(0.5, recent_fraction=2.0), r"recent_fraction must be in \[0, 1\]"),
        (lambda: C.pyramidkv(0.5, beta=0.5), "beta must be a number >= 1"),
        (lambda: C.chunkkv(budget=5, chunk_length=10), r"budget \(5\) must be >= chunk_length"),
        (lambda: C.duo_attention(np.ones(3)), "head_scores must be a numeric"),
        (lambda: C.duo_attention(np.ones((2, 2)), 1.5), r"head_compression_ratio must be in"),
        (lambda: C.decoding(C.knorm_scores, 8, interval=0), r"interval must be an int >= 1"),
        (lambda: C.decoding(3, 8), "scorer must be callable"),
        (lambda: C.decoding("nope", 8), "scorer must be a callable or one of"),
        (lambda: C.streaming_llm(0.5, n_sink=-1), r"n_sink must be an int >= 0"),
    ],
)
def test_factory_errors(make, match):
    with pytest.raises((ValueError, TypeError), match=match):
        make()


@pytest.mark.parametrize(
    "comp, match",
    [
        (C.knorm(budget=T + 1), rf"budget \({T + 1}\) is larger than the prompt"),
        (C.snapkv(budget=T + 1, window=8), r"budget .* is larger than the prompt"),
        (C.snapkv(budget=10, window=16), r"budget \(10\) is below the window \(16\)"),
        (C.snapkv(0.9, window=8), r"compression_ratio=0.9 \(keeps 3 of 40\) is below the window"),
        (C.snapkv(0.5, window=T), rf"window \({T}\) must be smaller than the observed prompt"),
        (C.streaming_llm(budget=3), r"budget \(3\) is below the sinks \(4\)"),
        (C.pyramidkv(0.5, window=64), r"window \(64\) must be smaller|below the window"),
        (C.chunkkv(budget=T + 5, chunk_length=5), "larger than the prompt"),
        (C.duo_attention(np.ones((3, 2)), 0.5), r"head_scores has shape \(3, 2\)"),
    ],
)
def test_trace_time_errors(comp, match):
    """Raised while tracing (jax.eval_shape runs nothing) from the static shapes."""
    cache, obs = synthetic(6, [T, T])
    with pytest.raises(ValueError, match=match):
        shapes(comp, cache, obs)


# --- end to end on a tiny model: memory, compilation ------------------------------------


@functools.cache
def tiny_model() -> Llama:
    """One tiny random model per test process (shared with test_compress_decoding)."""
    return Llama(LlamaConfig.tiny(eos_token_id=None), rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def _full_and_meta(cache):
    meta = sum(lc.lengths.nbytes for lc in cache.layers) + cache.next_position.nbytes
    return kvjax.cache.nbytes(cache) - meta, meta


def test_memory_and_compilations(model):
    """nbytes after compression at ratio r = (1 - r) x full within 2% (+ lengths metadata);
    the prompt's contents never recompile, a budget change does."""
    traces = []

    def counting(cache, obs):
        traces.append(cache.capacity)
        return C.knorm_scores(cache, obs)

    tokens = np.random.default_rng(0).integers(0, 256, (2, 200))
    full, _ = kvjax.prefill(model, tokens)
    full_bytes, meta = _full_and_meta(full)
    comp = from_scorer(counting, compression_ratio=0.75)
    for seed in range(3):
        other = np.random.default_rng(seed).integers(0, 256, (2, 200))
        cache, _ = kvjax.prefill(model, other, compressor=comp, lengths=[200, 150 + seed])
    assert traces == [200, 200]  # one trace (a call per layer) for three prompts
    data, meta2 = _full_and_meta(cache)
    assert meta2 == meta
    assert abs(data - 0.25 * full_bytes) <= 0.02 * 0.25 * full_bytes
    kvjax.prefill(model, tokens, compressor=from_scorer(counting, budget=30))
    assert traces == [200] * 4  # a new budget is a new compressor: one more trace


def test_pyramid_memory(model):
    tokens = np.random.default_rng(1).integers(0, 256, (1, 256))
    full, _ = kvjax.prefill(model, tokens)
    full_bytes, _ = _full_and_meta(full)
    comp = C.pyramidkv(0.5, window=16, beta=4)
    cache, _ = kvjax.prefill(model, tokens, compressor=comp)
    caps = [lc.capacity for lc in cache.layers]
    assert caps == C.pyramid_budgets(256, 2, 0.5, window=16, beta=4) and caps[0] > caps[1]
    data, _ = _full_and_meta(cache)
    assert abs(data - 0.5 * full_bytes) <= 0.02 * 0.5 * full_bytes


def test_bench_tiny_mode():
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "experiments"))
    import bench_compress

    rows = bench_compress.run(contexts=[160], names=["snapkv", "duo_attention"], repeats=1,
                              tiny=True, log=lambda s: None)
    assert [r["method"] for r in rows] == ["snapkv", "duo_attention"]
    assert all(r["compress_ms"] > 0 and r["prefill_ms"] > 0 for r in rows)
    assert abs(rows[0]["bytes_kept"] - 0.5) < 0.05
    assert "| 160 | snapkv |" in bench_compress.markdown(rows)
    with pytest.raises(ValueError, match="unknown methods"):
        bench_compress.run(contexts=[96], names=["nope"], tiny=True)


def test_chunkkv_layer_reuse(model):
    """reuse_layers=2: layer 1 keeps layer 0's chunks (via Observation.previous)."""
    tokens = np.random.default_rng(2).integers(0, 256, (2, 96))
    comp = C.chunkkv(0.5, chunk_length=8, scorer=C.knorm_scores, reuse_layers=2)
    cache, _ = kvjax.prefill(model, tokens, compressor=comp, lengths=[96, 77])
    a, b = (kept(lc) for lc in cache.layers)
    assert a == b and cache.layers[0].capacity == 48
    for row in a:
        assert row[0] == row[1]  # one selection per layer for all heads
