"""Evaluation runner: methods x compression ratios x tasks x lengths, batched and jit-compiled.

    results = sweep(model, tokenizer, methods=["full", "snapkv"], ratios=[0.25, 0.5],
                    tasks=["niah_single_1"], lengths=[512], num_samples=20, batch_size=8,
                    results_path="out/results.json")

Every cell (method, ratio, task, length) generates `num_samples` prompts (seeded per task and
length, so every method sees the same prompts), left-pads them to `length` tokens, runs
`kvjax.generate` greedily (one jit per method, ratio and length: prompt shapes and the decode
budget are fixed per length) and scores the decoded text with the task's metric. Cells are
written to `results_path` as they finish; rerunning skips finished cells (an interrupted sweep
resumes where it stopped). A method whose name takes no ratio (e.g. `kivi2`) runs once per
task and length (ratio recorded as None).

`kept_fraction` of a cell is measured, not assumed: the true bytes of the compressed cache after
prefill (`kvjax.cache.nbytes`, which depends on shapes only) over those of the full cache.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np

import kvjax
from kvjax.compress.base import Compressor
from kvjax.eval import methods as M
from kvjax.eval import tasks as T
from kvjax.eval.tokenizer import Tokenizer


def encode_prompts(samples: Sequence[T.Sample], tokenizer: Tokenizer, length: int
                   ) -> tuple[np.ndarray, np.ndarray]:
    """int32[B, length] left-padded prompt ids (BOS first when the tokenizer has one) and
    int32[B] lengths. Raises ValueError if a prompt exceeds `length` tokens."""
    bos = [] if tokenizer.bos_id is None else [tokenizer.bos_id]
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    out = np.full((len(samples), length), pad, np.int32)
    lengths = np.zeros((len(samples),), np.int32)
    for i, s in enumerate(samples):
        ids = bos + tokenizer.encode(s.prompt)
        if len(ids) > length:
            raise ValueError(f"prompt of task {s.task!r} has {len(ids)} tokens, more than the "
                             f"length {length}")
        out[i, length - len(ids):] = ids
        lengths[i] = len(ids)
    return out, lengths


def decode_answer(tokenizer: Tokenizer, ids: Sequence[int]) -> str:
    """Text of generated ids up to the first end-of-sequence token."""
    ids = [int(i) for i in ids]
    if tokenizer.eos_id is not None and tokenizer.eos_id in ids:
        ids = ids[:ids.index(tokenizer.eos_id)]
    return tokenizer.decode(ids)


def predict(model: Any, tokenizer: Tokenizer, samples: Sequence[T.Sample], length: int,
            compressor: Compressor | None, max_new_tokens: int, batch_size: int,
            mesh: Any = None) -> list[str]:
    """Greedy continuations of `samples` (batches of `batch_size`, the last one padded by
    repeating its final sample so shapes, hence compilations, stay fixed). With a `mesh`
    (`kvjax.sharding.make_mesh`), batches split over "data" and heads over "model"."""
    preds: list[str] = []
    eos = -1 if tokenizer.eos_id is None else tokenizer.eos_id
    for start in range(0, len(samples), batch_size):
        chunk = list(samples[start:start + batch_size])
        real = len(chunk)
        chunk += [chunk[-1]] * (batch_size - real)
        tokens, lengths = encode_prompts(chunk, tokenizer, length)
        out = kvjax.generate(model, tokens, max_new_tokens, compressor, lengths=lengths,
                             eos_id=eos, pad_id=eos if eos >= 0 else 0, mesh=mesh)
        new = np.asarray(jax.device_get(out))[:, length:]
        preds += [decode_answer(tokenizer, row) for row in new[:real]]
    return preds


def kept_fraction(model: Any, tokenizer: Tokenizer, samples: Sequence[T.Sample], length: int,
                  compressor: Compressor) -> float:
    """nbytes(compressed cache) / nbytes(full cache) after prefilling `samples`.

    Cache bytes depend only on shapes (static capacities), so this traces prefill with
    `jax.eval_shape` and compiles nothing.
    """
    tokens, lengths = encode_prompts(samples, tokenizer, length)

    def cache_bytes(comp: Compressor | None) -> int:
        shapes = jax.eval_shape(lambda: kvjax.prefill(model, tokens, comp, lengths=lengths)[0])
        return kvjax.cache.nbytes(shapes)

    return float(cache_bytes(compressor)) / float(cache_bytes(None))


def max_new_tokens(samples: Sequence[T.Sample], tokenizer: Tokenizer, extra: int = 8) -> int:
    """Decode budget covering every sample's target, rounded up to a multiple of 8."""
    need = max(len(tokenizer.encode(s.target)) for s in samples) + extra
    return -(-need // 8) * 8


def cell_key(method: str, ratio: float | None, task: str, length: int) -> str:
    return f"{method}|{'-' if ratio is None else repr(float(ratio))}|{task}|{length}"


def _load(path: str | None) -> dict[str, Any]:
    if path and os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    return {"cells": {}}


def _save(path: str | None, results: Mapping[str, Any]) -> None:
    if not path:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(results, f, indent=1)
    os.replace(tmp, path)


def _check_positive(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def _check_ratios(ratios: Sequence[float]) -> list[float]:
    out = []
    for r in ratios:
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0 <= r < 1:
            raise ValueError(f"ratios must be floats in [0, 1), got {list(ratios)}")
        out.append(float(r))
    return out


def sweep(model: Any, tokenizer: Tokenizer, *, methods: Sequence[str], ratios: Sequence[float],
          tasks: Sequence[str], lengths: Sequence[int], num_samples: int, batch_size: int,
          seed: int = 0, results_path: str | None = None,
          table: Mapping[str, M.Factory] | None = None, progress: bool = True,
          log: Callable[[str], None] | None = print, time_limit_s: float = 0.0,
          mesh: Any = None) -> dict[str, Any]:
    """Runs every missing cell and returns {"cells": {key: cell}} (see module doc).

    Cells run length by length, method by method (all ratios and tasks of a method before the
    next). time_limit_s > 0: start no new cell after that many seconds (rerun to continue).
    mesh: optional device mesh; params are sharded once and every batch runs sharded (the
    mesh's "data" size must divide batch_size).

    A cell: {"method", "ratio", "task", "length", "score" (mean in [0, 1]), "n",
    "kept_fraction", "seconds", "examples" (the first two predictions with their answers)}.
    Names are checked before any model work: unknown methods or tasks raise ValueError listing
    the known ones.
    """
    from tqdm.auto import tqdm

    table = M.method_table() if table is None else table
    M.check(list(methods), table)
    for t in tasks:
        T.check_task(t)
    ratios = _check_ratios(ratios)
    num_samples = _check_positive("num_samples", num_samples)
    batch_size = _check_positive("batch_size", batch_size)
    lengths = [_check_positive("lengths", n) for n in lengths]
    if mesh is not None:
        kvjax.sharding.check_mesh(mesh, model.config, batch_size)
        model = kvjax.sharding.shard_params(model, mesh)
    results = _load(results_path)
    plan = []
    for length in lengths:
        for method in methods:
            for ratio in (ratios if M.takes_ratio(method, table) else [None]):
                for task in tasks:
                    key = cell_key(method, ratio, task, length)
                    if key not in results["cells"]:
                        plan.append((key, method, ratio, task, length))
    samples_cache: dict[tuple[str, int], list[T.Sample]] = {}

    def samples_for(task: str, length: int) -> list[T.Sample]:
        if (task, length) not in samples_cache:
            samples_cache[(task, length)] = T.make_samples(task, num_samples, length, tokenizer,
                                                           seed)
        return samples_cache[(task, length)]

    budgets: dict[int, int] = {}
    kept: dict[tuple[str, Any, int], float] = {}
    bar = tqdm(plan, desc="eval", leave=False, **({} if progress else {"disable": True}))
    started = time.perf_counter()
    for i, (key, method, ratio, task, length) in enumerate(bar):
        if time_limit_s and time.perf_counter() - started > time_limit_s:
            if log is not None:
                log(f"time limit {time_limit_s:.0f} s reached: {len(plan) - i} cells left "
                    "for a rerun")
            break
        bar.set_postfix_str(key)
        if length not in budgets:
            budgets[length] = max(max_new_tokens(samples_for(t, length), tokenizer)
                                  for t in tasks)
        comp = M.build(method, ratio, table)
        samples = samples_for(task, length)
        start = time.perf_counter()
        if (method, ratio, length) not in kept:
            kept[(method, ratio, length)] = kept_fraction(
                model, tokenizer, samples[:batch_size], length, comp)
        preds = predict(model, tokenizer, samples, length, comp, budgets[length], batch_size,
                        mesh)
        scores = [T.score(s, p) for s, p in zip(samples, preds)]
        cell = {"method": method, "ratio": ratio, "task": task, "length": length,
                "score": float(np.mean(scores)), "n": len(scores),
                "kept_fraction": kept[(method, ratio, length)],
                "seconds": time.perf_counter() - start,
                "examples": [{"prediction": p, "answers": list(s.answers)}
                             for s, p in zip(samples[:2], preds[:2])]}
        results["cells"][key] = cell
        _save(results_path, results)
        if log is not None:
            r = "-" if ratio is None else f"{ratio:g}"
            log(f"{method:>24s} ratio {r:>4s} {task:>16s} @{length}: "
                f"{100 * cell['score']:5.1f}% (kept {cell['kept_fraction']:.2f}, "
                f"{cell['seconds']:.1f} s)")
    bar.close()
    return results


def full_cache_accuracy(model: Any, tokenizer: Tokenizer, tasks: Sequence[str],
                        lengths: Sequence[int], num_samples: int, batch_size: int, seed: int = 0,
                        results_path: str | None = None, progress: bool = True
                        ) -> dict[str, Any]:
    """`sweep` with the full cache only."""
    return sweep(model, tokenizer, methods=["full"], ratios=[0.0], tasks=tasks, lengths=lengths,
                 num_samples=num_samples, batch_size=batch_size, seed=seed,
                 results_path=results_path, progress=progress,
                 table={"full": kvjax.compress.identity})
