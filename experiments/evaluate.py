"""Sweeps compression methods x ratios x RULER-style tasks x lengths on a model.

    python experiments/evaluate.py --config=configs/eval_ruler.py:tiny --workdir=runs/eval_tiny
    python experiments/evaluate.py --config=configs/eval_ruler.py --workdir=runs/eval_small \
        --config.model=runs/lm_small/export --config.methods='["full","snapkv","kivi2"]'

Writes WORKDIR/results.json (cell by cell: rerun with the same workdir to resume an interrupted
sweep without recomputing finished cells), WORKDIR/results.md (one markdown table per length)
and WORKDIR/accuracy.png (average accuracy vs kept fraction of cache bytes, one line per
method). See `kvjax.eval.runner` for what a cell measures.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp

import kvjax
from kvjax.eval import methods as M
from kvjax.eval import report, runner
from kvjax.eval import tasks as T
from kvjax.eval.tokenizer import load_tokenizer

ASSETS = os.path.join(os.path.dirname(os.path.abspath(kvjax.__file__)), "assets")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def model_path(spec: str) -> str:
    """A checkpoint directory from "asset:NAME" (shipped in kvjax/assets) or a path."""
    if not isinstance(spec, str) or not spec:
        raise ValueError("config.model must name a checkpoint directory or 'asset:lm_tiny'")
    path = os.path.join(ASSETS, spec[len("asset:"):]) if spec.startswith("asset:") else spec
    if not os.path.isdir(path):
        raise FileNotFoundError(f"model checkpoint directory {path} does not exist")
    return path


def expand_methods(names: list[str], table: Mapping[str, M.Factory]) -> list[str]:
    """Replaces "all" by every ratio-taking method of the table that needs no other argument."""
    out: list[str] = []
    for name in names:
        if name != "all":
            out.append(name)
            continue
        for method in sorted(table):
            if method in ("full", "identity") or not M.takes_ratio(method, table):
                continue
            try:
                M.build(method, 0.5, table)
            except (TypeError, ValueError):
                continue  # needs arguments (e.g. adakv's scorer): name it explicitly
            out.append(method)
    return list(dict.fromkeys(out))


def run(config: Mapping[str, Any], workdir: str) -> dict[str, Any]:
    """Runs (or resumes) the sweep; writes results.json/.md and accuracy.png; returns results."""
    table = M.method_table()
    methods = expand_methods(list(config["methods"]), table)
    M.check(methods, table)
    for task in config["tasks"]:
        T.check_task(task)
    path = model_path(str(config["model"]))
    tokenizer = load_tokenizer(path)
    dtype = str(config["dtype"]) or None
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"config.dtype must be one of {sorted(DTYPES)} or '', got {dtype!r}")
    model = kvjax.models.load(path, dtype=None if dtype is None else DTYPES[dtype])
    print(f"model {path}; methods: {', '.join(methods)}", flush=True)
    os.makedirs(workdir, exist_ok=True)
    results = runner.sweep(
        model, tokenizer, methods=methods, ratios=list(config["ratios"]),
        tasks=list(config["tasks"]), lengths=list(config["lengths"]),
        num_samples=int(config["num_samples"]), batch_size=int(config["batch_size"]),
        seed=int(config["seed"]), results_path=os.path.join(workdir, "results.json"),
        table=table, time_limit_s=float(config["time_limit_s"]))
    table_md = report.accuracy_table(results)
    with open(os.path.join(workdir, "results.md"), "w") as f:
        f.write(table_md)
    report.plot_accuracy(results, os.path.join(workdir, "accuracy.png"),
                         str(config["title"]) or None)
    print(table_md, flush=True)
    return results


if __name__ == "__main__":
    from kvjax import train as kvtrain

    kvtrain.run_cli(run, "evaluation config file", "results.json, results.md, accuracy.png")
