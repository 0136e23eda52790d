"""Trains one of the project's own Llama-architecture language models on RULER-style tasks.

    python experiments/train_lm.py --config=configs/lm_tiny.py --workdir=runs/lm_tiny
    python experiments/train_lm.py --config=configs/lm_small.py --workdir=runs/lm_small

The model is `kvjax.models.Llama` with the byte-level tokenizer; the data is the task mixture
of `kvjax.eval.mixture` (batches are a pure function of the step, produced ahead by worker
processes); the loop is `kvjax.train.train` (optax AdamW, orbax checkpoints: rerun with the
same workdir to resume, tqdm progress, WORKDIR/metrics.jsonl). Parameters stay float32; the
forward runs in `config.compute_dtype` (bfloat16 on GPU: cuDNN flash attention through
`jax.nn.dot_product_attention`).

`config.init_from` starts from an exported checkpoint instead of random weights (fine-tuning;
the optimizer starts fresh); `config.time_limit_s` ends training between checkpoints.

Writes WORKDIR/export (config.json + model.safetensors + tokenizer.json: load with
`kvjax.models.load` or transformers), WORKDIR/loss.png, and, when `config.eval.tasks` is set,
the full-cache accuracy on them in WORKDIR/eval.json (printed as a table).
"""

from __future__ import annotations

import functools
import json
import multiprocessing
import os
import time
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from kvjax import train as kvtrain
from kvjax.eval import mixture, report, runner
from kvjax.eval.tokenizer import ByteTokenizer
from kvjax.learned.backbone import LayerInputs, forward
from kvjax.models import Llama, LlamaConfig
from kvjax.models import load as load_model
from kvjax.models import save as save_model

KIND = "kvjax_lm"


@functools.cache
def _cudnn_works(dtype: str) -> bool:
    """Whether cuDNN fused attention compiles here for causal GQA in `dtype` (GPU only)."""
    if jax.default_backend() != "gpu" or dtype not in ("bfloat16", "float16"):
        return False
    q = jnp.ones((1, 128, 4, 32), dtype)
    k = jnp.ones((1, 128, 2, 32), dtype)
    try:
        jax.block_until_ready(jax.jit(lambda q, k: jax.nn.dot_product_attention(
            q, k, k, is_causal=True, implementation="cudnn"))(q, k))
        return True
    except Exception as e:  # noqa: BLE001 - any failure means: use XLA's attention
        print(f"cuDNN attention unavailable ({type(e).__name__}); using XLA attention")
        return False


def causal_attention(layer: int, inputs: LayerInputs) -> tuple[jax.Array, None]:
    """Causal GQA attention through `jax.nn.dot_product_attention` (cuDNN flash attention on
    GPU in bf16/fp16, XLA otherwise)."""
    del layer
    t = lambda x: x.transpose(0, 2, 1, 3)  # [B, H, T, D] <-> [B, T, H, D]
    impl = "cudnn" if _cudnn_works(jnp.dtype(inputs.queries.dtype).name) else None
    out = jax.nn.dot_product_attention(t(inputs.queries), t(inputs.keys), t(inputs.values),
                                       scale=inputs.scale, is_causal=True, implementation=impl)
    return t(out), None


@functools.cache
def lm_loss(compute_dtype: str):
    """`loss_fn(model, backbone, batch, rng)` for `kvjax.train.train`: weighted next-token
    cross-entropy (batch["weights"] aligned with the predicted tokens), the forward in
    `compute_dtype` from float32 parameters."""
    dtype = jnp.dtype(compute_dtype)

    def loss_fn(model: Llama, backbone: Any, batch: Mapping[str, jax.Array], rng: jax.Array):
        del backbone, rng
        if dtype != model.dtype:
            shadow = nnx.eval_shape(lambda: Llama(model.config, rngs=nnx.Rngs(0), dtype=dtype))
            state = jax.tree.map(lambda x: x.astype(dtype), nnx.state(model))
            model = nnx.merge(nnx.graphdef(shadow), state)
        tokens = batch["tokens"]
        logits, _ = forward(model, tokens, attend_fn=causal_attention)
        logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
        nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
        w = batch["weights"][:, 1:]
        loss = jnp.sum(nll * w) / jnp.maximum(jnp.sum(w), 1e-6)
        target = (w == 1.0).astype(jnp.float32)
        hit = (jnp.argmax(logp, axis=-1) == tokens[:, 1:]).astype(jnp.float32)
        acc = jnp.sum(hit * target) / jnp.maximum(jnp.sum(target), 1.0)
        return loss, {"target_token_acc": acc}

    return loss_fn


def model_config(config: Mapping[str, Any]) -> LlamaConfig:
    m = dict(config["model"])
    return LlamaConfig(vocab_size=ByteTokenizer.vocab_size, bos_token_id=ByteTokenizer.bos_id,
                       eos_token_id=ByteTokenizer.eos_id, **m)


def _plain(data: Mapping[str, Any]) -> dict:
    """A ConfigDict (or mapping) as plain JSON-able Python (picklable for spawn workers)."""
    return json.loads(json.dumps(dict(data.to_dict() if hasattr(data, "to_dict") else data)))


def _worker(data: dict, first: int, stride: int, out: Any) -> None:
    """Worker process: puts `mixture.lm_batch(data, step)` for steps first, first + stride, ..."""
    step = first
    while True:
        out.put(mixture.lm_batch(data, step))
        step += stride


class _Batches:
    """`batches(step)` backed by worker processes that compute upcoming steps ahead.

    Worker k makes steps k, k + W, k + 2W, ... into its own bounded queue, so a step's batch is
    always `queues[step % W].get()` (deterministic order). Stopping kills the workers outright
    (`multiprocessing.Pool.terminate` can hang while workers are pushing large batches).
    """

    def __init__(self, data: Mapping[str, Any], workers: int, ahead: int = 2):
        self.data = _plain(data)
        self.workers, self.ahead = workers, ahead
        self.ctx = multiprocessing.get_context("spawn")
        self.procs: list[Any] = []
        self.queues: list[Any] = []
        self.next: int | None = None

    def _start(self, step: int) -> None:
        self.close()
        saved = os.environ.get("JAX_PLATFORMS")
        os.environ["JAX_PLATFORMS"] = "cpu"  # workers make numpy batches: keep them off the GPU
        try:
            self.queues = [self.ctx.Queue(self.ahead) for _ in range(self.workers)]
            self.procs = [self.ctx.Process(target=_worker, daemon=True,
                                           args=(self.data, step + k, self.workers, q))
                          for k, q in enumerate(self.queues)]
            for p in self.procs:
                p.start()
        finally:
            if saved is None:
                del os.environ["JAX_PLATFORMS"]
            else:
                os.environ["JAX_PLATFORMS"] = saved
        self.first = step

    def __call__(self, step: int) -> dict[str, Any]:
        if self.next != step:  # (re)start the stream at this step
            self._start(step)
        self.next = step + 1
        return self.queues[(step - self.first) % self.workers].get()

    def close(self) -> None:
        for p in self.procs:
            p.kill()
        for p in self.procs:
            p.join(timeout=5)
        for q in self.queues:
            q.cancel_join_thread()
            q.close()
        self.procs, self.queues, self.next = [], [], None


def _batches(data: Mapping[str, Any], workers: int) -> tuple[Any, Any]:
    """(batch_fn(step), closer or None): in-process when `workers` <= 0, else `_Batches`."""
    if workers <= 0:
        return functools.partial(mixture.lm_batch, _plain(data)), None
    b = _Batches(data, workers)
    return b, b


def run(config: Mapping[str, Any], workdir: str) -> dict[str, Any]:
    """Trains (or resumes), exports, plots the loss and evaluates; returns paths and metrics."""
    mixture.check_data(config["data"])
    mcfg = model_config(config)
    if config["init_from"]:  # continue from an exported checkpoint (fresh optimizer state)
        model = load_model(str(config["init_from"]), dtype=jnp.float32)
        if model.config != mcfg:
            diff = {k: (getattr(model.config, k), getattr(mcfg, k))
                    for k in mcfg.__dataclass_fields__
                    if getattr(model.config, k) != getattr(mcfg, k)}
            raise ValueError(f"config.init_from {config['init_from']} has another model "
                             f"config than config.model: {diff} (checkpoint vs config)")
    else:
        model = Llama(mcfg, rngs=nnx.Rngs(int(config["seed"])), dtype=jnp.float32)
    n_params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    print(f"model: {n_params / 1e6:.2f}M parameters, {mcfg.num_hidden_layers} layers, "
          f"hidden {mcfg.hidden_size}; backend {jax.default_backend()}", flush=True)
    tx = kvtrain.optimizer_from_config(config)
    batch_fn, pool = _batches(config["data"], int(config["data_workers"]))
    steps, every = int(config["steps"]), int(config["checkpoint_every"])
    stop_at = int(config["stop_at"]) or steps
    limit = float(config["time_limit_s"])
    meta = {"backbone": {}, "component": {"kind": KIND, "config": dict(config["model"])}}
    start = time.perf_counter()
    try:
        # With a time limit: a first chunk of checkpoint_every steps measures the speed (its
        # time includes compilation, so the estimate is safe), then one more call runs the
        # steps that fit (a resumed call recompiles, so chunks are kept to two).
        reached, first, sec_per_step = 0, True, 0.0
        while True:
            chunk_start = time.perf_counter()
            if not limit:
                target = stop_at
            elif first:
                target = min(stop_at, every)
            else:
                fit = int((limit - (time.perf_counter() - start)) / sec_per_step)
                if fit < 1:
                    print(f"time limit {limit:.0f} s: stopping at step {reached} of {steps}")
                    break
                target = min(stop_at, reached + fit)
            result = kvtrain.train(
                model, None, lm_loss(str(config["compute_dtype"])), batch_fn, steps=steps,
                optimizer=tx, workdir=workdir, checkpoint_every=every,
                log_every=int(config["log_every"]), seed=int(config["seed"]),
                stop_at=target, meta=meta)
            sec_per_step = (time.perf_counter() - chunk_start) / max(result.step - reached, 1)
            reached, first = result.step, False
            if reached >= stop_at or not limit:
                break
    finally:
        if pool is not None:
            pool.close()
    train_s = time.perf_counter() - start
    out: dict[str, Any] = {"step": result.step, "train_seconds": train_s,
                           "parameters": int(n_params)}
    metrics_file = os.path.join(workdir, "metrics.jsonl")
    if os.path.exists(metrics_file):
        out["loss_plot"] = report.plot_loss(metrics_file, os.path.join(workdir, "loss.png"))
    if result.step < steps and not limit:
        print(f"stopped at step {result.step} of {steps}; rerun to resume")
        return out
    export = config.get("export_dir") or os.path.join(workdir, "export")
    save_model(result.component, export)
    ByteTokenizer().save(export)
    out["export"] = export
    print(f"exported to {export}; trained {result.step} steps in {train_s:.0f} s", flush=True)
    ev = config["eval"]
    if ev["tasks"]:
        results = runner.full_cache_accuracy(
            result.component, ByteTokenizer(), list(ev["tasks"]), list(ev["lengths"]),
            int(ev["num_samples"]), int(ev["batch_size"]), seed=int(ev["seed"]))
        with open(os.path.join(workdir, "eval.json"), "w") as f:
            json.dump(results, f, indent=1)
        print(report.accuracy_table(results), flush=True)
        out["eval"] = results
    return out


if __name__ == "__main__":
    kvtrain.run_cli(run, "model/training config file", "checkpoints, logs, export")
