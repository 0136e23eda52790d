"""Eviction parity with kvpress on tiny random Llama and Qwen3 checkpoints (float32, CPU).

For every method: prefill the same prompt under the kvpress press (torch) and under the kvjax
compressor, decode greedily, and require (1) the same generated tokens and (2) the same kept
original positions per (layer, KV head) in the final cache. Differences are allowed only where
scores tie at the selection boundary; they are counted and bounded (kvpress and jax break exact
ties differently: e.g. Knorm scores of a token repeated in the prompt are equal in layer 0,
since RoPE preserves norms).
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
import kvpress
import numpy as np
import pytest
from kvpress_ref import (
    kept_sets,
    key_norm_scores,
    load_torch,
    masked_positions,
    quiet,
    run,
    save_sharp,
)

import kvjax
from kvjax import compress as C
from kvjax import rope
from kvjax.compress.duo_attention import streaming_mask

T = 150  # prompt tokens
MAX_TIE_FRACTION = 0.02  # tied boundary swaps allowed, as a fraction of all kept positions
TIE_RTOL = 1e-5

quiet()


@pytest.fixture(scope="module", params=["llama", "qwen3"])
def models(request, tmp_path_factory):
    directory = save_sharp(request.param, str(tmp_path_factory.mktemp(request.param)))
    prompt = np.random.default_rng(7).integers(3, 128, size=(1, T))
    return {
        "dir": directory,
        "sdpa": load_torch(directory, "sdpa"),
        "eager": load_torch(directory, "eager"),
        "jax": kvjax.models.load(directory),
        "prompt": prompt,
    }


def _kvjax_sets(cache) -> list[list[set]]:
    out = []
    for lc in cache.layers:
        lc = lc.to_dense() if hasattr(lc, "to_dense") else lc  # head-wise pools (DuoAttention)
        pos, lengths = np.asarray(lc.positions), np.asarray(lc.lengths)
        out.append([set(map(int, pos[0, h, : lengths[0, h]])) for h in range(pos.shape[1])])
    return out


def _captured_scores(model, prompt, scorer) -> list[np.ndarray]:
    """Per layer float32[Hkv, T]: `scorer` on the uncompressed prefill cache (for tie checks)."""

    def prefill(cache, obs, state):
        return cache, scorer(cache, obs)

    comp = C.Compressor(init=lambda c: (), prefill=prefill, decode=lambda c, o, s: (c, s))
    _, _, states = kvjax.prefill(model, prompt, compressor=comp, return_state=True)
    return [np.asarray(s)[0] for s in states]


def _compare(ref: list[list[set]], ours: list[list[set]], scores=None) -> int:
    """Number of tied swaps; fails on any non-tie difference. scores(layer) -> [Hkv, N] or None."""
    swaps, kept = 0, 0
    for layer, (ref_l, our_l) in enumerate(zip(ref, ours)):
        for head, (a, b) in enumerate(zip(ref_l, our_l)):
            kept += len(a)
            if a == b:
                continue
            only_ref, only_ours = sorted(a - b), sorted(b - a)
            where = f"layer {layer} head {head}: kvpress-only {only_ref}, kvjax-only {only_ours}"
            assert len(only_ref) == len(only_ours), where
            s = None if scores is None else scores(layer)
            assert s is not None, f"untied difference ({where})"
            vals = s[head][only_ref + only_ours]
            spread = vals.max() - vals.min()
            assert spread <= TIE_RTOL * max(1.0, np.abs(vals).max()), (
                f"not a tie ({where}, scores {vals})"
            )
            swaps += len(only_ref)
    assert swaps <= MAX_TIE_FRACTION * kept, f"{swaps} tied swaps of {kept} kept positions"
    print(f"kept positions: {kept}, tied swaps: {swaps}")  # shown with pytest -s
    return swaps


def _check(models, press, comp, *, new=8, attn="sdpa", wrap=None, scorer=None, scores=None,
           decode_press=False, prefill_press=True):
    """Runs both sides; returns the tied swaps. Tie checks use `scores(layer) -> [Hkv, N]` or,
    only when a difference shows up, `scorer` evaluated by kvjax on the uncompressed prompt."""
    prompt = models["prompt"]
    gen, positions, _ = run(models[attn], prompt, press, new, wrap=wrap or (press,),
                            decode_press=decode_press, prefill_press=prefill_press)
    out, cache = kvjax.generate(models["jax"], prompt, new, compressor=comp, eos_id=-1,
                                return_cache=True)
    np.testing.assert_array_equal(np.asarray(out[0, T:]), gen)
    ref = [kept_sets(p) for p in positions]
    if scorer is not None:
        captured = functools.cache(lambda: _captured_scores(models["jax"], prompt, scorer))
        scores = lambda layer: captured()[layer]  # noqa: E731
    return _compare(ref, _kvjax_sets(cache), scores)


def test_streaming_llm(models):
    assert _check(models, kvpress.StreamingLLMPress(0.5), C.streaming_llm(0.5)) == 0


def test_snapkv(models):
    _check(models, kvpress.SnapKVPress(0.5), C.snapkv(0.5), scorer=C.snapkv_scores)


def test_tova(models):
    _check(models, kvpress.TOVAPress(0.5), C.tova(0.5), scorer=C.tova_scores)


def test_knorm(models):
    norms = key_norm_scores(models["sdpa"], models["prompt"])
    # The prompt repeats tokens: their layer-0 key norms tie exactly (RoPE keeps norms).
    _check(models, kvpress.KnormPress(0.5), C.knorm(0.5), scores=lambda i: norms[i])


def test_observed_attention_h2o(models):
    _check(models, kvpress.ObservedAttentionPress(0.5), C.h2o(0.5), attn="eager",
           scorer=C.h2o_scores)


def test_expected_attention(models):
    _check(models, kvpress.ExpectedAttentionPress(0.5), C.expected_attention(0.5),
           scorer=C.expected_attention_scores)


def test_pyramidkv(models):
    press = kvpress.PyramidKVPress(0.5)
    comp = C.pyramidkv(0.5)
    _check(models, press, comp, scorer=C.snapkv_scores)
    assert C.pyramid_budgets(T, 2, 0.5) == [86, 64]  # a real pyramid at kvpress's defaults


def test_chunkkv(models):
    press = kvpress.ChunkKVPress(kvpress.SnapKVPress(0.5))
    assert _check(models, press, C.chunkkv(0.5)) == 0


def test_duo_attention_same_head_split(models):
    profile = np.random.default_rng(3).random((2, 2))

    class ProfiledDuo(kvpress.DuoAttentionPress):
        """kvpress's own split code, fed our profile instead of a downloaded pattern."""

        load_attention_pattern = staticmethod(lambda model: (8, 32, profile))

    press = ProfiledDuo(head_compression_ratio=0.5)
    new = 8
    gen, _, _ = run(models["sdpa"], models["prompt"], press, new, wrap=())
    masked = masked_positions(models["sdpa"])
    comp = C.duo_attention(profile, 0.5, sink_size=8, recent_size=32)
    out, cache = kvjax.generate(models["jax"], models["prompt"], new, compressor=comp, eos_id=-1,
                                return_cache=True)
    np.testing.assert_array_equal(np.asarray(out[0, T:]), gen)
    everything = set(range(T + new - 1))
    ref = [[everything - m for m in layer] for layer in masked]
    assert _compare(ref, _kvjax_sets(cache)) == 0
    np.testing.assert_array_equal(press.streaming_mask.numpy(), streaming_mask(profile, 0.5))


def _layer0_ties(models, out):
    """Knorm scores of the whole sequence for layer 0 only: its keys depend on the token and
    position alone, so they equal the compressed run's; later layers' keys do not (no ties
    are accepted there)."""
    norms = key_norm_scores(models["sdpa"], np.asarray(out)[:, :-1])[0]
    return lambda layer: norms if layer == 0 else None


@pytest.mark.parametrize("base", ["knorm", "tova"])
def test_decoding_compression(models, base):
    new = 30
    press_base = {"knorm": kvpress.KnormPress(), "tova": kvpress.TOVAPress()}[base]
    scorer = {"knorm": C.knorm_scores, "tova": C.tova_scores}[base]
    press = kvpress.DecodingPress(base_press=press_base, compression_interval=8, target_size=100)
    comp = C.decoding(scorer, 100, interval=8)
    prompt = models["prompt"]
    gen, positions, _ = run(models["sdpa"], prompt, press, new, wrap=(press,),
                            prefill_press=False, decode_press=True)
    out, cache = kvjax.generate(models["jax"], prompt, new, compressor=comp, eos_id=-1,
                                return_cache=True)
    np.testing.assert_array_equal(np.asarray(out[0, T:]), gen)
    assert [lc.capacity for lc in cache.layers] == [T + 8] * 2  # max(prompt, budget) + interval
    _compare([kept_sets(p) for p in positions], _kvjax_sets(cache), _layer0_ties(models, out))


def test_prefill_then_decoding_compression(models):
    """kvpress PrefillDecodingPress(SnapKV, DecodingPress(Knorm)) == chain(snapkv, decoding)."""
    new = 30
    snap = kvpress.SnapKVPress(0.4)
    dec = kvpress.DecodingPress(base_press=kvpress.KnormPress(), compression_interval=8,
                                target_size=80)
    press = kvpress.PrefillDecodingPress(prefilling_press=snap, decoding_press=dec)
    comp = C.chain(C.snapkv(0.4), C.decoding(C.knorm_scores, 80, interval=8))
    gen, positions, _ = run(models["sdpa"], models["prompt"], press, new, wrap=(snap, dec),
                            decode_press=True)
    out, cache = kvjax.generate(models["jax"], models["prompt"], new, compressor=comp, eos_id=-1,
                                return_cache=True)
    np.testing.assert_array_equal(np.asarray(out[0, T:]), gen)
    _compare([kept_sets(p) for p in positions], _kvjax_sets(cache), _layer0_ties(models, out))


def test_key_rerotation(models):
    """KeyRerotationPress(StreamingLLM): same tokens, and the same re-rotated keys up to the
    constant shift of positions (kvpress renumbers 0..n-1, kvjax L-n..L-1)."""
    new = 8
    press = kvpress.KeyRerotationPress(kvpress.StreamingLLMPress(0.5))
    prompt = models["prompt"]
    gen, _, ref_cache = run(models["sdpa"], prompt, press, new, wrap=(press,), rerotated=True)
    out, cache = kvjax.generate(models["jax"], prompt, new, compressor=C.streaming_llm(
        0.5, rerotate=True), eos_id=-1, return_cache=True)
    np.testing.assert_array_equal(np.asarray(out[0, T:]), gen)
    n = T // 2
    lc = cache.layers[0]
    np.testing.assert_array_equal(np.asarray(lc.positions[0, :, :n]),
                                  np.broadcast_to(np.arange(T - n, T), (lc.num_heads, n)))
    freq = rope.inv_freq(lc.head_dim, models["jax"].config.rope_theta,
                         models["jax"].config.rope_scaling_dict)
    shifted = rope.rerotate(lc.keys[:, :, :n], lc.positions[:, :, :n],
                            lc.positions[:, :, :n] - (T - n), jnp.asarray(freq))
    ref_keys = ref_cache.layers[0].keys[:, :, :n].numpy()
    np.testing.assert_allclose(np.asarray(shifted), ref_keys, atol=2e-4, rtol=1e-4)
