"""TPU block-sparse decode kernel: the Pallas TPU interpreter against the jnp reference on
CPU, bad input, Quest on TPU, and an ahead-of-time compile by libtpu (no TPU needed).

Tolerances: float32 1e-5 (max abs), bf16 2e-2.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tpu_aot import compiled_lines

from pallas_kernels import block_sparse_attention as bsa
from pallas_kernels import block_sparse_attention_tpu as bt

# (batch, kv heads, query heads per kv head, capacity, head dim, block size, list length,
#  blocks per step)
CASES = [
    (2, 2, 4, 256, 128, 16, 6, None),  # Quest-sized pages, 6 listed of 16, one step
    (1, 2, 1, 512, 64, 64, 5, 2),  # 3 steps of 2 entries, the last half used
    (1, 1, 8, 256, 128, 128, 2, None),  # one block per step
    (2, 1, 4, 1024, 128, 32, 20, 16),  # 16 per step: the second step partly used
]


def _case(i, dtype, extras=False):
    b, hkv, g, cap, d, bs, n, per = CASES[i]
    ks = jax.random.split(jax.random.key(i), 4)
    q = jax.random.normal(ks[0], (b, hkv * g, d), jnp.float32).astype(dtype)
    k = jax.random.normal(ks[1], (b, hkv, cap, d), jnp.float32).astype(dtype)
    v = jax.random.normal(ks[2], (b, hkv, cap, d), jnp.float32).astype(dtype)
    rng = np.random.default_rng(i)
    nb = cap // bs
    idx = np.stack([rng.permutation(nb)[:n] for _ in range(b * hkv)]).reshape(b, hkv, n)
    cnt = rng.integers(1, n + 1, (b, hkv))
    cnt.flat[0] = n  # a full list
    if b * hkv > 1:
        cnt.flat[-1] = 0  # an empty list: zeros
    lengths = np.full((b, hkv), cap)
    lengths.flat[0] = cap - bs - 3  # the last block partly past the length
    kw = {"block_size": bs}
    if extras:  # holes, future slots, a window, merged-slot bias
        pos = jnp.broadcast_to(jnp.arange(cap, dtype=jnp.int32), (b, hkv, cap))
        pos = pos.at[:, 0, 3:9].set(-1).at[:, -1, 10:12].set(10**6)
        kw.update(kv_positions=pos, q_positions=jnp.full((b,), cap - 7, jnp.int32),
                  kv_bias=jax.random.uniform(ks[3], (b, hkv, cap), jnp.float32, 0.0, 2.0),
                  sliding_window=cap // 2)
    lists = (jnp.asarray(idx, jnp.int32), jnp.asarray(cnt, jnp.int32))
    return (q, k, v, jnp.asarray(lengths, jnp.int32), *lists), per, kw


def _check(out, ref, dtype):
    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    assert out.shape == ref.shape and out.dtype == ref.dtype
    err = float(jnp.max(jnp.abs(out.astype(jnp.float32) - ref.astype(jnp.float32))))
    assert err <= tol, err
    assert float(jnp.max(jnp.abs(ref.astype(jnp.float32)))) > 0.05  # not an all-zero case


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("i", range(len(CASES)))
def test_matches_reference(i, dtype):
    args, per, kw = _case(i, dtype)
    out = bt.block_sparse_decode_tpu(*args, blocks_per_step=per, **kw)
    _check(out, bsa.reference_decode(*args, **kw), dtype)
    cnt, hq, hkv = args[5], args[0].shape[1], args[5].shape[1]
    empty = jnp.repeat(cnt == 0, hq // hkv, axis=1)[..., None]
    assert bool(jnp.all(jnp.where(empty, out == 0, True)))  # empty lists give zeros


@pytest.mark.parametrize("i", range(len(CASES)))
def test_positions_window_and_bias_match_reference(i):
    args, per, kw = _case(i, jnp.float32, extras=True)
    out = bt.block_sparse_decode_tpu(*args, blocks_per_step=per, **kw)
    _check(out, bsa.reference_decode(*args, **kw), jnp.float32)


def test_bad_input_is_rejected_before_launch():
    args, _, kw = _case(0, jnp.float32)
    f = bt.block_sparse_decode_tpu
    q, k, v, lengths, idx, cnt = args
    with pytest.raises(ValueError, match="blocks_per_step must be"):
        f(*args, blocks_per_step=0, **kw)
    with pytest.raises(ValueError, match="block_indices must be in"):
        f(q, k, v, lengths, idx.at[0, 0, 0].set(999), cnt, **kw)
    with pytest.raises(ValueError, match="block_counts must be in"):
        f(q, k, v, lengths, idx, cnt.at[0, 0].set(99), **kw)
    with pytest.raises(ValueError, match=">= 8 on TPU"):
        f(*args, block_size=4)
    with pytest.raises(ValueError, match="does not divide the capacity"):
        f(*args, block_size=512)
    with pytest.raises(ValueError, match="bf16 or float32"):
        f(q.astype(jnp.float16), k.astype(jnp.float16), v.astype(jnp.float16), lengths, idx,
          cnt, **kw)


def test_quest_uses_the_tpu_kernel_where_switched_on(monkeypatch):
    """Quest decode on a TPU (platform patched) with `TPU_DECODE_KERNEL`: jnp page selection,
    then this kernel (interpreted here) over the selected pages; equal to the reference."""
    from kvjax import attention
    from kvjax.cache import LayerCache
    from kvjax.sparse.quest import from_layer, quest_attend

    (q, k, v, lengths, _, _), _, kw = _case(0, jnp.float32, extras=True)
    layer = from_layer(LayerCache(k, v, lengths, kw["kv_positions"]), page_size=16,
                       token_budget=64)
    qpos = kw["q_positions"][:, None]
    calls = []
    real = bt.block_sparse_decode_tpu
    monkeypatch.setattr(bt, "block_sparse_decode_tpu",
                        lambda *a, **k_: calls.append(1) or real(*a, **k_))
    monkeypatch.setattr(attention, "kernel_platform", lambda: "tpu")
    ref = quest_attend(q[:, :, None], qpos, layer, impl="reference")
    quest_attend(q[:, :, None], qpos, layer)
    assert calls == []  # off by default
    monkeypatch.setattr(attention, "TPU_DECODE_KERNEL", True)
    out = quest_attend(q[:, :, None], qpos, layer)
    assert calls == [1]
    _check(out, ref, jnp.float32)


_AOT = """
import sys
import jax, jax.numpy as jnp
from pallas_kernels import block_sparse_attention_tpu as bt
S = jax.ShapeDtypeStruct
for topo in sys.argv[1:]:
    for b, hkv, g, cap, d, dtype, bs, n, pos, bias, window, per in (
            (8, 8, 4, 32768, 128, jnp.bfloat16, 64, 64, True, False, None, None),
            (8, 8, 4, 32768, 128, jnp.bfloat16, 16, 256, True, True, None, None),
            (1, 2, 1, 4096, 64, jnp.float32, 128, 8, True, True, 1024, 1)):
        bt.compile_for_tpu(
            topo, S((b, hkv * g, d), dtype), S((b, hkv, cap, d), dtype),
            S((b, hkv, cap, d), dtype), S((b, hkv), jnp.int32), S((b, hkv, n), jnp.int32),
            S((b, hkv), jnp.int32), S((b, hkv, cap), jnp.int32) if pos else None,
            S((b,), jnp.int32) if pos else None, S((b, hkv, cap), jnp.float32) if bias else None,
            block_size=bs, sliding_window=window, blocks_per_step=per)
        print("COMPILED", topo, bs, n, flush=True)
"""


def test_compiles_for_tpu_with_libtpu():
    """libtpu compiles the kernel for TPU v4, v5e and v6e: 8 x 32k bf16 with 64-token blocks,
    Quest's 16-token pages (16 per step, with bias), float32 with a window, one block per
    step. Compiled, not run: the module doc says where it ran."""
    compiled_lines(_AOT, 3)


def test_supported_shapes():
    args, _, _ = _case(0, jnp.float32)
    q, k, v = args[:3]
    assert bt.supported(q, k, v, 16)
    assert not bt.supported(q, k, v, 4)  # below a sublane tile
    assert not bt.supported(q, k, v, 48)  # not a power of two
    assert not bt.supported(q.astype(jnp.float16), k.astype(jnp.float16), v.astype(jnp.float16),
                            16)
    assert not bt.supported(q[..., :80], k[..., :80], v[..., :80], 16)  # head dim 80
