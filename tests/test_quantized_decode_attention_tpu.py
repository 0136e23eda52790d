"""TPU KIVI decode kernel (packed layout): the Pallas TPU interpreter against the jnp reference
on CPU, bad input, `kivi` dispatch on TPU, and an ahead-of-time compile by libtpu.

Tolerances: float32 queries 1e-5 (max abs; dequantization and dots in float32); bf16 queries
relative L2 1e-2 (dequantized keys / values and probabilities rounded to bf16 for the dots,
as the GPU kernels do).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tpu_aot import compiled_lines

from experiments.bench_quant import QARGS, random_quantized
from pallas_kernels import quantized_decode_attention as qda
from pallas_kernels import quantized_decode_attention_tpu as qt

# (batch, kv heads, query heads per kv head, tokens, head dim, G, residual R,
#  num_quantized, num_residual)
CASES = [
    (2, 2, 4, 700, 128, 32, 128, ((700, 0), (33, 650)), ((128, 5), (0, 77))),
    (1, 3, 1, 300, 64, 16, 16, ((300, 299, 1),), ((16, 0, 3),)),
    (1, 2, 8, 1000, 128, 64, 0, ((1000, 512),), None),  # no residual window
]


def _case(i, bits, dtype):
    b, h, gq, tokens, d, g, r, nq, nr = CASES[i]
    arrs = random_quantized(jax.random.key(10 * i + bits), b, h, tokens, d, bits, g, max(r, 1))
    arrs["num_quantized"] = jnp.array(nq, jnp.int32)
    args = [arrs[n] for n in QARGS[:7]]
    if r:
        arrs["num_residual"] = jnp.array(nr, jnp.int32)
        args = [arrs[n] for n in QARGS]
    q = jax.random.normal(jax.random.key(i), (b, h * gq, d), jnp.float32).astype(dtype)
    return q, args


def _check(out, ref, dtype):
    assert out.shape == ref.shape and out.dtype == ref.dtype
    o, r = out.astype(jnp.float32), ref.astype(jnp.float32)
    assert float(jnp.max(jnp.abs(r))) > 0.05  # not an all-zero case
    if dtype == jnp.float32:
        err = float(jnp.max(jnp.abs(o - r)))
        assert err <= 1e-5, err
    else:
        err = float(jnp.linalg.norm(o - r) / jnp.linalg.norm(r))
        assert err <= 1e-2, err


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("i", range(len(CASES)))
def test_matches_reference(i, bits, dtype):
    q, args = _case(i, bits, dtype)
    out = qt.quantized_decode_attention_tpu(q, *args)
    _check(out, qda.reference(q, *args), dtype)


def test_bad_input_is_rejected_before_launch():
    q, args = _case(0, 4, jnp.float32)
    f = qt.quantized_decode_attention_tpu
    with pytest.raises(ValueError, match="k_scale must be bf16"):
        f(q, args[0], args[1].astype(jnp.float16), *args[2:])
    with pytest.raises(ValueError, match="bf16 or float32"):
        f(q.astype(jnp.float16), *args)
    with pytest.raises(TypeError, match="k_codes must be uint32"):
        f(q, args[0].astype(jnp.int32), *args[1:])
    with pytest.raises(ValueError, match="num_quantized must have shape"):
        f(q, *args[:6], args[6][:1])
    with pytest.raises(ValueError, match="go together"):
        f(q, *args[:8], args[8], None)
    with pytest.raises(ValueError, match="scale must be finite"):
        f(q, *args, scale=float("nan"))


def test_kivi_dispatches_tpu_decode_where_switched_on(monkeypatch):
    """A `kivi(4)` cache decoding on a TPU (platform patched) with `TPU_DECODE_KERNEL` set runs
    this kernel (interpreted here) and agrees with the reference; off by default, and the int4
    layout (the Hopper kernel's) is not sent here."""
    from kvjax import attention
    from kvjax.cache import LayerCache
    from kvjax.quant import from_dense

    rng = np.random.default_rng(3)
    b, h, c, d = 2, 2, 300, 64
    lengths = jnp.array([[300, 290], [260, 300]], jnp.int32)
    pos = jnp.where(jnp.arange(c)[None, None] < lengths[..., None], jnp.arange(c) + 5, -1)
    dense = LayerCache(jnp.asarray(rng.normal(size=(b, h, c, d)), jnp.float32),
                       jnp.asarray(rng.normal(size=(b, h, c, d)), jnp.float32), lengths,
                       pos.astype(jnp.int32))
    qc = from_dense(dense, 4, 32, 64)
    q = jnp.asarray(rng.normal(size=(b, 2 * h, 1, d)), jnp.float32)
    qpos = jnp.full((b, 1), 1000, jnp.int32)
    calls = []
    real = qt.quantized_decode_attention_tpu
    monkeypatch.setattr(qt, "quantized_decode_attention_tpu",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr(attention, "kernel_platform", lambda: "tpu")
    ref = attention.attend(q, qpos, qc, impl="reference")
    attention.attend(q, qpos, qc)
    assert calls == []  # off by default
    monkeypatch.setattr(attention, "TPU_DECODE_KERNEL", True)
    out = attention.attend(q, qpos, qc)
    assert calls == [1]
    _check(out, ref, jnp.float32)
    attention.attend(q, qpos, from_dense(dense, 4, 32, 64, layout="int4"))
    assert calls == [1]


_AOT = """
import sys
import jax, jax.numpy as jnp
from pallas_kernels import quantized_decode_attention_tpu as qt
S = jax.ShapeDtypeStruct
for topo in sys.argv[1:]:
    for b, h, gq, tokens, d, g, bits, qdt, r in (
            (8, 8, 4, 32768, 128, 32, 4, jnp.bfloat16, 128),
            (8, 8, 4, 32768, 128, 32, 2, jnp.bfloat16, 128),
            (8, 8, 4, 32768, 128, 32, 8, jnp.bfloat16, 128),
            (1, 2, 1, 4096, 64, 16, 4, jnp.float32, 0)):
        per = 32 // bits
        nb = -(-tokens // (per * g))
        ng = nb * per
        u32, bf = jnp.uint32, jnp.bfloat16
        args = [S((b, h * gq, d), qdt), S((b, h, nb, g, d), u32), S((b, h, ng, d), bf),
                S((b, h, ng, d), bf), S((b, h, nb, g, d), u32), S((b, h, ng, d // g, g), bf),
                S((b, h, ng, d // g, g), bf), S((b, h), jnp.int32)]
        args += ([S((b, h, r, d), qdt), S((b, h, r, d), qdt), S((b, h), jnp.int32)] if r
                 else [None, None, None])
        qt.compile_for_tpu(topo, *args)
        print("COMPILED", topo, bits, flush=True)
"""


def test_compiles_for_tpu_with_libtpu():
    """libtpu compiles the kernel for TPU v4, v5e and v6e: int4 / int2 / int8 at 8 x 32k with
    bf16 queries and a full 128-token residual, float32 queries without a residual. Compiled,
    not run: the module doc says where it ran."""
    compiled_lines(_AOT, 4)
