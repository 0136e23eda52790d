"""Checkpoints written on another topology load here (e.g. trained on a GPU, loaded on a CPU).

A subprocess with 2 CPU devices writes a cache and a trained component whose arrays live on its
second device; this 1-device process must restore both (orbax's default restore would reuse the
saved sharding and fail with a topology mismatch).
"""

import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
from flax import nnx

import kvjax
from kvjax.learned import locret

WRITER = textwrap.dedent("""
    import sys, jax, numpy as np
    from flax import nnx
    import kvjax
    from kvjax.learned import locret
    from kvjax.models import Llama, LlamaConfig
    out = sys.argv[1]
    dev = jax.devices()[1]
    model = Llama(LlamaConfig.tiny(num_hidden_layers=2), rngs=nnx.Rngs(0))
    cache, _ = kvjax.prefill(model, np.arange(3, 15)[None])
    cache = jax.device_put(cache, dev)
    kvjax.cache.save(out + "/cache", cache)
    np.save(out + "/keys.npy", np.asarray(cache.layers[1].keys))
    config = locret.component_config(model, head_hidden=8, seed=1)
    heads = locret.build(config)
    nnx.update(heads, jax.device_put(nnx.state(heads), dev))
    locret.save(out + "/heads", heads, config, model)
    np.save(out + "/w.npy", np.asarray(jax.tree.leaves(nnx.state(heads))[0]))
""")


def test_restore_from_another_topology(tmp_path):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
               JAX_PLATFORMS="cpu")
    subprocess.run([sys.executable, "-c", WRITER, str(tmp_path)], check=True, env=env,
                   cwd=os.path.dirname(os.path.dirname(__file__)))
    cache = kvjax.cache.restore(tmp_path / "cache")
    np.testing.assert_array_equal(np.asarray(cache.layers[1].keys), np.load(tmp_path / "keys.npy"))
    heads = locret.load(tmp_path / "heads")
    np.testing.assert_array_equal(np.asarray(jax.tree.leaves(nnx.state(heads))[0]),
                                  np.load(tmp_path / "w.npy"))
