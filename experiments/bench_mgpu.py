"""Mosaic GPU ragged decode kernel (pallas_kernels/decode_attention_mgpu.py): GPU checks + timing.

Checks the kernel against `decode_attention.reference` over ragged shapes, then times it at
batch 1/8/32 x 32k (32 query / 8 KV heads, D 128, bf16, full lengths) over a small launch grid,
next to the Triton kernel (its tuned defaults; lengths only, then both with positions), cuDNN
(`jax.nn.dot_product_attention`) and torch SDPA, all in one run.

    PYTHONPATH=. python3 experiments/bench_mgpu.py --out $OUT [--batches=] [--no_check]

(`--batches=` runs the checks only.)
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from experiments._bench import copy_bandwidth, make_log, rel_err, time_jax  # noqa: E402
from experiments.bench_kernels import make_cache, torch_sdpa_time  # noqa: E402
from pallas_kernels import decode_attention as da  # noqa: E402
from pallas_kernels import decode_attention_mgpu as dm  # noqa: E402

LOG: list[str] = []
log, attempt = make_log(LOG)

GRID = [  # the launch configs of the fifth session's run (docs/benchmarks.md)
    {"block_k": 64, "num_stages": 2, "num_splits": 16},
    {"block_k": 64, "num_stages": 3, "num_splits": 16},
    {"block_k": 64, "num_stages": 4, "num_splits": 16},
    {"block_k": 128, "num_stages": 2, "num_splits": 16},
    {"block_k": 64, "num_stages": 3, "num_splits": 8},
    {"block_k": 64, "num_stages": 3, "num_splits": 32},
    {"block_k": 128, "num_stages": 2, "num_splits": 8},
    {"block_k": 64, "num_stages": 2, "num_splits": 32},
]


CHECK_TOL = 1e-2  # rel. L2 error; bf16 outputs measure ~2e-4 here


def _verdict(err: float) -> str:
    return "ok" if err <= CHECK_TOL else f"MISMATCH (> {CHECK_TOL})"


def check() -> None:
    rng = np.random.default_rng(0)
    for b, hkv, g, c, d, splits, bk in [(2, 2, 4, 512, 128, 3, 64), (1, 3, 8, 256, 64, 1, 64),
                                        (3, 2, 1, 1024, 128, 8, 128), (2, 1, 16, 512, 128, 4, 64)]:
        key = jax.random.key(b * 100 + c)
        k1, k2, k3 = jax.random.split(key, 3)
        q = jax.random.normal(k1, (b, hkv * g, d), jnp.bfloat16)
        k = jax.random.normal(k2, (b, hkv, c, d), jnp.bfloat16)
        v = jax.random.normal(k3, (b, hkv, c, d), jnp.bfloat16)
        lens = rng.integers(0, c + 1, (b, hkv))
        lens.flat[0] = c
        lens.flat[-1] = 1
        if lens.size > 2:
            lens.flat[1] = 0
        lengths = jnp.asarray(lens, jnp.int32)
        ref = da.reference(q, k, v, lengths)
        out = attempt("mgpu", dm.ragged_decode_attention_mgpu, q, k, v, lengths,
                      num_splits=splits, block_k=bk, num_stages=2)
        if out is not None:
            err = rel_err(out, ref)
            log(f"check b{b} hkv{hkv} g{g} c{c} d{d} splits{splits} bk{bk} lens {lens.tolist()}: "
                f"rel err {err:.2e} {_verdict(err)}")
        slot = np.arange(c)[None, None]
        pos = np.where((slot < lens[..., None]) & (rng.random((b, hkv, c)) > 0.2), slot, -1)
        pos, qpos = jnp.asarray(pos, jnp.int32), jnp.full((b,), c // 2, jnp.int32)
        ref = da.reference(q, k, v, lengths, kv_positions=pos, q_positions=qpos)
        out = attempt("mgpu pos", dm.ragged_decode_attention_mgpu, q, k, v, lengths,
                      kv_positions=pos, q_positions=qpos, num_splits=splits, block_k=bk,
                      num_stages=2)
        if out is not None:
            err = rel_err(out, ref)
            log(f"  with positions (holes, q_pos {c // 2}): rel err {err:.2e} {_verdict(err)}")


def bench(b: int, ctx: int, copy_bw: float, budget_end: float) -> dict:
    hkv, g, d = 8, 4, 128
    reps = 4
    nbytes = b * hkv * ctx * d * 2 * 2
    key = jax.random.key(b)
    qs = jax.random.normal(key, (reps, b, hkv * g, d), jnp.bfloat16)
    nsets = max(1, min(4, int(200e6 // nbytes) + 1))
    sets = []
    for s in range(nsets):  # full lengths: every set's positions are 0 .. ctx - 1
        k, v, lengths, pos = make_cache(jax.random.key(100 + s), b, hkv, ctx, d, jnp.bfloat16)
        sets.append((k, v, lengths))
    ref = da.reference(qs[0], *sets[0])
    row = {"batch": b, "ctx": ctx}

    def report(name, fn):
        t = attempt(name, time_jax, fn, qs, sets, reps)
        if t is None:
            return None
        err = rel_err(fn(qs[0], *sets[0]), ref)
        log(f"  {name:40s} {t * 1e6:9.1f} us  {nbytes / t / 1e9:7.0f} GB/s  "
            f"{100 * nbytes / t / copy_bw:5.1f}% copy  err {err:.1e}")
        row[name] = t * 1e6
        return t

    log(f"batch {b} ctx {ctx}: {nbytes / 1e9:.3f} GB K+V")
    report("triton", lambda q, k, v, ln: da.ragged_decode_attention(q, k, v, ln))
    for cfg in GRID:
        if time.time() > budget_end:
            log("  (budget spent)")
            break
        report("mgpu " + json.dumps(cfg), lambda q, k, v, ln, cfg=cfg:
               dm.ragged_decode_attention_mgpu(q, k, v, ln, **cfg))
    qpos = jnp.full((b,), ctx, jnp.int32)
    report("triton +pos", lambda q, k, v, ln: da.ragged_decode_attention(
        q, k, v, ln, kv_positions=pos, q_positions=qpos))
    report("mgpu +pos " + json.dumps(GRID[1]), lambda q, k, v, ln:
           dm.ragged_decode_attention_mgpu(q, k, v, ln, kv_positions=pos, q_positions=qpos,
                                           **GRID[1]))
    tset = [(jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2), ln) for k, v, ln in sets]
    t = attempt("cudnn", time_jax, lambda q, kt, vt, ln: jax.nn.dot_product_attention(
        q[:, None], kt, vt, implementation="cudnn")[:, 0], qs, tset, reps)
    if t is not None:
        log(f"  {'cudnn':40s} {t * 1e6:9.1f} us  {100 * nbytes / t / copy_bw:5.1f}% copy")
        row["cudnn"] = t * 1e6
    del tset
    t = attempt("torch", torch_sdpa_time, qs, [s[:2] for s in sets], reps)
    if t is not None:
        log(f"  {'torch sdpa':40s} {t * 1e6:9.1f} us  {100 * nbytes / t / copy_bw:5.1f}% copy")
        row["torch"] = t * 1e6
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="runs/mgpu")
    ap.add_argument("--budget", type=float, default=240.0)
    ap.add_argument("--batches", default="8,1,32", help="empty: checks only")
    ap.add_argument("--no_check", action="store_true", help="skip the correctness checks")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    end = time.time() + args.budget
    log(f"devices {jax.devices()} jax {jax.__version__}")
    if not args.no_check:
        check()
    rows, bw = [], None
    if args.batches:
        bw = copy_bandwidth(2 << 30)
        log(f"copy bandwidth {bw / 1e9:.0f} GB/s")
        rows = [bench(int(b), 32768, bw, end) for b in args.batches.split(",")]
    with open(os.path.join(args.out, "mgpu.json"), "w") as f:
        json.dump({"copy_bw": bw, "rows": rows}, f, indent=1)
    with open(os.path.join(args.out, "log.txt"), "a") as f:
        f.write("\n".join(LOG) + "\n")


if __name__ == "__main__":
    main()
