"""prefill/generate behaviour, the compressor contract, and bad-input errors."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import kvjax
from kvjax import rope
from kvjax.compress import Compressor, chain, identity, keep_topk
from kvjax.models import Llama, LlamaConfig


@pytest.fixture(scope="module")
def model():
    return Llama(LlamaConfig.tiny(eos_token_id=None), rngs=nnx.Rngs(0))


def _tokens(shape, seed=0):
    return np.random.default_rng(seed).integers(0, 256, shape)


def test_sampling_is_explicit_and_reproducible(model):
    tokens = _tokens((2, 12))
    a = kvjax.generate(model, tokens, 6, temperature=1.0, top_p=0.9, rng=jax.random.key(1))
    b = kvjax.generate(model, tokens, 6, temperature=1.0, top_p=0.9, rng=jax.random.key(1))
    c = kvjax.generate(model, tokens, 6, temperature=1.0, rng=jax.random.key(2))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert a.shape == (2, 18) and not np.array_equal(np.asarray(a), np.asarray(c))
    np.testing.assert_array_equal(np.asarray(a[:, :12]), tokens)


def test_top_p_tiny_is_greedy(model):
    tokens = _tokens((2, 10), 1)
    greedy = kvjax.generate(model, tokens, 5)
    nucleus = kvjax.generate(model, tokens, 5, temperature=1.0, top_p=1e-6, rng=jax.random.key(0))
    np.testing.assert_array_equal(np.asarray(greedy), np.asarray(nucleus))


def test_eos_stops_and_pads(model):
    tokens = _tokens((2, 10), 2)
    free = np.asarray(kvjax.generate(model, tokens, 6))
    eos = int(free[0, 11])  # the second generated token of row 0
    out = np.asarray(kvjax.generate(model, tokens, 6, eos_id=eos, pad_id=255))
    assert out[0, 11] == eos and (out[0, 12:] == 255).all()
    np.testing.assert_array_equal(out[0, :12], free[0, :12])


def test_positions_follow_tokens_seen_not_cache_length(model):
    """After compressing the prompt to 4 slots, the next token still gets position T."""

    def last4(cache, obs, state):
        return keep_topk(cache, cache.positions.astype(jnp.float32), 4), state

    comp = Compressor(init=lambda c: (), prefill=last4, decode=lambda c, o, s: (c, s))
    tokens = _tokens((1, 9), 3)
    out, cache = kvjax.generate(model, tokens, 3, compressor=comp, return_cache=True)
    pos = np.asarray(cache.layers[0].positions[0, 0])
    np.testing.assert_array_equal(pos[:6], [5, 6, 7, 8, 9, 10])
    assert int(cache.next_position[0]) == 11


def test_identity_and_chain_keep_everything(model):
    tokens = _tokens((2, 11), 4)
    base = kvjax.generate(model, tokens, 4)
    for comp in (identity(), chain(identity(), identity())):
        np.testing.assert_array_equal(
            np.asarray(kvjax.generate(model, tokens, 4, compressor=comp)), np.asarray(base)
        )
    assert identity() is identity()
    with pytest.raises(TypeError, match="not a Compressor"):
        chain(identity(), "snapkv")


def test_keep_topk_orders_and_counts():
    layer = kvjax.cache.init_layer(1, 2, 6, 2)
    k = jnp.ones((1, 2, 6, 2))
    layer = kvjax.cache.write(layer, k, k, jnp.arange(6)[None] * 10, jnp.array([5]))
    scores = jnp.array([[[5.0, 1, 4, 2, 3, 9], [0, 0, 0, 0, 0, 0]]])
    out = keep_topk(layer, scores, 3)
    np.testing.assert_array_equal(np.asarray(out.positions[0, 0]), [0, 20, 40])  # slot 5 invalid
    np.testing.assert_array_equal(np.asarray(out.positions[0, 1]), [0, 10, 20])  # ties: low index
    with pytest.raises(ValueError, match="budget"):
        keep_topk(layer, scores, 0)


def test_bfloat16_model_tracks_float32(model):
    bf = jax.tree.map(lambda x: x.astype(jnp.bfloat16) if x.dtype == jnp.float32 else x, model)
    bf.dtype = jnp.dtype(jnp.bfloat16)
    tokens = _tokens((1, 16), 5)
    _, l32 = kvjax.prefill(model, tokens)
    cache, l16 = kvjax.prefill(bf, tokens)
    assert cache.layers[0].keys.dtype == jnp.bfloat16
    rel = np.linalg.norm(np.asarray(l16) - np.asarray(l32)) / np.linalg.norm(np.asarray(l32))
    assert rel < 3e-2


def test_rerotate_equals_direct_rotation():
    freq = rope.inv_freq(16, 10000.0)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((1, 2, 5, 16)), jnp.float32)
    old = jnp.array([[3, 9, 14, 20, 31]])
    new = jnp.array([[0, 1, 2, 3, 4]])
    rotated_old = rope.apply(x, old, freq)
    moved = rope.rerotate(rotated_old, jnp.broadcast_to(old[:, None], (1, 2, 5)),
                          jnp.broadcast_to(new[:, None], (1, 2, 5)), freq)
    np.testing.assert_allclose(np.asarray(moved), np.asarray(rope.apply(x, new, freq)), atol=1e-5)


@pytest.mark.parametrize(
    "tokens, kwargs, error, match",
    [
        (np.zeros((4,), np.int32), {}, ValueError, "rank 2"),
        (np.zeros((1, 4), np.float32), {}, TypeError, "integer"),
        (np.full((1, 4), 999), {}, ValueError, r"token ids must be in \[0, 256\)"),
        (np.zeros((1, 4), np.int32), {"capacity": 3}, ValueError, "capacity .* smaller than"),
        (np.zeros((2, 4), np.int32), {"lengths": [4, 0]}, ValueError, r"lengths must be in"),
        (np.zeros((1, 4), np.int32), {"chunk_size": 0}, ValueError, "chunk_size"),
        (np.zeros((1, 4), np.int32), {"compressor": "snapkv"}, TypeError, "Compressor"),
    ],
)
def test_prefill_bad_input(model, tokens, kwargs, error, match):
    with pytest.raises(error, match=match):
        kvjax.prefill(model, tokens, **kwargs)


def test_generate_bad_input(model):
    tokens = np.zeros((1, 4), np.int32)
    with pytest.raises(ValueError, match="max_new_tokens"):
        kvjax.generate(model, tokens, 0)
    with pytest.raises(ValueError, match="rng"):
        kvjax.generate(model, tokens, 2, temperature=0.5)
    with pytest.raises(ValueError, match="top_p"):
        kvjax.generate(model, tokens, 2, top_p=1.5)


def test_loader_errors(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ValueError, match="unknown model_type 'gpt2'.*llama"):
        kvjax.models.load(str(tmp_path))
    cfg = dict(model_type="llama", vocab_size=16, hidden_size=8, intermediate_size=8,
               num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        kvjax.models.load(str(tmp_path))
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="pickle"):
        kvjax.models.load(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        kvjax.models.load(str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="rope_scaling type 'yarn'"):
        kvjax.models.from_hf_config({**cfg, "rope_scaling": {"rope_type": "yarn", "factor": 2}})
