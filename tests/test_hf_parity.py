"""Logit and generation parity with transformers on tiny random checkpoints (float32, CPU)."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hf_models import KINDS, save_tiny

import kvjax


@pytest.fixture(scope="module", params=KINDS)
def pair(request, tmp_path_factory):
    directory = str(tmp_path_factory.mktemp(request.param))
    torch_model = save_tiny(request.param, directory)
    return torch_model, kvjax.models.load(directory), directory


def _tokens(seed, shape, vocab=128):
    return np.random.default_rng(seed).integers(3, vocab, size=shape)


def test_full_forward_logits(pair):
    torch_model, model, _ = pair
    tokens = _tokens(0, (2, 24))
    with torch.no_grad():
        ref = torch_model(torch.tensor(tokens)).logits.numpy()
    _, logits = kvjax.prefill(model, tokens, return_all_logits=True)
    assert np.abs(np.asarray(logits) - ref).max() <= 1e-4


def test_prefill_then_decode_logits(pair):
    torch_model, model, _ = pair
    tokens = _tokens(1, (2, 17 + 8))
    prompt, rest = tokens[:, :17], tokens[:, 17:]
    with torch.no_grad():
        ref = torch_model(torch.tensor(tokens)).logits.numpy()
    cache, logits = kvjax.prefill(model, prompt, capacity=17 + 8)
    assert np.abs(np.asarray(logits) - ref[:, 16]).max() <= 1e-4
    for i in range(8):
        logits, cache, _ = kvjax.decode_step(model, cache, jnp.asarray(rest[:, i]))
        assert np.abs(np.asarray(logits) - ref[:, 17 + i]).max() <= 1e-4
    assert np.asarray(cache.next_position).tolist() == [25, 25]


def test_greedy_generate_matches(pair):
    torch_model, model, _ = pair
    tokens = _tokens(2, (3, 19))
    with torch.no_grad():
        ref = torch_model.generate(
            torch.tensor(tokens), attention_mask=torch.ones(tokens.shape, dtype=torch.long),
            max_new_tokens=10, do_sample=False, pad_token_id=0,
        ).numpy()
    out = np.asarray(kvjax.generate(model, tokens, 10, pad_id=0))
    np.testing.assert_array_equal(out, ref)


def test_left_padded_batch_matches(pair):
    torch_model, model, _ = pair
    lengths = np.array([15, 9, 12])
    tokens = _tokens(3, (3, 15))
    mask = np.arange(15)[None, :] >= (15 - lengths)[:, None]
    tokens = np.where(mask, tokens, 0)
    with torch.no_grad():
        ref = torch_model.generate(
            torch.tensor(tokens), attention_mask=torch.tensor(mask.astype(np.int64)),
            max_new_tokens=8, do_sample=False, pad_token_id=0,
        ).numpy()
    out = np.asarray(kvjax.generate(model, tokens, 8, lengths=lengths, pad_id=0))
    np.testing.assert_array_equal(out, ref)


def test_chunked_prefill_equals_one_shot(pair):
    _, model, _ = pair
    tokens = _tokens(4, (2, 23))
    lengths = np.array([23, 14])
    cache1, logits1 = kvjax.prefill(model, tokens, lengths=lengths)
    for chunk in (1, 5, 8, 23, 64):
        cache2, logits2 = kvjax.prefill(model, tokens, chunk_size=chunk, lengths=lengths)
        np.testing.assert_allclose(np.asarray(logits2), np.asarray(logits1), atol=1e-5)
        for a, b in zip(cache1.layers, cache2.layers):
            np.testing.assert_array_equal(np.asarray(a.lengths), np.asarray(b.lengths))
            np.testing.assert_array_equal(np.asarray(a.positions), np.asarray(b.positions))
            valid = np.asarray(a.positions) >= 0
            np.testing.assert_allclose(
                np.asarray(a.keys)[valid], np.asarray(b.keys)[valid], atol=1e-5
            )
            np.testing.assert_allclose(
                np.asarray(a.values)[valid], np.asarray(b.values)[valid], atol=1e-5
            )


def test_sharded_index_checkpoint(pair, tmp_path):
    """A checkpoint split into shards with model.safetensors.index.json loads identically."""
    from safetensors.numpy import load_file, save_file

    torch_model, model, directory = pair
    tensors = load_file(os.path.join(directory, "model.safetensors"))
    names = sorted(tensors)
    half = len(names) // 2
    weight_map = {}
    for shard, part in (("model-00001-of-00002.safetensors", names[:half]),
                        ("model-00002-of-00002.safetensors", names[half:])):
        save_file({n: tensors[n] for n in part}, str(tmp_path / shard), metadata={"format": "pt"})
        weight_map.update({n: shard for n in part})
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )
    (tmp_path / "config.json").write_text(open(os.path.join(directory, "config.json")).read())
    sharded = kvjax.models.load(str(tmp_path))
    tokens = _tokens(5, (1, 12))
    _, a = kvjax.prefill(model, tokens)
    _, b = kvjax.prefill(sharded, tokens)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # A missing shard is named in the error.
    os.remove(tmp_path / "model-00002-of-00002.safetensors")
    with pytest.raises(FileNotFoundError, match="model-00002-of-00002"):
        kvjax.models.load(str(tmp_path))


def test_save_roundtrip_loads_in_transformers(pair, tmp_path):
    import transformers

    torch_model, model, _ = pair
    kvjax.models.save(model, tmp_path)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
    tokens = _tokens(6, (1, 10))
    with torch.no_grad():
        a = torch_model(torch.tensor(tokens)).logits.numpy()
        b = reloaded(torch.tensor(tokens)).logits.numpy()
    np.testing.assert_allclose(a, b, atol=1e-5)
