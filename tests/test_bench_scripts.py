"""The kernel benchmark helpers and scripts run end to end on CPU (interpreted kernels)."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp

from experiments._bench import time_jax, time_torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT}


def _run(*args):
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=ENV,
                          timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc.stdout


def test_time_jax_returns_time_per_call():
    calls = []

    def fn(q, x):
        calls.append(1)  # traced once per call site of the unrolled chain
        return q * x

    qs = jnp.ones((3, 4))
    t = time_jax(fn, qs, [(jnp.float32(2.0),)], runs=2, min_seconds=1e-3)
    assert t > 0 and len(calls) == 3  # one executable of reps = 3 chained calls


def test_time_torch_chain_feeds_each_output_to_the_next_call():
    seen = []

    def fn(q, x):
        seen.append(q)
        return q + x

    qs = [10.0, 20.0, 30.0]
    seen.clear()
    assert time_torch(fn, qs, [(1.0,)], chain=True) > 0  # CPU: warm-up call, then 3 calls
    assert seen[1:] == [10.0, 11.0, 12.0]
    seen.clear()
    time_torch(fn, qs, [(1.0,)])
    assert seen[1:] == [10.0, 20.0, 30.0]


def test_profile_kernels_cpu_smoke():
    out = _run(os.path.join("experiments", "profile_kernels.py"), "--cpu",
               "--only=dense,int4_fold")
    assert "profiled: dense, int4_fold" in out


def test_bench_quant_quick_tune(tmp_path):
    """The sweep times both kernel variants and checks each against the jnp reference."""
    _run(os.path.join("experiments", "bench_quant.py"), "--quick", "--tune", "--bits=4",
         f"--out={tmp_path}")
    res = json.loads((tmp_path / "bench_quant.json").read_text())
    assert not res["errors"], res["errors"]
    variants = {r["variant"] for r in res["sweep"]}
    assert variants == {"fold", "tile"}
    assert all(r["ok"] and r["rel_err"] < 2e-2 for r in res["sweep"])
    assert jax.tree.leaves(res["best"])


def test_kernel_report_parses_loops_and_captures_triton_ir():
    """The offline compile report's two halves that need no `triton` package: capturing a
    kernel's Triton IR on a CPU host, and finding the loops of a SASS listing."""
    from experiments import kernel_report as kr

    fn, shapes, warps, stages = kr.case("quant", 4, {"variant": "fold", "num_warps": 2})
    (ttir,) = kr.capture_ttir(fn, shapes)
    assert "module @quantized_decode_attention_int4" in ttir and "tt.func" in ttir
    assert (warps, stages) == (2, 1)
    sass = "\n".join([
        "        /*0000*/                   MOV R1, c[0x0][0x28] ;",
        "        /*0010*/                   HMMA.16816.F32.BF16 R4, R8, R12, R4 ;",
        "        /*0020*/                   SHFL.BFLY PT, R2, R3, 0x1, 0x1f ;",
        "        /*0030*/               @P0 BRA 0x10 ;",
        "        /*0040*/                   EXIT ;",
        "        /*0050*/                   BRA 0x50;",
    ])
    total, loops = kr.sass_loops(sass)
    assert total == 6
    assert len(loops) == 1 and loops[0]["size"] == 3
    assert loops[0]["HMMA"] == 1 and loops[0]["SHFL"] == 1
