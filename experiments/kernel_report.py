"""Offline compile report of the Pallas Triton kernels for an H100 (sm_90), on a CPU host.

Lowers a kernel call for CUDA (Pallas -> Triton IR, as `jax.jit(...).lower` does on any host),
compiles that IR with the standalone `triton` package for sm_90 and reads the cubin with the
`cuobjdump` shipped in it: registers per thread, spill stack bytes, shared memory, SASS size and
the loops of the SASS (instructions per iteration, tensor-core and shuffle instructions in
each). No GPU is needed, so launch choices and kernel rewrites can be screened for register
pressure and instruction count before spending device time.

    pip install triton==3.9.0   # a dev tool, not a dependency of kvjax
    python experiments/kernel_report.py --kernel=quant --bits=4 \
        --configs='[{"variant": "fold", "num_warps": 2}, {"variant": "stack", "num_warps": 4}]'
    python experiments/kernel_report.py --kernel=dense --configs='[{}]'

The standalone Triton is not the one XLA compiles with on the GPU (jax 0.11.2 bundles its own),
so the figures are indicative: on 2026-11-23 the "fold" int4 kernel read 255 registers with a
416-byte spill stack at 2 warps and 255 / 40 bytes at 4 warps here, against 255 with spills and
247 without in Nsight Compute on the H100. Shapes: 32 query / 8 KV heads, D 128, batch 8, 32k
tokens (quant: G 32, R 128).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jax._src.pallas.triton import lowering as _tl  # noqa: E402

from pallas_kernels import block_sparse_attention as bsa  # noqa: E402
from pallas_kernels import decode_attention as da  # noqa: E402
from pallas_kernels import quantized_decode_attention as qda  # noqa: E402

B, HQ, HKV, D, CTX, G, R = 8, 32, 8, 128, 32768, 32, 128


def capture_ttir(fn, shapes) -> list[str]:
    """Triton IR text of every pallas_call that lowering fn(*shapes) for CUDA produces."""
    captured = []
    orig = _tl.lower_jaxpr_to_triton_module

    def hook(*args, **kwargs):
        res = orig(*args, **kwargs)
        captured.append(res.module.operation.get_asm(enable_debug_info=False))
        return res

    _tl.lower_jaxpr_to_triton_module = hook
    try:
        jax.jit(fn).trace(*shapes).lower(lowering_platforms=("cuda",))
    finally:
        _tl.lower_jaxpr_to_triton_module = orig
    return captured


def case(kernel: str, bits: int, cfg: dict):
    """(fn, shapes, num_warps, num_stages) of one kernel call; num_warps / num_stages are the
    launch's (the Triton IR does not carry them)."""
    sd = jax.ShapeDtypeStruct
    bf, u32, i32 = jnp.bfloat16, jnp.uint32, jnp.int32
    if kernel == "quant":
        per = 32 // bits
        nb = CTX // (per * G)
        ng = nb * per
        shapes = (sd((B, HQ, D), bf), sd((B, HKV, nb, G, D), u32), sd((B, HKV, ng, D), bf),
                  sd((B, HKV, ng, D), bf), sd((B, HKV, nb, G, D), u32),
                  sd((B, HKV, ng, D // G, G), bf), sd((B, HKV, ng, D // G, G), bf),
                  sd((B, HKV), i32), sd((B, HKV, R, D), bf), sd((B, HKV, R, D), bf),
                  sd((B, HKV), i32))
        full = {**qda.DEFAULT_CONFIG[bits], **cfg}

        def fn(*a):
            return qda.quantized_decode_partials(*a, interpret=False, **cfg)

        return fn, shapes, full["num_warps"], full["num_stages"]
    kv = (sd((B, HQ, D), bf), sd((B, HKV, CTX, D), bf), sd((B, HKV, CTX, D), bf),
          sd((B, HKV), i32))
    if kernel == "dense":
        full = {**da.decode_config(B, HKV, CTX, 2 * D * 2), **cfg}

        def fn(*a):
            return da.ragged_decode_attention(*a, interpret=False, **cfg)

        return fn, kv, full["num_warps"], full["num_stages"]
    if kernel == "bs":
        n = CTX // 64 // 8
        full = {**bsa.TUNED_BS["many"], **cfg}

        def fn(q, k, v, ln, idx, cnt):
            return bsa.block_sparse_decode(q, k, v, ln, idx, cnt, block_size=64,
                                           interpret=False, **cfg)

        return fn, kv + (sd((B, HKV, n), i32), sd((B, HKV), i32)), full["num_warps"], \
            full["num_stages"]
    raise ValueError(f"--kernel must be quant, dense or bs, got {kernel!r}")


_INSTR = re.compile(r"^\s+/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_BRANCH = re.compile(r"\bBRA\s+(0x[0-9a-f]+)")


def sass_loops(sass: str) -> tuple[int, list[dict]]:
    """(instruction count, loops): each backward branch's body (from its target address to
    the branch) with its size and HMMA / SHFL / BAR / LDG / LDS / STS / MUFU counts, innermost
    (smallest) first."""
    instrs = []  # (address, text)
    for line in sass.splitlines():
        m = _INSTR.match(line)
        if m:
            instrs.append((int(m.group(1), 16), m.group(2).strip()))
    loops = []
    for addr, text in instrs:
        m = _BRANCH.search(text)
        if m and int(m.group(1), 16) <= addr:
            body = [t for a, t in instrs if int(m.group(1), 16) <= a <= addr]
            ops = [t.split()[1] if t.startswith("@") else t.split()[0] for t in body]
            count = {k: sum(o.startswith(k) for o in ops)
                     for k in ("HMMA", "SHFL", "BAR", "LDG", "LDS", "STS", "MUFU")}
            hist: dict[str, int] = {}
            for o in ops:
                hist[o.split(".")[0]] = hist.get(o.split(".")[0], 0) + 1
            top = sorted(hist.items(), key=lambda kv: -kv[1])[:12]
            loops.append(dict(size=len(body), **count, ops=top))
    loops = [lp for lp in loops if lp["size"] > 1]  # drop the trailing self-branch
    return len(instrs), sorted(loops, key=lambda x: x["size"])


def report(ttir: str, num_warps: int, num_stages: int) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget

    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    tools = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.ttir")
        with open(path, "w") as f:
            f.write(ttir)
        k = triton.compile(path, target=GPUTarget("cuda", 90, 32),
                           options=dict(num_warps=num_warps, num_stages=num_stages))
        cubin = os.path.join(tmp, "kernel.cubin")
        with open(cubin, "wb") as f:
            f.write(k.asm["cubin"])
        dump = os.path.join(tools, "cuobjdump")
        usage = subprocess.run([dump, "--dump-resource-usage", cubin], capture_output=True,
                               text=True, check=True).stdout
        sass = subprocess.run([dump, "--dump-sass", cubin], capture_output=True, text=True,
                              check=True).stdout
    regs = re.search(r"REG:(\d+)", usage)
    stack = re.search(r"STACK:(\d+)", usage)
    total, loops = sass_loops(sass)
    return dict(registers=int(regs.group(1)) if regs else None,
                spill_stack_bytes=int(stack.group(1)) if stack else None,
                shared_bytes=int(k.metadata.shared), sass_instructions=total, loops=loops)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--kernel", default="quant", help="quant, dense or bs")
    ap.add_argument("--bits", type=int, default=4, help="quant: 8, 4 or 2")
    ap.add_argument("--configs", default="[{}]", help="JSON list of kernel keyword arguments")
    ap.add_argument("--ops", action="store_true", help="also print each loop's top opcodes")
    args = ap.parse_args()
    for cfg in json.loads(args.configs):
        fn, shapes, warps, stages = case(args.kernel, args.bits, cfg)
        for ttir in capture_ttir(fn, shapes):
            name = re.search(r"module @(\S+)", ttir).group(1)
            rep = report(ttir, warps, stages)
            loops = "; ".join(
                f"{lp['size']} instr ({lp['HMMA']} HMMA, {lp['SHFL']} SHFL, {lp['BAR']} BAR)"
                for lp in rep["loops"][:3])
            print(f"{name} {json.dumps(cfg)} warps={warps} stages={stages}: "
                  f"{rep['registers']} registers, spill stack {rep['spill_stack_bytes']} B, "
                  f"shared {rep['shared_bytes']} B, {rep['sass_instructions']} SASS; "
                  f"innermost loops: {loops}", flush=True)
            if args.ops:
                for lp in rep["loops"][:3]:
                    ops = " ".join(f"{o} {n}" for o, n in lp["ops"])
                    print(f"    loop of {lp['size']}: {ops}")


if __name__ == "__main__":
    main()
