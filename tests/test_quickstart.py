"""The shipped lm_tiny checkpoint, experiments/quickstart.py and notebooks/quickstart.ipynb."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import kvjax
from kvjax.eval import runner, tasks
from kvjax.eval.tokenizer import ByteTokenizer, load_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ASSET = os.path.join(os.path.dirname(kvjax.__file__), "assets", "lm_tiny")


def test_shipped_checkpoint_is_small_and_loads():
    files = sorted(os.listdir(ASSET))
    assert files == ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    assert sum(os.path.getsize(os.path.join(ASSET, f)) for f in files) < 5 * 2**20
    model = kvjax.models.load(ASSET)
    assert model.config.vocab_size == ByteTokenizer.vocab_size
    assert model.config.eos_token_id == ByteTokenizer.eos_id
    assert isinstance(load_tokenizer(ASSET), ByteTokenizer)


@pytest.mark.parametrize("length", [256, 512])
def test_shipped_model_retrieves_needles(length):
    """Full-cache accuracy on the first 10 prompts of the evaluation set (docs/results.md has
    the 50-prompt figures)."""
    model, tok = kvjax.models.load(ASSET), ByteTokenizer()
    samples = tasks.make_samples("niah_single_1", 10, length, tok)
    preds = runner.predict(model, tok, samples, length, None, 16, batch_size=10)
    accuracy = sum(tasks.score(s, p) for s, p in zip(samples, preds)) / len(samples)
    assert accuracy >= 0.8, list(zip(preds, [s.answers for s in samples]))


def test_quickstart_script_prints_the_table():
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    out = subprocess.run(
        [sys.executable, os.path.join(ROOT, "experiments", "quickstart.py"), "--length=256",
         "--num_samples=2", "--ratios=0.5"],
        capture_output=True, text=True, env=env, timeout=900, check=True).stdout
    assert "| method | ratio | kept | niah_single_1 | niah_single_2 | niah_single_3 | avg |" in out
    assert "| full | - | 1.00 |" in out
    assert out.count("| 0.5 |") == 3  # three compression methods at ratio 0.5


def test_notebook_runs(tmp_path):
    import nbclient
    import nbformat

    nb = nbformat.read(os.path.join(ROOT, "notebooks", "quickstart.ipynb"), as_version=4)
    settings = {"KVJAX_NB_SAMPLES": "2", "KVJAX_NB_RATIOS": "0.5", "JAX_PLATFORMS": "cpu"}
    saved = {k: os.environ.get(k) for k in settings}
    os.environ.update(settings)  # the kernel inherits them
    try:
        nbclient.NotebookClient(nb, timeout=900, kernel_name="python3",
                                resources={"metadata": {"path": str(tmp_path)}}).execute()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k)
            else:
                os.environ[k] = v
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                   for o in c.get("outputs", []))
    assert "| method | ratio | kept |" in text
    assert (tmp_path / "quickstart_accuracy.png").exists()
