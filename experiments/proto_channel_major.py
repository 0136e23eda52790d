"""Offline prototype: decode attention over a *channel-major* packed KIVI cache (not in kvjax).

The cache packs P = 32 / bits code fields per uint32 word across tokens (field j of word (block n,
row w, channel d) is token (n * P + j) * G + w); docs/benchmarks_quant.md ("Next steps", item 4)
proposed packing them across channels instead: word (token t, column c), field j = channel
j * D / P + c of token t, so one step dequantizes whole tokens ([G, D / P] word tiles, no words
held in registers across steps). This script writes that kernel for a 32-token step (keys: P
score dots of K = D / P summed; values: P accumulators of [16, D / P]) and reports its compiled
size on a CPU host exactly as `experiments/kernel_report.py` does (Triton 3.9, sm_90):

    pip install triton==3.9.0   # a dev tool
    python experiments/proto_channel_major.py

2026-12-05: int4 249 registers, 2220 instructions per step at 2 warps = 139 warp-instructions
per token (the default token-interleaved kernel: 60), int8 82 (default: 62; `python
experiments/kernel_report.py --kernel=quant --bits=8`). The P small dots and accumulators per
step cost more than the registers it saves, so this naive form was not pursued (no kvjax code
uses this layout).
"""

from __future__ import annotations

import functools
import os
import sys

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiments.kernel_report import capture_ttir, report  # noqa: E402
from pallas_kernels import decode_attention as da  # noqa: E402
from pallas_kernels.quantized_decode_attention import (  # noqa: E402
    NEG,
    _affine,
    _dot_nn,
    _dot_nt,
    _field,
)

B, HKV, D, CTX, G, GV = 8, 8, 128, 32768, 32, 32


def _kernel(nq_ref, q_ref, kc_ref, ks_ref, kz_ref, vc_ref, vs_ref, vz_ref, o_ref, m_ref, l_ref,
            *, bits: int, per_split: int):
    """Refs per (row, KV head): kc, vc uint32[CTX, D / P]; ks, kz [CTX / G, D]; vs, vz
    [CTX, D / GV]; q [16, D]. One step = one group of G tokens, all P fields."""
    per = 32 // bits
    dp = D // per
    qs = [(q_ref[:, pl.ds(j * dp, dp)].astype(jnp.float32) * D**-0.5).astype(jnp.bfloat16)
          for j in range(per)]
    nq = nq_ref[()]
    w_row = lax.broadcasted_iota(jnp.int32, (1, G), 1)

    def step(n, carry):
        m, den, accs = carry
        kw = kc_ref[pl.ds(n * G, G), :]  # [G, D / P]
        vw = vc_ref[pl.ds(n * G, G), :]
        s = None
        for j in range(per):
            ks = ks_ref[pl.ds(n, 1), pl.ds(j * dp, dp)].astype(jnp.float32)  # [1, D / P]
            kz = kz_ref[pl.ds(n, 1), pl.ds(j * dp, dp)].astype(jnp.float32)
            f, a, b = _field(kw, bits, j * bits, False)
            sj = _dot_nt(qs[j], _affine(f, ks, kz, a, b).astype(jnp.bfloat16))
            s = sj if s is None else s + sj
        valid = n * G + w_row < nq
        s = jnp.where(valid, s, NEG)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        alpha = jnp.exp(m - m_new)
        p = jnp.where(valid, jnp.exp(s - m_new[:, None]), 0.0)
        den = den * alpha + jnp.sum(p, axis=1)
        pd = p.astype(jnp.bfloat16)
        new = []
        for j in range(per):
            cg = (j * dp) // GV
            vs = vs_ref[pl.ds(n * G, G), cg].astype(jnp.float32)[:, None]
            vz = vz_ref[pl.ds(n * G, G), cg].astype(jnp.float32)[:, None]
            f, a, b = _field(vw, bits, j * bits, False)
            v = _affine(f, vs, vz, a, b).astype(jnp.bfloat16)
            new.append(accs[j] * alpha[:, None] + _dot_nn(pd, v))
        return m_new, den, tuple(new)

    init = (jnp.full((16,), NEG, jnp.float32), jnp.zeros((16,), jnp.float32),
            tuple(jnp.zeros((16, dp), jnp.float32) for _ in range(per)))
    start = pl.program_id(2) * per_split
    m, den, accs = lax.fori_loop(start, start + per_split, step, init)
    for j in range(per):
        o_ref[:, pl.ds(j * dp, dp)] = accs[j]
    m_ref[...] = m
    l_ref[...] = den


def compile_report(bits: int, warps: int, splits: int = 16) -> str:
    per = 32 // bits
    dp, ng = D // per, CTX // G
    sd = jax.ShapeDtypeStruct
    shapes = (sd((B, HKV), jnp.int32), sd((B, HKV, 16, D), jnp.bfloat16),
              sd((B, HKV, CTX, dp), jnp.uint32), sd((B, HKV, ng, D), jnp.bfloat16),
              sd((B, HKV, ng, D), jnp.bfloat16), sd((B, HKV, CTX, dp), jnp.uint32),
              sd((B, HKV, CTX, D // GV), jnp.bfloat16), sd((B, HKV, CTX, D // GV), jnp.bfloat16))
    wh = da.whole_head

    def fn(*args):
        return pl.pallas_call(
            functools.partial(_kernel, bits=bits, per_split=ng // splits),
            grid=(B, HKV, splits),
            in_specs=[pl.BlockSpec((None, None), lambda i, j, s: (i, j)), wh((16, D)),
                      wh((CTX, dp)), wh((ng, D)), wh((ng, D)), wh((CTX, dp)),
                      wh((CTX, D // GV)), wh((CTX, D // GV))],
            out_specs=da.partial_specs(16, D),
            out_shape=da.partial_shapes(B, HKV, splits, 16, D),
            name=f"channel_major_int{bits}", **da.launch_params(warps, 1, False))(*args)

    (ttir,) = capture_ttir(fn, shapes)
    rep = report(ttir, warps, 1)
    lp = rep["loops"][0]
    return (f"channel-major int{bits}, {warps} warps: {rep['registers']} registers, spill stack "
            f"{rep['spill_stack_bytes']} B, step loop {lp['size']} instructions ({lp['HMMA']} "
            f"HMMA, {lp['BAR']} BAR, {lp['SHFL']} SHFL) = {lp['size'] * warps / G:.1f} "
            f"warp-instructions per token")


if __name__ == "__main__":
    for bits, warps in ((4, 2), (4, 4), (8, 2), (8, 4)):
        print(compile_report(bits, warps), flush=True)
