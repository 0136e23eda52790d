"""Every GPU kernel compiled for an H100 on this CPU host (`pallas_kernels.aot.gpu_compile`):
Triton's and Mosaic GPU's whole toolchains, ptxas included, accept the kernels at the benchmark
shapes (8 x 32k, bf16, 32 / 8 heads, head dim 128) and their launch options. The interpreter
tests check the numbers; these check what only a GPU compile can: shared-memory and register
limits, Mosaic GPU's layouts and PTX. One subprocess (a CUDA compile-only client)."""

import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = r"""
import functools, sys
import jax, jax.numpy as jnp
from pallas_kernels.aot import gpu_compile
from pallas_kernels import (block_sparse_attention as bsa, decode_attention as da,
                            decode_attention_mgpu as dm, quantized_decode_attention as qda,
                            quantized_decode_attention_mgpu as qm, quest_select as qs,
                            sparse_decode_attention as sda)
from experiments.bench_quant import QARGS, random_quantized
from experiments.bench_quant_mgpu import mgpu_args

S = jax.ShapeDtypeStruct
bf16, i32, f32 = jnp.bfloat16, jnp.int32, jnp.float32
b, hq, hkv, c, d = 8, 32, 8, 32768, 128
q, kv, n = S((b, hq, d), bf16), S((b, hkv, c, d), bf16), S((b, hkv), i32)
pos, qpos = S((b, hkv, c), i32), S((b,), i32)


def compile_(name, fn, *args):
    print("BEGIN", name, flush=True)
    gpu_compile("h100", fn, *args)
    print("COMPILED", name, flush=True)


no_interp = dict(interpret=False)
compile_("ragged", functools.partial(da.ragged_decode_attention, **no_interp), q, kv, kv, n)
compile_("ragged positions window", lambda q, k, v, n, p, qp: da.ragged_decode_attention(
    q, k, v, n, kv_positions=p, q_positions=qp, sliding_window=4096, **no_interp),
    q, kv, kv, n, pos, qpos)
compile_("ragged mgpu", dm.ragged_decode_attention_mgpu, q, kv, kv, n)
nb = 512  # 1 / 8 of the 4096 64-token blocks
idx, cnt = S((b, hkv, nb), i32), S((b, hkv), i32)
compile_("block-sparse decode", functools.partial(bsa.block_sparse_decode, block_size=64,
                                                  **no_interp), q, kv, kv, n, idx, cnt)
compile_("block-sparse prefill", functools.partial(
    bsa.block_sparse_prefill, block_size=64, **no_interp), S((1, hq, 256, d), bf16),
    S((1, hkv, 4096, d), bf16), S((1, hkv, 4096, d), bf16), S((1, hkv), i32),
    S((1, hkv, 4, 8), i32), S((1, hkv, 4), i32))
pages = c // 16
compile_("quest page scores", functools.partial(qs.page_scores, page_size=16, **no_interp),
         q, S((b, hkv, pages, d), bf16), S((b, hkv, pages, d), bf16), n)
compile_("quest top pages", functools.partial(qs.top_pages, k=pages // 8, **no_interp),
         S((b, hkv, pages), f32))
keep = d // 2
compile_("mustafar", functools.partial(sda.sparse_decode_attention, **no_interp), q,
         S((b, hkv, c, keep), bf16), S((b, hkv, c, sda.num_words(d)), jnp.uint32),
         S((b, hkv, c, keep), bf16), S((b, hkv, c, sda.num_words(d)), jnp.uint32), n)
for bits in (8, 4, 2):
    # shapes and dtypes only (jax.eval_shape): no 8 x 32k cache is built on this host
    arrs = jax.eval_shape(lambda bits=bits: random_quantized(jax.random.key(0), b, hkv, c - 128,
                                                             d, bits, 32, 128))
    packed = [arrs[k] for k in QARGS]
    compile_(f"kivi triton int{bits}", functools.partial(qda.quantized_decode_attention,
                                                         **no_interp), q, *packed)
    if bits in qm.WORD_BITS:
        cfgs = [{}, {"prmt": True}] + ([{"fma": False}, {"fuse_residual": False}] * (bits == 4))
        mw = jax.eval_shape(functools.partial(mgpu_args, words=bits), arrs)
        for cfg in cfgs:
            compile_(f"kivi mgpu words{bits} {cfg}",
                     functools.partial(qm.quantized_decode_attention_mgpu, **cfg), q, *mw)
    if bits == 4:
        mg = jax.eval_shape(mgpu_args, arrs)
        for cfg in ({}, {"fma": False}, {"fuse_residual": False}, {"block_tokens": 64},
                    {"block_tokens": 256, "hoist_index": False}, {"fold_keys": True},
                    {"fold_keys": True, "fold_values": True}):
            compile_(f"kivi mgpu int4 {cfg}",
                     functools.partial(qm.quantized_decode_attention_mgpu, **cfg), q, *mg)
"""


def test_gpu_kernels_compile_for_h100():
    env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu",
           "MOSAIC_GPU_DUMP_PTXAS": "1"}
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                          timeout=1200, cwd=ROOT, env=env)
    out = proc.stdout
    begun = re.findall(r"^BEGIN (.*)$", out, re.M)
    done = re.findall(r"^COMPILED (.*)$", out, re.M)
    assert proc.returncode == 0 and begun == done and len(done) == 24, (
        out[-3000:] + proc.stderr[-3000:])
    # The Mosaic GPU kernels print ptxas' summary (MOSAIC_GPU_DUMP_PTXAS). Their defaults and
    # the options they replaced keep every register in registers (the first default, 256-token
    # steps without hoist_index, spills: 68 bytes of stores).
    blocks = dict(re.findall(r"^BEGIN (.*?)\n(.*?)^COMPILED ", out, re.M | re.S))
    for name in ("ragged mgpu", "kivi mgpu int4 {}", "kivi mgpu int4 {'fma': False}",
                 "kivi mgpu int4 {'fuse_residual': False}", "kivi mgpu words4 {}",
                 "kivi mgpu words4 {'fuse_residual': False}", "kivi mgpu words2 {}",
                 "kivi mgpu words4 {'prmt': True}", "kivi mgpu words2 {'prmt': True}"):
        spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", blocks[name])
        assert spills and all(x == ("0", "0") for x in spills), (name, blocks[name][-2000:])


def test_sass_report_offline(tmp_path):
    """`experiments/sass_mgpu.py --aot h100` reads registers, spills and the SASS histogram of
    the Mosaic KIVI kernel off an offline compile (ptxas and nvdisasm from the test deps)."""
    import json

    proc = subprocess.run([sys.executable, "experiments/sass_mgpu.py", "--aot", "h100",
                           "--out", str(tmp_path), "--configs", '[{}, {"fma": false}]'],
                          capture_output=True, text=True, timeout=600, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": ROOT})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = json.loads((tmp_path / "sass_mgpu.json").read_text())
    assert [r["ok"] for r in rows] == [True, True]
    fused, plain = rows
    for r in rows:
        assert 64 <= r["registers"] <= 255 and r["spill_stores"] == 0
        assert r["families"]["HGMMA"] > 0 and r["sass_total"] > 1000
    # fma: one HFMA2 per dequantized register pair where multiply + add took HMUL2 + HADD2
    assert fused["families"]["HFMA2"] == plain["families"]["HMUL2"] > 0
    assert fused["families"]["HMUL2"] == 0
    assert (tmp_path / "dumps.tar.gz").exists()
