"""The shared training loop: frozen backbone, exact resume, accumulation, configs, CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from kvjax import train as kvtrain
from kvjax.learned import retention_gate
from kvjax.lowrank import matryoshka

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = {"source": "recall", "batch_size": 2, "seq_len": 24, "seed": 0, "num_pairs": 2}


@pytest.fixture(scope="module")
def bf16_model():
    return kvtrain.load_backbone("random:tiny", "bfloat16")


def _gates(model, seed=0):
    return retention_gate.init(model, gate_hidden=8, bias_init=3.0, seed=seed)


def _arrays(tree):
    return {k: np.asarray(v) for k, v in kvtrain.flatten(tree).items()}


def _same(a, b):
    return a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]) for k in a)


def _run(model, workdir, steps, stop_at=None, grad_accum=1, meta=None):
    return kvtrain.train(
        _gates(model), model, retention_gate.loss(6), kvtrain.make_batch_fn(
            DATA, model.config.vocab_size, grad_accum),
        steps=steps, optimizer=kvtrain.optimizer(1e-2), workdir=workdir,
        checkpoint_every=0, log_every=1, stop_at=stop_at, progress=False,
        meta=meta or {"backbone": kvtrain.backbone_signature(model), "component": {"k": 1}},
    )


def test_only_component_params_change_backbone_bit_identical(bf16_model, tmp_path):
    backbone_before = _arrays(nnx.state(bf16_model))
    gates_before = _arrays(nnx.state(_gates(bf16_model)))
    result = _run(bf16_model, str(tmp_path), steps=3)
    assert _same(_arrays(nnx.state(bf16_model)), backbone_before)
    after = _arrays(nnx.state(result.component))
    assert after.keys() == gates_before.keys()
    assert all(after[k].dtype == np.float32 for k in after)  # component stays float32
    assert all(not np.array_equal(after[k], gates_before[k]) for k in after)
    assert result.step == 3 and [h["step"] for h in result.history] == [1, 2, 3]
    rows = [json.loads(x) for x in open(tmp_path / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert open(tmp_path / "metrics.csv").readline().startswith("step,")


def test_resume_is_bit_identical(bf16_model, tmp_path):
    full = _run(bf16_model, str(tmp_path / "full"), steps=4)
    part = _run(bf16_model, str(tmp_path / "resumed"), steps=4, stop_at=2)
    assert part.step == 2
    compiled = kvtrain._train_step._cache_size()
    resumed = _run(bf16_model, str(tmp_path / "resumed"), steps=4)
    assert resumed.step == 4
    # restored state hits the jitted step compiled for the fresh run (no recompilation)
    assert kvtrain._train_step._cache_size() == compiled
    assert [h["step"] for h in resumed.history] == [3, 4]
    assert _same(_arrays(nnx.state(resumed.component)), _arrays(nnx.state(full.component)))
    losses = [json.loads(x)["loss"] for x in open(tmp_path / "resumed" / "metrics.jsonl")]
    assert losses == [h["loss"] for h in full.history]


def test_resume_refuses_other_backbone_or_component(bf16_model, tmp_path):
    _run(bf16_model, str(tmp_path), steps=1)
    other = dict(kvtrain.backbone_signature(bf16_model), num_hidden_layers=5)
    with pytest.raises(ValueError, match="num_hidden_layers: 2 .checkpoint. vs 5"):
        _run(bf16_model, str(tmp_path), steps=2, meta={"backbone": other, "component": {"k": 1}})
    with pytest.raises(ValueError, match="written for component"):
        _run(bf16_model, str(tmp_path), steps=2, meta={
            "backbone": kvtrain.backbone_signature(bf16_model), "component": {"k": 2}})


def test_gradient_accumulation_matches_one_big_batch():
    model = kvtrain.load_backbone("random:tiny", "float32")
    data = dict(DATA, batch_size=1)
    micro = kvtrain.make_batch_fn(data, 256, 2)  # 2 micro-batches of 1 row

    def big(step):  # the same 2 rows as one micro-batch
        return {"tokens": micro(step)["tokens"].reshape(1, 2, -1)}

    import optax

    kwargs = dict(steps=1, optimizer=optax.sgd(1.0), progress=False)  # params - mean grads
    a = kvtrain.train(_gates(model), model, retention_gate.loss(6), micro, **kwargs)
    b = kvtrain.train(_gates(model), model, retention_gate.loss(6), big, **kwargs)
    for k, v in _arrays(nnx.state(a.component)).items():
        np.testing.assert_allclose(v, _arrays(nnx.state(b.component))[k], rtol=1e-4, atol=1e-7)


def test_learning_rate_schedules():
    cos = kvtrain.learning_rate(1.0, "cosine", 10, 2)
    assert [float(cos(i)) for i in (0, 1, 2)] == [0.0, 0.5, 1.0]
    assert float(cos(10)) == pytest.approx(0.0, abs=1e-7)
    lin = kvtrain.learning_rate(2.0, "linear", 4)
    assert [float(lin(i)) for i in range(5)] == [2.0, 1.5, 1.0, 0.5, 0.0]
    assert float(kvtrain.learning_rate(3.0)(100)) == 3.0
    assert kvtrain.optimizer(1e-3, "cosine", 5) is kvtrain.optimizer(1e-3, "cosine", 5)
    with pytest.raises(ValueError, match="schedule must be one of"):
        kvtrain.learning_rate(1.0, "step")
    with pytest.raises(ValueError, match=r"warmup_steps must be in \[0, 10\]"):
        kvtrain.learning_rate(1.0, "cosine", 10, 11)
    with pytest.raises(ValueError, match="lr must be in"):
        kvtrain.optimizer(0.0)


def test_data_is_a_pure_function_of_seed_and_step():
    fn = kvtrain.make_batch_fn(dict(DATA, batch_size=3), 50, 2)
    a, b, c = fn(7)["tokens"], fn(7)["tokens"], fn(8)["tokens"]
    assert a.shape == (2, 3, 24) and a.dtype == np.int32
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert a.min() >= 0 and a.max() < 50
    # every row ends with one of its earlier key/value spans (the needle to recall)
    for row in a.reshape(-1, 24):
        tail = row[-4:]
        assert any(np.array_equal(row[i:i + 4], tail) for i in range(0, 20, 4))
    with pytest.raises(ValueError, match="data.source"):
        kvtrain.make_batch_fn(dict(DATA, source="wiki"), 50, 1)
    with pytest.raises(ValueError, match="too short"):
        kvtrain.make_batch_fn(dict(DATA, seq_len=8), 50, 1)(0)


def test_mixture_data_source():
    mix = {"seed": 0, "lengths": [256], "length_weights": [1.0], "tokens_per_batch": 512,
           "tasks": {"niah_single_1": 1.0}, "filler": 1.0, "context_weight": 0.1}
    fn = kvtrain.make_batch_fn(dict(DATA, source="mixture", mixture=mix), 264, 1)
    toks = fn(3)["tokens"]
    assert toks.shape == (1, 2, 256) and toks.dtype == np.int32
    assert np.array_equal(toks, fn(3)["tokens"])
    with pytest.raises(ValueError, match="grad_accum must be 1"):
        kvtrain.make_batch_fn(dict(DATA, source="mixture", mixture=mix), 264, 2)
    with pytest.raises(ValueError, match="vocabulary"):
        kvtrain.make_batch_fn(dict(DATA, source="mixture", mixture=mix), 100, 1)(0)


def test_python_data_source(tmp_path, monkeypatch):
    (tmp_path / "mydata.py").write_text(
        "import numpy as np\n"
        "def batch(seed, step, batch_size, seq_len):\n"
        "    return np.full((batch_size, seq_len), (seed + step) % 7)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    fn = kvtrain.make_batch_fn(dict(DATA, source="python:mydata:batch", seed=3), 50, 2)
    toks = fn(1)["tokens"]
    assert toks.shape == (2, 2, 24) and toks[0, 0, 0] == 5 and toks[1, 0, 0] == 6


def test_config_key_and_value_errors():
    ref = ml_collections.ConfigDict({"lr": 1.0, "data": {"seq_len": 4,
                                                          "mixture": ml_collections.ConfigDict()}})
    kvtrain.check_config_keys({"lr": 2.0, "data": {"seq_len": 8, "mixture": {"any": 1}}}, ref)
    with pytest.raises(ValueError, match=r"unknown config key config.data.seqlen; known keys"):
        kvtrain.check_config_keys({"data": {"seqlen": 8}}, ref)
    with pytest.raises(ValueError, match="unknown config key config.lr_"):
        kvtrain.check_config_keys({"lr_": 1}, ref)
    with pytest.raises(ValueError, match="backbone"):
        kvtrain.load_backbone("", "float32")
    with pytest.raises(ValueError, match="backbone dtype"):
        kvtrain.load_backbone("random:tiny", "int8")
    with pytest.raises(FileNotFoundError):
        kvtrain.load_backbone("/no/such/checkpoint", "float32")
    with pytest.raises(ValueError, match="needs a workdir"):
        kvtrain.train(None, None, None, None, steps=2, optimizer=None, stop_at=1)


def test_component_save_load_and_backbone_shape_check(tmp_path):
    model = kvtrain.load_backbone("random:tiny", "float32")
    cfg = retention_gate.component_config(model, gate_hidden=8, seed=3)
    gates = retention_gate.build(cfg)
    retention_gate.save(tmp_path / "g", gates, cfg, model)
    loaded = retention_gate.load(tmp_path / "g", model)
    assert _same(_arrays(nnx.state(loaded)), _arrays(nnx.state(gates)))
    from kvjax.models import Llama, LlamaConfig

    other = Llama(LlamaConfig.tiny(num_key_value_heads=1), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="num_key_value_heads: 2 .checkpoint. vs 1"):
        retention_gate.load(tmp_path / "g", other)
    with pytest.raises(ValueError, match="holds a 'retention_gate' component"):
        matryoshka.load(tmp_path / "g")
    with pytest.raises(FileNotFoundError, match="component.json"):
        retention_gate.load(tmp_path)


def test_unflatten_checks_names_and_shapes():
    tree = {"a": jnp.zeros(2), "b": [jnp.ones((1, 2))]}
    flat = kvtrain.flatten(tree)
    assert sorted(flat) == ["a", "b/0"]
    back = kvtrain.unflatten(tree, flat)
    assert jax.tree.structure(back) == jax.tree.structure(tree)
    with pytest.raises(ValueError, match="missing"):
        kvtrain.unflatten(tree, {"a": flat["a"]})
    with pytest.raises(ValueError, match="has shape"):
        kvtrain.unflatten(tree, {"a": jnp.zeros(3), "b/0": flat["b/0"]})


def _cli(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "experiments", "train_gate.py"),
                           *args], capture_output=True, text=True, cwd=ROOT, timeout=300)


def _module(*path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("_m_" + "_".join(path)[:-3],
                                                  os.path.join(ROOT, *path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_unknown_key_is_a_clear_error(tmp_path):
    bad = _cli("--config=configs/train_gate.py:tiny", f"--workdir={tmp_path}",
               "--config.gate.memry=4")
    assert bad.returncode != 0
    assert "unknown config key --config.gate.memry" in bad.stderr
    assert "known keys of config.gate: bias_init" in bad.stderr
    assert not os.path.exists(tmp_path / "checkpoints")


def test_cli_tiny_run_then_resume_in_process(tmp_path):
    first = _cli("--config=configs/train_gate.py:tiny", f"--workdir={tmp_path}",
                 "--config.data.seq_len=32", "--config.steps=2", "--config.gate.memory=5")
    assert first.returncode == 0, first.stderr[-2000:]
    assert "step 2 " in first.stdout
    script = _module("experiments", "train_gate.py")
    config = _module("configs", "train_gate.py").get_config("tiny")
    config.update_from_flattened_dict({"steps": 3, "data.seq_len": 32, "gate.memory": 5})
    out = script.run(config, str(tmp_path))
    assert [h["step"] for h in out["history"]] == [3]  # resumed from the CLI's checkpoint
    rows = [json.loads(x) for x in open(tmp_path / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2, 3]
    model = kvtrain.load_backbone(kvtrain.tiny_backbone_spec(), "float32")
    retention_gate.load(out["component"], model)
    config.gate.memory = 0
    with pytest.raises(ValueError, match="memory must be in"):
        script.run(config, str(tmp_path))
    config.gate.memory = 5
    config.gate.extra = 1
    with pytest.raises(ValueError, match="unknown config key config.gate.extra"):
        script.run(config, str(tmp_path))
