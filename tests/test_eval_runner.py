"""The evaluation runner: method names, batching, scoring, resume, reports (tiny random model)."""

from __future__ import annotations

import functools
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import kvjax
from kvjax.compress import Compressor, identity, keep_topk
from kvjax.eval import methods as M
from kvjax.eval import report, runner
from kvjax.eval import tasks as T
from kvjax.eval.tokenizer import ByteTokenizer
from kvjax.models import Llama, LlamaConfig

TOK = ByteTokenizer()
LENGTH = 256


@functools.cache
def recent(compression_ratio: float = 0.5) -> Compressor:
    """A trivial test method: keep the most recent (1 - ratio) of each head's slots."""

    def prefill(cache, obs, state):
        budget = max(1, int(cache.capacity * (1 - compression_ratio)))
        return keep_topk(cache, cache.positions.astype(jnp.float32), budget), state

    return Compressor(init=lambda cache: (), prefill=prefill, decode=lambda c, o, s: (c, s))


def bits_method(bits: int = 8) -> Compressor:
    """A ratio-free test factory with a `bits` parameter (like kivi)."""
    del bits
    return identity()


TABLE = {"full": identity, "identity": identity, "recent": recent, "bits_method": bits_method}


@functools.cache
def model() -> Llama:
    cfg = LlamaConfig.tiny(vocab_size=TOK.vocab_size, eos_token_id=TOK.eos_id)
    return Llama(cfg, rngs=nnx.Rngs(0))


def test_method_names_resolve():
    assert M.build("full", 0.5, TABLE) is identity()
    assert M.build("recent", 0.25, TABLE) is recent(compression_ratio=0.25)
    assert M.build("recent(compression_ratio=0.75)", 0.25, TABLE) is recent(
        compression_ratio=0.75)
    assert M.build("bits_method4", 0.5, TABLE) is identity()
    chained = M.build("chain(recent, bits_method2)", 0.5, TABLE)
    assert chained is kvjax.compress.chain(recent(compression_ratio=0.5), identity())
    assert M.takes_ratio("chain(recent, bits_method2)", TABLE)
    assert not M.takes_ratio("bits_method2", TABLE)
    assert not M.takes_ratio("recent(compression_ratio=0.1)", TABLE)


@pytest.mark.parametrize("name, match", [
    ("snapkv_typo", "unknown method 'snapkv_typo'; known methods: bits_method, full"),
    ("chain(recent, nope)", "unknown method 'nope'"),
    ("recent(window=open)", "bad arguments for recent"),
    ("recent(x=[1, 2]", "is not a name"),
    ("1 + 2", "is not a name"),
    ("", "non-empty string"),
])
def test_bad_method_names(name, match):
    with pytest.raises(ValueError, match=match):
        M.build(name, 0.5, TABLE)


def test_table_discovers_landed_factories():
    table = M.method_table()
    assert table["full"] is kvjax.compress.identity
    assert "keep_topk" not in table and "valid_slots" not in table  # helpers, not methods
    for name, fn in table.items():
        assert M._is_factory(fn), name


def test_encode_prompts_left_pads():
    samples = T.make_samples("niah_single_1", 3, LENGTH, TOK)
    tokens, lengths = runner.encode_prompts(samples, TOK, LENGTH)
    assert tokens.shape == (3, LENGTH)
    for row, n, s in zip(tokens, lengths, samples):
        assert row[LENGTH - n] == TOK.bos_id
        assert TOK.decode(row[LENGTH - n + 1:]) == s.prompt
        assert np.all(row[:LENGTH - n] == TOK.pad_id)
    with pytest.raises(ValueError, match="more than the length 100"):
        runner.encode_prompts(samples, TOK, 100)


def test_predict_matches_unbatched_generate():
    samples = T.make_samples("niah_single_2", 3, LENGTH, TOK)
    preds = runner.predict(model(), TOK, samples, LENGTH, None, 8, batch_size=2)
    assert len(preds) == 3
    for s, p in zip(samples[1:], preds[1:]):  # one prompt alone, unpadded (last: padded batch)
        ids = np.array([[TOK.bos_id] + TOK.encode(s.prompt)])
        out = kvjax.generate(model(), ids, 8, eos_id=TOK.eos_id)
        assert p == runner.decode_answer(TOK, np.asarray(out)[0, ids.shape[1]:])


def test_sweep_resumes_and_reports(tmp_path, monkeypatch):
    path = str(tmp_path / "results.json")
    kw = dict(methods=["full", "recent", "bits_method2"], ratios=[0.5, 0.75],
              tasks=["niah_single_1"], lengths=[LENGTH], num_samples=2, batch_size=2,
              results_path=path, table=TABLE, progress=False, log=None)
    first = runner.sweep(model(), TOK, **{**kw, "methods": ["full", "recent"]})
    assert set(first["cells"]) == {"full|-|niah_single_1|256", "recent|0.5|niah_single_1|256",
                                   "recent|0.75|niah_single_1|256"}
    cell = first["cells"]["recent|0.5|niah_single_1|256"]
    assert cell["kept_fraction"] == pytest.approx(0.5, abs=0.01)  # measured cache bytes
    assert first["cells"]["full|-|niah_single_1|256"]["kept_fraction"] == 1.0
    assert 0.0 <= cell["score"] <= 1.0 and cell["n"] == 2

    calls = []
    real_predict = runner.predict
    monkeypatch.setattr(runner, "predict",
                        lambda *a, **k: calls.append(a[4]) or real_predict(*a, **k))
    second = runner.sweep(model(), TOK, **kw)  # only the new method's cell runs
    assert len(calls) == 1
    assert set(second["cells"]) == set(first["cells"]) | {"bits_method2|-|niah_single_1|256"}
    with open(path) as f:
        assert json.load(f) == second

    md = report.accuracy_table(second)
    assert "| method | ratio | kept | niah_single_1 | avg |" in md
    assert "| recent | 0.75 | 0.25 |" in md
    png = report.plot_accuracy(second, str(tmp_path / "acc.png"))
    assert os.path.getsize(png) > 1000


def test_kept_fraction_of_evict_then_quantize_multiplies():
    """chain(snapkv, kivi4) stores the evicted set quantized: its measured bytes follow the
    SnapKV ratio (f32 model, head dim 16, G = R = 16, 1024 tokens: kivi4 alone 0.228; chain
    0.175, 0.122, 0.069 at ratios 0.25, 0.5, 0.75, against (1 - ratio) x 0.228 = 0.171, 0.114,
    0.057).

    Exactly: R full-precision slots (132 bytes each) plus the quantized part allocated in
    blocks of 32 // bits groups of G tokens (the packed layout; 28 bytes per slot). With the
    defaults (G = 32, R = 128) and 4 bits the block and window are 256 + 128 slots, all of a
    512-token cache: that is why a 512-token sweep of lm_tiny reports 0.33 at every ratio.
    """
    length, g, r_slots, per = 1024, 16, 16, 8
    samples = T.make_samples("niah_single_1", 2, length, TOK)
    table = M.method_table()
    quant = f"kivi4(group_size={g}, residual={r_slots})"

    def expected(capacity: int) -> float:
        groups = -(-max(capacity - r_slots, 0) // g)
        slots = max(-(-groups // per) * per, per) * g
        return (slots * 28 + r_slots * 132 + 8) / (length * 132 + 4)  # + the int32 counts

    alone = runner.kept_fraction(model(), TOK, samples, length, M.build(quant, None, table))
    assert alone == pytest.approx(expected(length), abs=1e-3)
    for ratio in (0.25, 0.5, 0.75):
        comp = M.build(f"chain(snapkv, {quant})", ratio, table)
        kept = runner.kept_fraction(model(), TOK, samples, length, comp)
        assert kept == pytest.approx(expected(int(length * (1 - ratio))), abs=1e-3)
        assert (1 - ratio) * alone < kept < (1 - ratio) * alone + 0.015


def test_sweep_checks_names_before_work():
    kw = dict(ratios=[0.5], lengths=[LENGTH], num_samples=1, batch_size=1, table=TABLE,
              progress=False, log=None)
    with pytest.raises(ValueError, match="unknown method 'snapkvv'"):
        runner.sweep(None, TOK, methods=["snapkvv"], tasks=["niah_single_1"], **kw)
    with pytest.raises(ValueError, match="known tasks: niah_single_1, niah_single_2"):
        runner.sweep(None, TOK, methods=["full"], tasks=["needle"], **kw)
    with pytest.raises(ValueError, match=r"ratios must be floats in \[0, 1\)"):
        runner.sweep(None, TOK, methods=["full"], tasks=["vt"], **{**kw, "ratios": [1.5]})


def test_sweep_rejects_length_shorter_than_needle():
    with pytest.raises(ValueError, match="too short for task 'niah_single_3'"):
        runner.sweep(model(), TOK, methods=["full"], ratios=[0.5], tasks=["niah_single_3"],
                     lengths=[120], num_samples=1, batch_size=1, table=TABLE, progress=False,
                     log=None)


def test_evaluate_script_checks_its_config(tmp_path):
    import importlib.util

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location(
        "evaluate_script", os.path.join(root, "experiments", "evaluate.py"))
    evaluate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(evaluate)
    spec = importlib.util.spec_from_file_location(
        "eval_ruler", os.path.join(root, "configs", "eval_ruler.py"))
    cfg_module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cfg_module)
    config = cfg_module.get_config("tiny")
    with pytest.raises(ValueError, match="unknown method 'snapkv_v2'; known methods: "):
        evaluate.run({**config, "methods": ("full", "snapkv_v2")}, str(tmp_path))
    with pytest.raises(ValueError, match="unknown task 'qa_1'; known tasks: niah_single_1"):
        evaluate.run({**config, "tasks": ("qa_1",)}, str(tmp_path))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        evaluate.run({**config, "model": str(tmp_path / "nowhere")}, str(tmp_path))
    with pytest.raises(FileNotFoundError, match="tokenizer file .* not found"):
        evaluate.run({**config, "model": str(tmp_path)}, str(tmp_path))
    with pytest.raises(ValueError, match="unknown config variant 'huge'; known: 'tiny'"):
        cfg_module.get_config("huge")
