"""Learned components on lm_small in one time-boxed process: train, evaluate, report (issue 7).

    PYTHONPATH=. python experiments/learned_small.py --backbone=runs/lm_small/export \
        --out=runs/learned --budget_s=420
    PYTHONPATH=. python experiments/learned_small.py --backbone=/tmp/lms_cpu/export \
        --out=/tmp/learned_cpu --cpu_check          # the whole pipeline, small, on a CPU

Stages, with the wall-clock budget split explicitly (`--train_fraction` of it for training,
shared equally by the three components; the rest, less a reserve for the report, for the
evaluation):
1. trains the retention gates, Locret retaining heads and MatryoshkaKV projections on the frozen
   backbone with the `run(config, workdir)` of experiments/train_{gate,locret,matryoshka}.py and
   the configs of configs/train_*.py, overriding the step count, the data lengths (the eval
   length only: one compilation per component) and the budget-related settings. Each run is
   time-boxed: it trains `--probe_steps` steps, measures its step time, then continues to the
   planned step count or to the end of its time share, whichever comes first (checkpoints in
   OUT/train/NAME; a rerun with the same OUT resumes and retrains nothing already done).
   Tokens/s and wall times go to OUT/train.json.
2. evaluates on the RULER-style suite at `--length` with `kvjax.eval.runner.sweep` (results in
   OUT/eval/results.json; cells already there are skipped, so a rerun resumes): the full cache
   once; eviction at kept fractions 10% and 25% (ratios 0.9, 0.75; each method keeps
   max(1, int(length * kept)) tokens per layer and KV head: `n_kept`, kvpress's rule) for the
   retention gate, Locret, SnapKV, H2O and StreamingLLM; MatryoshkaKV at ranks 50% / 25% of
   head_dim (ratios 0.5, 0.75) vs its untrained PCA start ("matryoshka('.../pca')") and the
   per-prompt truncated SVD of keys and values of the same rank (`svd(rank=r, value_rank=r)`).
   The 10% cells run first, so a partial run holds the main comparison.
3. writes OUT/learned.json (training stats, the result cells, a summary), OUT/learned.md (the
   tables) and OUT/learned.png (accuracy vs kept fraction of cache bytes, a line per method),
   also after training and after every evaluated method (the plot at the end only).

On the device machine, where only a few flat files come back from $OUT, keep OUT outside it
and name $OUT in `--export`: it receives learned.{json,md,png} and learned_state.tar.gz (the
trained components, train.json and the finished eval cells, no optimizer checkpoints) after
every stage; a later call carries that archive back and passes `--import_state=FILE` to skip
the finished training and cells (the backbone export is git-ignored: carry it too):

    PYTHONUNBUFFERED=1 PYTHONPATH=. python3 experiments/learned_small.py \
        --backbone=runs/lm_small/export --out=/tmp/learned --export=$OUT --budget_s=420
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

COMPONENTS = ("gate", "locret", "matryoshka")
EVICT_RATIOS = (0.9, 0.75)  # kept 10%, 25%
RANK_RATIOS = (0.75, 0.5)  # ranks 25%, 50% of head_dim
BASELINES = ("snapkv", "h2o", "streaming_llm")
REPORT_RESERVE_S = 15.0  # kept back from the evaluation for tables, plot and JSON


def _load_module(path: str, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--backbone", required=True, help="exported backbone (HF-format directory)")
    p.add_argument("--out", required=True, help="output directory (rerun with it to resume)")
    p.add_argument("--budget_s", type=float, default=420.0, help="wall-clock budget, seconds")
    p.add_argument("--train_fraction", type=float, default=0.42,
                   help="share of the budget for training (all three components)")
    p.add_argument("--steps", type=int, default=None, help="planned steps per component (600)")
    p.add_argument("--probe_steps", type=int, default=None,
                   help="steps trained before the step time is measured")
    p.add_argument("--tokens_per_batch", type=int, default=None,
                   help="training tokens/step (16384)")
    p.add_argument("--length", type=int, default=None, help="eval (and training) length (4096)")
    p.add_argument("--tasks", default=None, help="comma-separated tasks, or 'all' (SUITE)")
    p.add_argument("--num_samples", type=int, default=None, help="per task (25)")
    p.add_argument("--batch_size", type=int, default=None, help="eval batch (25)")
    p.add_argument("--eval_dtype", default="", help="'' (checkpoint's), bfloat16, float32")
    p.add_argument("--skip_train", action="store_true", help="reuse OUT/train components")
    p.add_argument("--export", default="",
                   help="also copy learned.{json,md,png} and learned_state.tar.gz here after "
                        "every stage (e.g. the device's $OUT: few files, flat)")
    p.add_argument("--import_state", default="",
                   help="a learned_state.tar.gz of an earlier run: unpacked into OUT first, "
                        "so its components and finished eval cells are reused")
    p.add_argument("--cpu_check", action="store_true",
                   help="tiny settings for a CPU pipeline check (2 tasks, 2 samples, 512 tok)")
    args = p.parse_args(argv)
    defaults = {"steps": 600, "probe_steps": 20, "tokens_per_batch": 16384, "length": 4096,
                "num_samples": 25, "batch_size": 25, "tasks": "all"}
    if args.cpu_check:  # (what is given explicitly wins)
        defaults.update(steps=3, probe_steps=2, tokens_per_batch=1024, length=512,
                        num_samples=2, batch_size=2, tasks="niah_single_1,vt")
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    check_args(args)
    return args


def check_args(args: argparse.Namespace) -> None:
    """ValueError naming the first bad argument and its accepted range."""
    if not args.budget_s > 0:
        raise ValueError(f"--budget_s must be > 0, got {args.budget_s}")
    if not 0 < args.train_fraction < 1:
        raise ValueError(f"--train_fraction must be in (0, 1), got {args.train_fraction}")
    for name in ("steps", "probe_steps", "tokens_per_batch", "length", "num_samples",
                 "batch_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.length < 64:
        raise ValueError(f"--length must be >= 64, got {args.length}")
    if not os.path.isdir(args.backbone):
        raise FileNotFoundError(f"--backbone {args.backbone} is not a directory")
    if args.import_state and not os.path.isfile(args.import_state):
        raise FileNotFoundError(f"--import_state {args.import_state} is not a file")


def task_list(spec: str) -> list[str]:
    from kvjax.eval import tasks as T

    lm = _load_module(os.path.join(ROOT, "configs", "lm_small.py"), "_lm_small_cfg")
    names = list(lm.SUITE) if spec == "all" else [t.strip() for t in spec.split(",") if t]
    for t in names:
        T.check_task(t)
    return names


# --- stage 1: training -------------------------------------------------------------------------


def train_config(name: str, args: argparse.Namespace):
    """configs/train_NAME.py's defaults with this run's backbone, steps, data and budget."""
    cfg = _load_module(os.path.join(ROOT, "configs", f"train_{name}.py"), f"_cfg_{name}")
    c = cfg.get_config()
    c.backbone = os.path.abspath(args.backbone)
    c.steps = int(args.steps)
    c.warmup_steps = min(int(c.warmup_steps), max(1, args.steps // 10))
    c.checkpoint_every = max(args.probe_steps, 100)
    c.log_every = max(1, min(10, args.probe_steps // 2))
    c.data.mixture.lengths = (int(args.length),)  # one shape: one compilation
    c.data.mixture.length_weights = (1.0,)
    c.data.mixture.tokens_per_batch = max(int(args.tokens_per_batch), int(args.length))
    if name == "gate":
        c.gate.memory = max(8, args.length // 8)  # between the 10% and 25% eval budgets
    if name == "locret":
        c.locret.query_window = min(int(c.locret.query_window), args.length // 8)
    if args.cpu_check:
        c.backbone_dtype = "float32"
        tiny = {"gate": {"gate_hidden": 16, "remat": False}, "locret": {"head_hidden": 16},
                "matryoshka": {"pca_batches": 1, "remat": False}}[name]
        c[name].update(tiny)
    return c


@contextlib.contextmanager
def time_boxed(kvtrain, deadline: float, probe_steps: int, log: list[dict]) -> Iterator[None]:
    """Patches `kvtrain.train` so a run trains `probe_steps`, measures its step time, then
    stops (with a checkpoint) at its planned steps or before `deadline` (perf_counter s)."""
    orig = kvtrain.train

    def wrapped(*a, steps: int, stop_at: int | None = None, **kw):
        t0 = time.perf_counter()
        first = min(steps, _latest_step(kw.get("workdir")) + probe_steps)
        res = orig(*a, steps=steps, stop_at=first, **kw)
        histories = list(res.history)
        steady = list(res.history[1:])  # a call's first logged interval holds its compile
        step_s = None
        batch_fn = a[3] if len(a) > 3 else kw["batch_fn"]
        tokens = _tokens_per_step(batch_fn)
        if steady and res.step < steps:
            step_s = tokens / max(steady[-1]["tokens_per_s"], 1e-9)
            left = deadline - time.perf_counter() - 5.0  # checkpoint + component save
            stop = min(steps, res.step + max(0, int(0.9 * left / max(step_s, 1e-6))))
            if stop > res.step:
                res = orig(*a, steps=steps, stop_at=stop, **kw)
                histories += list(res.history)
                steady += list(res.history[1:])
        log.append({"planned_steps": steps, "trained_steps": res.step,
                    "wall_s": time.perf_counter() - t0, "steady_step_s": step_s,
                    "tokens_per_step": tokens, "history": histories,
                    "steady_tokens_per_s": [r["tokens_per_s"] for r in steady]})
        return res

    kvtrain.train = wrapped
    try:
        yield
    finally:
        kvtrain.train = orig


def _latest_step(workdir: str | None) -> int:
    """The newest checkpointed step in WORKDIR/checkpoints (0 if none)."""
    ckpt = os.path.join(workdir or "", "checkpoints")
    steps = [int(d) for d in os.listdir(ckpt) if d.isdigit()] if os.path.isdir(ckpt) else []
    return max(steps, default=0)


def _tokens_per_step(batch_fn: Callable[[int], dict]) -> int:
    import numpy as np

    return int(np.prod(np.shape(batch_fn(0)["tokens"])))


def train_all(args: argparse.Namespace, out: str, deadline: float, errors: dict[str, str]
              ) -> dict[str, Any]:
    """Trains (or resumes) every component within its share; returns {name: stats}. A
    component that fails is recorded in `errors` and skipped."""
    from kvjax import train as kvtrain

    stats_path = os.path.join(out, "train.json")
    stats: dict[str, Any] = {}
    if os.path.exists(stats_path):
        with open(stats_path) as f:
            stats = json.load(f)
    for i, name in enumerate(COMPONENTS):
        workdir = os.path.join(out, "train", name)
        if args.skip_train:
            continue
        if stats.get(name, {}).get("done"):
            print(f"[train] {name}: done in an earlier run, skipped", flush=True)
            continue
        if (os.path.exists(os.path.join(workdir, "component", "component.json"))
                and not os.path.isdir(os.path.join(workdir, "checkpoints"))):
            print(f"[train] {name}: imported component (no checkpoints to resume), kept",
                  flush=True)
            continue
        start = time.perf_counter()
        share = (deadline - start) / (len(COMPONENTS) - i)
        config = train_config(name, args)
        module = _load_module(os.path.join(ROOT, "experiments", f"train_{name}.py"),
                              f"_train_{name}")
        log: list[dict] = []
        print(f"[train] {name}: {args.steps} planned steps, {share:.0f} s share", flush=True)
        try:
            with time_boxed(kvtrain, start + share, args.probe_steps, log):
                result = module.run(config, workdir)
        except Exception as e:  # noqa: BLE001 - the other components and the eval go on
            errors[f"train {name}"] = f"{type(e).__name__}: {e}"[:2000]
            print(f"[train] {name} failed: {errors[f'train {name}']}", flush=True)
            continue
        wall = time.perf_counter() - start
        rows = log[-1]["history"] if log else []
        tps = log[-1]["steady_tokens_per_s"] if log else []
        stat = {"workdir": workdir, "component": result["component"],
                "trained_steps": int(result["step"]), "planned_steps": int(args.steps),
                "tokens_per_step": log[-1]["tokens_per_step"] if log else 0,
                "wall_s": wall, "steady_step_s": log[-1]["steady_step_s"] if log else None,
                "tokens_per_s": sorted(tps)[len(tps) // 2] if tps else None,  # median
                "tokens_per_s_last": tps[-1] if tps else None,
                "first_loss": rows[0]["loss"] if rows else None,
                "last_loss": rows[-1]["loss"] if rows else None,
                "done": int(result["step"]) >= int(args.steps)}
        stat["tokens_per_s_incl_compile"] = (stat["tokens_per_step"] * stat["trained_steps"]
                                             / max(wall, 1e-9))
        stats[name] = stat
        _write_json(stats_path, stats)
        print(f"[train] {name}: step {stat['trained_steps']}/{args.steps} in {wall:.1f} s, "
              f"steady {stat['tokens_per_s'] or 0:.3g} tokens/s, loss {stat['first_loss']} -> "
              f"{stat['last_loss']}", flush=True)
    return stats


# --- stage 2: evaluation -----------------------------------------------------------------------


def locret_stabilizers(length: int) -> int:
    """Recent tokens Locret always keeps: SnapKV's window (64), below half the 10% budget."""
    from kvjax.compress.scorer import n_kept

    return max(0, min(64, n_kept(length, max(EVICT_RATIOS)) // 2))


def baselines(length: int) -> list[str]:
    """SnapKV, H2O, StreamingLLM; SnapKV's window (64) shrinks to fit a short prompt's budget."""
    window = locret_stabilizers(length)
    return [b if b != "snapkv" or window >= 64 else f"snapkv(window={max(1, window)})"
            for b in BASELINES]


def eval_plan(length: int, head_dim: int) -> list[tuple[list[str], list[float]]]:
    """[(methods, ratios)] sweeps in priority order (10% / rank 25% first). Component paths
    are relative to OUT (the eval runs there), so cell keys do not depend on where OUT is."""
    comp = {n: os.path.join("train", n) for n in COMPONENTS}
    evict = [f"retention_gate({os.path.join(comp['gate'], 'component')!r})",
             f"locret({os.path.join(comp['locret'], 'component')!r}, "
             f"stabilizers={locret_stabilizers(length)})", *baselines(length)]
    lowrank = [f"matryoshka({os.path.join(comp['matryoshka'], 'component')!r})",
               f"matryoshka({os.path.join(comp['matryoshka'], 'pca')!r})"]
    plan: list[tuple[list[str], list[float]]] = [(["full"], [0.0])]
    for ev, lr in zip(EVICT_RATIOS, RANK_RATIOS):
        r = max(1, int(head_dim * (1 - lr)))  # matryoshka's rank at this ratio
        plan.append((evict, [ev]))
        plan.append((lowrank + [f"svd(rank={r}, value_rank={r})"], [lr]))
    return plan


def evaluate(args: argparse.Namespace, out: str, deadline: float, tasks: list[str],
             errors: dict[str, str], progress: Callable[[dict], None] = lambda r: None
             ) -> dict[str, Any]:
    """Runs (or resumes) the sweeps of `eval_plan` until `deadline`, one method at a time (a
    failing method is recorded in `errors` and the others go on; `progress(results)` after
    each); returns the results."""
    import jax.numpy as jnp

    import kvjax
    from kvjax.eval import methods as M
    from kvjax.eval.tokenizer import load_tokenizer

    dtypes = {"": None, "bfloat16": jnp.bfloat16, "float32": jnp.float32}
    if args.eval_dtype not in dtypes:
        raise ValueError(f"--eval_dtype must be one of {sorted(dtypes)}, got {args.eval_dtype!r}")
    model = kvjax.models.load(args.backbone, dtype=dtypes[args.eval_dtype])
    tokenizer = load_tokenizer(args.backbone)
    path = os.path.join(out, "eval", "results.json")
    table = M.method_table()
    with contextlib.chdir(out):
        return _run_plan(args, model, tokenizer, path, tasks, table, deadline, errors,
                         progress)


def _run_plan(args: argparse.Namespace, model: Any, tokenizer: Any, path: str,
              tasks: list[str], table: Any, deadline: float, errors: dict[str, str],
              progress: Callable[[dict], None]) -> dict[str, Any]:
    """`evaluate`'s loop (run inside OUT): one `runner.sweep` per method of `eval_plan`."""
    from kvjax.eval import runner

    results: dict[str, Any] = {"cells": {}}
    for methods, ratios in eval_plan(args.length, model.config.head_dim):
        for method in methods:
            left = deadline - time.perf_counter()
            if left <= 0:
                print("[eval] time budget spent; rerun with the same --out to continue",
                      flush=True)
                return _read_results(path, results)
            if not _component_ready(method):
                continue
            try:
                results = runner.sweep(
                    model, tokenizer, methods=[method], ratios=ratios, tasks=tasks,
                    lengths=[args.length], num_samples=args.num_samples,
                    batch_size=args.batch_size, results_path=path, table=table,
                    progress=False, time_limit_s=max(left, 1e-3))
            except Exception as e:  # noqa: BLE001 - keep the other methods' results
                errors[f"eval {method} {ratios}"] = f"{type(e).__name__}: {e}"[:2000]
                print(f"[eval] {method} failed: {errors[f'eval {method} {ratios}']}",
                      flush=True)
            progress(_read_results(path, results))
    return _read_results(path, results)


def _read_results(path: str, default: dict[str, Any]) -> dict[str, Any]:
    if not os.path.exists(path):
        return default
    with open(path) as f:
        return json.load(f)


def _component_ready(method: str) -> bool:
    """False for a learned method whose saved component is missing (training not done)."""
    if "('" not in method:
        return True
    comp = method.split("('", 1)[1].split("'", 1)[0]
    if os.path.exists(os.path.join(comp, "component.json")):
        return True
    print(f"[eval] skipping {method}: no saved component", flush=True)
    return False


# --- stage 3: report ---------------------------------------------------------------------------


def short_name(method: str) -> str:
    """Plot/table label: the method without its component path."""
    for name, label in (("retention_gate(", "retention_gate"), ("locret(", "locret"),
                        ("/component'", "matryoshka (trained)"), ("/pca'", "matryoshka PCA")):
        if name in method:
            return label
    if method.startswith("svd("):
        return "svd (per-prompt)"
    return method


def relabel(results: dict[str, Any], head_dim: int) -> dict[str, Any]:
    """Cells with short method labels (full name in "spec"); fixed-rank `svd(rank=r, ...)`
    cells get ratio 1 - r / head_dim (matryoshka's ratio of the same rank), so its ranks form
    one line and one table row each."""
    cells = {}
    for key, cell in results["cells"].items():
        ratio = cell["ratio"]
        if cell["method"].startswith("svd(rank=") and ratio is None:
            rank = int(cell["method"][len("svd(rank="):].split(",")[0].split(")")[0])
            ratio = round(1.0 - rank / head_dim, 4)
        cells[key] = dict(cell, method=short_name(cell["method"]), spec=cell["method"],
                          ratio=ratio)
    return {"cells": cells}


def write_report(out: str, stats: dict[str, Any], results: dict[str, Any],
                 args: argparse.Namespace, timings: dict[str, float],
                 errors: dict[str, str] | None = None, plot: bool = True, echo: bool = True
                 ) -> dict[str, str]:
    """Writes OUT/learned.md (tables), OUT/learned.json and, with `plot`, OUT/learned.png;
    returns their paths."""
    from kvjax.eval import report
    from kvjax.models import load_config

    labelled = relabel(results, load_config(args.backbone).head_dim)
    lines = ["# Learned components on lm_small", "",
             f"backbone `{args.backbone}`, length {args.length}, {args.num_samples} samples per "
             f"task; stage wall times (s): " + ", ".join(f"{k} {v:.0f}"
                                                         for k, v in timings.items()), ""]
    if stats:
        lines += ["## Training", "",
                  "| component | steps | wall s | tokens/step | tokens/s (steady) | "
                  "tokens/s (incl. compile) | loss first -> last |",
                  "|---|---:|---:|---:|---:|---:|---|"]
        for name, s in stats.items():
            lines.append(
                f"| {name} | {s['trained_steps']}/{s['planned_steps']} | {s['wall_s']:.1f} | "
                f"{s['tokens_per_step']} | {_fmt(s.get('tokens_per_s'))} | "
                f"{_fmt(s.get('tokens_per_s_incl_compile'))} | "
                f"{_fmt(s.get('first_loss'))} -> {_fmt(s.get('last_loss'))} |")
        lines.append("")
    paths = {"json": os.path.join(out, "learned.json"), "md": os.path.join(out, "learned.md"),
             "png": os.path.join(out, "learned.png")}
    if not plot or not labelled["cells"]:
        paths.pop("png")
    if labelled["cells"]:
        lines += ["## Accuracy", "", report.accuracy_table(labelled)]
    if "png" in paths:
        try:
            report.plot_accuracy(labelled, paths["png"],
                                 f"lm_small, {args.length} tokens: learned vs training-free")
        except ImportError as e:  # matplotlib missing: tables and JSON still written
            print(f"[report] no plot: {e}", flush=True)
            paths.pop("png")
    if errors:
        lines += ["## Errors", ""] + [f"- {k}: `{v.splitlines()[0][:300]}`"
                                      for k, v in errors.items()] + [""]
    with open(paths["md"], "w") as f:
        f.write("\n".join(lines) + "\n")
    summary = report.summary(labelled) if labelled["cells"] else []
    _write_json(paths["json"], {"args": vars(args), "timings_s": timings, "train": stats,
                                "errors": errors or {},
                                "summary": summary, "cells": labelled["cells"]})
    if echo:
        print("\n".join(lines), flush=True)
    return paths


STATE_MEMBERS = ("train.json", "eval/results.json", "train/gate/component",
                 "train/locret/component", "train/matryoshka/component",
                 "train/matryoshka/pca", "train/gate/metrics.jsonl",
                 "train/locret/metrics.jsonl", "train/matryoshka/metrics.jsonl")


def export(out: str, dest: str, paths: dict[str, str]) -> None:
    """Copies the report files and a learned_state.tar.gz (trained components without
    optimizer checkpoints, train.json, eval results: what `--import_state` takes) to `dest`."""
    import shutil
    import tarfile

    os.makedirs(dest, exist_ok=True)
    for p in paths.values():
        if os.path.abspath(os.path.dirname(p)) != os.path.abspath(dest):
            shutil.copy(p, dest)
    tmp = os.path.join(dest, "learned_state.tar.gz.tmp")
    with tarfile.open(tmp, "w:gz") as tar:
        for member in STATE_MEMBERS:
            if os.path.exists(os.path.join(out, member)):
                tar.add(os.path.join(out, member), arcname=member)
    os.replace(tmp, os.path.join(dest, "learned_state.tar.gz"))


def import_state(archive: str, out: str) -> None:
    """Unpacks a learned_state.tar.gz into `out` (only the members `export` writes)."""
    import tarfile

    with tarfile.open(archive) as tar:
        members = [m for m in tar.getmembers()
                   if any(m.name == s or m.name.startswith(s + "/") for s in STATE_MEMBERS)
                   and not m.issym() and not m.islnk()]
        tar.extractall(out, members=members, filter="data")
    print(f"[setup] imported {len(members)} entries of {archive}", flush=True)


def _fmt(x: Any) -> str:
    return "-" if x is None else f"{x:.4g}"


def _write_json(path: str, obj: Any) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(path + ".tmp", path)


def main(argv: Sequence[str] | None = None) -> dict[str, str]:
    t0 = time.perf_counter()
    args = parse_args(argv)
    args.backbone = os.path.abspath(args.backbone)
    end = t0 + args.budget_s
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    import logging

    logging.getLogger("absl").setLevel(logging.WARNING)  # orbax logs every file at INFO
    tasks = task_list(args.tasks)
    import jax

    print(f"[setup] devices {jax.devices()}; budget {args.budget_s:.0f} s", flush=True)
    if args.import_state:
        import_state(args.import_state, out)
    timings: dict[str, float] = {}
    train_deadline = t0 + args.train_fraction * args.budget_s
    errors: dict[str, str] = {}
    stats = train_all(args, out, train_deadline, errors)
    timings["train"] = time.perf_counter() - t0
    t1 = time.perf_counter()

    def report_now(results: dict[str, Any], plot: bool = False) -> dict[str, str]:
        timings["eval"] = time.perf_counter() - t1
        timings["total"] = time.perf_counter() - t0
        paths = write_report(out, stats, results, args, timings, errors, plot=plot,
                             echo=plot)
        if args.export:
            export(out, args.export, paths)
        return paths

    report_now({"cells": {}})  # training stats out before the evaluation starts
    results = evaluate(args, out, end - REPORT_RESERVE_S, tasks, errors, report_now)
    paths = report_now(results, plot=True)
    print(f"[done] {timings['total']:.0f} s; wrote {', '.join(paths.values())}", flush=True)
    return paths


if __name__ == "__main__":
    main()
