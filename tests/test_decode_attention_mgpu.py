"""Mosaic GPU ragged decode kernel: argument checks and lowering for CUDA (sm_90) on CPU.

The Mosaic GPU interpreter of jax 0.10.2 rejects transposed WGMMA operands, so this kernel's
numbers are checked against `decode_attention.reference` on the GPU
(`experiments/bench_mgpu.py`, figures in docs/benchmarks.md); here every shape family is
lowered through the whole Pallas -> Mosaic GPU pipeline, which is where shape, layout and
shared-memory errors surface.
"""

import jax
import jax.numpy as jnp
import pytest

from pallas_kernels import decode_attention_mgpu as dm


def _spec(shape, dtype=jnp.bfloat16):
    return jax.ShapeDtypeStruct(shape, dtype)


def _lower(b, hkv, g, c, d, dv=None, pos=False, **kw):
    dv = d if dv is None else dv
    args = [_spec((b, hkv * g, d)), _spec((b, hkv, c, d)), _spec((b, hkv, c, dv)),
            _spec((b, hkv), jnp.int32)]
    if pos:
        args += [_spec((b, hkv, c), jnp.int32), _spec((b,), jnp.int32)]

    def f(q, k, v, n, *p):
        extra = {"kv_positions": p[0], "q_positions": p[1]} if p else {}
        return dm.ragged_decode_attention_mgpu(q, k, v, n, **extra, **kw)

    return jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",)).as_text()


@pytest.mark.parametrize("b,hkv,g,c,d,dv,pos,kw", [
    (2, 2, 4, 512, 128, None, False, {"num_splits": 3}),
    (1, 3, 8, 256, 64, None, True, {"num_splits": 1}),
    (3, 2, 1, 1024, 128, None, False, {"num_splits": 8, "block_k": 128, "num_stages": 2}),
    (2, 1, 16, 512, 128, 64, True, {"num_splits": 4, "num_stages": 4}),
    (1, 1, 64, 256, 128, None, False, {}),
])
def test_lowers_for_cuda(b, hkv, g, c, d, dv, pos, kw):
    text = _lower(b, hkv, g, c, d, dv, pos, **kw)
    assert "mosaic_gpu" in text


def test_rejects_bad_input():
    q = jnp.zeros((1, 8, 128), jnp.bfloat16)
    k = jnp.zeros((1, 2, 256, 128), jnp.bfloat16)
    n = jnp.full((1, 2), 256, jnp.int32)
    with pytest.raises(TypeError, match="share one dtype"):
        dm.ragged_decode_attention_mgpu(q.astype(jnp.float32), k, k, n)
    f32 = jnp.float32
    with pytest.raises(TypeError, match="bf16 or fp16"):
        dm.ragged_decode_attention_mgpu(q.astype(f32), k.astype(f32), k.astype(f32), n)
    with pytest.raises(ValueError, match="block_k"):
        dm.ragged_decode_attention_mgpu(q, k, k, n, block_k=96)
    with pytest.raises(ValueError, match="divide the capacity"):
        dm.ragged_decode_attention_mgpu(q, k[:, :, :200], k[:, :, :200], n)
    with pytest.raises(ValueError, match="multiples of 64"):
        dm.ragged_decode_attention_mgpu(q[..., :96], k[..., :96], k[..., :96], n)
    with pytest.raises(ValueError, match="multiple of KV heads"):
        dm.ragged_decode_attention_mgpu(q[:, :7], k, k, n)
    with pytest.raises(ValueError, match="<= 64"):
        dm.ragged_decode_attention_mgpu(jnp.zeros((1, 130, 128), jnp.bfloat16), k, k, n)
    with pytest.raises(ValueError, match="together"):
        dm.ragged_decode_attention_mgpu(q, k, k, n, kv_positions=jnp.zeros((1, 2, 256), jnp.int32))
    with pytest.raises(ValueError, match="kv_positions must have shape"):
        dm.ragged_decode_attention_mgpu(q, k, k, n, kv_positions=jnp.zeros((1, 2, 255), jnp.int32),
                                        q_positions=jnp.zeros((1,), jnp.int32))
    with pytest.raises(ValueError, match="num_splits"):
        dm.ragged_decode_attention_mgpu(q, k, k, n, num_splits=0)
    with pytest.raises(ValueError, match="num_stages"):
        dm.ragged_decode_attention_mgpu(q, k, k, n, num_stages=0)
