"""experiments/train_lm.py on the `:micro` config: trains, resumes, exports an HF checkpoint."""

from __future__ import annotations

import importlib.util
import json
import os

import numpy as np
import pytest

import kvjax
from kvjax.eval import mixture
from kvjax.eval.tokenizer import ByteTokenizer, load_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(path: str, name: str):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


train_lm = _load("experiments/train_lm.py", "train_lm")
lm_tiny = _load("configs/lm_tiny.py", "lm_tiny_config")


def test_batches_are_pure_functions_of_the_step():
    data = lm_tiny.get_config().data
    a, b = mixture.lm_batch(data, 5), mixture.lm_batch(data, 5)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["tokens"], mixture.lm_batch(data, 6)["tokens"])
    tok = ByteTokenizer()
    toks, w = a["tokens"][0], a["weights"][0]
    assert toks.shape[0] * toks.shape[1] <= data.tokens_per_batch
    for row, wr in zip(toks, w):
        if wr.max() < 1.0:
            continue  # a filler row
        target = tok.decode(row[wr == 1.0])  # the weighted tokens are exactly the answer
        text = tok.decode(row)
        assert text.endswith(target) and row[wr == 1.0][-1] == tok.eos_id
        assert target.strip(" .") in text[:-len(target)]  # the needle holds the answer
        assert np.all(wr[row == tok.pad_id] == 0)


def test_bad_data_config():
    data = lm_tiny.get_config().data
    with pytest.raises(ValueError, match="known tasks"):
        mixture.check_data({**data, "tasks": {"needle": 1.0}})
    with pytest.raises(ValueError, match="length_weights needs 2 entries"):
        mixture.check_data({**data, "length_weights": [1.0]})


def test_train_resume_export(tmp_path):
    config = lm_tiny.get_config("micro")
    workdir = str(tmp_path / "run")
    config.stop_at = 2
    first = train_lm.run(config, workdir)
    assert first["step"] == 2 and "export" not in first  # interrupted: nothing exported yet
    config.stop_at = 0
    out = train_lm.run(config, workdir)  # resumes at step 2
    assert out["step"] == 3
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        assert [json.loads(line)["step"] for line in f] == [1, 2, 3]
    assert os.path.getsize(out["loss_plot"]) > 1000
    export = out["export"]
    assert sorted(os.listdir(export)) == ["config.json", "model.safetensors", "tokenizer.json",
                                          "tokenizer_config.json"]
    assert isinstance(load_tokenizer(export), ByteTokenizer)
    assert set(out["eval"]["cells"]) == {"full|-|niah_single_1|256"}

    # The export is an HF checkpoint: kvjax and transformers give the same logits.
    import torch
    import transformers

    model = kvjax.models.load(export)
    ids = np.array([[ByteTokenizer.bos_id] + ByteTokenizer().encode("The grass is green.")])
    _, logits = kvjax.prefill(model, ids, return_all_logits=True)
    hf = transformers.AutoModelForCausalLM.from_pretrained(export).eval()
    with torch.no_grad():
        ref = hf(torch.as_tensor(ids)).logits.numpy()
    np.testing.assert_allclose(np.asarray(logits), ref, atol=2e-4, rtol=1e-4)
