"""Decode-kernel benchmark: ragged decode, block-sparse decode and Quest against baselines.

One run checks the kernels against their references on the GPU, measures the GPU's copy
bandwidth, tunes the ragged decode kernel's launch config, then times, for batch 1/8/32 and
context 4k/32k/128k (32 query / 8 KV heads, D 128, bf16):

  kernel        pallas_kernels.decode_attention (with cache positions, as kvjax.attention uses it)
  kernel_nopos  the same kernel masking by lengths only
  jnp_ref       kvjax.attention.reference_attention under jit
  xla / cudnn   jax.nn.dot_product_attention(implementation=...) on [B, T, N, H] copies
  torch         torch.nn.functional.scaled_dot_product_attention(enable_gqa=True), same buffers
                (zero-copy via DLPack), timed as a CUDA graph
  bs_1/8        block_sparse_decode, 1/8 of the 64-token blocks of each head active (random)
  quest_1/8     Quest end to end (page scores + top-k + block-sparse decode), 16-token pages,
                token budget = context / 8; quest_sel: the page selection alone

Each JAX timing runs `reps` calls (distinct queries; KV inputs rotated over several copies when
one copy would fit in L2) inside one jitted executable and reports the median over 7 runs
divided by reps (the one host dispatch per executable is amortised over >= 2 ms of work).
Bytes are the minimum each method must read (+ positions where read); GB/s = bytes / time.

    PYTHONPATH=. python3 experiments/bench_kernels.py --out $OUT          # GPU
    PYTHONPATH=. python3 experiments/bench_kernels.py --quick             # CPU smoke test
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import sys
import time
import traceback

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # torch shares the GPU

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from pallas_kernels import block_sparse_attention as bsa  # noqa: E402
from pallas_kernels import decode_attention as da  # noqa: E402

LOG: list[str] = []


def log(*parts) -> None:
    line = " ".join(str(p) for p in parts)
    print(line, flush=True)
    LOG.append(line)


def _try(name, fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except Exception as e:  # noqa: BLE001 - a failing baseline must not stop the run
        msg = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
        log(f"  [{name}] FAILED {msg}")
        LOG.append(traceback.format_exc())
        return None


# --- timing -----------------------------------------------------------------------------------


def time_jax(fn, qs, sets, reps, runs=7):
    """Median seconds per call of fn(q, *set) over `reps` calls inside one executable."""
    nset = len(sets)

    @jax.jit
    def many(qs, sets):
        # Call i+1 takes its query through an optimization barrier with call i's output: the
        # calls run one after another and XLA cannot fuse them (e.g. read K once for all).
        outs = []
        for i in range(reps):
            q = qs[i]
            if outs:
                q, _ = jax.lax.optimization_barrier((q, outs[-1]))
            outs.append(fn(q, *sets[i % nset]))
        return outs

    jax.block_until_ready(many(qs, sets))
    ts = []
    for _ in range(runs):
        t0 = time.perf_counter()
        jax.block_until_ready(many(qs, sets))
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts)) / reps


def time_torch(fn, qs, sets, reps, runs=7):
    import torch

    nset = len(sets)
    if not torch.cuda.is_available():
        fn(qs[0], *sets[0])
        t0 = time.perf_counter()
        for i in range(reps):
            fn(qs[i], *sets[i % nset])
        return (time.perf_counter() - t0) / reps
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            fn(qs[0], *sets[0])
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        outs = [fn(qs[i], *sets[i % nset]) for i in range(reps)]
    del outs
    g.replay()
    torch.cuda.synchronize()
    ts = []
    for _ in range(runs):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b) / 1e3)
    return float(np.median(ts)) / reps


def copy_bandwidth(nbytes: int) -> float:
    """Device-to-device copy bandwidth (bytes read + written per second), torch, median of 10."""
    import torch

    if not torch.cuda.is_available():
        return float("nan")
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device="cuda").normal_()
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    torch.cuda.synchronize()
    ts = []
    for _ in range(10):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        dst.copy_(src)
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b) / 1e3)
    del src, dst
    torch.cuda.empty_cache()
    return 2 * nbytes / float(np.median(ts))


# --- inputs ----------------------------------------------------------------------------------


def make_cache(key, b, hkv, c, d, dtype, lengths=None):
    kk, kv = jax.random.split(key)
    k = jax.random.normal(kk, (b, hkv, c, d), dtype)
    v = jax.random.normal(kv, (b, hkv, c, d), dtype)
    if lengths is None:
        lengths = jnp.full((b, hkv), c, jnp.int32)
    slot = jnp.arange(c, dtype=jnp.int32)[None, None, :]
    pos = jnp.where(slot < lengths[:, :, None], slot, -1).astype(jnp.int32)
    return k, v, lengths, pos


def rel_err(a, b) -> float:
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


# --- correctness on the device ----------------------------------------------------------------


def check_correctness(interpret, small):
    log("== correctness (kernel vs jnp reference, on this device) ==")
    key = jax.random.key(1)
    b, hq, hkv, d = 2, 32, 8, 128
    c = 200 if small else 1000
    ok = True
    rng = np.random.default_rng(0)
    lens = rng.integers(0, c + 1, (b, hkv)).astype(np.int32)
    lens[0, 0], lens[0, 1], lens[1, 2] = 0, 1, c
    for dtype, tol in ((jnp.float32, 1e-4), (jnp.bfloat16, 2e-2), (jnp.float16, 5e-3)):
        k, v, lengths, pos = make_cache(key, b, hkv, c, d, dtype, jnp.asarray(lens))
        pos = jnp.where(jax.random.uniform(key, pos.shape) < 0.1, -1, pos)  # holes
        q = jax.random.normal(jax.random.key(2), (b, hq, d), dtype)
        qpos = jnp.asarray([c - 3, c + 5], jnp.int32)
        out = da.ragged_decode_attention(q, k, v, lengths, kv_positions=pos, q_positions=qpos,
                                         sliding_window=c // 2, interpret=interpret)
        ref = da.reference(q, k, v, lengths, kv_positions=pos, q_positions=qpos,
                           sliding_window=c // 2)
        err = float(jnp.max(jnp.abs(out.astype(jnp.float32) - ref.astype(jnp.float32))))
        good = err <= tol and bool(jnp.all(jnp.isfinite(out.astype(jnp.float32))))
        ok &= good
        log(f"  ragged decode {jnp.dtype(dtype).name:8s} max|err| {err:.2e} "
            f"rel {rel_err(out, ref):.2e} (tol {tol}) {'ok' if good else 'FAIL'}")
    # pool (head-wise) layout
    k, v, lengths, _ = make_cache(key, b, hkv, c, d, jnp.bfloat16, jnp.asarray(lens))
    caps = jnp.asarray(lens + 3)
    offsets = jnp.cumsum(caps, 1) - caps
    poolk = jax.random.normal(key, (b, int(caps.sum(1).max()), d), jnp.bfloat16)
    q = jax.random.normal(jax.random.key(3), (b, hq, d), jnp.bfloat16)
    out = da.ragged_decode_attention(q, poolk, poolk, lengths, offsets=offsets,
                                     interpret=interpret)
    ref = da.reference(q, poolk, poolk, lengths, offsets=offsets)
    err = float(jnp.max(jnp.abs(out.astype(jnp.float32) - ref.astype(jnp.float32))))
    ok &= err <= 2e-2
    log(f"  ragged decode pool layout bf16 max|err| {err:.2e}")
    # block-sparse decode, pages 16 (4 per step) and 64
    k, v, lengths, pos = make_cache(key, b, hkv, c // 64 * 64, d, jnp.bfloat16,
                                    jnp.asarray(np.minimum(lens, c // 64 * 64)))
    cap = k.shape[2]
    for bs in (16, 64):
        idx, cnt = bsa.decode_pattern(lengths, cap // bs, block_size=bs, sink=1, local=2,
                                      stride=3)
        qpos = jnp.full((b,), cap, jnp.int32)
        out = bsa.block_sparse_decode(q, k, v, lengths, idx, cnt, block_size=bs,
                                      kv_positions=pos, q_positions=qpos, interpret=interpret)
        ref = bsa.reference_decode(q, k, v, lengths, idx, cnt, block_size=bs, kv_positions=pos,
                                   q_positions=qpos)
        err = float(jnp.max(jnp.abs(out.astype(jnp.float32) - ref.astype(jnp.float32))))
        ok &= err <= 2e-2
        log(f"  block-sparse decode page {bs} bf16 max|err| {err:.2e}")
    # block-sparse prefill, static pattern, causal by positions
    t = 128 if small else 256
    kq = jax.random.normal(jax.random.key(4), (b, hq, t, d), jnp.bfloat16)
    kp, vp, lp, pp = make_cache(key, b, hkv, t, d, jnp.bfloat16)
    sidx, scnt = bsa.static_pattern(t // 64, t // 64, block_q=64, block_size=64, sink=1,
                                    local=1, stride=2)
    sidx = jnp.broadcast_to(jnp.asarray(sidx), (b, hkv) + sidx.shape)
    scnt = jnp.broadcast_to(jnp.asarray(scnt), (b, hkv, t // 64))
    qp = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    out = bsa.block_sparse_prefill(kq, kp, vp, lp, sidx, scnt, block_size=64, block_q=64,
                                   kv_positions=pp, q_positions=qp, interpret=interpret)
    ref = bsa.reference_prefill(kq, kp, vp, lp, sidx, scnt, block_size=64, block_q=64,
                                kv_positions=pp, q_positions=qp)
    err = float(jnp.max(jnp.abs(out.astype(jnp.float32) - ref.astype(jnp.float32))))
    ok &= err <= 2e-2
    log(f"  block-sparse prefill bf16 max|err| {err:.2e}")
    log(f"  correctness {'PASSED' if ok else 'FAILED'}")
    return ok


def check_kvjax(on_gpu):
    """Dispatch through kvjax.attention and Quest's cache kind, kernel vs reference path."""
    from kvjax import attention
    from kvjax.cache import LayerCache
    from kvjax.sparse.quest import from_layer, quest_attend

    key = jax.random.key(5)
    b, hq, hkv, c, d = 2, 32, 8, 512, 128
    k, v, lengths, pos = make_cache(key, b, hkv, c, d, jnp.bfloat16,
                                    jnp.asarray([[512, 300, 1, 0, 77, 512, 256, 13]] * 2))
    q = jax.random.normal(key, (b, hq, 1, d), jnp.bfloat16)
    qpos = jnp.full((b, 1), c, jnp.int32)
    layer = LayerCache(k, v, lengths, pos)
    a = attention.attend(q, qpos, layer)
    r = attention.attend(q, qpos, layer, impl="reference")
    log(f"  kvjax.attention auto (kernel on gpu: {attention.use_decode_kernel(q, layer)}) vs "
        f"reference max|err| {float(jnp.max(jnp.abs(a.astype(jnp.float32) - r))):.2e}")
    ql = from_layer(layer, page_size=16, token_budget=128)
    a = quest_attend(q, qpos, ql)
    r = quest_attend(q, qpos, ql, impl="reference")
    log(f"  quest auto vs reference max|err| "
        f"{float(jnp.max(jnp.abs(a.astype(jnp.float32) - r))):.2e}")


# --- benchmark --------------------------------------------------------------------------------


def tune(b, ctx, hkv, g, d, copy_bw, small):
    log(f"== tuning ragged decode at batch {b} x {ctx} ==")
    k, v, lengths, pos = make_cache(jax.random.key(7), b, hkv, ctx, d, jnp.bfloat16)
    reps = 8
    qs = jax.random.normal(jax.random.key(8), (reps, b, hkv * g, d), jnp.bfloat16)
    qpos = jnp.full((b,), ctx, jnp.int32)
    sets = [(k, v, lengths, pos, qpos)]
    nbytes = 2 * k.size * 2 + pos.size * 4
    grid = [(64, 4, 3, None), (64, 4, 2, None), (64, 4, 4, None), (64, 4, 3, 2), (64, 4, 3, 4),
            (64, 4, 4, 4), (64, 4, 3, 8), (128, 4, 2, None), (128, 4, 3, None), (128, 4, 2, 4),
            (128, 8, 3, 2), (32, 4, 4, 4), (64, 8, 4, 4), (256, 8, 2, 2)]
    if small:
        grid = grid[:2]
    best, best_t = None, float("inf")
    dflt = da.default_splits(b, hkv, ctx, 64)
    for bk, nw, ns, mult in grid:
        splits = None if mult is None else mult * da.default_splits(b, hkv, ctx, bk)
        cfg = dict(block_k=bk, num_warps=nw, num_stages=ns, num_splits=splits)

        def fn(q, k, v, lengths, pos, qpos, cfg=cfg):
            return da.ragged_decode_attention(q, k, v, lengths, kv_positions=pos,
                                              q_positions=qpos, **cfg)

        t = _try(f"tune {cfg}", time_jax, fn, qs, sets, reps)
        if t is None:
            continue
        log(f"  block_k {bk:4d} warps {nw} stages {ns} splits "
            f"{splits or da.default_splits(b, hkv, ctx, bk):4d}: {t * 1e6:9.1f} us "
            f"{nbytes / t / 1e9:7.0f} GB/s {100 * nbytes / t / copy_bw:5.1f}% of copy")
        if t < best_t:
            best, best_t = cfg, t
    log(f"  best: {best} (default splits at block_k 64: {dflt})")
    del k, v, sets
    gc.collect()
    return best or {}


def tune_sparse(b, ctx, hkv, g, d, small):
    log(f"== tuning block-sparse decode (1/8 of 64-token blocks) at batch {b} x {ctx} ==")
    k, v, lengths, pos = make_cache(jax.random.key(9), b, hkv, ctx, d, jnp.bfloat16)
    reps = 8
    qs = jax.random.normal(jax.random.key(8), (reps, b, hkv * g, d), jnp.bfloat16)
    qpos = jnp.full((b,), ctx, jnp.int32)
    idx, cnt = random_blocks(b, hkv, ctx // 64, 8)
    sets = [(k, v, lengths, pos, qpos, idx, cnt)]
    best, best_t = None, float("inf")
    grid = [(64, 4, 3, None), (64, 4, 3, 2), (64, 4, 3, 4), (128, 8, 3, 4), (64, 4, 3, 8)]
    for bk, nw, ns, sp in grid[: 2 if small else None]:
        cfg = dict(block_k=bk, num_warps=nw, num_stages=ns)
        if sp is not None:
            cfg["num_splits"] = sp

        def fn(q, k, v, lengths, pos, qpos, idx, cnt, cfg=cfg):
            return bsa.block_sparse_decode(q, k, v, lengths, idx, cnt, block_size=64,
                                           kv_positions=pos, q_positions=qpos, **cfg)

        t = _try(f"tune bs {cfg}", time_jax, fn, qs, sets, reps)
        if t is None:
            continue
        log(f"  block_k {bk:4d} warps {nw} stages {ns} splits {sp}: {t * 1e6:9.1f} us")
        if t < best_t:
            best, best_t = cfg, t
    log(f"  best: {best}")
    del k, v, sets
    gc.collect()
    return best or {}


def bench_ragged(b, ctx, hkv, g, d, copy_bw, best):
    """Per-head random lengths in [1, ctx]: GB/s over the bytes of valid slots only."""
    rng = np.random.default_rng(3)
    lengths = jnp.asarray(rng.integers(1, ctx + 1, (b, hkv)), jnp.int32)
    k, v, lengths, pos = make_cache(jax.random.key(12), b, hkv, ctx, d, jnp.bfloat16, lengths)
    reps = 8
    qs = jax.random.normal(jax.random.key(8), (reps, b, hkv * g, d), jnp.bfloat16)
    qpos = jnp.full((b,), ctx, jnp.int32)
    valid = int(jnp.sum(lengths))
    nbytes = valid * (2 * d * 2 + 4)

    def fn(q, k, v, ln, p, qp):
        return da.ragged_decode_attention(q, k, v, ln, kv_positions=p, q_positions=qp, **best)

    t = time_jax(fn, qs, [(k, v, lengths, pos, qpos)], reps)
    log(f"== ragged lengths (mean {valid / (b * hkv):.0f} of {ctx}) batch {b}: {t * 1e6:.1f} us, "
        f"{nbytes / t / 1e9:.0f} GB/s of valid bytes, {100 * nbytes / t / copy_bw:.1f}% of copy")
    return {"us": t * 1e6, "GBps": nbytes / t / 1e9, "pct_copy": 100 * nbytes / t / copy_bw}


def random_blocks(b, hkv, nb, frac_inv, seed=0):
    n = max(1, nb // frac_inv)
    rng = np.random.default_rng(seed)
    idx = np.sort(np.stack([[rng.choice(nb, n, replace=False) for _ in range(hkv)]
                            for _ in range(b)]), -1).astype(np.int32)
    return jnp.asarray(idx), jnp.full((b, hkv), n, jnp.int32)


def bench_config(b, ctx, hkv, g, d, copy_bw, best, best_bs, torch_ok, small):
    try:  # the kernels need no kvjax; the jnp_ref and Quest columns do
        from kvjax import attention
        from kvjax.sparse.quest import from_layer, page_scores, quest_attend, select_pages
    except Exception as e:  # noqa: BLE001
        log(f"  kvjax import failed ({type(e).__name__}: {e}); no jnp_ref / quest columns")
        attention = None

    hq = hkv * g
    kv_bytes = 2 * b * hkv * ctx * d * 2
    pos_bytes = b * hkv * ctx * 4
    l2 = 50e6
    nsets = int(min(8, max(1, math.ceil(3 * l2 / kv_bytes))))
    est = kv_bytes / 3e12
    reps = int(min(20, max(2, math.ceil(2e-3 / est))))
    need = kv_bytes * nsets * 2.2 + 4 * b * hq * ctx * 4  # + BTNH copies + XLA temporaries
    free = None
    try:
        import torch

        if torch.cuda.is_available():
            free = torch.cuda.mem_get_info()[0]
    except Exception:  # noqa: BLE001
        pass
    if free is not None and need > 0.9 * free:
        log(f"  b={b} ctx={ctx}: SKIPPED, needs ~{need / 2**30:.1f} GiB, {free / 2**30:.1f} free")
        return None
    sets = []
    for s in range(nsets):
        k, v, lengths, pos = make_cache(jax.random.key(100 + s), b, hkv, ctx, d, jnp.bfloat16)
        sets.append((k, v, lengths, pos))
    qs = jax.random.normal(jax.random.key(11), (reps, b, hq, d), jnp.bfloat16)
    qpos = jnp.full((b,), ctx, jnp.int32)
    res = {"batch": b, "ctx": ctx, "kv_bytes": kv_bytes, "reps": reps, "sets": nsets}

    def record(name, t, nbytes):
        if t is None:
            return
        res[name] = {"us": t * 1e6, "GBps": nbytes / t / 1e9,
                     "pct_copy": 100 * nbytes / t / copy_bw}

    kset = [(k, v, ln, p, qpos) for k, v, ln, p in sets]

    def kern(q, k, v, ln, p, qp):
        return da.ragged_decode_attention(q, k, v, ln, kv_positions=p, q_positions=qp, **best)

    def kern_nopos(q, k, v, ln, p, qp):
        return da.ragged_decode_attention(q, k, v, ln, **best)

    record("kernel", _try("kernel", time_jax, kern, qs, kset, reps), kv_bytes + pos_bytes)
    if ctx == 32768:
        record("kernel_nopos", _try("kernel_nopos", time_jax, kern_nopos, qs, kset, reps),
               kv_bytes)
    # Split-K sweep: programs ~ 1/2, 1, 2, 4 x (2 per SM); the best goes to "kernel_best".
    dflt = da.default_splits(b, hkv, ctx, best.get("block_k", 64))
    cands = sorted({max(1, min(ctx // 64, round(p / (b * hkv)))) for p in (132, 264, 528, 1056)}
                   - {dflt})
    sweep = {dflt: res["kernel"]["us"]} if "kernel" in res else {}
    for sp in cands:
        cfg = dict(best, num_splits=sp)

        def kern_s(q, k, v, ln, p, qp, cfg=cfg):
            return da.ragged_decode_attention(q, k, v, ln, kv_positions=p, q_positions=qp, **cfg)

        t = _try(f"splits {sp}", time_jax, kern_s, qs, kset, reps)
        if t is not None:
            sweep[sp] = t * 1e6
    if sweep:
        sp = min(sweep, key=sweep.get)
        record("kernel_best", sweep[sp] / 1e6, kv_bytes + pos_bytes)
        res["splits_sweep"] = {int(k_): round(v_, 1) for k_, v_ in sorted(sweep.items())}
        res["splits_default"] = dflt
        log(f"   splits sweep (default {dflt}): {res['splits_sweep']}")

    def ref(q, k, v, ln, p, qp):
        layer = attention.LayerCache(k, v, ln, p)
        return attention.reference_attention(q[:, :, None], qp[:, None], layer)

    if attention is not None:
        record("jnp_ref", _try("jnp_ref", time_jax, ref, qs, kset, reps), kv_bytes + pos_bytes)

    # jax.nn.dot_product_attention on [B, T, N, H] copies (made outside the timed region).
    tset = [(jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)) for k, v, _, _ in sets]
    for impl in ("xla", "cudnn"):
        def dpa(q, kt, vt, impl=impl):
            return jax.nn.dot_product_attention(q[:, None], kt, vt, implementation=impl)[:, 0]

        record(impl, _try(impl, time_jax, dpa, qs, tset, reps), kv_bytes)
    del tset
    gc.collect()

    if torch_ok:
        import torch
        import torch.nn.functional as F

        tq = [torch.from_dlpack(qs[i][:, :, None]) for i in range(reps)]
        tkv = [(torch.from_dlpack(k), torch.from_dlpack(v)) for k, v, _, _ in sets]

        def sdpa(q, k, v):
            return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)

        record("torch", _try("torch", time_torch, sdpa, tq, tkv, reps), kv_bytes)
        del tq, tkv

    # Block-sparse decode with 1/8 of the 64-token blocks active per head.
    nb = ctx // 64
    idx, cnt = random_blocks(b, hkv, nb, 8)
    frac = int(cnt[0, 0]) / nb
    bset = [(k, v, ln, p, qpos, idx, cnt) for k, v, ln, p in sets]

    def bsd(q, k, v, ln, p, qp, idx, cnt):
        return bsa.block_sparse_decode(q, k, v, ln, idx, cnt, block_size=64, kv_positions=p,
                                       q_positions=qp, **best_bs)

    record("bs_1/8", _try("bs", time_jax, bsd, qs, bset, reps),
           frac * (kv_bytes + pos_bytes) + idx.size * 4)

    # Quest: 16-token pages, budget ctx / 8, selection + sparse attention end to end.
    if attention is None:
        return res
    qsets = []
    for k, v, ln, p in sets:
        qsets.append((from_layer(attention.LayerCache(k, v, ln, p), page_size=16,
                                 token_budget=ctx // 8), qpos))
    summ = 2 * b * hkv * (ctx // 16) * d * 2

    def quest(q, ql, qp):
        return quest_attend(q[:, :, None], qp[:, None], ql)[:, :, 0]

    def quest_sel(q, ql, qp):
        return select_pages(q, ql)

    record("quest_1/8", _try("quest", time_jax, quest, qs, qsets, reps),
           summ + (kv_bytes + pos_bytes) / 8)
    record("quest_sel", _try("quest_sel", time_jax, quest_sel, qs, qsets, reps), summ)

    def quest_score(q, ql, qp):
        return page_scores(q, ql.page_min, ql.page_max, ql.lengths, ql.page_size)

    record("quest_score", _try("quest_score", time_jax, quest_score, qs, qsets, reps), summ)
    del qsets
    gc.collect()
    return res


def fmt_row(r, names):
    cells = []
    for n in names:
        x = r.get(n)
        cells.append(f"{x['us']:11.1f}" if x else f"{'-':>11s}")
    return " ".join(cells)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--quick", action="store_true", help="tiny CPU smoke test (interpret mode)")
    ap.add_argument("--tune", action="store_true", help="sweep the ragged kernel's launch config")
    ap.add_argument("--deadline_s", type=float, default=380.0,
                    help="start no new table row after this many seconds (device budget)")
    args = ap.parse_args(argv)
    t_start = time.perf_counter()
    small = args.quick
    interpret = jax.default_backend() == "cpu"
    log(f"jax {jax.__version__} backend {jax.default_backend()} device {jax.devices()[0]}")
    torch_ok = False
    try:
        import torch

        torch_ok = True
        log(f"torch {torch.__version__} cuda {torch.cuda.is_available()}")
    except Exception:  # noqa: BLE001
        log("torch not available")
    ok = _try("correctness", check_correctness, interpret, small)
    _try("kvjax", check_kvjax, not interpret)
    hkv, g, d = 8, 4, 128
    copy_bw = copy_bandwidth(2 * 2**30) if not small else float("nan")
    if not math.isfinite(copy_bw):
        copy_bw = 3.0e12
        log("copy bandwidth: not measured (no CUDA), using 3.0e12 for percentages")
    else:
        log(f"copy bandwidth (torch D2D, read+write): {copy_bw / 1e12:.3f} TB/s")
    tb, tctx = (1, 512) if small else (8, 32768)
    # The launch-config sweep of the first GPU run (docs/benchmarks.md) chose DEFAULT_CONFIG;
    # --tune repeats it.
    best = tune(tb, tctx, hkv, g, d, copy_bw, small) if args.tune else dict(da.DEFAULT_CONFIG)
    best_bs = tune_sparse(tb, tctx, hkv, g, d, small)
    bsa.DEFAULT_DECODE.update({k: v for k, v in best_bs.items()
                               if k in ("num_warps", "num_stages")})
    ragged = _try("ragged", bench_ragged, tb, tctx, hkv, g, d, copy_bw, best)
    batches = (1, 2) if small else (1, 8, 32)
    ctxs = (512,) if small else (32768, 4096, 131072)  # the targets are at 32k: first
    names = ["kernel", "kernel_best", "kernel_nopos", "jnp_ref", "xla", "cudnn", "torch",
             "bs_1/8", "quest_1/8", "quest_sel", "quest_score"]
    rows = []
    for ctx in ctxs:
        for b in batches:
            if time.perf_counter() - t_start > args.deadline_s:
                log(f"-- batch {b} ctx {ctx}: NOT RUN (deadline {args.deadline_s:.0f} s reached)")
                continue
            log(f"-- batch {b} ctx {ctx} (t={time.perf_counter() - t_start:.0f} s)")
            r = _try(f"b{b} ctx{ctx}", bench_config, b, ctx, hkv, g, d, copy_bw, best, best_bs,
                     torch_ok and not interpret, small)
            if r is not None:
                rows.append(r)
                log("   " + json.dumps({k: (round(v["us"], 1) if isinstance(v, dict)
                                            and "us" in v else v) for k, v in r.items()}))
    log("")
    log(f"copy bandwidth {copy_bw / 1e12:.3f} TB/s; kernel config {best}; block-sparse {best_bs}"
        f"; total {time.perf_counter() - t_start:.0f} s")
    log("times in us (median per call); bf16, Hq 32, Hkv 8, D 128")
    log(f"{'batch':>5s} {'ctx':>7s} " + " ".join(f"{n[:11]:>11s}" for n in names))
    for r in rows:
        log(f"{r['batch']:5d} {r['ctx']:7d} " + fmt_row(r, names))
    log("")
    log("kernel: GB/s, % of copy bw, speedup vs best baseline; bs & quest speedup vs kernel")
    for r in rows:
        kr = r.get("kernel")
        if not kr:
            continue
        bases = {n: r[n]["us"] for n in ("xla", "cudnn", "torch", "jnp_ref") if r.get(n)}
        best_base = min(bases.values()) if bases else float("nan")
        sp = lambda n, r=r, kr=kr: kr["us"] / r[n]["us"] if r.get(n) else float("nan")  # noqa: E731
        log(f"{r['batch']:5d} {r['ctx']:7d}  {kr['GBps']:6.0f} GB/s {kr['pct_copy']:5.1f}%  "
            f"vs best baseline {best_base / kr['us']:5.2f}x  "
            + " ".join(f"{n} {bases[n] / kr['us']:.2f}x" for n in bases)
            + f"  bs_1/8 {sp('bs_1/8'):5.2f}x quest_1/8 {sp('quest_1/8'):5.2f}x")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "bench_kernels.json"), "w") as f:
        json.dump({"copy_bw": copy_bw, "best": best, "best_bs": best_bs, "rows": rows,
                   "ragged": ragged,
                   "correct": ok, "jax": jax.__version__}, f, indent=1)
    with open(os.path.join(args.out, "bench_kernels.log"), "w") as f:
        f.write("\n".join(LOG))
    return 0


if __name__ == "__main__":
    sys.exit(main())
