"""GPU benchmark: decode attention over KIVI-quantized caches (int8/int4/int2) vs bf16 dense.

Two modes, each sized for one H100 call of <= 150 s (`--budget` stops early and still writes
the results):

    # launch-parameter sweep of each bit width at 32k x batch 8; prints the best as --config
    PYTHONPATH=. python experiments/bench_quant.py --tune --out=$OUT
    # the table: bf16 dense (project kernel, cuDNN, XLA) vs int8/int4/int2 kernels
    PYTHONPATH=. python experiments/bench_quant.py --config='<printed by --tune>' --out=$OUT
    # CPU smoke test of both (tiny shapes, interpret mode)
    python experiments/bench_quant.py --quick [--tune]

Shapes: 32 query heads, 8 KV heads, head dim 128, group 32, bf16 queries / residual / scales,
residual window of 128 tokens (full), contexts 32k and 128k, batch 1/8/32 (cells whose dense
cache does not fit are skipped; the 32k x batch 8 cell, the target, runs first).

Method: the measured HBM bandwidth (a 2 GiB device copy, bytes read + written); then each cell.
Each timing: one jitted program issues `--calls` back-to-back attention calls, rotating over
enough cache copies (>= 256 MB) that no call is served from L2; `--reps` runs of it are dispatched
asynchronously and synchronised once (median of 3 such batches); time per call = run time /
calls. The same program also returns its first call's output, which is compared against the
jnp reference (float32 dequantization) where that fits (rel. L2 error in the JSON and the
table). Bytes per call: codes + scales + zeros + residual for quantized,
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
flags.DEFINE_list("batches", ["8", "1", "32"], "batch sizes (in this order)")
flags.DEFINE_list("bits", ["8", "4", "2"], "bit widths")
flags.DEFINE_integer("hq", 32, "query heads")
flags.DEFINE_integer("hkv", 8, "KV heads")
flags.DEFINE_integer("head_dim", 128, "head dim")
flags.DEFINE_integer("group", 32, "KIVI group size")
flags.DEFINE_integer("residual", 128, "residual window")
flags.DEFINE_integer("calls", 4, "attention calls per timed program")
flags.DEFINE_integer("reps", 10, "timed runs (median)")
flags.DEFINE_bool("check", False, "run the small-shape correctness checks first")
flags.DEFINE_bool("tune", False, "sweep launch parameters at 32k x batch 8 instead of the table")
flags.DEFINE_bool("quick", False, "tiny shapes for a CPU smoke test (interpret mode)")
flags.DEFINE_float("budget", 105.0, "seconds after which remaining timings are skipped")
flags.DEFINE_string(
    "config", "",
    "per-bit launch config as JSON (printed by --tune), e.g. "
    "'{\"2\": {\"block_tokens\": 128, \"num_warps\": 8, \"num_stages\": 1}}'; "
    "unlisted bits use the kernel defaults",
)
flags.DEFINE_string("grid", "", "--tune: a JSON list of configs to sweep instead of TUNE_GRID")
flags.DEFINE_float("max_gb", 60.0, "skip cells needing more device memory than this (GB)")

RESULTS: dict = {"rows": [], "checks": [], "sweep": [], "errors": [], "skipped": []}
T0 = time.time()

# The --tune grid, in priority order (kernel keyword arguments; the rest are the defaults).
TUNE_GRID = [
    # the best of the fourth session's first sweep ("fold", dequant, exact unpack, 2 warps) and,
    # around it, options untimed when written: `reload` (words re-read per field instead of held
    # in registers: 191 -> 168 registers at 4 warps offline), `fields` per softmax step, splits
    dict(variant="fold", num_warps=2, num_stages=1, dequant=True, fast_unpack=False),
    dict(variant="fold", num_warps=2, num_stages=1, dequant=True, fast_unpack=False, reload=True),
    dict(variant="fold", num_warps=4, num_stages=1, dequant=True, fast_unpack=False, reload=True),
    dict(variant="fold", num_warps=4, num_stages=1, dequant=True, reload=True),
    dict(variant="fold", num_warps=2, num_stages=1, dequant=True, reload=True),
    dict(variant="fold", num_warps=2, num_stages=1, dequant=True, fast_unpack=False, fields=2),
    dict(variant="fold", num_warps=2, num_stages=1, dequant=True, fast_unpack=False,
         num_splits=32),
    dict(variant="fold", num_warps=2, num_stages=1, dequant=True, fast_unpack=False,
         num_splits=8),
    dict(variant="fold", num_warps=8, num_stages=1, dequant=True, fast_unpack=False, reload=True),
    dict(variant="fold", num_warps=2, num_stages=2, dequant=True, fast_unpack=False),
]


def log(*a):
    print(f"[{time.time() - T0:6.1f}s]", *a, flush=True)


def over_budget() -> bool:
    return time.time() - T0 > FLAGS.budget


def save():
    os.makedirs(FLAGS.out, exist_ok=True)
    with open(os.path.join(FLAGS.out, "bench_quant.json"), "w") as f:
        json.dump(RESULTS, f, indent=1)


def bench(fn, args, calls_done: int) -> tuple[float, object]:
    """(seconds per attention call, extra output) of `fn(*args)` -> (result, extra).

    `--reps` runs are dispatched back to back (asynchronously, so host dispatch overlaps the
    device work) and synchronised once; the median over 3 such batches, divided by the calls
    each run issues."""
    out = jax.block_until_ready(fn(*args))
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(FLAGS.reps):
            res = fn(*args)
        jax.block_until_ready(res)
        times.append((time.perf_counter() - t0) / FLAGS.reps)
    return statistics.median(times) / calls_done, out[1]


def rotating(op, copies):
    """jit program: FLAGS.calls calls of op(q, *copy), rotating copies, chained through q;
    returns (sum of outputs, the first call's output)."""
    n = FLAGS.calls

    @jax.jit
    def run(q, copies):
        acc = jnp.zeros(q.shape, jnp.float32)
        first = None
        for i in range(n):
            out = op(q, *copies[i % len(copies)])
            first = out if first is None else first
            acc = acc + out.astype(jnp.float32)
            q = q + (out * 1e-30).astype(q.dtype)
        return acc, first

    return lambda q: run(q, copies)


def n_copies(nbytes: int) -> int:
    return int(min(FLAGS.calls, max(1, -(-256 * 2**20 // max(nbytes, 1)))))


def rel_err(out, ref) -> float:
    out, ref = np.asarray(out, np.float32), np.asarray(ref, np.float32)
    return float(np.linalg.norm(out - ref) / max(np.linalg.norm(ref), 1e-30))


def parse_config(text: str) -> dict:
    """--config JSON '{"4": {"block_tokens": 64, ...}, ...}' -> {4: {...}, ...}."""
    if not text:
        return {}
    cfgs = {int(k): dict(v) for k, v in json.loads(text).items()}
    bad = [k for k in cfgs if k not in (2, 4, 8)]
    if bad:
        raise ValueError(f"--config keys must be bit widths 2, 4 or 8, got {bad}")
    return cfgs


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
    n = 2**20 if FLAGS.quick else 2**30  # 2 GiB of bf16 on the GPU
    x = jax.random.normal(jax.random.key(0), (n,), jnp.bfloat16)
    f = jax.jit(lambda x: (x * jnp.bfloat16(1.0009765625), 0))
    t, _ = bench(f, (x,), 1)
    bw = 2 * x.size * 2 / t
    del x
    RESULTS["hbm_bytes_per_s"] = bw
    log(f"measured HBM bandwidth (copy, read + write): {bw / 1e12:.2f} TB/s")
    return bw


_REF = jax.jit(qda.reference)


def time_quant(b, s, bits, cfg, qkey, check: bool = True):
    """(seconds per call, bytes per call, rel. error vs the reference or None)."""
    arrs = random_quantized(jax.random.key(bits * 7 + b), b, FLAGS.hkv, s - FLAGS.residual,
                            FLAGS.head_dim, bits, FLAGS.group, FLAGS.residual)
    nbytes = qbytes(arrs)
    copies = [tuple(arrs[n] for n in QARGS)]
    for _ in range(1, n_copies(nbytes)):
        copies.append(tuple(jax.tree.map(lambda x: x.copy(), copies[0])))
    q = jax.random.normal(qkey, (b, FLAGS.hq, FLAGS.head_dim), jnp.bfloat16)

    def op(q, *a):
        return qda.quantized_decode_attention(q, *a, **cfg)

    t, first = bench(rotating(op, copies), (q,), FLAGS.calls)
    err = None
    if check and b * s * FLAGS.hkv * FLAGS.head_dim * 8 <= 12e9:  # float32 K + V of the ref
        err = rel_err(first, _REF(q.astype(jnp.float32), *copies[0]))
    del copies, arrs, first
    gc.collect()
    return t, nbytes, err


def tune():
    """Sweeps TUNE_GRID round-robin over the bit widths at 32k x batch 8 (or the quick shape)."""
    s, b = (int(FLAGS.contexts[0]), int(FLAGS.batches[0])) if FLAGS.quick else (32768, 8)
    bits_list = [int(x) for x in FLAGS.bits]
    best: dict = {}
    qkey = jax.random.key(1)
    base, _ = time_dense(b, s, qkey, only=("dense kernel", "dense jnp reference"))
    RESULTS["tune_baseline"] = {k: v * 1e6 for k, v in base.items()}
    dense = next(iter(base.values()), None)
    for cfg in json.loads(FLAGS.grid) if FLAGS.grid else TUNE_GRID:
        for bits in bits_list:
            if over_budget():
                RESULTS["skipped"].append(f"tune int{bits} {cfg}")
                continue
            try:
                t, nbytes, err = time_quant(b, s, bits, cfg, qkey)
            except Exception:  # noqa: BLE001 - a config that does not compile is recorded
                RESULTS["errors"].append(f"tune int{bits} {cfg}: {traceback.format_exc()}")
                log(f"tune int{bits} {cfg} failed: {traceback.format_exc().splitlines()[-1]}")
                continue
            ok = err is None or err < 2e-2
            RESULTS["sweep"].append(dict(bits=bits, **cfg, us=t * 1e6, rel_err=err, ok=ok))
            speed = f"{dense / t:.2f}x vs dense" if dense else ""
            log(f"tune int{bits} {cfg}: {t * 1e6:.1f} us  {nbytes / t / 1e9:.0f} GB/s  "
                f"{speed}  rel_err {err}")
            if ok and (bits not in best or t < best[bits][1]):
                best[bits] = (cfg, t)
            save()
    RESULTS["best"] = {str(k): dict(v[0], us=v[1] * 1e6) for k, v in best.items()}
    text = json.dumps({str(k): v[0] for k, v in sorted(best.items())}, separators=(",", ":"))
    RESULTS["best_config"] = text
    save()
    for k, (cfg, t) in sorted(best.items()):
        speed = f"  {dense / t:.2f}x faster than the dense kernel" if dense else ""
        log(f"best int{k}: {cfg} {t * 1e6:.1f} us{speed}")
    log(f"--config='{text}'")
    with open(os.path.join(FLAGS.out, "best_config.json"), "w") as f:  # for --config="$(cat ..)"
        f.write(text)


def dense_ops():
    """name -> (op(q, k, v, lengths), layout 'bhsd' or 'bshd') of the dense baselines."""
    ops = {}
    try:
        from pallas_kernels.decode_attention import ragged_decode_attention

        ops["dense kernel"] = (lambda q, k, v, n: ragged_decode_attention(q, k, v, n), "bhsd")
    except ImportError:
        from kvjax.attention import reference_attention
        from kvjax.cache import LayerCache

        def ref(q, k, v, n):
            pos = jnp.broadcast_to(jnp.arange(k.shape[2], dtype=jnp.int32), k.shape[:3])
            layer = LayerCache(k, v, n, pos)
            qpos = jnp.full((q.shape[0], 1), k.shape[2], jnp.int32)
            return reference_attention(q[:, :, None], qpos, layer)[:, :, 0]

        ops["dense jnp reference"] = (ref, "bhsd")

    def sdpa(impl):
        def op(q, k, v, n):  # BTNH layout
            return jax.nn.dot_product_attention(q[:, None], k, v, implementation=impl)[:, 0]

        return op

    if not FLAGS.quick:  # cuDNN needs a GPU
        ops["cuDNN"] = (sdpa("cudnn"), "bshd")
    ops["XLA"] = (sdpa("xla"), "bshd")
    return ops


def time_dense(b, s, qkey, only=None):
    d, h = FLAGS.head_dim, FLAGS.hkv
    nbytes = 2 * b * h * s * d * 2
    q = jax.random.normal(qkey, (b, FLAGS.hq, d), jnp.bfloat16)
    n = jnp.full((b, h), s, jnp.int32)
    out = {}
    for name, (op, layout) in dense_ops().items():
        if only is not None and name not in only:
            continue
        if over_budget():
            RESULTS["skipped"].append(f"{name} b={b} s={s}")
            continue
        shape = (b, h, s, d) if layout == "bhsd" else (b, s, h, d)
        try:
            k = jax.random.normal(jax.random.key(11), shape, jnp.bfloat16)
            v = jax.random.normal(jax.random.key(12), shape, jnp.bfloat16)
            copies = [(k, v, n)]
            for _ in range(1, n_copies(nbytes)):
                copies.append(tuple(x.copy() for x in copies[0]))
            t, _ = bench(rotating(op, copies), (q,), FLAGS.calls)
            out[name] = t
            log(f"  {name}: {t * 1e6:.1f} us  {nbytes / t / 1e9:.0f} GB/s")
        except Exception:  # noqa: BLE001
            RESULTS["errors"].append(f"{name} b={b} s={s}: {traceback.format_exc()}")
            log(f"  {name} failed: {traceback.format_exc().splitlines()[-1]}")
        k = v = copies = None
        gc.collect()
    return out, nbytes


def table(bw: float) -> str:
    lines = [
        "| context | batch | method | time (us) | bytes read (MB) | GB/s | % of HBM bw | "
        "vs dense kernel | vs cuDNN | vs XLA | rel. err |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in RESULTS["rows"]:
        base = r["baselines"]
        for name, t, nbytes, err in r["entries"]:
            gbs = nbytes / t / 1e9

            def sp(k, t=t, base=base):
                return f"{base[k] / t:.2f}x" if k in base else "-"

            dense_key = next((k for k in base if k.startswith("dense")), None)
            lines.append(
                f"| {r['s']} | {r['b']} | {name} | {t * 1e6:.1f} | {nbytes / 1e6:.0f} | "
                f"{gbs:.0f} | {100 * nbytes / t / bw:.0f}% | "
                f"{sp(dense_key) if dense_key else '-'} | {sp('cuDNN')} | {sp('XLA')} | "
                f"{'-' if err is None else f'{err:.1e}'} |"
            )
    return "\n".join(lines)


def table_run(bw: float):
    cfgs = {bits: {} for bits in (2, 4, 8)}
    cfgs.update(parse_config(FLAGS.config))
    RESULTS["configs"] = {str(k): v for k, v in cfgs.items()}
    log("configs:", cfgs)
    qkey = jax.random.key(42)
    for s in [int(x) for x in FLAGS.contexts]:
        for b in [int(x) for x in FLAGS.batches]:
            dense_gb = 2 * b * FLAGS.hkv * s * FLAGS.head_dim * 2 / 1e9
            if 2 * dense_gb > FLAGS.max_gb:  # the cache and its K/V generation temporaries
                RESULTS["skipped"].append(f"b={b} s={s} (dense cache {dense_gb:.0f} GB)")
                log(f"skip context {s} batch {b}: dense cache {dense_gb:.0f} GB")
                continue
            if over_budget():
                RESULTS["skipped"].append(f"b={b} s={s} (budget)")
                continue
            log(f"context {s} batch {b}")
            base, dense_bytes = time_dense(b, s, qkey)
            entries = [(name, t, dense_bytes, None) for name, t in base.items()]
            for bits in [int(x) for x in FLAGS.bits]:
                if over_budget():
                    RESULTS["skipped"].append(f"int{bits} b={b} s={s} (budget)")
                    continue
                try:
                    t, nbytes, err = time_quant(b, s, bits, cfgs[bits], qkey)
                    entries.append((f"int{bits} kernel", t, nbytes, err))
                    log(f"  int{bits}: {t * 1e6:.1f} us  {nbytes / t / 1e9:.0f} GB/s  "
                        f"rel_err {err}")
                except Exception:  # noqa: BLE001
                    RESULTS["errors"].append(f"int{bits} b={b} s={s}: {traceback.format_exc()}")
                    log(f"  int{bits} failed: {traceback.format_exc()}")
            RESULTS["rows"].append(dict(s=s, b=b, baselines=base, entries=entries))
            save()
    md = table(bw)
    with open(os.path.join(FLAGS.out, "bench_quant.md"), "w") as f:
        f.write(md + "\n")
    log("\n" + md)


def main(argv):
    del argv
    if FLAGS.quick:  # tiny CPU shapes; flags given explicitly still win
        for name, val in (("contexts", ["1024"]), ("batches", ["1"]), ("hq", 8), ("hkv", 2),
                          ("calls", 1), ("reps", 1)):
            if not FLAGS[name].present:
                FLAGS[name].value = val
        global TUNE_GRID
        TUNE_GRID = [dict(variant="fold", num_warps=4, num_stages=1, prefetch=True),
                     dict(variant="tile", block_tokens=32, num_warps=4, num_stages=1,
                          value_split=True, num_splits=2)]
    RESULTS["device"] = str(jax.devices()[0])
    RESULTS["jax"] = jax.__version__
    RESULTS["mode"] = "tune" if FLAGS.tune else "table"
    log("device:", RESULTS["device"], "jax", jax.__version__)
    if FLAGS.check:
        checks()
    bw = hbm_bandwidth()
    if FLAGS.tune:
        tune()
    else:
        table_run(bw)
    if RESULTS["errors"]:
        log(f"{len(RESULTS['errors'])} error(s) recorded in bench_quant.json")
    if RESULTS["skipped"]:
        log(f"skipped: {RESULTS['skipped']}")


if __name__ == "__main__":
    app.run(main)
