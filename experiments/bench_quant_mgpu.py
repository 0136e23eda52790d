"""GPU checks and timing of the Mosaic GPU int4 KIVI decode kernel against bf16 dense.

`pallas_kernels/quantized_decode_attention_mgpu.py` (int4 codes by TMA, dequantized in
registers or with scales folded into the small operands, register-A WGMMA) is checked against
`quantized_decode_attention.reference` on `kivi`-layout arrays repacked by `repack_int4`
(ragged counts, partial residual, group sizes 16 / 32 / 64, 1 to 16 query heads per KV head),
then timed on batch x context cells (default 8 x 32k; `GRID` of launch options, or
`--configs`; the words layout at 4 and 2 bits with the defaults) next to the baselines of the
same cell: the project's dense bf16 kernel (`ragged_decode_attention`), cuDNN and XLA
(`jax.nn.dot_product_attention`) and the Triton kernel (`quantized_decode_attention`, packed
layout, default) at 8, 4 and 2 bits, all with `_bench.time_jax` in the same run. The run ends
with a markdown table (`table`: us, bytes read, GB/s, % of the torch copy bandwidth measured
in the run, speedup vs the dense kernel, cuDNN and XLA, error vs the jnp reference). Shapes as
bench_quant: 32 query / 8 KV heads, head dim 128, G = Gv = 32, full 128-token residual.

    PYTHONPATH=. python3 experiments/bench_quant_mgpu.py --out $OUT          # GPU
    PYTHONPATH=. python3 experiments/bench_quant_mgpu.py --out $OUT --no_check \
        --batches=8,1,32 --contexts=32768,131072 --configs='[{}]'               # the table
    python experiments/bench_quant_mgpu.py --lower                           # CPU: lowering
"""

from __future__ import annotations

import argparse
import functools
import inspect
import json
import os
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiments._bench import (  # noqa: E402
    copy_bandwidth,
    copy_method,
    make_log,
    rel_err,
    time_jax,
)
from experiments.bench_kernels import decode_dpa, make_cache  # noqa: E402
from experiments.bench_quant import QARGS, random_quantized  # noqa: E402
from pallas_kernels import decode_attention as da  # noqa: E402
from pallas_kernels import quantized_decode_attention as qda  # noqa: E402
from pallas_kernels import quantized_decode_attention_mgpu as qm  # noqa: E402

LOG: list[str] = []
log, attempt = make_log(LOG)  # a failing config logs one line (traceback into LOG) and goes on
GRID = ({},  # the defaults: 16 splits, 2 stages, 128-token steps, hoist_index, fma, fused residual
        {"fuse_residual": False},  # the residual window as a separate jnp pass
        {"fma": False},  # multiply + add instead of one bf16x2 FMA per register pair
        {"fma": False, "fuse_residual": False},  # the eleventh session's defaults
        {"block_tokens": 256, "hoist_index": False},  # the first defaults
        {"fold_keys": True, "fold_values": True},
        {"block_tokens": 256, "fold_keys": True, "fold_values": True},
        {"fold_keys": True}, {"fold_values": True}, {"block_tokens": 256},
        {"block_tokens": 64}, {"num_splits": 8}, {"num_stages": 3}, {"num_splits": 32})
CHECK_CONFIGS = ({}, {"fuse_residual": False}, {"fma": False}, {"fma": False, "block_tokens": 64},
                 {"fma": False, "fuse_residual": False},
                 {"block_tokens": 256, "hoist_index": False},
                 {"num_stages": 3, "block_tokens": 64, "hoist_index": False},
                 {"fold_keys": True, "block_tokens": 256},
                 {"fold_keys": True, "hoist_index": False},
                 {"fold_values": True}, {"fold_keys": True, "fold_values": True},
                 {"fold_keys": True, "fold_values": True, "block_tokens": 256},
                 {"fold_keys": True, "fold_values": True, "block_tokens": 64},
                 {"fold_values": True, "block_tokens": 64})
# (batch, kv heads, query heads per kv head, head dim, G, tokens per head, residual, splits):
# few splits, so that a split streams several steps even at 256-token steps (the fold_values
# bug of the eighth session hid behind one step per split); residuals partial, full (128),
# not a multiple of 64 (50, 17, 100) and none
CHECKS = ((2, 2, 4, 128, 32, ((1000, 37), (64, 0)), 50, 2),
          (1, 3, 8, 128, 64, ((2048, 1999, 5),), 128, 4),
          (2, 1, 16, 64, 16, ((512,), (300,)), 0, 2),
          (1, 2, 1, 128, 32, ((4096, 4095),), 17, 3),
          (1, 2, 4, 128, 16, ((1024, 700),), 100, 4))


def mgpu_args(arrs: dict, words: int = 0) -> tuple:
    """The kernel's arguments after q (k4, k_scale, k_zero, v4, v_scale, v_zero, num_quantized,
    residual keys / values / count) from `random_quantized`'s `kivi`-layout arrays: codes in
    the int4 layout, or with `words` = bits in the words layout (`qm.repack_words`)."""
    if words:
        k4, v4 = qm.repack_words(arrs["k_codes"], arrs["v_codes"], words)
    else:
        k4, v4 = qm.repack_int4(arrs["k_codes"], arrs["v_codes"])
    return (k4, arrs["k_scale"], arrs["k_zero"], v4, *(arrs[n] for n in QARGS[4:]))


def case(key, b, h, gq, d, g, counts, r, cap=None, bits=4, words=False):
    """kivi-layout arrays (packed, `bits`) with per-head counts and residual counts, their
    repack (int4 layout, or the words layout), and a query."""
    tokens = cap or max(max(c) for c in counts)
    arrs = random_quantized(key, b, h, tokens, d, bits, g, max(r, 1))
    arrs["num_quantized"] = jnp.array(counts, jnp.int32)
    # the window holds r slots; head i of the batch uses r - 13 i of them (partial, some empty)
    arrs["num_residual"] = jnp.maximum(r - 13 * jnp.arange(b * h).reshape(b, h), 0).astype(
        jnp.int32)
    q = jax.random.normal(jax.random.fold_in(key, 1), (b, h * gq, d), jnp.bfloat16)
    return q, arrs, (q, *mgpu_args(arrs, bits if words else 0))


def check_configs(i: int, g: int, gq: int, core: bool = False) -> list[dict]:
    """Launch configs checked on CHECKS[i]: all on the first case, then the defaults and one
    more in turn plus the folds where their limits allow (fold_keys: (64 / G) x Gq <= 16;
    fold_values: Gv = G = 32 here and at most 8 score columns). core: the defaults on every
    case, plus the residual by jnp, no `fma` and both folds on the first (`--checks core`, for
    short device time)."""
    if core:
        return [{}] + ([{"fuse_residual": False}, {"fma": False}, {"fold_values": True},
                        {"fold_keys": True, "fold_values": True}] if i == 0 else [])
    if i == 0:
        return list(CHECK_CONFIGS)
    out = [{}, CHECK_CONFIGS[1 + i % 4]]
    if (qm.T // g) * gq <= qm.N:
        out.append({"fold_keys": True})
    if g == 32 and gq <= 8:
        out.append({"fold_values": True})
    if g == 32 and 2 * gq <= 8:
        out.append({"fold_keys": True, "fold_values": True})
    return out


WORDS_CONFIGS = ({"fuse_residual": False}, {"block_tokens": 64},
                 {"block_tokens": 256, "num_stages": 3})
WORDS_GRID = ({}, {"prmt": True}, {"fuse_residual": False}, {"fma": False})  # words: timed


def words_check_configs(i: int, core: bool = False) -> list[dict]:
    """Words-layout configs checked on CHECKS[i] (each bit width): the defaults and `prmt`,
    and without `core` one of WORDS_CONFIGS in turn; no `fma` on the first case."""
    return ([{}, {"prmt": True}] + ([] if core else [WORDS_CONFIGS[i % 3]])
            + ([{"fma": False}] if i == 0 else []))


def checks(core: bool = False) -> set[frozenset]:
    """Runs every check; returns the option combinations whose checks failed (the names of the
    boolean options set True in a failing config; the empty set: the default path failed;
    "words4" / "words2": the words layout)."""
    bad: set[frozenset] = set()
    for i, (b, h, gq, d, g, counts, r, splits) in enumerate(CHECKS):
        # (bits, words layout, configs): one case and reference each
        layouts = [(4, False, check_configs(i, g, gq, core))]
        layouts += [(bits, True, words_check_configs(i, core)) for bits in qm.WORD_BITS]
        for bits, words, cfgs in layouts:
            q, arrs, mg = case(jax.random.key(10 + i), b, h, gq, d, g, counts, r, bits=bits,
                               words=words)
            ref = qda.reference(q, *(arrs[k] for k in QARGS))
            cap = arrs["k_codes"].shape[2] * 32 // bits * g
            for cfg in cfgs:
                name = f"words{bits} " * words + json.dumps(cfg)
                out = attempt(f"check {i} {name}", qm.quantized_decode_attention_mgpu,
                              *mg, num_splits=splits, **cfg)
                err = float("nan") if out is None else rel_err(out, ref)
                good = out is not None and err < 1e-2 and bool(
                    jnp.all(jnp.isfinite(out.astype(jnp.float32))))
                if not good:
                    bad.add(_options(cfg) | ({f"words{bits}"} if words else set()))
                log(f"check b{b} h{h} gq{gq} d{d} G{g} cap{cap} counts {counts} residual {r} "
                    f"splits {splits} {name}: rel err {err:.2e} {'ok' if good else 'FAIL'}")
    return bad


# the kernel's boolean launch options and their defaults (hoist_index, fma, fuse_residual, ...)
BOOL_DEFAULTS = {k: p.default for k, p in
                 inspect.signature(qm.quantized_decode_attention_mgpu).parameters.items()
                 if isinstance(p.default, bool)}


def _options(cfg: dict) -> frozenset:
    """The boolean options a config sets, the kernel's defaults included."""
    return frozenset(k for k, v in (BOOL_DEFAULTS | cfg).items() if v is True)


def runnable(cfg: dict, bad: set[frozenset], layout: str = "") -> bool:
    """Whether a timing config avoids every option combination whose check failed (a config
    that sets all the options of a failing check is skipped); layout "words4" / "words2" for
    the words layout."""
    opts = _options(cfg) | ({layout} if layout else set())
    return not any(combo <= opts for combo in bad)


def bench(b: int, ctx: int, budget_end: float, grid=GRID, bad: frozenset = frozenset()
          ) -> dict:
    """One batch x context cell: the dense bf16 kernel, cuDNN and XLA attention (the
    baselines), the Triton kernel (packed layout) at 8 / 4 / 2 bits and the Mosaic GPU kernel
    (int4 layout: the `grid` configs; words layout at 4 and 2 bits: defaults). row[name] is us
    per call; row["bytes"][name] the bytes the method must read; row["err"][name] the rel. L2
    error against the jnp reference where that fits in memory."""
    hkv, gq, d, g, r = 8, 4, 128, 32, 128
    reps = 4
    row: dict = {"batch": b, "ctx": ctx, "bytes": {}, "err": {}}
    qs = jax.random.normal(jax.random.key(b), (reps, b, hkv * gq, d), jnp.bfloat16)
    dbytes = b * hkv * ctx * d * 2 * 2

    def record(name: str, t: float, nbytes: int, err: str = "-") -> None:
        row[name], row["bytes"][name], row["err"][name] = t * 1e6, nbytes, err
        vs = f"{row['dense'] / (t * 1e6):5.2f}x dense" if "dense" in row else ""
        log(f"  {name:44s} {t * 1e6:8.1f} us {nbytes / t / 1e9:6.0f} GB/s {vs}  err {err}")

    k, v, lengths, _ = make_cache(jax.random.key(100), b, hkv, ctx, d, jnp.bfloat16)
    log(f"batch {b} ctx {ctx}:")
    record("dense", time_jax(lambda q, k, v, ln: da.ragged_decode_attention(q, k, v, ln), qs,
                             [(k, v, lengths)], reps), dbytes)
    kt, vt = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)  # [B, T, N, H] for jax.nn
    del k, v
    for impl in ("cudnn", "xla"):
        t = attempt(impl, time_jax, functools.partial(decode_dpa, impl=impl), qs, [(kt, vt)],
                    reps)
        if t is not None:
            record(impl, t, dbytes)
    del kt, vt
    for bits in (8, 4, 2):  # Triton (packed layout), and the Mosaic GPU kernel at 4 / 2 bits
        if time.time() > budget_end:
            log("  (budget spent)")
            break
        arrs = random_quantized(jax.random.key(7), b, hkv, ctx - r, d, bits, g, r)
        qbytes = qda.hbm_bytes(b, hkv, ctx - r, d, bits, g) + b * hkv * r * d * 2 * 2
        packed = tuple(arrs[n] for n in QARGS)
        # the float32 reference dequantizes the whole cache: only where that fits next to it
        ref = qda.reference(qs[0], *packed) if b * ctx <= 16 * 32768 else None

        def err_of(out, ref=ref) -> str:
            return "n/a" if ref is None else f"{rel_err(out, ref):.1e}"

        t = attempt(f"triton int{bits}", time_jax,
                    lambda q, *a: qda.quantized_decode_attention(q, *a), qs, [packed], reps)
        if t is not None:
            record(f"triton_int{bits}", t, qbytes,
                   err_of(qda.quantized_decode_attention(qs[0], *packed)))
        if bits == 4:  # the int4 layout: the launch configs of `grid`
            mg = mgpu_args(arrs)
            for cfg in grid:
                if time.time() > budget_end:
                    log("  (budget spent)")
                    break
                if not runnable(cfg, bad):
                    log(f"  mgpu {json.dumps(cfg)} skipped: its options failed the checks")
                    continue
                f = functools.partial(qm.quantized_decode_attention_mgpu, **cfg)
                t = attempt("mgpu " + json.dumps(cfg), time_jax, lambda q, *a, f=f: f(q, *a),
                            qs, [mg], reps)
                if t is not None:
                    record("mgpu " + json.dumps(cfg), t, qbytes, err_of(f(qs[0], *mg)))
            del mg
        if bits in qm.WORD_BITS:  # the words layout (`pack_words`): WORDS_GRID
            mw = mgpu_args(arrs, bits)
            for cfg in WORDS_GRID:
                name = f"mgpu words{bits}" + (" " + json.dumps(cfg)) * bool(cfg)
                if not runnable(cfg, bad, f"words{bits}"):
                    log(f"  {name} skipped: its check failed")
                    continue
                f = functools.partial(qm.quantized_decode_attention_mgpu, **cfg)
                t = attempt(name, time_jax, lambda q, *a, f=f: f(q, *a), qs, [mw], reps)
                if t is not None:
                    record(name, t, qbytes, err_of(f(qs[0], *mw)))
            del mw
        del arrs, packed, ref
    return row


def table(rows: list[dict], copy_bw: float | None = None) -> list[str]:
    """Markdown table of `bench` rows: time, bytes, GB/s (and % of `copy_bw`), speedup
    against the dense kernel, cuDNN and XLA of the same cell, error."""
    lines = ["| context | batch | method | us | MB read | GB/s | " + "% copy bw | " * bool(copy_bw)
             + "vs dense kernel | vs cuDNN | vs XLA | rel. err |",
             "|---:|---:|---|---:|---:|---:|" + "---:|" * bool(copy_bw) + "---:|---:|---:|---:|"]
    for r in rows:
        for name, nbytes in r["bytes"].items():
            us = r[name]
            sp = [f"{r[base] / us:.2f}x" if base in r else "-"
                  for base in ("dense", "cudnn", "xla")]
            pct = f"{100 * nbytes / (us * 1e-6) / copy_bw:.0f}% | " if copy_bw else ""
            lines.append(f"| {r['ctx']} | {r['batch']} | {name} | {us:.1f} | {nbytes / 1e6:.0f} | "
                         f"{nbytes / (us * 1e-6) / 1e9:.0f} | {pct}{' | '.join(sp)} | "
                         f"{r['err'][name]} |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "runs/quant_mgpu"))
    ap.add_argument("--batches", default="8", help="comma-separated; empty: checks only")
    ap.add_argument("--contexts", default="32768", help="comma-separated context lengths")
    ap.add_argument("--configs", default="",
                    help='JSON list of kernel keyword dicts to time instead of GRID, e.g. "[{}]"')
    ap.add_argument("--budget", type=float, default=200.0, help="seconds for the timings")
    ap.add_argument("--no_check", action="store_true")
    ap.add_argument("--checks", default="all", choices=("all", "core"),
                    help="core: fewer launch configs per case (check_configs)")
    ap.add_argument("--lower", action="store_true", help="CPU: lower every check for CUDA")
    args = ap.parse_args()
    if args.lower:
        for i, (b, h, gq, d, g, counts, r, splits) in enumerate(CHECKS):
            _, _, mg = case(jax.random.key(i), b, h, gq, d, g, counts, r)
            for cfg in check_configs(i, g, gq):
                f = functools.partial(qm.quantized_decode_attention_mgpu, num_splits=splits,
                                      **cfg)
                jax.jit(f).trace(*mg).lower(lowering_platforms=("cuda",))
            for bits in qm.WORD_BITS:
                _, _, mw = case(jax.random.key(i), b, h, gq, d, g, counts, r, bits=bits,
                                words=True)
                for cfg in words_check_configs(i):
                    f = functools.partial(qm.quantized_decode_attention_mgpu,
                                          num_splits=splits, **cfg)
                    jax.jit(f).trace(*mw).lower(lowering_platforms=("cuda",))
            print("lowered", CHECKS[i])
        for cfg in GRID:
            _, _, mg = case(jax.random.key(0), 1, 2, 4, 128, 32, ((4096, 4000),), 128)
            f = functools.partial(qm.quantized_decode_attention_mgpu, **cfg)
            jax.jit(f).trace(*mg).lower(lowering_platforms=("cuda",))
            print("lowered", cfg)
        return
    os.makedirs(args.out, exist_ok=True)
    log(f"devices {jax.devices()} jax {jax.__version__}")
    bad = set() if args.no_check else checks(args.checks == "core")
    end = time.time() + args.budget
    grid = tuple(json.loads(args.configs)) if args.configs else GRID
    cells = [(int(b), int(c)) for c in args.contexts.split(",") for b in args.batches.split(",")
             if b and c]
    rows = [bench(b, c, end, grid, frozenset(bad)) for b, c in cells]
    bw = copy_bandwidth(2 * 2**30) if rows and copy_method() == "torch" else None
    if bw:
        log(f"copy bandwidth (torch D2D, read + write): {bw / 1e12:.3f} TB/s")
    for line in table(rows, bw):
        log(line)
    with open(os.path.join(args.out, "quant_mgpu.json"), "w") as f:
        json.dump({"failed_checks": sorted(sorted(c) for c in bad), "rows": rows}, f,
                  indent=1)
    with open(os.path.join(args.out, "log.txt"), "a") as f:
        f.write("\n".join(LOG) + "\n")


if __name__ == "__main__":
    main()
