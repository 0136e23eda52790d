"""One optax training loop for learned cache components on a frozen backbone.

    component = kvjax.learned.retention_gate.init(model, ...)       # an nnx.Module
    result = kvjax.train.train(component, model, loss_fn, batch_fn, steps=1000,
                               optimizer=kvjax.train.optimizer(lr=1e-3), workdir="runs/gate")

* Only the component's `nnx.Param`s are trained: the component is split into (graphdef, params,
  rest) and gradients are taken with respect to `params` alone. The backbone is a plain jit
  argument that is never differentiated or updated, so it stays bit-identical; load it in
  bfloat16 (`load_backbone(spec, "bfloat16")`) while the component stays float32.
* `loss_fn(component, backbone, batch, rng) -> (loss, metrics)`; `batch_fn(step) -> batch` is a
  pure function of the step (and the data seed it closes over), its leaves having a leading
  gradient-accumulation axis [A, ...]. One optimizer update per step averages the gradients of
  the A micro-batches (`lax.scan`).
* Checkpoints (orbax, `workdir/checkpoints/<step>`) hold params, the component's other
  (fixed) variables, optimizer state, step and the PRNG key; the data position is the step.
  Re-running with the same workdir resumes and gives bit-identical parameters to an
  uninterrupted run (tests check this). A checkpoint written for
  another backbone or component configuration is refused with a ValueError.
* Metrics go to stdout, `workdir/metrics.jsonl` and `workdir/metrics.csv`, with a tqdm bar.

Trained components are saved with `save_component` (orbax arrays + `component.json` with the
method name, its constructor config and the backbone's shape signature) and loaded with
`load_component`, which refuses a checkpoint made for another backbone shape.
"""

from __future__ import annotations

import csv
import functools
import importlib
import json
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

Array = jax.Array
Batch = Any
LossFn = Callable[[nnx.Module, nnx.Module, Batch, Array], tuple[Array, dict[str, Array]]]

SCHEDULES = ("constant", "cosine", "linear")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")


# --- configuration -------------------------------------------------------------------------


def check_config_keys(config: Mapping[str, Any], reference: Mapping[str, Any],
                      where: str = "config") -> None:
    """Raises ValueError naming any key of `config` that `reference` (the defaults) lacks.

    An empty mapping in `reference` is an opaque section (e.g. `data.mixture`, checked by its
    own consumer): any keys are accepted there.
    """
    if hasattr(reference, "keys") and not list(reference.keys()):
        return
    for key in config.keys():
        if key not in reference:
            known = ", ".join(sorted(reference.keys()))
            raise ValueError(f"unknown config key {where}.{key}; known keys: {known}")
        value, ref = config[key], reference[key]
        if hasattr(value, "keys") and hasattr(ref, "keys"):
            check_config_keys(value, ref, f"{where}.{key}")


def _load_config_file(spec: str):
    """`get_config(arg)` of a config file spec "path.py[:arg]"."""
    import importlib.util

    path, _, arg = spec.partition(":")
    if not os.path.exists(path):
        raise FileNotFoundError(f"config file {path} does not exist")
    module_spec = importlib.util.spec_from_file_location("_kvjax_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()


def flags_parser(argv: Sequence[str]) -> list[str]:
    """absl `flags_parser` that reports unknown `--config.KEY=...` overrides clearly.

    ml_collections raises a bare AttributeError for an override of a key the config lacks; this
    loads the config file named by `--config=FILE[:ARG]` first, checks every overridden key path
    against it, and exits with a message listing the known keys.
    """
    from absl import flags

    argv = list(argv)
    spec = None
    for i, a in enumerate(argv[1:], start=1):
        if a.startswith("--config="):
            spec = a[len("--config="):]
        elif a == "--config" and i + 1 < len(argv):
            spec = argv[i + 1]
    overrides = [a for a in argv[1:] if a.startswith("--config.")]
    if spec is not None and overrides:
        try:
            config = _load_config_file(spec)
        except FileNotFoundError as e:
            sys.exit(f"error: {e}")
        for arg in overrides:
            path = arg[len("--config."):].split("=", 1)[0]
            node = config
            for i, part in enumerate(path.split(".")):
                if not hasattr(node, "keys") or part not in node.keys():
                    where = ".".join(["config"] + path.split(".")[:i])
                    known = ", ".join(sorted(node.keys())) if hasattr(node, "keys") else "none"
                    sys.exit(f"error: unknown config key --config.{path} (no {part!r} in "
                             f"{where}); known keys of {where}: {known}")
                node = node[part]
    return flags.FLAGS(argv)


def run_cli(run: Callable[[Any, str], Any], config_help: str, workdir_help: str) -> None:
    """The training scripts' command line: `--config=FILE[:ARG] --workdir=DIR [--config.K=V]`.

    Defines the two absl flags (workdir required), checks overrides with `flags_parser`, quiets
    orbax's INFO logging and calls `run(config, workdir)`.
    """
    from absl import app, flags, logging
    from ml_collections import config_flags

    config = config_flags.DEFINE_config_file("config", None, config_help)
    workdir = flags.DEFINE_string("workdir", None, workdir_help)
    flags.mark_flag_as_required("workdir")

    def main(argv):
        del argv
        logging.set_verbosity(logging.WARNING)  # orbax logs every file it writes at INFO
        run(config.value, workdir.value)

    app.run(main, flags_parser=flags_parser)


def check_int(name: str, value: Any, low: int, high: int | None = None) -> int:
    """`value` as an int in [low, high], else ValueError naming `name` and the range."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an int, got {value!r}")
    if value < low or (high is not None and value > high):
        hi = "inf)" if high is None else f"{high}]"
        raise ValueError(f"{name} must be in [{low}, {hi}, got {value}")
    return int(value)


def check_float(name: str, value: Any, low: float, high: float | None = None,
                low_open: bool = False) -> float:
    """`value` as a float in [low, high] (or (low, high]), else ValueError."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    value = float(value)
    bad_low = value <= low if low_open else value < low
    if bad_low or (high is not None and value > high):
        lo = f"({low}" if low_open else f"[{low}"
        hi = "inf)" if high is None else f"{high}]"
        raise ValueError(f"{name} must be in {lo}, {hi}, got {value}")
    return value


# --- backbone --------------------------------------------------------------------------------


def tiny_backbone_spec() -> str:
    """The `:tiny` backbone: the shipped `kvjax/assets/lm_tiny` if present, else a random one."""
    if os.path.exists(os.path.join(ASSETS, "lm_tiny", "config.json")):
        return "asset:lm_tiny"
    return "random:tiny"


def load_backbone(spec: str, dtype: str = "bfloat16", seed: int = 0):
    """A frozen kvjax Llama from a spec string.

    spec: an HF-format checkpoint directory; "asset:NAME" (a checkpoint shipped in
      `kvjax/assets/NAME`); or "random:tiny" (`LlamaConfig.tiny()`, random weights from `seed`).
    dtype: parameter/compute dtype, one of DTYPES (default bfloat16: frozen backbones train in
      bf16 while components stay float32).
    """
    from kvjax.models import Llama, LlamaConfig, load

    if dtype not in DTYPES:
        raise ValueError(f"backbone dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if not isinstance(spec, str) or not spec:
        raise ValueError(
            "config.backbone must name the frozen model: an HF checkpoint directory (e.g. the "
            "trained lm_small), 'asset:lm_tiny' or 'random:tiny'"
        )
    if spec == "random:tiny":
        return Llama(LlamaConfig.tiny(), rngs=nnx.Rngs(seed), dtype=DTYPES[dtype])
    if spec.startswith("random:"):
        raise ValueError(f"unknown random backbone {spec!r}; supported: 'random:tiny'")
    path = os.path.join(ASSETS, spec[len("asset:"):]) if spec.startswith("asset:") else spec
    if not os.path.isdir(path):
        raise FileNotFoundError(f"backbone checkpoint directory {path} does not exist")
    return load(path, dtype=DTYPES[dtype])


def backbone_signature(model) -> dict[str, Any]:
    """The backbone shape a component depends on (stored with checkpoints, checked on load)."""
    c = model.config
    return {
        "model_type": c.model_type,
        "num_hidden_layers": c.num_hidden_layers,
        "hidden_size": c.hidden_size,
        "num_attention_heads": c.num_attention_heads,
        "num_key_value_heads": c.num_key_value_heads,
        "head_dim": c.head_dim,
        "vocab_size": c.vocab_size,
    }


def check_signature(found: Mapping[str, Any], expected: Mapping[str, Any], what: str) -> None:
    """ValueError listing the fields where two backbone signatures differ."""
    diff = {k: (found.get(k), expected.get(k)) for k in set(found) | set(expected)
            if found.get(k) != expected.get(k)}
    if diff:
        detail = ", ".join(f"{k}: {a} (checkpoint) vs {b} (backbone)" for k, (a, b) in
                           sorted(diff.items()))
        raise ValueError(f"{what} was made for another backbone shape: {detail}")


# --- data ------------------------------------------------------------------------------------


def recall_tokens(seed: int, step: int, shape: tuple[int, ...], seq_len: int, vocab: int,
                  num_pairs: int = 4, key_len: int = 2, value_len: int = 2) -> np.ndarray:
    """int32[*shape, seq_len] synthetic needle/recall sequences, a pure function of (seed, step).

    Each row is random filler with `num_pairs` key/value spans (key_len + value_len tokens)
    inserted at random places in the first part; the row ends with one of the keys followed by
    its value, so predicting the end needs attention far back (a RULER-style needle task).
    """
    rng = np.random.default_rng([seed, step])
    rows = int(np.prod(shape))
    span = key_len + value_len
    if seq_len < (num_pairs + 1) * span + 1:
        raise ValueError(f"seq_len {seq_len} is too short for {num_pairs} pairs of {span} tokens")
    out = rng.integers(0, vocab, (rows, seq_len), dtype=np.int64)
    body = seq_len - span
    for r in range(rows):
        pairs = rng.integers(0, vocab, (num_pairs, span))
        slots = rng.choice(body // span, num_pairs, replace=False)
        for p, s in zip(pairs, slots):
            out[r, s * span:(s + 1) * span] = p
        out[r, body:] = pairs[rng.integers(num_pairs)]
    return out.reshape(shape + (seq_len,)).astype(np.int32)


def make_batch_fn(data: Mapping[str, Any], vocab: int, grad_accum: int) -> Callable[[int], dict]:
    """`step -> {"tokens": int32[grad_accum, batch, length]}` from a data config.

    data.source:
      "recall": the synthetic needle task above (batch_size x seq_len, any vocabulary);
      "mixture": the RULER-style task + filler mixture the project's language models are
        trained on (`kvjax.eval.mixture.lm_batch(data.mixture, step)`, byte tokenizer; the
        length bucket and row count come from `data.mixture`; grad_accum must be 1);
      "python:MODULE:FUNCTION": `fn(seed, step, batch_size, seq_len) -> int[batch_size,
        seq_len]`.
    Batches depend only on (seed, step).
    """
    source = data["source"]
    if source == "mixture":
        from kvjax.eval import mixture

        mix = json.loads(json.dumps(_plain(data["mixture"])))
        mixture.check_data(mix)
        if grad_accum != 1:
            raise ValueError("grad_accum must be 1 with data.source='mixture' (batch size and "
                             "length come from data.mixture.tokens_per_batch / lengths)")

        def batch_fn(step: int) -> dict:
            toks = mixture.lm_batch(mix, step)["tokens"]
            if toks.max() >= vocab:
                raise ValueError(f"data.mixture token ids reach {toks.max()}, but the backbone "
                                 f"vocabulary has {vocab} ids (not a byte-level model?)")
            return {"tokens": toks}
        return batch_fn
    batch_size = check_int("data.batch_size", data["batch_size"], 1)
    seq_len = check_int("data.seq_len", data["seq_len"], 2)
    seed = int(data["seed"])
    if source == "recall":
        def batch_fn(step: int) -> dict:
            toks = recall_tokens(seed, step, (grad_accum, batch_size), seq_len, vocab,
                                 data["num_pairs"])
            return {"tokens": toks}
        return batch_fn
    if isinstance(source, str) and source.startswith("python:") and source.count(":") == 2:
        _, module, name = source.split(":")
        fn = getattr(importlib.import_module(module), name)

        def batch_fn(step: int) -> dict:
            rows = [np.asarray(fn(seed, step * grad_accum + a, batch_size, seq_len))
                    for a in range(grad_accum)]
            toks = np.stack(rows).astype(np.int32)
            if toks.shape != (grad_accum, batch_size, seq_len) or toks.max() >= vocab:
                raise ValueError(f"{source} returned tokens of shape {toks.shape[1:]} or ids "
                                 f">= vocab {vocab}; expected ({batch_size}, {seq_len})")
            return {"tokens": toks}
        return batch_fn
    raise ValueError("data.source must be 'recall', 'mixture' or 'python:MODULE:FUNCTION', "
                     f"got {source!r}")


def _plain(x: Any) -> Any:
    return x.to_dict() if hasattr(x, "to_dict") else dict(x)


# --- optimizer -------------------------------------------------------------------------------


def learning_rate(lr: float, schedule: str = "constant", steps: int = 1,
                  warmup_steps: int = 0) -> optax.Schedule:
    """step -> learning rate: linear warmup from 0 over `warmup_steps`, then "constant",
    "cosine" (decay to 0 at `steps`) or "linear" (decay to 0 at `steps`, Locret's schedule)."""
    check_float("lr", lr, 0.0, low_open=True)
    check_int("steps", steps, 1)
    check_int("warmup_steps", warmup_steps, 0, steps)
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    decay_steps = max(steps - warmup_steps, 1)
    if schedule == "constant":
        after = optax.constant_schedule(lr)
    elif schedule == "cosine":
        after = optax.cosine_decay_schedule(lr, decay_steps)
    else:
        after = optax.linear_schedule(lr, 0.0, decay_steps)
    if not warmup_steps:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup_steps), after],
                                [warmup_steps])


@functools.cache
def optimizer(
    lr: float,
    schedule: str = "constant",
    steps: int = 1,
    warmup_steps: int = 0,
    weight_decay: float = 0.0,
    b1: float = 0.9,
    b2: float = 0.999,
    clip_norm: float | None = 1.0,
) -> optax.GradientTransformation:
    """AdamW on `learning_rate(lr, schedule, steps, warmup_steps)` after global-norm clipping
    (None or 0: no clipping). Memoised: equal arguments give the same object, so the jitted
    train step is reused."""
    sched = learning_rate(lr, schedule, steps, warmup_steps)
    check_float("weight_decay", weight_decay, 0.0)
    check_float("b1", b1, 0.0, 1.0)
    check_float("b2", b2, 0.0, 1.0)
    parts = [optax.clip_by_global_norm(clip_norm)] if clip_norm else []
    parts.append(optax.adamw(sched, b1=b1, b2=b2, weight_decay=weight_decay))
    return optax.chain(*parts)


def optimizer_from_config(config: Mapping[str, Any]) -> optax.GradientTransformation:
    """`optimizer(...)` from a config with lr, schedule, steps, warmup_steps, weight_decay, b1,
    b2, clip_norm (clip_norm 0 disables clipping)."""
    return optimizer(
        float(config["lr"]), str(config["schedule"]), int(config["steps"]),
        int(config["warmup_steps"]), float(config["weight_decay"]), float(config["b1"]),
        float(config["b2"]), float(config["clip_norm"]) or None,
    )


# --- experiment setup ---------------------------------------------------------------------


def lm_config(model: Mapping[str, Any]):
    """The keys `configs/lm_*.py` share (experiments/train_lm.py), with the common defaults.

    model: `LlamaConfig` fields. seed; compute_dtype; steps .. clip_norm: the optimizer (see
    `optimizer_from_config`); checkpoint_every / log_every: in steps; stop_at: >0 stops (with a
    checkpoint) after this step, as a preempted job would; time_limit_s: >0 ends training
    between checkpoints before this many seconds; data_workers: processes computing batches
    ahead (0: in the training process); export_dir: default WORKDIR/export; init_from: an
    exported checkpoint to continue from (fine-tuning). The defaults are configs/lm_tiny.py's
    recipe; the `data` and `eval` sections are each config file's own.
    """
    import ml_collections

    return ml_collections.ConfigDict(dict(
        seed=0, model=dict(model), compute_dtype="float32",
        steps=2000, lr=3e-3, schedule="cosine", warmup_steps=100, weight_decay=0.01, b1=0.9,
        b2=0.98, clip_norm=1.0,
        checkpoint_every=200, log_every=10, stop_at=0, time_limit_s=0.0, data_workers=0,
        export_dir="", init_from="",
    ))


def default_config():
    """The keys every `configs/train_*.py` shares (an ml_collections ConfigDict).

    backbone: the frozen model (see `load_backbone`); backbone_dtype: its dtype; seed: PRNG
    seed of the run (component init, rank sampling); steps .. clip_norm: the optimizer (see
    `optimizer`); grad_accum: micro-batches per step; checkpoint_every / log_every: in steps;
    data: see `make_batch_fn` (batch_size is per micro-batch; `mixture` is an opaque section
    for source "mixture", see `lm_mixture_data`).
    """
    import ml_collections

    c = ml_collections.ConfigDict()
    c.backbone = ""
    c.backbone_dtype = "bfloat16"
    c.seed = 0
    c.steps = 2000
    c.lr = 1e-3
    c.schedule = "cosine"
    c.warmup_steps = 100
    c.weight_decay = 0.0
    c.b1 = 0.9
    c.b2 = 0.999
    c.clip_norm = 1.0
    c.grad_accum = 1
    c.checkpoint_every = 200
    c.log_every = 10
    c.data = ml_collections.ConfigDict(
        {"source": "recall", "batch_size": 8, "seq_len": 2048, "seed": 1, "num_pairs": 8,
         "mixture": ml_collections.ConfigDict()}
    )
    return c


def lm_mixture_data(lm_config_file: str, tokens_per_batch: int = 16384):
    """The `data` section of a language-model config (e.g. configs/lm_small.py), so components
    train on the backbone's own data mixture; `tokens_per_batch` is lowered because component
    training runs the model twice per step (teacher and student)."""
    config = _load_config_file(lm_config_file)
    data = config.data
    data.tokens_per_batch = max(int(tokens_per_batch), max(int(n) for n in data.lengths))
    return data


def lm_backbone_config(lm_config_file: str, backbone: str = "runs/lm_small/export"):
    """`default_config()` for a component trained on `backbone` (the export of
    `experiments/train_lm.py --config=<lm_config_file>`) with that model's own data mixture
    (`lm_mixture_data`); synthetic recall sequences when the LM config file is missing."""
    c = default_config()
    c.backbone = backbone
    if os.path.exists(lm_config_file):  # train on the backbone's own RULER-style data mixture
        c.data.source = "mixture"
        c.data.mixture = lm_mixture_data(lm_config_file)
    return c


def tiny_overrides(c) -> None:
    """Turns a config into its `:tiny` CPU variant (a few steps on a tiny backbone, on
    synthetic recall sequences)."""
    c.backbone = tiny_backbone_spec()
    c.data.source = "recall"
    c.steps = 4
    c.warmup_steps = 0
    c.schedule = "constant"
    c.lr = 1e-2
    c.checkpoint_every = 2
    c.log_every = 1
    c.data.batch_size = 2
    c.data.seq_len = 48
    c.data.num_pairs = 2


def setup(config: Mapping[str, Any], reference: Mapping[str, Any]):
    """Checks `config` against `reference` (the defaults) and builds the shared pieces.

    Returns (backbone model, batch_fn, optax optimizer).
    """
    check_config_keys(config, reference)
    check_int("grad_accum", config["grad_accum"], 1)
    check_int("checkpoint_every", config["checkpoint_every"], 0)
    check_int("log_every", config["log_every"], 1)
    tx = optimizer_from_config(config)
    model = load_backbone(config["backbone"], config["backbone_dtype"], int(config["seed"]))
    batch_fn = make_batch_fn(config["data"], model.config.vocab_size, int(config["grad_accum"]))
    return model, batch_fn, tx


# --- the loop --------------------------------------------------------------------------------


def _keystr(path) -> str:
    return jax.tree_util.keystr(path, simple=True, separator="/")


def flatten(tree: Any) -> dict[str, Any]:
    """{"a/b/0": leaf} of a pytree (orbax-friendly string keys)."""
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {_keystr(path): leaf for path, leaf in leaves}


def unflatten(template: Any, flat: Mapping[str, Any], what: str = "checkpoint") -> Any:
    """Rebuilds `template`'s structure from `flatten` output, checking names and shapes."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(template)
    keys = [_keystr(path) for path, _ in leaves]
    missing, extra = sorted(set(keys) - set(flat)), sorted(set(flat) - set(keys))
    if missing or extra:
        raise ValueError(f"{what} does not match: missing {missing[:5]}, unexpected {extra[:5]}")
    out = []
    for k, (_, ref) in zip(keys, leaves):
        arr = flat[k]
        if tuple(np.shape(arr)) != tuple(np.shape(ref)):
            raise ValueError(f"{what}: {k} has shape {np.shape(arr)}, expected {np.shape(ref)}")
        out.append(jnp.asarray(arr, getattr(ref, "dtype", None)))
    return treedef.unflatten(out)


def _global_norm(tree: Any) -> Array:
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))


@functools.partial(jax.jit, static_argnames=("graphdef", "loss_fn", "tx"))
def _train_step(graphdef, params, rest, opt_state, rng, backbone, batch, loss_fn, tx):
    step_key, next_rng = jax.random.split(rng)
    n_micro = jax.tree.leaves(batch)[0].shape[0]

    def micro(carry, xs):
        grads_acc, metrics_acc = carry
        i, mb = xs

        def objective(p):
            comp = nnx.merge(graphdef, p, rest)
            return loss_fn(comp, backbone, mb, jax.random.fold_in(step_key, i))

        (loss, metrics), grads = jax.value_and_grad(objective, has_aux=True)(params)
        metrics = dict(metrics, loss=loss)
        grads_acc = jax.tree.map(jnp.add, grads_acc, grads)
        metrics_acc = jax.tree.map(jnp.add, metrics_acc, metrics)
        return (grads_acc, metrics_acc), None

    zeros = jax.tree.map(jnp.zeros_like, params)
    _, metric_shapes = jax.eval_shape(
        lambda p: loss_fn(nnx.merge(graphdef, p, rest), backbone,
                          jax.tree.map(lambda x: x[0], batch), step_key), params)
    metric_zeros = {k: jnp.zeros((), jnp.float32) for k in list(metric_shapes) + ["loss"]}
    (grads, metrics), _ = jax.lax.scan(
        micro, (zeros, metric_zeros), (jnp.arange(n_micro), batch)
    )
    grads = jax.tree.map(lambda g: g / n_micro, grads)
    metrics = {k: v / n_micro for k, v in metrics.items()}
    metrics["grad_norm"] = _global_norm(grads)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    return params, opt_state, next_rng, metrics


def _commit(tree: Any) -> Any:
    """`tree` with every array committed to the device it is on.

    Freshly initialised arrays are uncommitted, orbax-restored ones committed; jit keys its
    cache on that flag, so without this a resumed run compiled the training step again.
    """
    return jax.tree.map(lambda x: jax.device_put(x, x.sharding), tree)


class TrainResult(NamedTuple):
    component: nnx.Module
    step: int
    history: list[dict[str, float]]


def _trim_logs(workdir: str, step: int) -> None:
    """Drops log rows past `step` (written after the checkpoint a resumed run starts from)."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    rows = [r for r in rows if r["step"] <= step]
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    _write_csv(workdir, rows)


def _write_csv(workdir: str, rows: list[dict[str, Any]]) -> None:
    fields = sorted({k for r in rows for k in r}, key=lambda k: (k != "step", k))
    with open(os.path.join(workdir, "metrics.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def train(
    component: nnx.Module,
    backbone: nnx.Module,
    loss_fn: LossFn,
    batch_fn: Callable[[int], Batch],
    *,
    steps: int,
    optimizer: optax.GradientTransformation,
    workdir: str | None = None,
    checkpoint_every: int = 0,
    log_every: int = 10,
    seed: int = 0,
    meta: Mapping[str, Any] | None = None,
    stop_at: int | None = None,
    keep_checkpoints: int = 2,
    progress: bool = True,
    mesh: Any = None,
) -> TrainResult:
    """Trains `component`'s nnx.Params for `steps` optimizer steps; returns the trained module.

    Args:
      component: the trainable module (float32); its non-Param variables stay fixed.
      backbone: the frozen model, passed to `loss_fn` and never updated.
      loss_fn: `(component, backbone, micro_batch, rng) -> (loss, {name: scalar})`; should be a
        memoised/module-level function so the jitted step is reused across calls.
      batch_fn: `step -> batch` whose leaves have a leading grad-accumulation axis.
      steps: total optimizer steps of the run (a resumed run continues to this number).
      optimizer: an optax transformation (see `optimizer`).
      workdir: where checkpoints and logs go; rerunning with the same workdir resumes.
      checkpoint_every: save every N steps (0: only at the end); needs `workdir`.
      log_every: log metrics every N steps (and at the last step).
      seed: PRNG seed of the run (the key is checkpointed and carried across steps).
      meta: JSON-able description stored with checkpoints; a resumed run must match its
        "backbone" and "component" entries.
      stop_at: stop (with a checkpoint) after this step, as a preempted job would; rerun to
        continue.
      keep_checkpoints: how many step checkpoints orbax keeps.
      progress: show a tqdm progress bar.
      mesh: optional `jax.sharding.Mesh` (`kvjax.sharding.make_mesh`) for data-parallel
        training: component params and optimizer state are replicated, the backbone is sharded
        (tensor parallel over "model"), every batch is split over "data" along its batch axis
        (axis 1, after the grad-accumulation axis); XLA inserts the gradient all-reduce.
    """
    import orbax.checkpoint as ocp
    from tqdm.auto import tqdm

    check_int("steps", steps, 1)
    check_int("log_every", log_every, 1)
    check_int("checkpoint_every", checkpoint_every, 0)
    if stop_at is not None:
        check_int("stop_at", stop_at, 1, steps)
    if (checkpoint_every or stop_at) and workdir is None:
        raise ValueError("checkpointing (checkpoint_every / stop_at) needs a workdir")
    meta = json.loads(json.dumps(dict(meta or {})))
    graphdef, params, rest = nnx.split(component, nnx.Param, ...)
    opt_state = optimizer.init(params)
    rng = jax.random.key(seed)
    start = 0
    mgr = None
    if workdir is not None:
        workdir = os.path.abspath(workdir)
        os.makedirs(workdir, exist_ok=True)
        mgr = ocp.CheckpointManager(
            os.path.join(workdir, "checkpoints"),
            options=ocp.CheckpointManagerOptions(max_to_keep=keep_checkpoints, create=True),
        )
        latest = mgr.latest_step()
        if latest is not None:
            template = {"params": flatten(params), "rest": flatten(rest),
                        "opt_state": flatten(opt_state), "rng": jax.random.key_data(rng),
                        "step": jnp.int32(0)}
            abstract = jax.tree.map(lambda x: local_abstract(np.shape(x), x.dtype), template)
            found = mgr.restore(latest, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
            where = f"checkpoint {workdir}/checkpoints/{latest}"
            check_signature(found.meta.get("backbone", {}), meta.get("backbone", {}), where)
            if found.meta.get("component") != meta.get("component"):
                raise ValueError(
                    f"{where} was written for component {found.meta.get('component')}, but this "
                    f"run trains {meta.get('component')}; use another workdir"
                )
            state = mgr.restore(
                latest, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract))
            ).state
            params = unflatten(params, state["params"], "checkpoint params")
            rest = unflatten(rest, state["rest"], "checkpoint variables")
            opt_state = unflatten(opt_state, state["opt_state"], "checkpoint optimizer state")
            rng = jax.random.wrap_key_data(jnp.asarray(state["rng"]))
            start = int(state["step"])
            _trim_logs(workdir, start)

    if mesh is None:
        params, rest, opt_state, rng = _commit((params, rest, opt_state, rng))
    else:
        from kvjax import sharding

        params, rest, opt_state = sharding.replicate((params, rest, opt_state), mesh)
        backbone = sharding.shard_params(backbone, mesh)

    def save(step: int) -> None:
        if mgr is None:
            return
        tree = {"params": flatten(params), "rest": flatten(rest),
                "opt_state": flatten(opt_state), "rng": jax.random.key_data(rng),
                "step": jnp.int32(step)}
        mgr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(tree),
                                               meta=ocp.args.JsonSave(meta)), force=True)

    end = steps if stop_at is None else stop_at
    history: list[dict[str, float]] = []
    rows: list[dict[str, Any]] = []
    if workdir is not None and os.path.exists(os.path.join(workdir, "metrics.jsonl")):
        with open(os.path.join(workdir, "metrics.jsonl")) as f:
            rows = [json.loads(line) for line in f if line.strip()]
    bar = tqdm(total=steps, initial=start, disable=not progress, desc="train", leave=False)
    t_last, tokens_since = time.perf_counter(), 0
    step = start
    for step in range(start + 1, end + 1):
        batch = jax.tree.map(jnp.asarray, batch_fn(step - 1))
        if mesh is not None:
            batch = sharding.shard_batch(batch, mesh, axis=1)
        tokens_since += int(sum(np.prod(x.shape) for x in jax.tree.leaves(batch)
                                if jnp.issubdtype(x.dtype, jnp.integer)))
        params, opt_state, rng, metrics = _train_step(
            graphdef, params, rest, opt_state, rng, backbone, batch, loss_fn, optimizer
        )
        bar.update(1)
        if step % log_every == 0 or step == end:
            metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
            now = time.perf_counter()
            metrics["tokens_per_s"] = tokens_since / max(now - t_last, 1e-9)
            t_last, tokens_since = now, 0
            row = {"step": step, **metrics}
            history.append(row)
            bar.set_postfix(loss=f"{metrics['loss']:.4g}")
            print(" ".join([f"step {step}"] + [f"{k}={v:.5g}" for k, v in metrics.items()]),
                  flush=True)
            if workdir is not None:
                rows.append(row)
                with open(os.path.join(workdir, "metrics.jsonl"), "a") as f:
                    f.write(json.dumps(row) + "\n")
                _write_csv(workdir, rows)
        if checkpoint_every and step % checkpoint_every == 0:
            save(step)
    bar.close()
    if mgr is not None:
        if step > start and mgr.latest_step() != step:
            save(step)
        mgr.wait_until_finished()
        mgr.close()
    return TrainResult(nnx.merge(graphdef, params, rest), step, history)


def train_from_config(component: nnx.Module, backbone: nnx.Module, loss_fn: LossFn,
                      batch_fn: Callable[[int], Batch], optimizer: optax.GradientTransformation,
                      config: Mapping[str, Any], workdir: str, *, kind: str,
                      component_config: Mapping[str, Any]) -> TrainResult:
    """`train` with steps, checkpoint_every, log_every and seed from a `default_config`-shaped
    config; the checkpoint meta is the backbone's signature and {kind, component_config}, so a
    resume with another backbone or component configuration is refused."""
    return train(
        component, backbone, loss_fn, batch_fn, steps=config["steps"], optimizer=optimizer,
        workdir=workdir, checkpoint_every=config["checkpoint_every"],
        log_every=config["log_every"], seed=config["seed"],
        meta={"backbone": backbone_signature(backbone),
              "component": {"kind": kind, "config": component_config}},
    )


# --- trained components ----------------------------------------------------------------------


def save_component(path: str | os.PathLike, component: nnx.Module, *, kind: str,
                   config: Mapping[str, Any], backbone: Mapping[str, Any]) -> None:
    """Stores every variable of `component` (orbax) plus `component.json` describing it.

    kind: the method name; config: the JSON-able constructor arguments `load_component` passes
    to the method's builder; backbone: `backbone_signature(model)`.
    """
    import orbax.checkpoint as ocp

    path = os.path.abspath(os.fspath(path))
    os.makedirs(path, exist_ok=True)
    ckpt = ocp.StandardCheckpointer()
    ckpt.save(os.path.join(path, "state"), flatten(nnx.state(component)), force=True)
    ckpt.wait_until_finished()
    with open(os.path.join(path, "component.json"), "w") as f:
        json.dump({"kind": kind, "config": dict(config), "backbone": dict(backbone)}, f,
                  indent=1)


def read_component_meta(path: str | os.PathLike) -> dict[str, Any]:
    meta_file = os.path.join(os.fspath(path), "component.json")
    if not os.path.exists(meta_file):
        raise FileNotFoundError(f"{path} is not a saved kvjax component (no component.json)")
    with open(meta_file) as f:
        return json.load(f)


def local_abstract(shape: Any, dtype: Any) -> jax.ShapeDtypeStruct:
    """A restore target on this process's first device, so checkpoints written on another
    topology (e.g. trained on a GPU, loaded on a CPU) restore instead of raising."""
    device = jax.local_devices()[0]
    return jax.ShapeDtypeStruct(tuple(shape), dtype,
                                sharding=jax.sharding.SingleDeviceSharding(device))


def load_component(path: str | os.PathLike, build: Callable[[dict[str, Any]], nnx.Module], *,
                   kind: str, backbone: Mapping[str, Any] | None = None) -> nnx.Module:
    """Loads a component saved by `save_component`.

    build: `config -> module` (the method's constructor; called under `nnx.eval_shape`).
    backbone: the target backbone's signature; a component made for another shape raises.
    """
    import orbax.checkpoint as ocp

    path = os.path.abspath(os.fspath(path))
    meta = read_component_meta(path)
    if meta.get("kind") != kind:
        raise ValueError(f"{path} holds a {meta.get('kind')!r} component, not {kind!r}")
    if backbone is not None:
        check_signature(meta["backbone"], backbone, f"component {path}")
    component = nnx.eval_shape(lambda: build(meta["config"]))
    state = nnx.state(component)
    abstract = {k: local_abstract(v.shape, v.dtype) for k, v in flatten(state).items()}
    flat = ocp.StandardCheckpointer().restore(os.path.join(path, "state"), abstract)
    nnx.update(component, unflatten(state, flat, f"component {path}"))
    return component
