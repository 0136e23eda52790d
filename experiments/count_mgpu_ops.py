"""Counts the MLIR ops of the Mosaic GPU int4 KIVI kernel body per launch option (CPU only).

Lowers `quantized_decode_attention_mgpu` for CUDA on this host and counts the ops of the Mosaic
GPU module just before its serialization (index arithmetic, shared-memory loads, float ops): an
offline proxy for the per-element work an option removes, not a timing (LLVM and ptxas fold
part of it). Shapes: 1 x 2 KV heads, 4 query heads each, head dim 128, G 32, 4096 tokens.

    python experiments/count_mgpu_ops.py
"""

from __future__ import annotations

import collections
import functools
import os
import re
import sys

import jax
from jax.experimental.mosaic.gpu import core

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiments.bench_quant_mgpu import case  # noqa: E402
from pallas_kernels import quantized_decode_attention_mgpu as qm  # noqa: E402

OPS = ("arith.divui", "arith.remui", "arith.addi", "arith.muli", "vector.load", "memref.load",
       "arith.addf", "arith.mulf", "arith.subf", "arith.shrui", "arith.andi", "arith.ori",
       "nvvm.shfl.sync", "llvm.inline_asm")
# launch options; "words": 4 or 2 for the words layout (`pack_words`) instead of the int4 one
CONFIGS = ({"block_tokens": 64, "hoist_index": False}, {"block_tokens": 64},
           {"hoist_index": False}, {}, {"fma": False}, {"fuse_residual": False},
           {"fold_keys": True}, {"fold_keys": True, "fold_values": True}, {"words": 4},
           {"words": 2}, {"words": 4, "fma": False})


def count(cfg: dict) -> collections.Counter:
    """Op name -> count in the Mosaic GPU module of one lowering with `cfg`."""
    return collections.Counter(re.findall(r"= ([a-z_]+\.[a-z_.]+)", module_text(cfg)))


def module_text(cfg: dict) -> str:
    """The Mosaic GPU module (MLIR text, before serialization) of one lowering with `cfg`."""
    texts = []
    serde = core._run_serde_pass

    def capture(module, **kw):
        texts.append(str(module))
        return serde(module, **kw)

    core._run_serde_pass = capture
    cfg = dict(cfg)
    bits = cfg.pop("words", 0)
    try:
        _, _, mg = case(jax.random.key(0), 1, 2, 4, 128, 32, ((4096, 4000),), 128,
                        bits=bits or 4, words=bool(bits))
        f = functools.partial(qm.quantized_decode_attention_mgpu, **cfg)
        jax.jit(f).trace(*mg).lower(lowering_platforms=("cuda",))
    finally:
        core._run_serde_pass = serde
    return texts[-1]


def main() -> None:
    print("config", *OPS, "all", sep=" | ")
    for cfg in CONFIGS:
        ops = count(cfg)
        print(cfg, *(ops.get(k, 0) for k in OPS), sum(ops.values()), sep=" | ")


if __name__ == "__main__":
    main()
