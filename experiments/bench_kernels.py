"""Decode-kernel benchmark: ragged decode, block-sparse decode and Quest against baselines.

A normal run checks the kernels against their references on the GPU, measures the GPU's copy
bandwidth, then times, for batch 1/8/32 and context 4k/32k/128k (32 query / 8 KV heads, D 128,
bf16), with the kernels' per-shape default launch parameters (their TUNED_* tables, or a
tuned.json passed with --tuned):

  kernel        pallas_kernels.decode_attention (with cache positions, as kvjax.attention uses it)
  kernel_nopos  the same kernel masking by lengths only
  jnp_ref       kvjax.attention.reference_attention under jit
  xla / cudnn   jax.nn.dot_product_attention(implementation=...) on [B, T, N, H] copies
  torch         torch.nn.functional.scaled_dot_product_attention(enable_gqa=True), same buffers
                (zero-copy via DLPack), timed as a CUDA graph
  bs_1/8        block_sparse_decode, 1/8 of the 64-token blocks of each head active (random)
  quest_1/8     Quest end to end (page scores + top-k + block-sparse decode), 16-token pages,
                token budget = context / 8; quest_sel: the page selection alone (Pallas score
                and top-k kernels on the GPU), quest_score: the scores alone;
                quest32_1/8: Quest with 32-token pages, same budget

--tune runs only the launch sweeps (~150 s on an H100): ragged decode at batch 1 and 8 x 32k
(block_k / warps / stages, then split density x merge kind), block-sparse decode at 8 x 32k
(list mode, launch, split density; 64- and 128-token blocks) and Quest at 8 x 32k (score tile,
top-k warps, attention block_k x list mode; 16- and 32-token pages). Every config is checked
against the reference once before it is timed. It prints the TUNED_* tables to paste into the
kernels and writes them to $OUT/tuned.json.

Each JAX timing runs `reps` calls (distinct queries; KV inputs rotated over several copies when
one copy would fit in L2) inside one jitted executable, dispatched back to back (asynchronously)
for >= 20 ms and waited for once, and reports the median over 7 such runs per call: device time
per call including the launch gaps between its kernels, without the host's dispatch and wait
(`experiments/_bench.py`; before 2026-11-23's third session those were charged to the calls,
~30 us per call, which made small calls look up to 1.5x slower than their kernels).
Bytes are the minimum each method must read (+ positions where read); GB/s = bytes / time.

    PYTHONPATH=. python3 experiments/bench_kernels.py --tune --out $OUT   # GPU sweep, ~150 s
    PYTHONPATH=. python3 experiments/bench_kernels.py --out $OUT --tuned $OUT/tuned.json
    PYTHONPATH=. python3 experiments/bench_kernels.py --quick [--tune]    # CPU smoke test
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import math
import os
import sys
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # torch shares the GPU

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from experiments._bench import (  # noqa: E402
    copy_bandwidth,
    make_log,
    rel_err,
    time_jax,
    time_torch,
)
from pallas_kernels import block_sparse_attention as bsa  # noqa: E402
from pallas_kernels import decode_attention as da  # noqa: E402

LOG: list[str] = []
log, _try = make_log(LOG)  # tracebacks of failed steps go into the log


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
        ref = bsa.reference_decode(q, k, v, lengths, idx, cnt, block_size=bs, kv_positions=pos,
                                   q_positions=qpos)
        for mode in bsa.LIST_MODES[: 1 if small else None]:
            out = bsa.block_sparse_decode(q, k, v, lengths, idx, cnt, block_size=bs,
                                          kv_positions=pos, q_positions=qpos, list_mode=mode,
                                          interpret=interpret)
            err = float(jnp.max(jnp.abs(out.astype(jnp.float32) - ref.astype(jnp.float32))))
            ok &= err <= 2e-2
            log(f"  block-sparse decode page {bs} list_mode {mode} bf16 max|err| {err:.2e}")
    # ragged decode: single split (in-kernel normalisation) and the Pallas merge
    if not small:
        k, v, lengths, pos = make_cache(key, b, hkv, c, d, jnp.bfloat16, jnp.asarray(lens))
        ref = da.reference(q, k, v, lengths)
        for sp, merge in ((1, "xla"), (5, "pallas"), (40, "pallas")):
            out = da.ragged_decode_attention(q, k, v, lengths, num_splits=sp, merge=merge,
                                             block_k=16, interpret=interpret)
            err = float(jnp.max(jnp.abs(out.astype(jnp.float32) - ref.astype(jnp.float32))))
            ok &= err <= 2e-2
            log(f"  ragged decode splits {sp} merge {merge} bf16 max|err| {err:.2e}")
    # Quest selection kernels vs jnp (scores allclose, top-k lists identical)
    from pallas_kernels import quest_select as qsel

    npg = 300 if not small else 40
    rng2 = np.random.default_rng(6)
    mn = jnp.asarray(rng2.standard_normal((b, hkv, npg, d)), jnp.bfloat16)
    mx = (mn.astype(jnp.float32) + jnp.abs(jnp.asarray(
        rng2.standard_normal((b, hkv, npg, d)), jnp.float32))).astype(jnp.bfloat16)
    ln = jnp.asarray(rng2.integers(0, npg * 16 + 1, (b, hkv)), jnp.int32)
    sref = qsel.reference_page_scores(q, mn, mx, ln, 16)
    sk = qsel.page_scores(q, mn, mx, ln, 16, interpret=interpret)
    fin = jnp.isfinite(sref)
    err = float(jnp.max(jnp.where(fin, jnp.abs(sk - sref) / (1 + jnp.abs(sref)), 0)))
    same_inf = bool(jnp.all(jnp.where(fin, True, sk == sref)))
    ti, tc = qsel.top_pages(sref, npg // 8, interpret=interpret)
    ri, rc = qsel.reference_top_pages(sref, npg // 8)
    same = bool(jnp.all(ti == ri) & jnp.all(tc == rc))
    ok &= err <= 1e-5 and same_inf and same
    log(f"  quest page scores rel err {err:.2e}, +-inf same {same_inf}; top_pages == "
        f"lax.top_k: {same}")
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


# --- launch-parameter sweep (--tune) -----------------------------------------------------------


def _err(out, ref) -> float:
    return float(jnp.max(jnp.abs(out.astype(jnp.float32) - ref.astype(jnp.float32))))


class Sweep:
    """Times configs of one callable on one input set; keeps the fastest that is also correct.

    fn(q, *inputs, **cfg) -> output; each config is checked once against `ref_out` (bf16
    tolerance 2e-2 absolute) before it is timed; failing or crashing configs are skipped.
    """

    def __init__(self, name, fn, qs, sets, reps, ref_out=None, nbytes=None, copy_bw=None):
        self.name, self.fn, self.qs, self.sets, self.reps = name, fn, qs, sets, reps
        self.ref_out, self.nbytes, self.copy_bw = ref_out, nbytes, copy_bw
        self.results: list[tuple[float, dict]] = []

    def run(self, cfg: dict) -> float | None:
        if time.perf_counter() > TUNE_END[0]:
            log(f"  {self.name} {cfg}: not run (tune time budget spent)")
            return None
        f = lambda q, *a, cfg=cfg: self.fn(q, *a, **cfg)  # noqa: E731
        if self.ref_out is not None:
            out = _try(f"{self.name} {cfg}", jax.jit(f), self.qs[0], *self.sets[0])
            if out is None:
                return None
            err = _err(jax.tree_util.tree_leaves(out)[0],
                       jax.tree_util.tree_leaves(self.ref_out)[0])
            if not err <= 2e-2:
                log(f"  {self.name} {cfg}: WRONG (max|err| {err:.2e}), skipped")
                return None
        t = _try(f"{self.name} {cfg}", time_jax, f, self.qs, self.sets, self.reps)
        if t is None:
            return None
        extra = ""
        if self.nbytes:
            extra = f" {self.nbytes / t / 1e9:6.0f} GB/s"
            if self.copy_bw:
                extra += f" {100 * self.nbytes / t / self.copy_bw:5.1f}% of copy"
        log(f"  {self.name} {json.dumps(cfg)}: {t * 1e6:8.1f} us{extra}")
        self.results.append((t, dict(cfg)))
        return t

    def best(self) -> tuple[float, dict]:
        if not self.results:
            return float("nan"), {}
        return min(self.results, key=lambda r: r[0])


def _with(base: dict, **kw) -> dict:
    return {**base, **kw}


def tune_decode(b, ctx, hkv, g, d, copy_bw, small):
    """Ragged decode at one shape: (block_k, warps, stages), then split density x merge."""
    log(f"== tune ragged decode, batch {b} x {ctx} ==")
    nsets = 2 if b * ctx * hkv * d * 4 < 150e6 else 1  # rotate when K+V is near L2 size
    sets = []
    for s in range(nsets):
        k, v, lengths, pos = make_cache(jax.random.key(70 + s), b, hkv, ctx, d, jnp.bfloat16)
        sets.append((k, v, lengths, pos, jnp.full((b,), ctx, jnp.int32)))
    reps = 8
    qs = jax.random.normal(jax.random.key(8), (reps, b, hkv * g, d), jnp.bfloat16)
    k, v, lengths, pos, qpos = sets[0]
    ref = da.reference(qs[0], k, v, lengths, kv_positions=pos, q_positions=qpos)
    nbytes = 2 * k.size * 2 + pos.size * 4

    def fn(q, k, v, ln, p, qp, pps=1.0, **cfg):
        sp = da.default_splits(b, hkv, ctx, cfg["block_k"], pps)
        return da.ragged_decode_attention(q, k, v, ln, kv_positions=p, q_positions=qp,
                                          num_splits=sp, **cfg)

    sw = Sweep("decode", fn, qs, sets, reps, ref, nbytes, copy_bw)
    base = {"block_k": 64, "num_warps": 4, "num_stages": 3, "pps": 1.0, "merge": "xla",
            "split_tail": False}
    stage_a = [(64, 4, 3), (64, 4, 4), (64, 8, 3), (128, 4, 3), (128, 8, 3), (256, 8, 2)]
    for bk, nw, ns in stage_a[: 2 if small else None]:
        sw.run(_with(base, block_k=bk, num_warps=nw, num_stages=ns))
    _, top = sw.best()
    top = top or base
    ppss = (1.0, 2.0, 4.0) if da.regime(b, hkv) == "few" else (0.5, 1.0, 2.0)
    for pps in ppss[: 1 if small else None]:
        for merge in ("xla", "pallas"):
            cfg = _with(top, pps=pps, merge=merge)
            if cfg not in [c for _, c in sw.results]:
                sw.run(cfg)
    _, top = sw.best()
    sw.run(_with(top or base, split_tail=True))
    t, cfg = sw.best()
    log(f"  best decode b{b} x {ctx}: {t * 1e6:.1f} us {cfg}")
    for chain in (False, True):
        t_torch = _try("torch sdpa", torch_sdpa_time, qs, [(k, v) for k, v, *_ in sets], reps,
                       chain)
        if t_torch:
            log(f"  torch SDPA{' chained' if chain else ''} b{b} x {ctx}: {t_torch * 1e6:.1f} us;"
                f" best kernel / torch time {t / t_torch:.3f}"
                f" ({'not slower' if t <= t_torch else 'SLOWER'})")
    del sets
    gc.collect()
    return t, cfg


def decode_dpa(q, kt, vt, impl=None):
    """`jax.nn.dot_product_attention` for decode: q [B, Hq, D], kt / vt [B, T, Hkv, D] (the
    [B, T, N, H] copies, made outside the timed region) -> [B, Hq, D]; impl as jax.nn's."""
    return jax.nn.dot_product_attention(q[:, None], kt, vt, implementation=impl)[:, 0]


def torch_sdpa(q, k, v):
    """torch scaled_dot_product_attention with GQA: q [B, Hq, 1, D], k/v [B, Hkv, C, D]."""
    import torch.nn.functional as F

    return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)


def torch_sdpa_time(qs, kv_sets, reps, chain=False):
    """torch_sdpa on the same buffers (DLPack, zero copy), CUDA graph; None off GPU.
    chain: each call's output is the next call's query (`time_torch`)."""
    import torch

    if not torch.cuda.is_available():
        return None
    tq = [torch.from_dlpack(qs[i][:, :, None]) for i in range(reps)]
    tkv = [(torch.from_dlpack(k), torch.from_dlpack(v)) for k, v in kv_sets]
    return time_torch(torch_sdpa, tq, tkv, reps, chain=chain)


def tune_block_sparse(b, ctx, hkv, g, d, small):
    """Block-sparse decode, 1/8 of the 64-token blocks: list mode, launch, split density."""
    log(f"== tune block-sparse decode (1/8 of 64-token blocks), batch {b} x {ctx} ==")
    k, v, lengths, pos = make_cache(jax.random.key(9), b, hkv, ctx, d, jnp.bfloat16)
    reps = 8
    qs = jax.random.normal(jax.random.key(8), (reps, b, hkv * g, d), jnp.bfloat16)
    qpos = jnp.full((b,), ctx, jnp.int32)
    res = {}
    for bs in (64, 128):
        idx, cnt = random_blocks(b, hkv, ctx // bs, 8)
        sets = [(k, v, lengths, pos, qpos, idx, cnt)]
        ref = bsa.reference_decode(qs[0], k, v, lengths, idx, cnt, block_size=bs,
                                   kv_positions=pos, q_positions=qpos)

        def fn(q, k, v, ln, p, qp, idx, cnt, pps=2.0, min_steps=16, bs=bs, **cfg):
            sp = bsa.sparse_splits(b, hkv, idx.shape[-1], bs, cfg["block_k"],
                                   programs_per_sm=pps, min_steps=min_steps)
            return bsa.block_sparse_decode(q, k, v, ln, idx, cnt, block_size=bs,
                                           kv_positions=p, q_positions=qp, num_splits=sp, **cfg)

        sw = Sweep(f"bs{bs}", fn, qs, sets, reps, ref)
        base = {"block_k": 64, "num_warps": 4, "num_stages": 3, "list_mode": "load",
                "pps": 2.0, "min_steps": 16, "merge": "xla"}
        if bs == 64:
            for mode in bsa.LIST_MODES[: 1 if small else None]:
                sw.run(_with(base, list_mode=mode))
            _, top = sw.best()
            top = top or base
            for bk, nw, ns in [(64, 4, 4), (64, 8, 3), (128, 8, 3)][: 0 if small else None]:
                sw.run(_with(top, block_k=bk, num_warps=nw, num_stages=ns))
            _, top = sw.best()
            top = top or base
            sw.run(_with(top, merge="pallas"))
            _, top = sw.best()
            top = top or base
            for pps, ms in [(1.0, 16), (4.0, 16), (4.0, 4)][: 0 if small else None]:
                sw.run(_with(top, pps=pps, min_steps=ms))
        else:  # 128-token blocks: the best 64-token config, and block_k 128
            top = res[64][1] or base
            sw.run(top)
            if not small:
                sw.run(_with(top, block_k=128, num_warps=8))
        t, cfg = sw.best()
        log(f"  best block-sparse, {bs}-token blocks: {t * 1e6:.1f} us {cfg}")
        res[bs] = (t, cfg)
    del k, v
    gc.collect()
    return res


def tune_quest(b, ctx, hkv, g, d, small):
    """Quest with budget ctx/8: score kernel tile, top-k warps, then the attention config."""
    import importlib

    from kvjax import attention
    from pallas_kernels import quest_select as qsel

    qmod = importlib.import_module("kvjax.sparse.quest")  # kvjax.sparse.quest is the factory

    log(f"== tune Quest (budget ctx/8), batch {b} x {ctx} ==")
    k, v, lengths, pos = make_cache(jax.random.key(10), b, hkv, ctx, d, jnp.bfloat16)
    reps = 8
    qs = jax.random.normal(jax.random.key(8), (reps, b, hkv * g, d), jnp.bfloat16)
    qpos = jnp.full((b,), ctx, jnp.int32)
    saved = dict(qsel.TUNED_QUEST)
    res = {}
    sel16 = {}
    for ps in (16, 32):
        ql = qmod.from_layer(attention.LayerCache(k, v, lengths, pos), page_size=ps,
                             token_budget=ctx // 8)
        sets = [(ql, qpos)]
        ref_s = qsel.reference_page_scores(qs[0], ql.page_min, ql.page_max, ql.lengths, ps)

        def score(q, ql, qp, **cfg):
            return qsel.page_scores(q, ql.page_min, ql.page_max, ql.lengths, ql.page_size,
                                    **cfg)

        sw = Sweep(f"quest{ps} scores", score, qs, sets, reps, None)
        out = _try("quest scores", score, qs[0], ql, qpos)
        if out is not None:
            fin = jnp.isfinite(ref_s)
            log(f"  quest{ps} scores vs jnp max|err| "
                f"{float(jnp.max(jnp.where(fin, jnp.abs(out - ref_s), 0))):.2e}, same +-inf: "
                f"{bool(jnp.all(jnp.where(fin, True, out == ref_s)))}")
        grid = [(64, 4, 2), (128, 4, 2), (128, 8, 2)] if ps == 16 else []
        for bp, nw, ns in grid[: 1 if small else None]:
            sw.run({"block_p": bp, "num_warps": nw, "num_stages": ns})
        _, sc = sw.best()
        if sc:
            qsel.TUNED_QUEST.update(block_p=sc["block_p"], score_warps=sc["num_warps"],
                                    score_stages=sc["num_stages"])
        sel_ref = qsel.reference_top_pages(ref_s, ql.max_pages)
        sel = _try("quest top_pages", qsel.top_pages, ref_s, ql.max_pages)
        if sel is not None:
            log(f"  quest{ps} top_pages == lax.top_k selection: "
                f"{bool(jnp.all(sel[0] == sel_ref[0]) & jnp.all(sel[1] == sel_ref[1]))}")

        def top(q, ql, qp, **cfg):
            s = qsel.reference_page_scores(q, ql.page_min, ql.page_max, ql.lengths,
                                           ql.page_size)
            return qsel.top_pages(s, ql.max_pages, **cfg)

        def top_ref(q, ql, qp):
            s = qsel.reference_page_scores(q, ql.page_min, ql.page_max, ql.lengths,
                                           ql.page_size)
            return qsel.reference_top_pages(s, ql.max_pages)

        t_ref = _try("quest jnp selection", time_jax, top_ref, qs, sets, reps)
        if t_ref is not None:
            log(f"  quest{ps} jnp scores + lax.top_k + sort: {t_ref * 1e6:.1f} us")
        tw = Sweep(f"quest{ps} jnp scores + top_pages", top, qs, sets, reps, None)
        for nw in ((4, 8) if ps == 16 else ())[: 1 if small else None]:
            tw.run({"num_warps": nw})
        _, tc = tw.best()
        if tc:
            qsel.TUNED_QUEST.update(select_warps=tc["num_warps"])

        def quest(q, ql, qp):
            return qmod.quest_attend(q[:, :, None], qp[:, None], ql)[:, :, 0]

        ref = qmod.quest_attend(qs[0][:, :, None], qpos[:, None], ql, impl="reference")[:, :, 0]

        def quest_cfg(q, ql, qp, block_k, list_mode):
            qsel.TUNED_QUEST.update(block_k=block_k, list_mode=list_mode)
            return quest(q, ql, qp)

        ew = Sweep(f"quest{ps} end to end", quest_cfg, qs, sets, reps, ref)
        for bk in ((64, 128) if ps == 16 else (64,))[: 1 if small else None]:
            for mode in bsa.LIST_MODES[: 1 if small else None]:
                ew.run({"block_k": bk, "list_mode": mode})
        t, cfg = ew.best()
        best = {**{kk: qsel.TUNED_QUEST[kk] for kk in ("block_p", "score_warps",
                                                       "score_stages", "select_warps")}, **cfg}
        log(f"  best Quest, {ps}-token pages: {t * 1e6:.1f} us {best}")
        res[ps] = (t, best)
        qsel.TUNED_QUEST.clear()
        qsel.TUNED_QUEST.update(saved)
        if ps == 16:  # page 32 reuses the selection kernels' launch parameters
            sel16 = {kk: best[kk] for kk in ("block_p", "score_warps", "score_stages",
                                             "select_warps")}
        qsel.TUNED_QUEST.update(sel16)
    qsel.TUNED_QUEST.clear()
    qsel.TUNED_QUEST.update(saved)
    del k, v
    gc.collect()
    return res


TUNE_END = [float("inf")]  # perf_counter time after which Sweep.run starts nothing new


def run_tune(args, copy_bw, small):
    """--tune: the launch sweeps for all three kernels; prints pasteable default tables."""
    hkv, g, d = 8, 4, 128
    ctx = 512 if small else 32768
    t0 = time.perf_counter()
    # Cumulative shares of the budget per section (a section that ends early leaves its
    # slack to the next): decode b1 / b8 25% each, block-sparse 22%, Quest the rest; with
    # --tune_only=decode the two decode sweeps share the whole budget.
    share = iter((0.5, 1.0) if args.tune_only == "decode" else (0.25, 0.5, 0.72, 1.0))

    def section():
        TUNE_END[0] = t0 + next(share) * args.tune_budget_s

    dec = {}
    for b in ((1, 2) if small else (1, 8)):
        section()
        dec[b] = tune_decode(b, ctx, hkv, g, d, copy_bw, small)
    bsb = 2 if small else 8
    bsr, qr = {}, {}
    if args.tune_only != "decode":
        section()
        bsr = _try("tune block-sparse", tune_block_sparse, bsb, ctx, hkv, g, d, small) or {}
        section()
        qr = _try("tune quest", tune_quest, bsb, ctx, hkv, g, d, small) or {}
    log("")
    log(f"== tune summary ({time.perf_counter() - t0:.0f} s) ==")
    dense8 = dec.get(bsb, (float("nan"), {}))[0]
    for b, (t, cfg) in dec.items():
        log(f"decode b{b} x {ctx}: {t * 1e6:.1f} us, "
            f"{100 * 2 * b * hkv * ctx * d * 2 / t / copy_bw:.1f}% of copy bw, {cfg}")
    for bs, (t, cfg) in bsr.items():
        log(f"block-sparse 1/8 of {bs}-token blocks b{bsb}: {t * 1e6:.1f} us, "
            f"{dense8 / t:.2f}x the tuned dense decode, {cfg}")
    for ps, (t, cfg) in qr.items():
        log(f"Quest {ps}-token pages b{bsb}: {t * 1e6:.1f} us, {dense8 / t:.2f}x the tuned "
            f"dense decode, {cfg}")

    def dec_entry(cfg):
        return {"block_k": cfg.get("block_k", 64), "num_warps": cfg.get("num_warps", 4),
                "num_stages": cfg.get("num_stages", 3),
                "programs_per_sm": cfg.get("pps", 1.0), "merge": cfg.get("merge", "xla"),
                "split_tail": cfg.get("split_tail", False)}

    few, many = (dec[b][1] for b in sorted(dec))  # batch 1 and 8: da.regime "few", "many"
    tuned = {"TUNED_DECODE": {"few": dec_entry(few), "many": dec_entry(many)}}
    if 64 in bsr and bsr[64][1]:
        c = bsr[64][1]
        ent = {"block_k": c["block_k"], "num_warps": c["num_warps"],
               "num_stages": c["num_stages"], "list_mode": c["list_mode"],
               "programs_per_sm": c["pps"], "min_steps": c["min_steps"], "merge": c["merge"]}
        tuned["TUNED_BS"] = {"few": dict(bsa.TUNED_BS["few"]), "many": ent}
    if qr:
        ps = min(qr, key=lambda p: qr[p][0] if math.isfinite(qr[p][0]) else float("inf"))
        tuned["TUNED_QUEST"] = dict(qr[16][1]) if 16 in qr and qr[16][1] else {}
        tuned["quest_best_page_size"] = ps
    log("paste into pallas_kernels/decode_attention.py, block_sparse_attention.py, "
        "quest_select.py (or pass --tuned tuned.json to a normal run):")
    for name, val in tuned.items():
        log(f"{name} = {val!r}")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "tuned.json"), "w") as f:
        json.dump(tuned, f, indent=1)
    return tuned


def apply_tuned(path: str) -> None:
    """Loads a tuned.json written by --tune into the kernels' default tables."""
    from pallas_kernels import quest_select as qsel

    with open(path) as f:
        tuned = json.load(f)
    for mod, name in ((da, "TUNED_DECODE"), (bsa, "TUNED_BS"), (qsel, "TUNED_QUEST")):
        if tuned.get(name):
            getattr(mod, name).update(tuned[name])
    log(f"applied {path}: {json.dumps(tuned)}")


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
    res["kernel_config"] = da.decode_config(b, hkv, ctx, 2 * d * 2)  # bf16 K + V

    def ref(q, k, v, ln, p, qp):
        layer = attention.LayerCache(k, v, ln, p)
        return attention.reference_attention(q[:, :, None], qp[:, None], layer)

    if attention is not None:
        record("jnp_ref", _try("jnp_ref", time_jax, ref, qs, kset, reps), kv_bytes + pos_bytes)

    # jax.nn.dot_product_attention on [B, T, N, H] copies (made outside the timed region).
    tset = [(jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)) for k, v, _, _ in sets]
    for impl in ("xla", "cudnn"):
        record(impl, _try(impl, time_jax, functools.partial(decode_dpa, impl=impl), qs, tset,
                          reps), kv_bytes)
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
        # Same dependence as time_jax's chain: each call's output is the next call's query.
        record("torch_chained", _try("torch_chained", time_torch, sdpa, tq, tkv, reps,
                                     chain=True), kv_bytes)
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

    impl = "pallas" if torch_ok else "jnp"  # what quest_attend selects with on the GPU

    def quest_sel(q, ql, qp):
        return select_pages(q, ql, impl)

    record("quest_1/8", _try("quest", time_jax, quest, qs, qsets, reps),
           summ + (kv_bytes + pos_bytes) / 8)
    record("quest_sel", _try("quest_sel", time_jax, quest_sel, qs, qsets, reps), summ)

    def quest_score(q, ql, qp):
        return page_scores(q, ql.page_min, ql.page_max, ql.lengths, ql.page_size, impl)

    record("quest_score", _try("quest_score", time_jax, quest_score, qs, qsets, reps), summ)
    del qsets
    gc.collect()
    # Quest with 32-token pages (same token budget): half the summary bytes, half the pages.
    q32 = [(from_layer(attention.LayerCache(k, v, ln, p), page_size=32, token_budget=ctx // 8),
            qpos) for k, v, ln, p in sets]
    record("quest32_1/8", _try("quest32", time_jax, quest, qs, q32, reps),
           summ / 2 + (kv_bytes + pos_bytes) / 8)
    del q32
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
    ap.add_argument("--tune", action="store_true",
                    help="only the launch sweeps of all three kernels (~150 s on an H100)")
    ap.add_argument("--tune_budget_s", type=float, default=125.0,
                    help="--tune starts no new config after this many seconds of sweeping")
    ap.add_argument("--tune_only", default="all", choices=("all", "decode"),
                    help="--tune: sweep every kernel or only the ragged decode kernel")
    ap.add_argument("--tuned", default=None, help="tuned.json from --tune: kernel defaults")
    ap.add_argument("--deadline_s", type=float, default=240.0,
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
    if args.tuned:
        apply_tuned(args.tuned)
    hkv, g, d = 8, 4, 128
    copy_bw = copy_bandwidth(2 * 2**30) if not small else float("nan")
    if not math.isfinite(copy_bw):
        copy_bw = 3.0e12
        log("copy bandwidth: not measured (no CUDA), using 3.0e12 for percentages")
    else:
        log(f"copy bandwidth (torch D2D, read+write): {copy_bw / 1e12:.3f} TB/s")
    if args.tune:
        run_tune(args, copy_bw, small)
        log(f"total {time.perf_counter() - t_start:.0f} s")
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "bench_kernels_tune.log"), "w") as f:
            f.write("\n".join(LOG))
        return 0
    ok = _try("correctness", check_correctness, interpret, small)
    _try("kvjax", check_kvjax, not interpret)
    tb, tctx = (1, 512) if small else (8, 32768)
    best: dict = {}  # launch parameters: the kernels' per-shape defaults (TUNED_* tables)
    best_bs: dict = {}
    ragged = _try("ragged", bench_ragged, tb, tctx, hkv, g, d, copy_bw, best)
    batches = (1, 2) if small else (1, 8, 32)
    ctxs = (512,) if small else (32768, 4096, 131072)  # the targets are at 32k: first
    names = ["kernel", "kernel_nopos", "jnp_ref", "xla", "cudnn", "torch", "torch_chained",
             "bs_1/8",
             "quest_1/8", "quest_sel", "quest_score", "quest32_1/8"]
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
    log(f"copy bandwidth {copy_bw / 1e12:.3f} TB/s; TUNED_DECODE {da.TUNED_DECODE}; TUNED_BS "
        f"{bsa.TUNED_BS}; total {time.perf_counter() - t_start:.0f} s")
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
        bases = {n: r[n]["us"] for n in ("xla", "cudnn", "torch", "torch_chained", "jnp_ref")
                 if r.get(n)}
        best_base = min(bases.values()) if bases else float("nan")
        sp = lambda n, r=r, kr=kr: kr["us"] / r[n]["us"] if r.get(n) else float("nan")  # noqa: E731
        log(f"{r['batch']:5d} {r['ctx']:7d}  {kr['GBps']:6.0f} GB/s {kr['pct_copy']:5.1f}%  "
            f"vs best baseline {best_base / kr['us']:5.2f}x  "
            + " ".join(f"{n} {bases[n] / kr['us']:.2f}x" for n in bases)
            + f"  bs_1/8 {sp('bs_1/8'):5.2f}x quest_1/8 {sp('quest_1/8'):5.2f}x"
            + f" quest32_1/8 {sp('quest32_1/8'):5.2f}x")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "bench_kernels.json"), "w") as f:
        json.dump({"copy_bw": copy_bw, "tuned_decode": da.TUNED_DECODE,
                   "tuned_bs": bsa.TUNED_BS, "rows": rows,
                   "ragged": ragged,
                   "correct": ok, "jax": jax.__version__}, f, indent=1)
    with open(os.path.join(args.out, "bench_kernels.log"), "w") as f:
        f.write("\n".join(LOG))
    return 0


if __name__ == "__main__":
    sys.exit(main())
