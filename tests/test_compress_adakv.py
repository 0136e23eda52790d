"""AdaKV: kvpress parity (kept positions, greedy generation), real memory, decode, no recompile."""

import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hf_models import save_tiny
from kvpress import AdaKVPress, KnormPress, SnapKVPress
from transformers import DynamicCache

import kvjax
from kvjax import cache as kvcache
from kvjax.compress.adakv import adakv, adakv_keep_mask
from kvjax.compress.base import Compressor, valid_slots
from kvjax.headwise import HeadwiseLayerCache

WINDOW, KERNEL = 8, 5


def _scorer(name):
    """kvjax scorers with kvpress's parameters."""
    if name == "snapkv":
        from kvjax.compress.snapkv import snapkv_scores

        return snapkv_scores, dict(window=WINDOW, kernel=KERNEL)
    from kvjax.compress.knorm import knorm_scores

    return knorm_scores, {}


def _press(name, ratio):
    if name == "snapkv":
        inner = SnapKVPress(compression_ratio=ratio, window_size=WINDOW, kernel_size=KERNEL)
    else:
        inner = KnormPress(compression_ratio=ratio)
    return AdaKVPress(inner, alpha_safeguard=0.2)


@pytest.fixture(scope="module", params=["llama", "qwen3"])
def pair(request, tmp_path_factory):
    directory = str(tmp_path_factory.mktemp(request.param))
    torch_model = save_tiny(request.param, directory)
    assert torch_model.config._attn_implementation != "eager"  # kvpress AdaKV needs sdpa
    return torch_model, kvjax.models.load(directory)


def _kvpress_prefill(torch_model, press, tokens):
    """kvpress's pipeline steps: prefill under the press, record scores and pruned indices."""
    scores = []
    score_fn = press.press.score

    def recording(*args, **kwargs):
        s = score_fn(*args, **kwargs)
        scores.append(s.detach().clone().numpy())
        return s

    press.press.score = recording
    cache = DynamicCache()
    try:
        with torch.no_grad(), press(torch_model):
            out = torch_model(torch.tensor(tokens), past_key_values=cache)
    finally:
        press.press.score = score_fn
    b, t = tokens.shape
    h = torch_model.config.num_key_value_heads
    kept = []
    for layer in torch_model.model.layers:
        mask = np.ones((b, h, t), bool)
        bi, hi, si = (x.numpy() for x in layer.self_attn.masked_key_indices)
        mask[bi, hi, si] = False
        kept.append(mask)
    return kept, scores, cache, out


def _kept_positions(layer: HeadwiseLayerCache, t: int) -> np.ndarray:
    """bool[B, Hkv, t]: which prompt positions each head holds (decode tokens ignored)."""
    dense = layer.to_dense()
    pos, lens = np.asarray(dense.positions), np.asarray(dense.lengths)
    kept = np.zeros(pos.shape[:2] + (t,), bool)
    for b in range(pos.shape[0]):
        for h in range(pos.shape[1]):
            p = pos[b, h, : lens[b, h]]
            kept[b, h, p[p < t]] = True
    return kept


@pytest.mark.parametrize("scorer", ["snapkv", "knorm"])
def test_kept_positions_and_greedy_generation_match_kvpress(pair, scorer):
    torch_model, model = pair
    ratio, t, n_new = 0.5, 40, 8
    tokens = np.random.default_rng(0).integers(3, 128, size=(2, t))
    fn, params = _scorer(scorer)
    comp = adakv(fn, ratio, **params)
    press = _press(scorer, ratio)

    ref_kept, ref_scores, cache, out = _kvpress_prefill(torch_model, press, tokens)
    gen, ours = kvjax.generate(model, tokens, n_new, compressor=comp, eos_id=-1,
                               return_cache=True)
    n_kept = int(t * (1 - ratio))
    mismatched = ties = 0
    for layer, want, s in zip(ours.layers, ref_kept, ref_scores):
        assert isinstance(layer, HeadwiseLayerCache)
        assert layer.pool_size == layer.num_heads * (n_kept + n_new)  # grown for decoding
        got = _kept_positions(layer, t)
        assert (got.sum((1, 2)) == want.sum((1, 2))).all()  # every row keeps Hkv x n_kept
        diff = got != want
        mismatched += int(diff.sum())
        # Any disagreement must be a tie at the selection boundary of kvpress's scores.
        for b in range(got.shape[0]):
            if diff[b].any():
                flat = np.sort(s[b].ravel())[::-1]
                boundary = flat[want[b].sum() - 1]
                near = np.isclose(s[b], boundary, rtol=1e-5, atol=1e-7)
                ties += int(near.sum())
                assert near[diff[b]].all()
    assert mismatched <= ties  # measured: 0 mismatches on both models and both scorers
    # per-head budgets really differ (AdaKV is not uniform here)
    assert len({int(x) for x in np.asarray(ours.layers[0].lengths).ravel()}) > 1

    # greedy generation: kvpress prefill under the press then decode with its masked cache
    with torch.no_grad():
        tok = out.logits[:, -1].argmax(-1)
        ref = [tok]
        for _ in range(n_new - 1):
            tok = torch_model(tok[:, None], past_key_values=cache).logits[:, -1].argmax(-1)
            ref.append(tok)
    ref = torch.stack(ref, 1).numpy()
    np.testing.assert_array_equal(np.asarray(gen)[:, t:], ref)


def _tiny_model(layers=2):
    from flax import nnx

    from kvjax.models.llama import Llama, LlamaConfig

    return Llama(LlamaConfig.tiny(num_hidden_layers=layers), rngs=nnx.Rngs(0))


def _knorm(cache, obs):
    return -jnp.linalg.norm(cache.keys.astype(jnp.float32), axis=-1)


@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.75])
def test_memory_is_the_kept_fraction(ratio):
    model = _tiny_model()
    t = 64
    tokens = np.random.default_rng(1).integers(0, 256, size=(2, t))
    # shapes are static by design, so tracing (no compilation) gives the true allocation
    full = jax.eval_shape(lambda m: kvjax.prefill(m, tokens)[0], model)
    small = jax.eval_shape(lambda m: kvjax.prefill(m, tokens, adakv(_knorm, ratio))[0], model)
    assert all(isinstance(layer, HeadwiseLayerCache) for layer in small.layers)
    b, h = 2, model.config.num_key_value_heads
    metadata = model.config.num_hidden_layers * b * h * 8  # offsets + capacities, int32
    full_b, small_b = kvcache.nbytes(full.layers), kvcache.nbytes(small.layers)
    lengths_b = model.config.num_hidden_layers * b * h * 4  # the dense cache's lengths
    assert small_b == (1 - ratio) * (full_b - lengths_b) + lengths_b + metadata
    assert abs(small_b - metadata - (1 - ratio) * full_b) <= 0.02 * (1 - ratio) * full_b


def _masked_twin(keep_fn) -> Compressor:
    """The masked-dense reference: same selection, kept in a full-size cache by masking."""

    def prefill(cache, obs, state):
        keep = keep_fn(cache, obs)
        return cache.replace(positions=jnp.where(keep, cache.positions, -1)), state

    return Compressor(init=lambda c: (), prefill=prefill, decode=lambda c, o, s: (c, s))


def test_generate_equals_masked_dense_reference_with_padding():
    model = _tiny_model()
    tokens = np.random.default_rng(2).integers(0, 256, size=(3, 30))
    lengths = np.array([30, 9, 24])
    comp = adakv(_knorm, 0.6, alpha_safeguard=0.3)
    n = int(30 * 0.4)

    def keep(cache, obs):
        return adakv_keep_mask(_knorm(cache, obs), valid_slots(cache), n, 0.3)

    out, cache = kvjax.generate(model, tokens, 6, comp, lengths=lengths, eos_id=-1,
                                return_cache=True)
    ref = kvjax.generate(model, tokens, 6, _masked_twin(keep), lengths=lengths, eos_id=-1)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(ref))
    layer = cache.layers[0]
    assert isinstance(layer, HeadwiseLayerCache)
    assert layer.capacity == n + 6  # generate grew every head by max_new_tokens
    # every row keeps Hkv x n tokens (+5 decode appends per head); a row shorter than the
    # per-head budget keeps all its tokens in every head
    lens = np.asarray(layer.lengths)
    np.testing.assert_array_equal(lens.sum(1), [2 * n + 10, 2 * 9 + 10, 2 * n + 10])
    np.testing.assert_array_equal(lens[1], [9 + 5] * 2)


def _numpy_adakv(scores, valid, n_kept, alpha):
    b, h, c = scores.shape
    s = np.where(valid, scores, -np.inf)
    n_safe = max(1, int(n_kept * alpha)) if alpha > 0 else 0
    keep = np.zeros_like(valid)
    for bi in range(b):
        floor = np.zeros((h, c), bool)
        for hi in range(h):
            order = np.argsort(-s[bi, hi], kind="stable")[:n_safe]
            floor[hi, order] = valid[bi, hi, order]
        pri = np.where(floor, np.inf, s[bi]).ravel()
        top = np.argsort(-pri, kind="stable")[: h * n_kept]
        keep[bi].ravel()[top] = True
    return keep & valid


def test_keep_mask_matches_a_direct_reference():
    rng = np.random.default_rng(3)
    for _ in range(5):
        scores = rng.standard_normal((2, 4, 16)).astype(np.float32)
        scores[:, 1] -= 5.0  # one head with low scores: only its safeguard floor survives
        valid = rng.random((2, 4, 16)) < 0.9
        for alpha in (0.0, 0.2, 0.5):
            got = np.asarray(adakv_keep_mask(jnp.asarray(scores), jnp.asarray(valid), 6, alpha))
            np.testing.assert_array_equal(got, _numpy_adakv(scores, valid, 6, alpha))
            assert got.sum() <= 2 * 4 * 6
            if alpha > 0:
                n_safe = max(1, int(6 * alpha))
                assert (got.sum(-1) >= np.minimum(valid.sum(-1), n_safe)).all()


def test_prompt_contents_do_not_recompile():
    model = _tiny_model()
    gen = sys.modules["kvjax.generate"]._generate_jit
    comp = adakv(_knorm, 0.5)
    rng = np.random.default_rng(4)
    kvjax.generate(model, rng.integers(0, 256, (2, 20)), 3, comp, eos_id=-1)
    size = gen._cache_size()
    for _ in range(2):
        kvjax.generate(model, rng.integers(0, 256, (2, 20)), 3, adakv(_knorm, 0.5), eos_id=-1)
    assert gen._cache_size() == size
    assert adakv(_knorm, 0.5) is comp  # memoised factory


def test_bad_input_errors():
    with pytest.raises(ValueError, match="compression_ratio"):
        adakv(_knorm, 1.5)
    with pytest.raises(ValueError, match="exactly one"):
        adakv(_knorm, 0.5, budget=4)
    with pytest.raises(ValueError, match="exactly one"):
        adakv(_knorm)
    with pytest.raises(ValueError, match="budget"):
        adakv(_knorm, budget=0)
    with pytest.raises(ValueError, match="alpha_safeguard"):
        adakv(_knorm, 0.5, alpha_safeguard=1.5)
    with pytest.raises(ValueError, match="scorer_or_name 'nope'"):
        adakv("nope", 0.5)
    with pytest.raises(TypeError, match="scorer_or_name"):
        adakv(3, 0.5)
    with pytest.raises(TypeError, match="hashable"):
        adakv(_knorm, 0.5, table=[1, 2])
    comp = adakv(_knorm, 0.5)
    pooled, _ = comp.prefill(kvcache.init_layer(1, 2, 4, 4), None, ())
    assert isinstance(pooled, HeadwiseLayerCache)
    with pytest.raises(TypeError, match="dense LayerCache"):
        comp.prefill(pooled, None, ())
