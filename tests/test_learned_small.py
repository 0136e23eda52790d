"""experiments/learned_small.py: the eval plan, labels and the time box (no model runs; the
whole pipeline is checked with `--cpu_check`, ~50 s, too slow for the suite)."""

import importlib.util
import os
import time
import types

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def ls():
    spec = importlib.util.spec_from_file_location(
        "learned_small", os.path.join(ROOT, "experiments", "learned_small.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_eval_plan_budgets_and_ranks(ls):
    plan = ls.eval_plan(4096, 32)
    assert plan[0] == (["full"], [0.0])
    evict, low = plan[1], plan[2]
    assert evict[1] == [0.9] and low[1] == [0.75]  # 10% kept and rank 25% first
    assert "locret('train/locret/component', stabilizers=64)" in evict[0]
    assert {"snapkv", "h2o", "streaming_llm"} <= set(evict[0])
    assert low[0][-1] == "svd(rank=8, value_rank=8)"
    assert plan[4][0][-1] == "svd(rank=16, value_rank=16)" and plan[3][1] == [0.75]
    # a short prompt: SnapKV's window and Locret's stabilizers fit the 10% budget (51 tokens)
    assert ls.baselines(512)[0] == "snapkv(window=25)" and ls.locret_stabilizers(512) == 25


def test_relabel_puts_svd_ranks_on_the_rank_ratio(ls):
    cells = {"a": {"method": "svd(rank=8, value_rank=8)", "ratio": None},
             "b": {"method": "matryoshka('/o/train/matryoshka/pca')", "ratio": 0.75},
             "c": {"method": "retention_gate('/o/train/gate/component')", "ratio": 0.9}}
    out = ls.relabel({"cells": cells}, 32)["cells"]
    assert out["a"]["ratio"] == 0.75 and out["a"]["spec"] == cells["a"]["method"]
    assert out["b"]["method"] == "matryoshka PCA"
    assert out["c"]["method"] == "retention_gate" and out["c"]["ratio"] == 0.9


def test_bad_arguments(ls, tmp_path):
    with pytest.raises(ValueError, match="--train_fraction"):
        ls.parse_args(["--backbone", str(tmp_path), "--out", "o", "--train_fraction", "1.5"])
    with pytest.raises(ValueError, match="--num_samples"):
        ls.parse_args(["--backbone", str(tmp_path), "--out", "o", "--num_samples", "0"])
    with pytest.raises(FileNotFoundError, match="--backbone"):
        ls.parse_args(["--backbone", str(tmp_path / "nope"), "--out", "o"])


def test_time_box_stops_before_the_deadline(ls, tmp_path):
    calls = []

    def fake_train(component, model, loss_fn, batch_fn, *, steps, stop_at, log_every,
                   workdir):
        calls.append(stop_at)
        start = calls[-2] if len(calls) > 1 else 0
        # 1024 tokens per step at 1024 tokens/s: one second per step
        hist = [{"step": s, "tokens_per_s": 1024.0, "loss": 1.0}
                for s in range(start + 1, stop_at + 1)]
        return types.SimpleNamespace(step=stop_at, history=hist)

    fake = types.SimpleNamespace(train=fake_train)
    log = []
    batch_fn = lambda step: {"tokens": [[0] * 512] * 2}  # noqa: E731
    with ls.time_boxed(fake, time.perf_counter() + 25.0, 4, log):
        res = fake.train(None, None, None, batch_fn, steps=1000, log_every=1,
                         workdir=str(tmp_path))
    assert fake.train is fake_train  # restored
    assert calls[0] == 4 and 4 < res.step < 4 + 25  # ~0.9 x (25 - 5) s of 1 s steps
    assert log[0]["trained_steps"] == res.step and log[0]["tokens_per_step"] == 1024
    assert log[0]["steady_tokens_per_s"][0] == 1024.0 and len(log[0]["history"]) == res.step


def test_export_then_import_state(ls, tmp_path):
    out, dest, new = tmp_path / "out", tmp_path / "export", tmp_path / "new"
    (out / "train" / "gate" / "component").mkdir(parents=True)
    (out / "train" / "gate" / "component" / "component.json").write_text("{}")
    (out / "train" / "gate" / "checkpoints").mkdir()  # optimizer state: not exported
    (out / "train.json").write_text('{"gate": {"done": true}}')
    (out / "learned.md").write_text("# table")
    ls.export(str(out), str(dest), {"md": str(out / "learned.md")})
    assert sorted(p.name for p in dest.iterdir()) == ["learned.md", "learned_state.tar.gz"]
    ls.import_state(str(dest / "learned_state.tar.gz"), str(new))
    assert (new / "train" / "gate" / "component" / "component.json").read_text() == "{}"
    assert (new / "train.json").exists() and not (new / "train" / "gate" / "checkpoints").exists()
