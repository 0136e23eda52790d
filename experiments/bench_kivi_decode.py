"""GPU: decode steps (cache write + `kvjax.attention.attend`) over kivi int4 caches in both layouts.

What a model's decode loop does per layer and token, through the public API: `kvjax.cache.write`
of one token (the residual window is full, so every 32nd step quantizes a group: the flush
writes int4 rows / columns in the int4 layout, or-s bit fields into words in the packed one),
then `kvjax.attention.attend` with `impl="auto"`, which dispatches
  dense bf16 LayerCache          -> the ragged decode kernel (Triton)
  kivi(4) packed layout          -> the Triton quantized kernel
  kivi(4, layout="int4")         -> the Mosaic GPU kernel (sm_90)
  kivi(bits, layout="words")     -> (`--words`, bits 4 and 2) the Mosaic GPU kernel (sm_90);
                                    kivi(2) packed next to it (Triton)
The steps run in one `lax.scan` with the cache as carry (donated, updated in place), as in
`kvjax.generate`; time per step = scan time / steps. Outputs and codes of the int4 and words
layouts are compared with the packed layout's of the same bits on the same steps (all hold
the same quantized cache).
Shapes: 32 query / 8 KV heads, head dim 128, G = 32, R = 128, bf16.

    PYTHONPATH=. python3 experiments/bench_kivi_decode.py --out $OUT                 # GPU
    python experiments/bench_kivi_decode.py --batches=1 --contexts=2048 --steps=4  # CPU smoke
        [--words]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import kvjax  # noqa: E402
from experiments._bench import make_log, rel_err  # noqa: E402
from experiments.bench_kernels import make_cache  # noqa: E402
from kvjax.cache import LayerCache  # noqa: E402
from kvjax.quant import from_dense  # noqa: E402

LOG: list[str] = []
log, attempt = make_log(LOG)
HKV, GQ, D, G, R = 8, 4, 128, 32, 128
ROOM = 1024  # free slots: appends over several timed runs stay inside the capacity


PACKED = "kivi4 packed (Triton)"
PACKED2 = "kivi2 packed (Triton)"


def caches(b: int, ctx: int, words: bool = False) -> dict:
    """{name: layer cache} at b x ctx capacity holding ctx - ROOM tokens per head."""
    k, v, lengths, pos = make_cache(jax.random.key(b), b, HKV, ctx, D, jnp.bfloat16,
                                    jnp.full((b, HKV), ctx - ROOM, jnp.int32))
    dense = LayerCache(k, v, lengths, pos)
    out = {"dense bf16": dense,
           PACKED: from_dense(dense, 4, G, R),
           "kivi4 int4 (Mosaic GPU)": from_dense(dense, 4, G, R, layout="int4")}
    if words:  # the words layout (Mosaic GPU on Hopper) at 4 and 2 bits; 2-bit packed: Triton
        out["kivi4 words (Mosaic GPU)"] = from_dense(dense, 4, G, R, layout="words")
        out[PACKED2] = from_dense(dense, 2, G, R)
        out["kivi2 words (Mosaic GPU)"] = from_dense(dense, 2, G, R, layout="words")
    return out


def steps_fn(n: int):
    """jit(cache, qs, ks, vs, ps) -> (cache, outputs [n, B, Hq, D]): n decode steps in a scan."""

    def step(c, x):
        q, k, v, p = x
        c = kvjax.cache.write(c, k, v, p)
        return c, kvjax.attention.attend(q, p, c)[:, :, 0]

    return jax.jit(lambda c, *xs: jax.lax.scan(step, c, xs), donate_argnums=0)


def inputs(b: int, ctx: int, n: int, seed: int) -> tuple:
    keys = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(keys[0], (n, b, HKV * GQ, 1, D), jnp.bfloat16)
    k = jax.random.normal(keys[1], (n, b, HKV, 1, D), jnp.bfloat16)
    v = jax.random.normal(keys[2], (n, b, HKV, 1, D), jnp.bfloat16)
    p = jnp.broadcast_to(ctx - ROOM + jnp.arange(n, dtype=jnp.int32)[:, None, None], (n, b, 1))
    return q, k, v, p


def run_cell(b: int, ctx: int, n: int, runs: int, words: bool = False) -> dict:
    row: dict = {"batch": b, "ctx": ctx, "steps": n}
    f = steps_fn(n)
    outs, codes, bits = {}, {}, {}
    for name, cache in caches(b, ctx, words).items():
        xs = inputs(b, ctx, n, 0)
        cache, out = f(cache, *xs)  # compile + the steps whose outputs are compared
        outs[name] = np.asarray(out, np.float32)
        if hasattr(cache, "codes"):  # after n steps (flushes included), on this device
            codes[name] = [np.asarray(x) for x in cache.codes()] + [np.asarray(cache.k_scale)]
            bits[name] = cache.bits
        ts = []
        for i in range(runs):
            xs = inputs(b, ctx, n, i + 1)
            jax.block_until_ready(xs)
            t0 = time.perf_counter()
            cache, out = f(cache, *xs)
            jax.block_until_ready((cache, out))
            ts.append(time.perf_counter() - t0)
        t = float(np.median(ts)) / n
        row[name] = t * 1e6
        nq = cache.num_quantized if hasattr(cache, "num_quantized") else cache.lengths
        log(f"batch {b} ctx {ctx}: {name:26s} {t * 1e6:8.1f} us per step "
            f"({row['dense bf16'] / (t * 1e6):5.2f}x dense; quantized / held tokens now "
            f"{int(nq.min())}; {kvjax.cache.nbytes(cache) / 2**20:7.1f} MiB)")
        del cache
    packed = {4: PACKED, 2: PACKED2}  # each layout is compared with the packed one of its bits
    for p in packed.values():
        if p in outs:
            row[f"packed_vs_dense_err {p}"] = rel_err(outs[p], outs["dense bf16"])
    for name in codes:
        p = packed[bits[name]]
        if name == p:
            continue
        same = [bool(np.array_equal(x, y)) for x, y in zip(codes[name], codes[p])]
        row[f"same_codes_after_steps {name}"] = same
        row[f"vs_packed_err {name}"] = err = rel_err(outs[name], outs[p])
        log(f"  {name}: after {n} steps key codes, value codes, key scales equal to the packed "
            f"layout's: {same}; outputs vs packed rel err {err:.1e} (packed vs dense bf16 "
            f"{row[f'packed_vs_dense_err {p}']:.1e}: the quantization)")
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "runs/kivi_decode"))
    ap.add_argument("--batches", default="8,1")
    ap.add_argument("--contexts", default="32768")
    ap.add_argument("--steps", type=int, default=64, help="decode steps per scan")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--words", action="store_true",
                    help='also kivi(4 and 2, layout="words") through the Mosaic GPU kernel, and '
                         'kivi(2) packed (Triton); codes and outputs compared on this device')
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    log(f"devices {jax.devices()} jax {jax.__version__}")
    rows = []
    for c in args.contexts.split(","):
        for b in args.batches.split(","):
            row = attempt(f"cell {b} x {c}", run_cell, int(b), int(c), args.steps, args.runs,
                          args.words)
            if row is not None:
                rows.append(row)
    with open(os.path.join(args.out, "kivi_decode.json"), "w") as f:
        json.dump(rows, f, indent=1)
    with open(os.path.join(args.out, "log.txt"), "a") as f:
        f.write("\n".join(LOG) + "\n")


if __name__ == "__main__":
    main()
