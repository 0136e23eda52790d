"""GPU benchmark: decode attention over KIVI-quantized caches (int8/int4/int2) vs bf16 dense.

    PYTHONPATH=. python experiments/bench_quant.py --out=/tmp/bench_quant

Budget the device time: each timed program holds `--calls` kernel instances and Triton compiles
the unrolled int2 kernel slowly; the first H100 run (checks + a 2-config sweep, --calls=8) spent
~470 s before reaching the table. Use --contexts/--batches/--bits to time a subset.

Shapes: 32 query heads, 8 KV heads, head dim 128, group 32, bf16 queries / residual / scales,
residual window of 128 tokens (full), contexts 32k and 128k, batch 1/8/32.

Baselines, timed in the same run: the project's dense decode kernel
(`pallas_kernels.decode_attention.ragged_decode_attention`, or the jnp reference under jit when
that module is missing), cuDNN and XLA through `jax.nn.dot_product_attention`.

Method: first a correctness check of the compiled kernel against its jnp reference (random
codes, ragged lengths, partially full residual) and of `kvjax.attention.attend` on quantized
caches; then the measured HBM bandwidth (a large device copy, bytes read + written); a small
launch-parameter sweep of each bit width at 32k x batch 8; then the table. Each timing is the
median of `--reps` runs of one jitted program issuing `--calls` back-to-back attention calls,
rotating over enough cache copies (>= 256 MB) that no call is served from L2; time per call =
run time / calls. Bytes per call: codes + scales + zeros (+ residual, + q/out) for quantized,
keys + values for dense. Results go to OUT/bench_quant.json and OUT/bench_quant.md.
"""

from __future__ import annotations

import gc
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

from pallas_kernels import quantized_decode_attention as qda  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("out", os.environ.get("OUT", "/tmp/bench_quant"), "output directory")
flags.DEFINE_list("contexts", ["32768", "131072"], "context lengths")
flags.DEFINE_list("batches", ["1", "8", "32"], "batch sizes")
flags.DEFINE_list("bits", ["8", "4", "2"], "bit widths")
flags.DEFINE_integer("hq", 32, "query heads")
flags.DEFINE_integer("hkv", 8, "KV heads")
flags.DEFINE_integer("head_dim", 128, "head dim")
flags.DEFINE_integer("group", 32, "KIVI group size")
flags.DEFINE_integer("residual", 128, "residual window")
flags.DEFINE_integer("calls", 4, "attention calls per timed program")
flags.DEFINE_integer("reps", 10, "timed runs (median)")
flags.DEFINE_bool("check", True, "run the correctness checks first")
flags.DEFINE_bool("sweep", False, "sweep launch parameters at 32k x batch 8 first")

RESULTS: dict = {"rows": [], "checks": [], "sweep": [], "errors": []}


def log(*a):
    print(*a, flush=True)


def save():
    os.makedirs(FLAGS.out, exist_ok=True)
    with open(os.path.join(FLAGS.out, "bench_quant.json"), "w") as f:
        json.dump(RESULTS, f, indent=1)


def bench(fn, args, calls_done: int) -> float:
    """Median seconds per attention call of `fn(*args)` (which issues `calls_done` calls)."""
    jax.block_until_ready(fn(*args))
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(FLAGS.reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times) / calls_done


def rotating(op, copies):
    """jit program: FLAGS.calls calls of op(q, *copy), rotating copies, chained through q."""
    n = FLAGS.calls

    @jax.jit
    def run(q, copies):
        acc = jnp.zeros(q.shape, jnp.float32)
        for i in range(n):
            out = op(q, *copies[i % len(copies)])
            acc = acc + out.astype(jnp.float32)
            q = q + (out * 1e-30).astype(q.dtype)
        return acc

    return lambda q: run(q, copies)


def n_copies(nbytes: int) -> int:
    return int(min(FLAGS.calls, max(1, -(-256 * 2**20 // max(nbytes, 1)))))


# --- inputs -----------------------------------------------------------------------------


def random_quantized(key, b, h, tokens, d, bits, g, r):
    """Random packed codes / bf16 scales for `tokens` quantized tokens (+ a full residual)."""
    per = 32 // bits
    groups = -(-tokens // g)
    ng = -(-groups // per) * per
    nb = ng // per
    ks = jax.random.split(key, 8)
    u32 = lambda k, s: jax.random.bits(k, s, jnp.uint32)  # noqa: E731
    uni = lambda k, s, lo, hi: jax.random.uniform(k, s, jnp.float32, lo, hi).astype(  # noqa: E731
        jnp.bfloat16
    )
    levels = 2**bits - 1
    arrs = dict(
        k_codes=u32(ks[0], (b, h, nb, g, d)),
        k_scale=uni(ks[1], (b, h, ng, d), 1.0 / levels, 2.0 / levels),
        k_zero=uni(ks[2], (b, h, ng, d), -1.0, 0.0),
        v_codes=u32(ks[3], (b, h, nb, g, d)),
        v_scale=uni(ks[4], (b, h, ng, d // g, g), 1.0 / levels, 2.0 / levels),
        v_zero=uni(ks[5], (b, h, ng, d // g, g), -1.0, 0.0),
        num_quantized=jnp.full((b, h), tokens, jnp.int32),
        residual_keys=jax.random.normal(ks[6], (b, h, r, d), jnp.bfloat16),
        residual_values=jax.random.normal(ks[7], (b, h, r, d), jnp.bfloat16),
        num_residual=jnp.full((b, h), r, jnp.int32),
    )
    return arrs


QARGS = ("k_codes", "k_scale", "k_zero", "v_codes", "v_scale", "v_zero", "num_quantized",
         "residual_keys", "residual_values", "num_residual")


def qbytes(arrs) -> int:
    return int(sum(arrs[k].size * arrs[k].dtype.itemsize for k in QARGS))


# --- checks -----------------------------------------------------------------------------


def checks():
    key = jax.random.key(0)
    b, h, gq, d, g, r = 2, 8, 4, 128, 32, 128
    for bits in (8, 4, 2):
        per = 32 // bits
        tokens = 5 * per * g + 7 * g  # 5.x blocks
        arrs = random_quantized(jax.random.fold_in(key, bits), b, h, tokens, d, bits, g, r)
        nq = jax.random.randint(jax.random.key(bits), (b, h), 0, tokens + 1).astype(jnp.int32)
        nr = jax.random.randint(jax.random.key(bits + 1), (b, h), 0, r + 1).astype(jnp.int32)
        arrs = dict(arrs, num_quantized=nq, num_residual=nr)
        for dtype in (jnp.bfloat16, jnp.float32):
            q = jax.random.normal(jax.random.key(7), (b, h * gq, d), dtype)
            args = [arrs[k] for k in QARGS]
            out = qda.quantized_decode_attention(q, *args)
            ref = qda.reference(q.astype(jnp.float32), *args)
            out, ref = np.asarray(out, np.float32), np.asarray(ref, np.float32)
            rel = float(np.linalg.norm(out - ref) / np.linalg.norm(ref))
            row = dict(what=f"kernel int{bits} q={jnp.dtype(dtype).name}", rel_err=rel,
                       finite=bool(np.isfinite(out).all()))
            RESULTS["checks"].append(row)
            log("check", row)
    try:  # the kvjax-level dispatch (auto -> kernel on GPU) on caches built by kivi
        import kvjax
        from kvjax.cache import LayerCache

        b, h, c = 2, 8, 1000
        kk = jax.random.normal(jax.random.key(3), (b, h, c, d), jnp.bfloat16)
        vv = jax.random.normal(jax.random.key(4), (b, h, c, d), jnp.bfloat16)
        lengths = jnp.array([[1000] * h, [777] * h], jnp.int32)
        pos = jnp.where(jnp.arange(c)[None, None] < lengths[..., None], jnp.arange(c), -1)
        dense = LayerCache(kk, vv, lengths, pos.astype(jnp.int32))
        q = jax.random.normal(jax.random.key(5), (b, h * gq, 1, d), jnp.bfloat16)
        qpos = jnp.full((b, 1), c, jnp.int32)
        caches = {f"kivi int{bits}": kvjax.quant.from_dense(dense, bits) for bits in (8, 4, 2)}
        knorm = lambda cache, obs: -jnp.linalg.norm(  # noqa: E731
            cache.keys.astype(jnp.float32), axis=-1
        )
        mixed = kvjax.quant.mixed_precision(knorm)
        caches["mixed 8/2"] = mixed.prefill(dense, None, ())[0]
        for name, cache in caches.items():
            auto = kvjax.attention.attend(q, qpos, cache, impl="auto")
            ref = kvjax.attention.attend(q, qpos, cache, impl="reference")
            auto, ref = np.asarray(auto, np.float32), np.asarray(ref, np.float32)
            rel = float(np.linalg.norm(auto - ref) / np.linalg.norm(ref))
            exact = kvjax.attention.attend(q, qpos, dense, impl="reference")
            qerr = float(np.linalg.norm(np.asarray(exact, np.float32) - ref)
                         / np.linalg.norm(ref))
            row = dict(what=f"attend auto vs reference, {name}", rel_err=rel,
                       quant_vs_bf16_rel_err=qerr)
            RESULTS["checks"].append(row)
            log("check", row)
    except Exception:  # noqa: BLE001 - keep benchmarking; the error is recorded
        RESULTS["errors"].append(traceback.format_exc())
        log(traceback.format_exc())
    save()


# --- timing -----------------------------------------------------------------------------


def hbm_bandwidth() -> float:
    x = jax.random.normal(jax.random.key(0), (2**30,), jnp.bfloat16)  # 2 GiB
    f = jax.jit(lambda x: x * jnp.bfloat16(1.0009765625))
    t = bench(f, (x,), 1)
    bw = 2 * x.size * 2 / t
    del x
    RESULTS["hbm_bytes_per_s"] = bw
    log(f"measured HBM bandwidth (copy, read + write): {bw / 1e12:.2f} TB/s")
    return bw


def quant_op(cfg):
    def op(q, *arrs):
        return qda.quantized_decode_attention(q, *arrs, **cfg)

    return op


def time_quant(b, s, bits, cfg, qkey):
    arrs = random_quantized(jax.random.key(bits * 7 + b), b, FLAGS.hkv, s - FLAGS.residual,
                            FLAGS.head_dim, bits, FLAGS.group, FLAGS.residual)
    nbytes = qbytes(arrs)
    k = n_copies(nbytes)
    copies = [tuple(arrs[n] for n in QARGS)]
    for _ in range(1, k):
        copies.append(tuple(jax.tree.map(lambda x: x.copy(), copies[0])))
    q = jax.random.normal(qkey, (b, FLAGS.hq, FLAGS.head_dim), jnp.bfloat16)
    t = bench(rotating(quant_op(cfg), copies), (q,), FLAGS.calls)
    del copies, arrs
    gc.collect()
    return t, nbytes


def best_cfgs(s=32768, b=8):
    default = dict(num_warps=4, num_stages=2, softmax_chunk=8)
    cands = [default, dict(num_warps=8, num_stages=2, softmax_chunk=8)]
    best = {}
    for bits in [int(x) for x in FLAGS.bits]:
        best[bits] = (default, None)
        if not FLAGS.sweep:
            continue
        for cfg in cands:
            try:
                t, _ = time_quant(b, s, bits, cfg, jax.random.key(1))
            except Exception:  # noqa: BLE001
                RESULTS["errors"].append(f"sweep int{bits} {cfg}: {traceback.format_exc()}")
                log(traceback.format_exc())
                continue
            RESULTS["sweep"].append(dict(bits=bits, **cfg, us=t * 1e6))
            log(f"sweep int{bits} {cfg}: {t * 1e6:.1f} us")
            if best[bits][1] is None or t < best[bits][1]:
                best[bits] = (cfg, t)
        save()
    return {k: v[0] for k, v in best.items()}


def dense_ops():
    """name -> (op(q, k, v, lengths) on [B,Hkv,S,D] caches, layout) of the dense baselines."""
    ops = {}
    try:
        from pallas_kernels.decode_attention import ragged_decode_attention

        ops["dense kernel"] = lambda q, k, v, n: ragged_decode_attention(q, k, v, n)
    except ImportError:
        from kvjax.attention import reference_attention
        from kvjax.cache import LayerCache

        def ref(q, k, v, n):
            pos = jnp.broadcast_to(jnp.arange(k.shape[2], dtype=jnp.int32), k.shape[:3])
            layer = LayerCache(k, v, n, pos)
            qpos = jnp.full((q.shape[0], 1), k.shape[2], jnp.int32)
            return reference_attention(q[:, :, None], qpos, layer)[:, :, 0]

        ops["dense jnp reference"] = ref

    def sdpa(impl):
        def op(q, k, v, n):  # BTNH layout
            out = jax.nn.dot_product_attention(q[:, None], k, v, implementation=impl)
            return out[:, 0]

        return op

    ops["cuDNN"] = sdpa("cudnn")
    ops["XLA"] = sdpa("xla")
    return ops


def time_dense(b, s, qkey):
    d, h = FLAGS.head_dim, FLAGS.hkv
    k = jax.random.normal(jax.random.key(11), (b, h, s, d), jnp.bfloat16)
    v = jax.random.normal(jax.random.key(12), (b, h, s, d), jnp.bfloat16)
    n = jnp.full((b, h), s, jnp.int32)
    nbytes = 2 * k.size * 2
    q = jax.random.normal(qkey, (b, FLAGS.hq, d), jnp.bfloat16)
    out = {}
    for name, op in dense_ops().items():
        try:
            if name in ("cuDNN", "XLA"):
                kt, vt = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)
                copies = [(kt, vt, n)]
            else:
                copies = [(k, v, n)]
            reps = n_copies(nbytes)
            for _ in range(1, reps):
                copies.append(tuple(x.copy() for x in copies[0]))
            t = bench(rotating(op, copies), (q,), FLAGS.calls)
            out[name] = t
            log(f"  {name}: {t * 1e6:.1f} us")
        except Exception:  # noqa: BLE001
            RESULTS["errors"].append(f"{name} b={b} s={s}: {traceback.format_exc()}")
            log(f"  {name} failed: {traceback.format_exc().splitlines()[-1]}")
        copies = None
        gc.collect()
    del k, v
    gc.collect()
    return out, nbytes


def table(bw: float) -> str:
    lines = [
        "| context | batch | method | time (us) | bytes read (MB) | GB/s | % of HBM bw | "
        "vs dense kernel | vs cuDNN | vs XLA |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in RESULTS["rows"]:
        base = r["baselines"]
        for name, t, nbytes in r["entries"]:
            gbs = nbytes / t / 1e9

            def sp(k, t=t, base=base):
                return f"{base[k] / t:.2f}x" if k in base else "-"

            dense_key = next((k for k in base if k.startswith("dense")), None)
            lines.append(
                f"| {r['s']} | {r['b']} | {name} | {t * 1e6:.1f} | {nbytes / 1e6:.0f} | "
                f"{gbs:.0f} | {100 * nbytes / t / bw:.0f}% | "
                f"{sp(dense_key) if dense_key else '-'} | {sp('cuDNN')} | {sp('XLA')} |"
            )
    return "\n".join(lines)


def main(argv):
    del argv
    RESULTS["device"] = str(jax.devices()[0])
    RESULTS["jax"] = jax.__version__
    log("device:", RESULTS["device"], "jax", jax.__version__)
    if FLAGS.check:
        checks()
    bw = hbm_bandwidth()
    cfgs = best_cfgs()
    RESULTS["configs"] = {str(k): v for k, v in cfgs.items()}
    log("configs:", cfgs)
    qkey = jax.random.key(42)
    for s in [int(x) for x in FLAGS.contexts]:
        for b in [int(x) for x in FLAGS.batches]:
            log(f"context {s} batch {b}")
            base, dense_bytes = time_dense(b, s, qkey)
            entries = [(name, t, dense_bytes) for name, t in base.items()]
            for bits in [int(x) for x in FLAGS.bits]:
                try:
                    t, nbytes = time_quant(b, s, bits, cfgs[bits], qkey)
                    entries.append((f"int{bits} kernel", t, nbytes))
                    log(f"  int{bits}: {t * 1e6:.1f} us")
                except Exception:  # noqa: BLE001
                    RESULTS["errors"].append(f"int{bits} b={b} s={s}: {traceback.format_exc()}")
                    log(f"  int{bits} failed: {traceback.format_exc()}")
            RESULTS["rows"].append(dict(s=s, b=b, baselines=base, entries=entries))
            save()
    md = table(bw)
    with open(os.path.join(FLAGS.out, "bench_quant.md"), "w") as f:
        f.write(md + "\n")
    log(md)


if __name__ == "__main__":
    app.run(main)
