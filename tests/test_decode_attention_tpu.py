"""TPU ragged decode kernel: the Pallas TPU interpreter against the jnp reference on CPU, bad
input, and an ahead-of-time compile by the TPU compiler (libtpu, no TPU needed).

Tolerances: float32 1e-5 (max abs, outputs of unit-variance values); bf16 2e-2 (bf16
probabilities times bf16 values, float32 accumulation).
"""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from tpu_aot import compiled_lines

from pallas_kernels import decode_attention as da
from pallas_kernels import decode_attention_tpu as dt

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (batch, kv heads, query heads per kv head, capacity, head dim, lengths, block_k)
CASES = [
    (2, 2, 4, 256, 128, ((200, 0), (1, 256)), 128),  # empty head, length 1, full head
    (1, 3, 1, 1000, 64, ((1000, 999, 130),), None),  # capacity not a multiple of the block
    (2, 1, 8, 100, 128, ((37,), (100,)), None),  # capacity below one block
    (1, 2, 4, 640, 128, ((640, 513),), 256),  # several blocks, last one partial
]


def _case(i, dtype, positions=False, bias=False):
    b, hkv, g, cap, d, lengths, block_k = CASES[i]
    ks = jax.random.split(jax.random.key(i), 5)
    q = jax.random.normal(ks[0], (b, hkv * g, d), jnp.float32).astype(dtype)
    k = jax.random.normal(ks[1], (b, hkv, cap, d), jnp.float32).astype(dtype)
    v = jax.random.normal(ks[2], (b, hkv, cap, d), jnp.float32).astype(dtype)
    kw = {}
    if positions:  # holes (-1) and a few future positions that the query must not see
        pos = jnp.broadcast_to(jnp.arange(cap, dtype=jnp.int32), (b, hkv, cap))
        pos = pos.at[:, 0, 3:9].set(-1).at[:, -1, 10:12].set(10**6)
        kw.update(kv_positions=pos, q_positions=jnp.full((b,), cap - 7, jnp.int32))
    if bias:
        kw["kv_bias"] = jax.random.uniform(ks[3], (b, hkv, cap), jnp.float32, 0.0, 2.0)
    return q, k, v, jnp.array(lengths, jnp.int32), block_k, kw


def _check(out, ref, dtype):
    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    assert out.shape == ref.shape and out.dtype == ref.dtype
    err = float(jnp.max(jnp.abs(out.astype(jnp.float32) - ref.astype(jnp.float32))))
    assert err <= tol, err


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("i", range(len(CASES)))
def test_matches_reference(i, dtype):
    q, k, v, lengths, block_k, _ = _case(i, dtype)
    out = dt.ragged_decode_attention_tpu(q, k, v, lengths, block_k=block_k)
    _check(out, da.reference(q, k, v, lengths), dtype)
    empty = lengths == 0  # rows that see nothing are zeros, never NaN
    g = q.shape[1] // lengths.shape[1]
    assert bool(jnp.all(jnp.where(jnp.repeat(empty, g, axis=1)[..., None], out == 0, True)))


@pytest.mark.parametrize("i", range(len(CASES)))
def test_positions_window_and_bias_match_reference(i):
    q, k, v, lengths, block_k, kw = _case(i, jnp.float32, positions=True, bias=True)
    for window in (None, 50):
        out = dt.ragged_decode_attention_tpu(q, k, v, lengths, block_k=block_k,
                                             sliding_window=window, **kw)
        _check(out, da.reference(q, k, v, lengths, sliding_window=window, **kw), jnp.float32)


def test_lengths_past_the_capacity_mean_the_whole_cache():
    q, k, v, lengths, _, _ = _case(1, jnp.float32)
    over = jnp.full_like(lengths, 5000)
    out = dt.ragged_decode_attention_tpu(q, k, v, over)
    _check(out, da.reference(q, k, v, jnp.full_like(lengths, k.shape[2])), jnp.float32)


def test_bad_input_is_rejected_before_launch():
    q, k, v, lengths, _, kw = _case(0, jnp.float32, positions=True)
    f = dt.ragged_decode_attention_tpu
    with pytest.raises(ValueError, match="block_k must be a positive multiple of 128"):
        f(q, k, v, lengths, block_k=100)
    with pytest.raises(ValueError, match="bf16 or float32"):
        f(q.astype(jnp.float16), k.astype(jnp.float16), v.astype(jnp.float16), lengths)
    with pytest.raises(TypeError, match="share one dtype"):
        f(q, k.astype(jnp.bfloat16), v, lengths)
    with pytest.raises(ValueError, match="lengths must be"):
        f(q, k, v, lengths[0])
    with pytest.raises(ValueError, match="sliding_window needs kv_positions"):
        f(q, k, v, lengths, sliding_window=8)
    with pytest.raises(ValueError, match="scale must be finite"):
        f(q, k, v, lengths, scale=float("inf"))
    with pytest.raises(ValueError, match="kv_positions must have shape"):
        f(q, k, v, lengths, kv_positions=kw["kv_positions"][:, :, :5],
          q_positions=kw["q_positions"])


_AOT = """
import sys
import jax, jax.numpy as jnp
from pallas_kernels import decode_attention_tpu as dt
S = jax.ShapeDtypeStruct
for topo in sys.argv[1:]:
    for b, hkv, g, cap, d, dtype, pos, bias, window, block_k in (
            (8, 8, 4, 32768, 128, jnp.bfloat16, True, False, None, None),
            (1, 2, 1, 4096, 64, jnp.float32, True, True, 1024, 128),
            (2, 4, 8, 1000, 128, jnp.bfloat16, False, False, None, None),
            (1, 2, 2, 100, 128, jnp.float32, True, True, 50, None)):
        dt.compile_for_tpu(
            topo, S((b, hkv * g, d), dtype), S((b, hkv, cap, d), dtype),
            S((b, hkv, cap, d), dtype), S((b, hkv), jnp.int32),
            S((b, hkv, cap), jnp.int32) if pos else None, S((b,), jnp.int32) if pos else None,
            S((b, hkv, cap), jnp.float32) if bias else None, sliding_window=window,
            block_k=block_k)
        print("COMPILED", topo, b, hkv, g, cap, d, flush=True)
"""


def test_compiles_for_tpu_with_libtpu():
    """The TPU compiler (libtpu, a test dependency) accepts the kernel for TPU v4, v5e and v6e:
    bf16 at 8 x 32k, float32 with positions, bias and a window, a capacity that is not a
    multiple of the block and one below a block. Compiling is all a CPU host can do: the
    kernel has not run on a TPU (module doc)."""
    compiled_lines(_AOT, 4)


def test_dense_attend_dispatches_tpu_decode_where_switched_on(monkeypatch):
    """On a TPU (platform patched) with `TPU_DECODE_KERNEL` set, decode over a LayerCache runs
    the kernel (interpreted here) with the cache's positions and merged-slot bias; with the
    switch off, for prefill or for float16, the reference."""
    from kvjax import attention
    from kvjax.cache import LayerCache

    q, k, v, lengths, _, kw = _case(0, jnp.float32, positions=True, bias=True)
    layer = LayerCache(k, v, lengths, kw["kv_positions"], {"log_count": kw["kv_bias"]})
    qpos = kw["q_positions"][:, None]
    calls = []
    real = dt.ragged_decode_attention_tpu
    monkeypatch.setattr(dt, "ragged_decode_attention_tpu",
                        lambda *a, **k_: calls.append(1) or real(*a, **k_))
    monkeypatch.setattr(attention, "kernel_platform", lambda: "tpu")
    ref = attention.attend(q[:, :, None], qpos, layer, sliding_window=60, impl="reference")
    attention.attend(q[:, :, None], qpos, layer, sliding_window=60)
    assert calls == []  # off by default
    monkeypatch.setattr(attention, "TPU_DECODE_KERNEL", True)
    out = attention.attend(q[:, :, None], qpos, layer, sliding_window=60)
    assert calls == [1]
    _check(out, ref, jnp.float32)
    attention.attend(jnp.concatenate([q[:, :, None]] * 2, 2), jnp.concatenate([qpos] * 2, 1),
                     layer)  # prefill
    half = LayerCache(k.astype(jnp.float16), v.astype(jnp.float16), lengths, layer.positions)
    attention.attend(q[:, :, None].astype(jnp.float16), qpos, half)
    assert calls == [1]


def test_tpu_bench_quick_cpu(tmp_path):
    """The TPU benchmark's CPU smoke run: every kernel config passes its check and is timed."""
    proc = subprocess.run([sys.executable, os.path.join("experiments", "bench_tpu_decode.py"),
                           "--quick", f"--out={tmp_path}"], capture_output=True, text=True,
                          timeout=600, cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "WRONG" not in proc.stdout and "FAILED" not in proc.stdout, proc.stdout
    rows = json.load(open(tmp_path / "tpu_decode.json"))["rows"]
    assert {"kernel block_k 128", "kernel block_k 256", "reference (jnp)",
            "block-sparse 1/8 of 64-slot blocks",
            "block-sparse 1/8 of 16-slot blocks", "kivi4 (packed)", "kivi2 (packed)"
            } <= set(rows[0])
