"""Times the TPU decode kernels against XLA on a TPU (none in this workplace yet).

At each batch x context cell: `pallas_kernels/decode_attention_tpu.py` (Mosaic TPU) for each
`--block_k`, `block_sparse_attention_tpu.py` with 1/8 of the 64- and 16-slot blocks listed,
and `quantized_decode_attention_tpu.py` over KIVI 4- and 2-bit caches (G 32, full 128-token
residual), next to the jnp reference (`decode_attention.reference`, what `kvjax.attention`
runs on TPU with `TPU_DECODE_KERNEL` off) and `jax.nn.dot_product_attention` (XLA), all with
`_bench.time_jax` in the same run; bytes are what each reads (K + V, + 4 B per slot of
positions where used; codes + scales + zeros + residual for KIVI), % of the copy bandwidth
measured in the run (a jitted copy, bytes read + written). Each kernel config is checked
against its reference before it is timed. bf16, 32 query / 8 KV heads, head dim 128, full
lengths, positions.

    python experiments/bench_tpu_decode.py --out $OUT     # on a TPU VM / Colab
    python experiments/bench_tpu_decode.py --quick        # CPU smoke (interpreter)

Then, if the kernel wins: `kvjax.attention.TPU_DECODE_KERNEL = True` by default, and the best
`--block_k` as `decode_attention_tpu.BLOCK_K`, with the figures in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiments._bench import copy_bandwidth, make_log, rel_err, time_jax  # noqa: E402
from experiments.bench_kernels import decode_dpa, random_blocks  # noqa: E402
from experiments.bench_quant import QARGS, random_quantized  # noqa: E402
from pallas_kernels import block_sparse_attention as bsa  # noqa: E402
from pallas_kernels import block_sparse_attention_tpu as bt  # noqa: E402
from pallas_kernels import decode_attention as da  # noqa: E402
from pallas_kernels import decode_attention_tpu as dt  # noqa: E402
from pallas_kernels import quantized_decode_attention as qda  # noqa: E402
from pallas_kernels import quantized_decode_attention_tpu as qt  # noqa: E402

LOG: list[str] = []
log, attempt = make_log(LOG)


def bench(b: int, ctx: int, block_ks: list[int], copy_bw: float, hkv: int = 8, g: int = 4,
          d: int = 128) -> dict:
    """One cell: reference, XLA dot_product_attention and the kernel per block_k (us)."""
    reps = 4
    ks = jax.random.split(jax.random.key(b * 7919 + ctx), 4)
    qs = jax.random.normal(ks[0], (reps, b, hkv * g, d), jnp.bfloat16)
    k = jax.random.normal(ks[1], (b, hkv, ctx, d), jnp.bfloat16)
    v = jax.random.normal(ks[2], (b, hkv, ctx, d), jnp.bfloat16)
    lengths = jnp.full((b, hkv), ctx, jnp.int32)
    pos = jnp.broadcast_to(jnp.arange(ctx, dtype=jnp.int32), (b, hkv, ctx))
    qpos = jnp.full((b,), ctx, jnp.int32)
    kv_bytes = 2 * k.size * 2
    row: dict = {"batch": b, "ctx": ctx}

    def record(name: str, t: float | None, nbytes: int) -> None:
        if t is None:
            return
        row[name] = t * 1e6
        log(f"  {name:28s} {t * 1e6:9.1f} us {nbytes / t / 1e9:7.0f} GB/s "
            f"{100 * nbytes / t / copy_bw:5.1f}% of copy")

    log(f"batch {b} ctx {ctx}:")
    sets = [(k, v, lengths, pos, qpos)]
    ref_fn = lambda q, k, v, ln, p, qp: da.reference(  # noqa: E731
        q, k, v, ln, kv_positions=p, q_positions=qp)
    record("reference (jnp)", attempt("reference", time_jax, ref_fn, qs, sets, reps),
           kv_bytes + pos.size * 4)
    kt, vt = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)
    record("xla dot_product_attention",
           attempt("xla", time_jax, decode_dpa, qs, [(kt, vt)], reps), kv_bytes)
    del kt, vt
    def checked(name: str, fn, arg_set: tuple, ref, nbytes: int) -> None:
        """fn(q, *arg_set) once against `ref`; timed and recorded only if it agrees."""
        out = attempt(name, jax.jit(fn), qs[0], *arg_set)
        if out is None:
            return
        err = rel_err(out, ref)
        if not err < 1e-2:
            log(f"  {name}: WRONG (rel. err {err:.2e}), not timed")
            return
        record(name, attempt(name, time_jax, fn, qs, [arg_set], reps), nbytes)

    ref = ref_fn(qs[0], *sets[0])
    for bk in block_ks:
        def kern(q, k, v, ln, p, qp, bk=bk):
            return dt.ragged_decode_attention_tpu(q, k, v, ln, kv_positions=p, q_positions=qp,
                                                  block_k=bk)

        checked(f"kernel block_k {bk}", kern, sets[0], ref, kv_bytes + pos.size * 4)
    # block-sparse decode (`block_sparse_attention_tpu`), 1/8 of the blocks listed per head
    for bs in (64, 16):
        idx, cnt = random_blocks(b, hkv, ctx // bs, 8)

        def sparse(q, k, v, ln, p, qp, bs=bs, idx=idx, cnt=cnt):
            return bt.block_sparse_decode_tpu(q, k, v, ln, idx, cnt, block_size=bs,
                                              kv_positions=p, q_positions=qp)

        want = bsa.reference_decode(qs[0], k, v, lengths, idx, cnt, block_size=bs,
                                    kv_positions=pos, q_positions=qpos)
        frac = int(cnt[0, 0]) / (ctx // bs)
        checked(f"block-sparse 1/8 of {bs}-slot blocks", sparse, sets[0], want,
                int(frac * (kv_bytes + pos.size * 4)))
    # KIVI (`quantized_decode_attention_tpu`), packed 4 / 2 bits, G 32, full 128-token residual
    r = min(128, ctx // 2)
    for bits in (4, 2):
        arrs = random_quantized(jax.random.key(bits), b, hkv, ctx - r, d, bits, 32, r)
        qargs = tuple(arrs[n] for n in QARGS)
        checked(f"kivi{bits} (packed)", qt.quantized_decode_attention_tpu, qargs,
                qda.reference(qs[0], *qargs),
                qda.hbm_bytes(b, hkv, ctx - r, d, bits, 32) + b * hkv * r * d * 2 * 2)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "runs/tpu_decode"))
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--contexts", default="4096,32768")
    ap.add_argument("--block_k", default="512,1024,2048")
    ap.add_argument("--quick", action="store_true", help="CPU smoke test: tiny shapes")
    args = ap.parse_args()
    log(f"devices {jax.devices()} jax {jax.__version__}")
    block_ks = [int(x) for x in args.block_k.split(",")]
    cells = [(int(b), int(c)) for c in args.contexts.split(",") for b in args.batches.split(",")]
    if args.quick:
        cells, block_ks = [(1, 512)], [128, 256]
    copy_bw = copy_bandwidth(2**26 if args.quick else 2**31)
    log(f"copy bandwidth (`_bench.copy_bandwidth`, read + write): {copy_bw / 1e9:.0f} GB/s")
    rows = [bench(b, c, block_ks, copy_bw, **({"hkv": 2, "d": 128} if args.quick else {}))
            for b, c in cells]
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "tpu_decode.json"), "w") as f:
        json.dump({"copy_bw": copy_bw, "rows": rows, "jax": jax.__version__,
                   "device": str(jax.devices()[0])}, f, indent=1)
    with open(os.path.join(args.out, "log.txt"), "w") as f:
        f.write("\n".join(LOG) + "\n")


if __name__ == "__main__":
    main()
