"""kvjax.sharding: partition rules (in process, 1 device) and 8-device checks (subprocess).

The multi-device checks need `--xla_force_host_platform_device_count=8`, which XLA reads once
at start-up, so they run in `tests/sharding_checks.py` in a subprocess (one jax start for all
of them) and each check is reported here as its own test.
"""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx, struct
from jax.sharding import PartitionSpec as P
from ml_collections import ConfigDict

import kvjax
from kvjax import sharding

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

MESHES = ("8x1", "2x4", "1x8")
EQUAL = ["equal/8x1/knorm", "equal/2x4/knorm/chunk5", "equal/1x8/knorm"]
HLO = [f"hlo/{m}/{c}" for m in MESHES for c in ("identity", "knorm", "control")]
if hasattr(kvjax.compress, "snapkv"):
    EQUAL.append("equal/2x4/snapkv")
    HLO += [f"hlo/{m}/snapkv" for m in MESHES]
ERRORS = [f"error/{n}" for n in
          ("mesh_size", "mesh_model", "heads", "batch", "shard_cache", "shard_batch")]
CHECKS = EQUAL + HLO + ERRORS + ["dp_train/8x1", "train_loop/8x1", "eval_runner/2x4", "pad_batch",
                                     "params"]


def _run(args, xla_flags=""):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags)
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, f"{args[0]} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


@pytest.fixture(scope="module")
def checks(tmp_path_factory):
    path = tmp_path_factory.mktemp("sharding") / "results.json"
    _run([os.path.join(HERE, "sharding_checks.py"), str(path)])
    with open(path) as f:
        return json.load(f)


def test_every_check_ran(checks):
    assert sorted(checks) == sorted(CHECKS)


@pytest.mark.parametrize("name", CHECKS)
def test_eight_devices(checks, name):
    """equal/*: sharded prefill+compress+generate == one device (tokens, logits 1e-5, cache)
    and caches keep their sharding; hlo/*: a compressor's compiled HLO has no collective (the
    control, which normalises across shards, must have one); error/*: clear ValueErrors;
    dp_train: data-parallel optax steps == one device; params: placement of params."""
    assert checks[name]["ok"], checks[name]["detail"]


def test_bench_tiny(tmp_path):
    out = tmp_path / "bench.json"
    _run([os.path.join(ROOT, "experiments", "bench_sharding.py"), "--preset=tiny",
          "--prompt_len=8", "--new_tokens=3", "--batch=2", "--repeats=1", f"--out={out}"],
         xla_flags="--xla_force_host_platform_device_count=8")
    rows = json.loads(out.read_text())["rows"]
    assert [r["mode"] for r in rows] == ["1 device", "dp", "tp"]
    assert [r["mesh"] for r in rows] == [{"data": 1, "model": 1}, {"data": 8, "model": 1},
                                         {"data": 1, "model": 8}]
    assert [r["batch"] for r in rows] == [2, 16, 2]
    assert all(r["match"] for r in rows)  # float32: sharded tokens equal the one-device ones
    assert all(r["generate_tok_s"] > 0 and r["prefill_tok_s"] > 0 for r in rows)


# --- in process (one device) ------------------------------------------------------------


@pytest.mark.parametrize("name, shape, spec", [
    ("layers.0.self_attn.q_proj.kernel", (64, 256), P(None, "model")),
    ("layers.0.self_attn.k_proj.kernel", (64, 64), P(None, "model")),
    ("layers.3.self_attn.v_proj.bias", (64,), P("model")),
    ("layers.0.self_attn.o_proj.kernel", (256, 64), P("model", None)),
    ("layers.1.mlp.gate_proj.kernel", (64, 128), P(None, "model")),
    ("layers.1.mlp.up_proj.kernel", (64, 128), P(None, "model")),
    ("layers.1.mlp.down_proj.kernel", (128, 64), P("model", None)),
    ("layers.1.mlp.down_proj.bias", (64,), P()),
    ("lm_head.kernel", (64, 256), P(None, "model")),
    ("lm_head.kernel", (64, 250), P()),  # vocab not divisible by 4: replicated
    ("embed_tokens.embedding", (256, 64), P()),
    ("layers.0.input_layernorm.weight", (64,), P()),
    ("layers.0.self_attn.q_norm.weight", (16,), P()),
])
def test_param_spec(name, shape, spec):
    assert sharding.param_spec(name, shape, 4) == spec


def _abstract_model():
    """Shapes only (no compute): placement rules and input checks need nothing more."""
    return nnx.eval_shape(lambda: kvjax.models.Llama(kvjax.models.LlamaConfig.tiny(),
                                                     rngs=nnx.Rngs(0)))


def test_param_shardings_cover_the_model():
    model = _abstract_model()
    mesh = sharding.make_mesh(1, 1)
    specs = {jax.tree_util.keystr(p): s.spec for p, s in
             jax.tree_util.tree_leaves_with_path(sharding.param_shardings(model, mesh))}
    assert len(specs) == len(jax.tree.leaves(nnx.state(model)))
    assert specs["['layers'][1]['self_attn']['k_proj']['kernel'].value"] == P(None, "model")
    assert specs["['layers'][1]['mlp']['down_proj']['kernel'].value"] == P("model", None)


@struct.dataclass
class _OtherKind:
    """A stand-in for another cache kind (e.g. quantized codes + per-token scales + a basis)."""

    codes: jax.Array  # [B, H, C, D // 2]
    scales: jax.Array  # [B, H, C]
    basis: jax.Array  # [D, R]  (not per row)
    lengths: jax.Array  # [B, H]
    positions: jax.Array  # [B, H, C]
    row_state: jax.Array  # [B, 3]


def test_cache_specs_every_kind():
    cache = kvjax.cache.init(2, batch=3, num_heads=2, capacity=5, head_dim=4)
    specs = sharding.cache_specs(cache)
    layer = specs.layers[1]
    assert (layer.keys, layer.values, layer.lengths, layer.positions) == (P("data", "model"),) * 4
    assert specs.next_position == P("data")
    other = _OtherKind(codes=jnp.zeros((3, 2, 5, 2), jnp.uint8), scales=jnp.zeros((3, 2, 5)),
                       basis=jnp.zeros((4, 3)), lengths=jnp.zeros((3, 2), jnp.int32),
                       positions=jnp.zeros((3, 2, 5), jnp.int32), row_state=jnp.zeros((3, 3)))
    s = sharding.cache_specs(other)
    assert (s.codes, s.scales, s.lengths, s.positions) == (P("data", "model"),) * 4
    assert (s.basis, s.row_state) == (P(), P("data"))
    with pytest.raises(TypeError, match="lengths"):
        sharding.cache_specs({"keys": jnp.zeros((1, 1, 1, 1))})


def test_mesh_config_and_errors():
    assert dict(sharding.make_mesh().shape) == {"data": 1, "model": 1}
    cfg = ConfigDict({"data": -1, "model": 1})
    assert dict(sharding.mesh_from_config(cfg).shape) == {"data": 1, "model": 1}
    assert sharding.mesh_from_config({"model": 1}).axis_names == ("data", "model")
    with pytest.raises(ValueError, match="number of devices"):
        sharding.make_mesh(2, 1)
    with pytest.raises(ValueError, match="model must be a positive int"):
        sharding.make_mesh(1, 0)
    with pytest.raises(TypeError, match="mesh must be a jax.sharding.Mesh"):
        sharding.check_mesh("2x4")
    other = jax.make_mesh((1,), ("batch",), axis_types=(jax.sharding.AxisType.Auto,))
    with pytest.raises(ValueError, match="mesh axes must be"):
        sharding.check_mesh(other)
    with pytest.raises(ValueError, match="mesh axes must be"):
        kvjax.prefill(_abstract_model(), np.zeros((1, 4), np.int32), mesh=other)


def test_shard_batch_and_pad_errors():
    mesh = sharding.make_mesh(1, 1)
    out = sharding.shard_batch({"x": np.ones((2, 3, 4))}, mesh, axis=1)
    assert out["x"].sharding.spec == P(None, "data", None)
    with pytest.raises(ValueError, match="axis 3 is out of range"):
        sharding.shard_batch(np.ones((2, 3)), mesh, axis=3)
    with pytest.raises(ValueError, match="disagree"):
        sharding.pad_batch((np.ones((2, 3)), np.ones((3,))), mesh)
    batch, n = sharding.pad_batch(np.arange(6).reshape(3, 2), mesh)
    assert n == 3 and batch.shape == (3, 2)
