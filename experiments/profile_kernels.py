"""Runs each decode kernel once at batch 8 x 32k inside a CUDA profiler range, for Nsight Compute.

The benchmark scripts time the kernels; this one exists so that `ncu --profile-from-start off`
sees exactly one launch of each (after compilation and a warm-up), with every XLA kernel the
call issues around it (merges, selections). On the device machine:

    NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu | head -1)
    $NCU --profile-from-start off --clock-control none --set full -o $OUT/prof -f \
        python3 experiments/profile_kernels.py
    $NCU -i $OUT/prof.ncu-rep --page details --csv > $OUT/details.csv

Shapes as in bench_kernels / bench_quant: 32 query / 8 KV heads, head dim 128, bf16, batch 8,
32768 tokens; block-sparse with 1/8 of the 64-token blocks active, Quest with 16- and 32-token
pages and a budget of 4096 tokens, KIVI with group 32 and a full 128-token residual. `--only`
restricts the set (`torch`: PyTorch SDPA on the same buffers; `dense_nopos`: the ragged kernel
masking by lengths only), `--batch` sets the batch; `--cpu` runs it at tiny shapes in interpret
mode (smoke test). `proto_int4` / `proto_int4k` / `proto_bf16` (GPU only): the Mosaic GPU
probe of experiments/proto_mgpu_int4.py (int4 keys + values, int4 keys only, bf16 keys +
values; 16 splits, 2 stages); `int4_mgpu`, `int4_mgpu_b64`, `int4_mgpu_hoist`,
`int4_mgpu_fold` (GPU only): the Mosaic GPU int4 KIVI kernel
(pallas_kernels/quantized_decode_attention_mgpu.py) with the options of `MGPU_VARIANTS` (under
`ncu` the process crashed compiling that kernel on 2026-12-07, after the probe's had run).
`--repeat N` calls each case N times in the range, so that `nsys profile
--capture-range=cudaProfilerApi` then `nsys stats -r cuda_gpu_kern_sum` gives each kernel's
mean device time without launch gaps (the fair comparison with torch's kernels; the lent
device had no `nsys` on 2026-12-07).
"""

from __future__ import annotations

import argparse
import ctypes
import functools
import os
import sys

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiments.bench_kernels import make_cache, random_blocks, torch_sdpa  # noqa: E402
from experiments.bench_quant import QARGS, random_quantized  # noqa: E402
from kvjax import attention  # noqa: E402
from kvjax.sparse.quest import from_layer, quest_attend  # noqa: E402
from pallas_kernels import block_sparse_attention as bsa  # noqa: E402
from pallas_kernels import decode_attention as da  # noqa: E402
from pallas_kernels import quantized_decode_attention as qda  # noqa: E402

MGPU_VARIANTS = {  # int4_mgpu{name}: quantized_decode_attention_mgpu keyword arguments
    "": {},
    "_b64": dict(block_tokens=64),
    "_hoist": dict(hoist_index=True),
    "_fold": dict(fold_keys=True, fold_values=True),
}


def _profiler(on: bool) -> None:
    """cudaProfilerStart / Stop (no-op without a CUDA runtime, e.g. on CPU)."""
    for name in ("libcudart.so", "libcudart.so.13", "libcudart.so.12"):
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            continue
        (lib.cudaProfilerStart if on else lib.cudaProfilerStop)()
        return
    try:  # torch ships its own runtime
        import torch

        (torch.cuda.profiler.start if on else torch.cuda.profiler.stop)()
    except Exception:  # noqa: BLE001
        print("no CUDA runtime found: profiler range not marked")


QUANT_VARIANTS = {  # kernel keyword arguments of the quantized cases (int{bits}_{name})
    "default": {},
    "fold": dict(variant="fold", num_warps=4, num_stages=1),
    "fold2": dict(variant="fold", num_warps=2, num_stages=1),
    "fold2zc": dict(variant="fold", num_warps=2, num_stages=1, dequant=False),
    "foldu": dict(variant="fold", num_warps=4, num_stages=1, unroll=True),
    "tile": dict(variant="tile", block_tokens=64, num_warps=8, num_stages=1),
}


def _torch_sdpa(q, k, v) -> None:
    """bench_kernels.torch_sdpa on the same buffers (DLPack, zero copy); waits for the GPU."""
    import torch

    torch_sdpa(*(torch.from_dlpack(x) for x in (q[:, :, None], k, v)))
    torch.cuda.synchronize()


def cases(b: int, ctx: int, hkv: int, g: int, d: int) -> dict:
    """name -> (jitted fn, args)."""
    k, v, lengths, pos = make_cache(jax.random.key(1), b, hkv, ctx, d, jnp.bfloat16)
    q = jax.random.normal(jax.random.key(2), (b, hkv * g, d), jnp.bfloat16)
    qpos = jnp.full((b,), ctx, jnp.int32)
    out = {}
    out["dense"] = (jax.jit(lambda q, k, v, ln, p, qp: da.ragged_decode_attention(
        q, k, v, ln, kv_positions=p, q_positions=qp)), (q, k, v, lengths, pos, qpos))
    out["dense_nopos"] = (jax.jit(da.ragged_decode_attention), (q, k, v, lengths))
    out["torch"] = (_torch_sdpa, (q, k, v))
    idx, cnt = random_blocks(b, hkv, ctx // 64, 8)
    out["bs_1/8"] = (jax.jit(lambda q, k, v, ln, p, qp, i, c: bsa.block_sparse_decode(
        q, k, v, ln, i, c, block_size=64, kv_positions=p, q_positions=qp)),
        (q, k, v, lengths, pos, qpos, idx, cnt))
    for page in (16, 32):
        ql = from_layer(attention.LayerCache(k, v, lengths, pos), page_size=page,
                        token_budget=ctx // 8)
        out[f"quest{page}"] = (jax.jit(lambda q, ql, qp: quest_attend(
            q[:, :, None], qp[:, None], ql)[:, :, 0]), (q, ql, qpos))
    for bits in (4, 2, 8):
        arrs = random_quantized(jax.random.key(bits), b, hkv, ctx - 128, d, bits, 32, 128)
        for variant, kw in QUANT_VARIANTS.items():
            out[f"int{bits}_{variant}"] = (
                jax.jit(functools.partial(qda.quantized_decode_attention, **kw)),
                (q, *(arrs[n] for n in QARGS)))
    if jax.default_backend() == "gpu":  # Mosaic GPU has no interpret mode for these
        from experiments import proto_mgpu_int4 as proto  # noqa: PLC0415

        q8, k4, v4, kb, vb = proto.inputs(jax.random.key(3), b, hkv, ctx, d)
        f = functools.partial(proto.scores_stats, splits=16, stages=2)
        out["proto_int4"] = (f, (q8, k4, v4))
        out["proto_int4k"] = (f, (q8, k4))
        out["proto_bf16"] = (f, (q8, kb, vb))
        from experiments.bench_quant_mgpu import mgpu_args  # noqa: PLC0415
        from pallas_kernels import quantized_decode_attention_mgpu as qm  # noqa: PLC0415

        arrs = random_quantized(jax.random.key(4), b, hkv, ctx - 128, d, 4, 32, 128)
        mg = (q, *mgpu_args(arrs))
        for name, kw in MGPU_VARIANTS.items():
            out[f"int4_mgpu{name}"] = (
                jax.jit(functools.partial(qm.quantized_decode_attention_mgpu, **kw)), mg)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", default="", help="comma-separated case names (default: all)")
    ap.add_argument("--cpu", action="store_true", help="tiny shapes, interpret mode")
    ap.add_argument("--batch", type=int, default=8, help="batch (GPU shapes)")
    ap.add_argument("--repeat", type=int, default=1,
                    help="calls of each case in the range (e.g. for nsys kernel averages)")
    args = ap.parse_args()
    b, ctx = (1, 1024) if args.cpu else (args.batch, 32768)
    todo = cases(b, ctx, 8, 4, 128)
    if args.only:
        todo = {n: todo[n] for n in args.only.split(",")}
    for name, (fn, a) in todo.items():  # compile + warm up outside the profiled range
        jax.block_until_ready(fn(*a))
        jax.block_until_ready(fn(*a))
        print("ready", name, flush=True)
    _profiler(True)
    for fn, a in todo.values():
        for _ in range(args.repeat):
            jax.block_until_ready(fn(*a))
    _profiler(False)
    print("profiled:", ", ".join(todo), flush=True)


if __name__ == "__main__":
    main()
