"""The int4 Mosaic GPU probe (experiments/proto_mgpu_int4.py) lowers for CUDA (sm_90) on CPU.

Its numbers are checked against its jnp reference on the GPU only (the Mosaic GPU interpreter
of jax 0.10.2 rejects register WGMMA operands); this keeps the probe and the `inline_mgpu`
key-scale expansion compiling through the whole Pallas -> Mosaic GPU pipeline.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import proto_mgpu_int4 as pm


def _lower(f, *args):
    return jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",)).as_text()


@pytest.mark.parametrize("int4,values,zeros", [
    (True, False, False), (True, True, True), (False, True, False)])
def test_probe_lowers(int4, values, zeros):
    b, h, cap, d = 1, 2, 1024, 128
    dt = jnp.int4 if int4 else jnp.bfloat16
    args = [jax.ShapeDtypeStruct((b, h, pm.N, d), jnp.bfloat16),
            jax.ShapeDtypeStruct((b, h, cap, d), dt)]
    if values:
        args.append(jax.ShapeDtypeStruct((b, h, d, cap), dt))
    f = functools.partial(pm.scores_stats, splits=2, stages=2, zeros=zeros)
    assert "mosaic_gpu" in _lower(lambda *a: f(*a), *args)


def test_expand_scaled_lowers_and_reference_rows():
    spec = jax.ShapeDtypeStruct
    assert "mosaic_gpu" in _lower(pm.expand_call, spec((4, 128), jnp.bfloat16),
                                  spec((8, 128), jnp.bfloat16))
    q = np.arange(4 * 128, dtype=np.float32).reshape(4, 128)
    ks = np.arange(8 * 128, dtype=np.float32).reshape(8, 128) + 1
    ref = pm.expand_reference(q, ks)
    for i in range(4):  # tile i, duplicate d, key group g, head h
        for d in range(2):
            for g in range(2):
                for hh in range(4):
                    np.testing.assert_array_equal(ref[16 * i + 8 * d + 4 * g + hh],
                                                  q[hh] * ks[2 * i + g])


def test_capacity_must_fill_the_splits():
    q8 = jnp.zeros((1, 1, pm.N, 128), jnp.bfloat16)
    keys = jnp.zeros((1, 1, 100, 128), jnp.int4)
    with pytest.raises(ValueError, match="capacity 100"):
        pm.scores_stats(q8, keys, splits=1)
