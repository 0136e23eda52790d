"""Locret retaining heads: targets, training, scoring from the cache, chunked eviction."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import kvjax
from kvjax import train as kvtrain
from kvjax.learned import backbone as bb
from kvjax.learned import evict, locret
from kvjax.models import Llama, LlamaConfig


@pytest.fixture(scope="module")
def model():
    return Llama(LlamaConfig.tiny(), rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def heads(model):
    h = locret.init(model, head_hidden=8, seed=2)
    h.w2.set_value(h.w2[...] * 50.0)  # spread the scores
    return h


def _tokens(b, t, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (b, t)).astype(np.int32)


def _full_scores(model, heads, tokens):
    """[L][B, Hkv, T] head scores from the full-cache layer inputs."""

    @jax.jit
    def run(tokens):
        out = []

        def attend(layer, inputs):
            out.append(heads(layer, inputs.raw_queries, inputs.raw_keys, inputs.values))
            return bb.plain_attention(layer, inputs)

        bb.forward(model, tokens, attend)
        return out

    return [np.asarray(x) for x in run(jnp.asarray(tokens))]


@pytest.mark.parametrize("target", ["logits", "probs"])
def test_importance_targets_match_numpy(model, target):
    b, t, w = 2, 9, 3
    x = jnp.asarray(np.random.default_rng(1).normal(size=(b, t, 64)), jnp.float32)
    inputs = bb.layer_inputs(model, 1, x, jnp.broadcast_to(jnp.arange(t), (b, t)))
    got = np.asarray(locret.importance_targets(inputs, w, target))
    q, k = np.asarray(inputs.queries, np.float64), np.asarray(inputs.keys, np.float64)
    for bi in range(b):
        for h in range(2):
            for i in range(t - w):
                best = -np.inf
                for g in range(2):
                    for qt in range(t - w, t):
                        s = q[bi, 2 * h + g, qt] @ k[bi, h, :qt + 1].T * inputs.scale
                        p = np.exp(s - s.max()) / np.exp(s - s.max()).sum()
                        best = max(best, (s if target == "logits" else p)[i])
                np.testing.assert_allclose(got[bi, h, i], best, rtol=1e-4, atol=1e-6)


def test_training_reduces_loss(model):
    heads = locret.init(model, head_hidden=16)
    loss_fn = locret.loss(6)
    batch = {"tokens": jnp.asarray(_tokens(2, 24))}
    result = kvtrain.train(heads, model, loss_fn, lambda step: {"tokens": batch["tokens"][None]},
                           steps=7, log_every=1, optimizer=kvtrain.optimizer(1e-2),
                           progress=False)
    losses = [h["loss"] for h in result.history]  # each before that step's update
    assert losses[-1] < 0.8 * losses[0]
    assert all(0.0 <= h["top10_overlap"] <= 1.0 for h in result.history)
    assert {"regression", "smooth", "top10_overlap"} <= set(result.history[0])


def test_loss_arguments_are_checked(model):
    with pytest.raises(ValueError, match="query_window must be in"):
        locret.loss(0)
    with pytest.raises(ValueError, match="target must be one of"):
        locret.loss(4, target="max")
    heads = locret.init(model, head_hidden=4)
    with pytest.raises(ValueError, match="must exceed query_window"):
        locret.loss(8)(heads, model, {"tokens": jnp.zeros((1, 8), jnp.int32)}, None)


def test_cache_scores_equal_scores_from_layer_inputs(model, heads):
    """The compressor rebuilds pre-RoPE keys from the cache; padding rows map to their slots."""
    tokens = _tokens(2, 11, seed=3)
    lengths = np.array([11, 7])
    padded = tokens.copy()
    padded[1] = np.concatenate([np.zeros(4, np.int32), tokens[1, :7]])  # left padding
    comp = locret.locret(heads, budget=32)
    cache, _ = kvjax.prefill(model, padded, compressor=comp, lengths=lengths)
    for row, n in ((0, 11), (1, 7)):
        want = _full_scores(model, heads, tokens[row:row + 1, :n])
        for layer, lc in enumerate(cache.layers):
            got = np.asarray(lc.slot_data[locret.SLOT][row, :, :n])
            np.testing.assert_allclose(got, want[layer][0], rtol=2e-4, atol=2e-4)


def test_eviction_keeps_top_scores_and_stabilizers(model, heads):
    tokens = _tokens(2, 16, seed=4)
    budget, stab = 6, 2
    comp = locret.locret(heads, budget=budget, stabilizers=stab)
    cache, _ = kvjax.prefill(model, tokens, compressor=comp)
    scores = _full_scores(model, heads, tokens)
    for layer, lc in enumerate(cache.layers):
        assert lc.capacity == budget
        for bi in range(2):
            for h in range(2):
                s = scores[layer][bi, h].copy()
                s[16 - stab:] = np.inf
                want = np.sort(np.argsort(-s, kind="stable")[:budget])
                np.testing.assert_array_equal(np.asarray(lc.positions[bi, h]), want)


def test_chunked_prefill_matches_simulation(model, heads):
    tokens = _tokens(2, 19, seed=5)
    budget, chunk, stab = 7, 4, 2
    comp = locret.locret(heads, budget=budget, stabilizers=stab)
    cache, _ = evict.prefill(model, tokens, comp, budget=budget, chunk_size=chunk)
    assert all(int(lc.lengths.max()) == budget for lc in cache.layers)
    score = _full_scores(model, heads, tokens)[0]  # layer 0 inputs ignore the cache
    for bi in range(2):
        for h in range(2):
            kept = []
            for start in range(0, 19, chunk):
                end = min(start + chunk, 19)
                kept += list(range(start, end))
                s = np.array([np.inf if i >= end - stab else score[bi, h, i] for i in kept])
                kept = sorted(kept[j] for j in np.argsort(-s, kind="stable")[:budget])
            np.testing.assert_array_equal(np.asarray(cache.layers[0].positions[bi, h, :budget]),
                                          kept)
    out, cache = evict.generate(model, tokens, 3, comp, budget=budget, chunk_size=chunk,
                                return_cache=True)
    assert out.shape == (2, 22)
    # headroom dropped, then room for the decoded tokens (Locret does not evict while decoding)
    assert all(lc.capacity == budget + 3 and int(lc.lengths.min()) == budget + 2
               for lc in cache.layers)


def test_save_load_and_bad_inputs(model, heads, tmp_path):
    cfg = locret.component_config(model, head_hidden=8, seed=2)
    locret.save(tmp_path / "h", heads, cfg, model)
    loaded = locret.load(tmp_path / "h", model)
    np.testing.assert_array_equal(np.asarray(loaded.w2[...]), np.asarray(heads.w2[...]))
    other = Llama(LlamaConfig.tiny(num_hidden_layers=3), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="num_hidden_layers: 2 .checkpoint. vs 3"):
        locret.load(tmp_path / "h", other)
    with pytest.raises(ValueError, match=r"stabilizers must be in \[0, 3\]"):
        locret.locret(heads, budget=4, stabilizers=4)
    with pytest.raises(ValueError, match="budget must be an int >= 1"):
        locret.locret(heads, budget=0)
    with pytest.raises(ValueError, match="exactly one of compression_ratio"):
        locret.locret(heads, 0.5, budget=4)
    with pytest.raises(ValueError, match="stabilizers .4. must be below the budget .2"):
        kvjax.prefill(model, _tokens(1, 5), compressor=locret.locret(
            heads, 0.6, stabilizers=4))
    with pytest.raises(TypeError, match="RetainingHeads"):
        locret.locret(123, budget=4)
    with pytest.raises(ValueError, match="KV heads"):
        kvjax.prefill(other, _tokens(1, 6), compressor=locret.locret(heads, budget=4))


def test_tiny_script_config(tmp_path):
    """configs/train_locret.py:tiny through experiments/train_locret.py (the CI variant)."""
    import importlib.util
    import os

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def module(*path):
        spec = importlib.util.spec_from_file_location("_t_" + path[-1][:-3],
                                                      os.path.join(root, *path))
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod

    config = module("configs", "train_locret.py").get_config("tiny")
    config.steps = 2
    out = module("experiments", "train_locret.py").run(config, str(tmp_path))
    assert out["step"] == 2 and len(out["history"]) == 2
    model = kvtrain.load_backbone(config.backbone, "float32")
    heads = locret.load(out["component"], model)
    assert heads.w1.shape[-1] == config.locret.head_hidden
    config.locret.query_window = config.data.seq_len
    with pytest.raises(ValueError, match="query_window must be in"):
        module("experiments", "train_locret.py").run(config, str(tmp_path / "bad"))
