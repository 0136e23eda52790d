"""Benchmark: decode attention over Mustafar sparse caches (bitmap + packed values) vs dense.

    PYTHONPATH=. python experiments/bench_mustafar.py --out=/tmp/bench_mustafar      # GPU
    PYTHONPATH=. python experiments/bench_mustafar.py --contexts=64 --batches=1 --hq=4 \
        --hkv=2 --head_dim=16 --sparsities=0.5 --calls=1 --reps=1 --out=/tmp/bm    # CPU smoke

Default shapes (the paper's setting, Llama-3-8B-like decode): batch 8, 32k context, 32 query /
8 KV heads, head dim 128, bf16, key and value sparsity 0.5 and 0.7. The paper (Joo et al. 2025)
reports up to 2.23x tokens/s end to end; this measures the attention step alone.

Timed, in one run: the Mustafar Pallas kernel (`pallas_kernels.sparse_decode_attention`), its
jnp reference under jit (densify + dense attention), and dense decode baselines: the project's
Pallas decode kernel (`pallas_kernels.decode_attention`, when importable), jax's
`dot_product_attention` (cuDNN and XLA on GPU; XLA on CPU) and torch SDPA (GPU with torch).
First a correctness check of the kernel against the reference (ragged lengths, a bias).

Each timing is the median of `--reps` runs of one jitted program issuing `--calls` attention
calls with different queries; time per call = run time / calls. Bytes per call: packed values
+ bitmaps of K and V (sparse), keys + values (dense). On CPU the kernel runs interpreted, so
only the smoke mode is meaningful there. Results: OUT/bench_mustafar.json and .md.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from kvjax.sparse import mustafar as ms  # noqa: E402
from pallas_kernels import sparse_decode_attention as sda  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("out", os.environ.get("OUT", "/tmp/bench_mustafar"), "output directory")
flags.DEFINE_list("contexts", ["32768"], "context lengths")
flags.DEFINE_list("batches", ["8"], "batch sizes")
flags.DEFINE_list("sparsities", ["0.5", "0.7"], "key and value sparsities")
flags.DEFINE_integer("hq", 32, "query heads")
flags.DEFINE_integer("hkv", 8, "KV heads")
flags.DEFINE_integer("head_dim", 128, "head dim")
flags.DEFINE_string("dtype", "bfloat16", "cache and query dtype")
flags.DEFINE_list("block_sizes", ["32", "64"], "kernel block sizes tried (best reported)")
flags.DEFINE_list("num_warps", ["4"], "kernel num_warps tried (best reported)")
flags.DEFINE_integer("calls", 8, "attention calls per timed program")
flags.DEFINE_integer("reps", 10, "timed runs (median)")
flags.DEFINE_bool("check", True, "check the kernel against the reference first")
flags.DEFINE_bool("baselines", True, "time the dense baselines")

RESULTS: dict = {"device": "", "rows": [], "checks": [], "errors": []}


def log(*parts) -> None:
    print(*parts, flush=True)


def save() -> None:
    os.makedirs(FLAGS.out, exist_ok=True)
    with open(os.path.join(FLAGS.out, "bench_mustafar.json"), "w") as f:
        json.dump(RESULTS, f, indent=1)
    with open(os.path.join(FLAGS.out, "bench_mustafar.md"), "w") as f:
        f.write(table())


def table() -> str:
    lines = [
        f"Device: {RESULTS['device']}\n",
        "| batch | context | method | sparsity | us / call | GB/s | MB read | x dense best |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in RESULTS["rows"]:
        lines.append(
            f"| {r['batch']} | {r['context']} | {r['method']} | {r.get('sparsity', '-')} | "
            f"{r['us']:.1f} | {r['gbps']:.0f} | {r['bytes'] / 1e6:.1f} | "
            f"{r.get('speedup', float('nan')):.2f} |"
        )
    return "\n".join(lines) + "\n"


def _try(name, fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except Exception as e:  # noqa: BLE001 - one failing baseline must not stop the run
        msg = f"{type(e).__name__}: {str(e)[:300]}"
        log(f"  [{name}] FAILED {msg}")
        RESULTS["errors"].append({"name": name, "error": msg, "trace": traceback.format_exc()})
        return None


def time_jax(fn, qs, args) -> float:
    """Median seconds per call of fn(q, *args) over FLAGS.calls calls inside one program."""

    @jax.jit
    def many(qs, args):
        return [fn(qs[i], *args) for i in range(qs.shape[0])]

    jax.block_until_ready(many(qs, args))
    ts = []
    for _ in range(FLAGS.reps):
        t0 = time.perf_counter()
        jax.block_until_ready(many(qs, args))
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) / qs.shape[0]


def time_torch(fn, qs) -> float:
    import torch

    for _ in range(2):
        fn(qs[0])
    torch.cuda.synchronize()
    ts = []
    for _ in range(FLAGS.reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for q in qs:
            fn(q)
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b) / 1e3)
    return statistics.median(ts) / len(qs)


def dense_decode(q, keys, values, lengths, scale):
    """jnp dense decode [B, Hq, D] (float32 softmax) for the baseline and the check."""
    b, hq, d = q.shape
    h = keys.shape[1]
    qg = q.reshape(b, h, hq // h, d)
    s = jnp.einsum("bhgd,bhsd->bhgs", qg, keys, preferred_element_type=jnp.float32) * scale
    valid = jnp.arange(keys.shape[2])[None, None, None] < lengths[:, :, None, None]
    p = jax.nn.softmax(jnp.where(valid, s, -jnp.inf), axis=-1)
    out = jnp.einsum("bhgs,bhsd->bhgd", p.astype(values.dtype), values,
                     preferred_element_type=jnp.float32)
    return out.reshape(b, hq, d).astype(q.dtype)


def check(dtype) -> None:
    """Kernel == reference on ragged lengths with a bias, at small shapes."""
    key = jax.random.key(0)
    b, hkv, g, c, d = 2, 2, FLAGS.hq // FLAGS.hkv, 80, FLAGS.head_dim
    k1, k2, k3, k4 = jax.random.split(key, 4)
    q = jax.random.normal(k1, (b, hkv * g, d), dtype)
    keys = jax.random.normal(k2, (b, hkv, c, d), dtype)
    values = jax.random.normal(k3, (b, hkv, c, d), dtype)
    lengths = jnp.asarray([[80, 33], [1, 64]], jnp.int32)
    bias = jax.random.normal(k4, (b, hkv, c), jnp.float32).at[0, 0, :10].set(-1e30)
    for s in [float(x) for x in FLAGS.sparsities]:
        kv, kb = ms.sparsify(keys, ms.keep_count(d, s))
        vv, vb = ms.sparsify(values, ms.keep_count(d, s))
        out = sda.sparse_decode_attention(q, kv, kb, vv, vb, lengths, bias=bias, block_size=16)
        ref = sda.reference(q, kv, kb, vv, vb, lengths, bias=bias)
        err = float(jnp.max(jnp.abs(out.astype(jnp.float32) - ref.astype(jnp.float32))))
        RESULTS["checks"].append({"sparsity": s, "max_abs_err": err})
        log(f"check sparsity={s}: max |kernel - reference| = {err:.2e}")


def bench(b: int, c: int, dtype) -> None:
    hq, hkv, d = FLAGS.hq, FLAGS.hkv, FLAGS.head_dim
    itemsize = jnp.dtype(dtype).itemsize
    scale = d**-0.5
    key = jax.random.key(b * 7919 + c)
    k1, k2, k3 = jax.random.split(key, 3)
    qs = jax.random.normal(k1, (FLAGS.calls, b, hq, d), dtype)
    keys = jax.random.normal(k2, (b, hkv, c, d), dtype)
    values = jax.random.normal(k3, (b, hkv, c, d), dtype)
    lengths = jnp.full((b, hkv), c, jnp.int32)
    dense_bytes = 2 * b * hkv * c * d * itemsize
    rows = []

    def record(method, t, nbytes, sparsity=None):
        if t is None:
            return
        row = {"batch": b, "context": c, "method": method, "us": t * 1e6, "bytes": nbytes,
               "gbps": nbytes / t / 1e9}
        if sparsity is not None:
            row["sparsity"] = sparsity
        rows.append(row)
        log(f"  {method:<28} s={sparsity!s:<5} {t * 1e6:9.1f} us  {nbytes / t / 1e9:7.0f} GB/s")

    log(f"batch {b} context {c}: dense K+V {dense_bytes / 1e6:.0f} MB")
    if FLAGS.baselines:
        record("dense jnp (jit)", _try("dense jnp", time_jax, dense_decode, qs,
                                       (keys, values, lengths, scale)), dense_bytes)
        on_gpu = jax.default_backend() == "gpu"
        for impl in (("cudnn", "xla") if on_gpu else ("xla",)):
            def dpa(q, k, v, impl=impl):  # k, v: [B, C, Hkv, D] (jax's layout)
                out = jax.nn.dot_product_attention(q[:, None], k, v, scale=scale,
                                                   implementation=impl)
                return out[:, 0]

            kt, vt = jnp.swapaxes(keys, 1, 2), jnp.swapaxes(values, 1, 2)
            record(f"jax dpa {impl}", _try(f"dpa {impl}", time_jax, dpa, qs, (kt, vt)),
                   dense_bytes)
        if on_gpu:
            try:
                from pallas_kernels import decode_attention as dda

                record("dense pallas kernel", _try(
                    "dense pallas", time_jax,
                    lambda q, k, v, ln: dda.ragged_decode_attention(q, k, v, ln),
                    qs, (keys, values, lengths)), dense_bytes)
            except ImportError as e:
                log(f"  dense pallas kernel unavailable: {e}")
            record("torch sdpa", _try("torch sdpa", _torch_sdpa, qs, keys, values, scale),
                   dense_bytes)

    for s in [float(x) for x in FLAGS.sparsities]:
        kk, vk = ms.keep_count(d, s), ms.keep_count(d, s)
        kv, kb = jax.jit(ms.sparsify, static_argnums=1)(keys, kk)
        vv, vb = jax.jit(ms.sparsify, static_argnums=1)(values, vk)
        nbytes = sda.hbm_bytes(b, hkv, c, d, kk, vk, itemsize)
        best = None
        for bs in [int(x) for x in FLAGS.block_sizes]:
            for nw in [int(x) for x in FLAGS.num_warps]:
                def kern(q, kv, kb, vv, vb, ln, bs=bs, nw=nw):
                    return sda.sparse_decode_attention(q, kv, kb, vv, vb, ln, block_size=bs,
                                                       num_warps=nw)

                t = _try(f"mustafar bs={bs} nw={nw}", time_jax, kern, qs,
                         (kv, kb, vv, vb, lengths))
                if t is not None and (best is None or t < best[0]):
                    best = (t, bs, nw)
        if best is not None:
            record(f"mustafar kernel bs={best[1]} nw={best[2]}", best[0], nbytes, s)
        record("mustafar jnp reference", _try(
            "mustafar reference", time_jax,
            lambda q, kv, kb, vv, vb, ln: sda.reference(q, kv, kb, vv, vb, ln),
            qs, (kv, kb, vv, vb, lengths)), nbytes, s)

    dense_times = [r["us"] for r in rows if "sparsity" not in r]
    for r in rows:
        if dense_times:
            r["speedup"] = min(dense_times) / r["us"]
    RESULTS["rows"].extend(rows)
    save()


def _torch_sdpa(qs, keys, values, scale):
    import torch
    import torch.nn.functional as F

    if not torch.cuda.is_available():
        raise RuntimeError("torch has no CUDA device")
    tdt = {jnp.bfloat16: torch.bfloat16, jnp.float16: torch.float16}.get(
        jnp.dtype(keys.dtype).type, torch.float32)

    def to_t(x):
        return torch.from_numpy(np.asarray(x.astype(jnp.float32))).to("cuda", tdt)

    k, v = to_t(keys), to_t(values)
    tq = [to_t(q)[:, :, None] for q in qs]

    def fn(q):
        return F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=True)

    return time_torch(fn, tq)


def main(argv) -> None:
    del argv
    dtype = jnp.dtype(FLAGS.dtype)
    RESULTS["device"] = str(jax.devices()[0].device_kind)
    RESULTS["config"] = {k: FLAGS[k].value for k in (
        "contexts", "batches", "sparsities", "hq", "hkv", "head_dim", "dtype", "calls", "reps")}
    log(f"device: {RESULTS['device']} ({jax.default_backend()}), jax {jax.__version__}")
    if FLAGS.hq % FLAGS.hkv:
        raise app.UsageError(f"--hq ({FLAGS.hq}) must be a multiple of --hkv ({FLAGS.hkv})")
    for s in FLAGS.sparsities:
        ms.check_sparsity("--sparsities", float(s))
    if FLAGS.check:
        check(dtype)
    for b in [int(x) for x in FLAGS.batches]:
        for c in [int(x) for x in FLAGS.contexts]:
            bench(b, c, dtype)
    save()
    log(table())


if __name__ == "__main__":
    app.run(main)
