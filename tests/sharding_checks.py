"""Multi-device checks for tests/test_sharding.py, run in a subprocess with 8 CPU devices.

XLA reads `--xla_force_host_platform_device_count` once, when jax initialises, and the pytest
process must keep its single device; so this script sets the flag, runs every check, and writes
{check name: {"ok": bool, "detail": str}} as JSON to the path in argv[1]. A check that raises
is recorded as failed with its traceback.

    python tests/sharding_checks.py /tmp/results.json
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ["JAX_PLATFORMS"] = "cpu"

import json  # noqa: E402
import sys  # noqa: E402
import traceback  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import kvjax  # noqa: E402
from kvjax import rope, sharding  # noqa: E402
from kvjax.compress import Compressor, Observation, keep_topk  # noqa: E402
from kvjax.models import Llama, LlamaConfig  # noqa: E402

MESHES = ((8, 1), (2, 4), (1, 8))
CONFIG = LlamaConfig.tiny(num_attention_heads=16, num_key_value_heads=8, head_dim=8,
                          eos_token_id=None)
BATCH, T, NEW, BUDGET = 8, 12, 5, 6
TOL = 1e-5


def knorm(budget: int) -> Compressor:
    """Keeps the `budget` keys of smallest L2 norm per head (a score-based keep_topk method)."""

    def prefill(cache, obs, state):
        scores = -jnp.linalg.norm(cache.keys.astype(jnp.float32), axis=-1)
        return keep_topk(cache, scores, budget), state

    return Compressor(init=lambda cache: (), prefill=prefill, decode=lambda c, o, s: (c, s))


def compressors() -> dict[str, Compressor | None]:
    comps = {"identity": None, "knorm": knorm(BUDGET)}
    if hasattr(kvjax.compress, "snapkv"):
        comps["snapkv"] = kvjax.compress.snapkv(budget=BUDGET, window=2)
    return comps


def prompt() -> tuple[np.ndarray, np.ndarray]:
    """Left-padded ragged prompts int[B, T] and their lengths."""
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, CONFIG.vocab_size, (BATCH, T))
    lengths = rng.integers(T // 2, T + 1, (BATCH,))
    lengths[0] = T
    for i, n in enumerate(lengths):
        tokens[i, : T - n] = 0
    return tokens, lengths


def sharding_mismatches(tree, mesh) -> list[str]:
    """Leaves of a cache whose sharding is not the one `kvjax.sharding.cache_specs` gives."""
    specs = sharding.cache_specs(tree)
    bad = []
    for (path, x), spec in zip(jax.tree_util.tree_leaves_with_path(tree), jax.tree.leaves(specs)):
        if not x.sharding.is_equivalent_to(NamedSharding(mesh, spec), x.ndim):
            bad.append(f"{jax.tree_util.keystr(path)}: {x.sharding} != {spec}")
    return bad


def cache_diff(a, b) -> list[str]:
    out = []
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
        x, y = np.asarray(x), np.asarray(y)
        if x.shape != y.shape:
            out.append(f"{jax.tree_util.keystr(path)} shape {x.shape} != {y.shape}")
        elif jnp.issubdtype(x.dtype, jnp.integer):
            if not np.array_equal(x, y):
                out.append(f"{jax.tree_util.keystr(path)} differs")
        elif np.abs(x - y).max(initial=0) > TOL:
            out.append(f"{jax.tree_util.keystr(path)} max diff {np.abs(x - y).max()}")
    return out


def check_equal(results: dict, model: Llama) -> None:
    """Sharded prefill + compress + generate == the single-device result."""
    tokens, lengths = prompt()
    cases = [((8, 1), "knorm", None), ((2, 4), "knorm", 5), ((1, 8), "knorm", None)]
    if "snapkv" in compressors():
        cases.append(((2, 4), "snapkv", None))
    refs = {}
    for shape, name, chunk in cases:
        comp = compressors()[name]
        key = f"equal/{shape[0]}x{shape[1]}/{name}" + (f"/chunk{chunk}" if chunk else "")

        def run(comp=comp, chunk=chunk, shape=shape, name=name):
            if (name, chunk) not in refs:
                cache, logits = kvjax.prefill(model, tokens, comp, chunk, lengths=lengths)
                out = kvjax.generate(model, tokens, NEW, comp, lengths=lengths, chunk_size=chunk)
                refs[name, chunk] = cache, np.asarray(logits), np.asarray(out)
            ref_cache, ref_logits, ref_out = refs[name, chunk]
            mesh = sharding.make_mesh(*shape)
            cache, logits = kvjax.prefill(model, tokens, comp, chunk, lengths=lengths, mesh=mesh)
            out, gen_cache = kvjax.generate(model, tokens, NEW, comp, lengths=lengths,
                                            chunk_size=chunk, mesh=mesh, return_cache=True)
            errors = []
            diff = np.abs(np.asarray(logits) - ref_logits).max()
            if not diff <= TOL:
                errors.append(f"prefill logits max diff {diff}")
            if not np.array_equal(np.asarray(out), ref_out):
                errors.append(f"generated tokens differ:\n{np.asarray(out)}\nvs\n{ref_out}")
            if cache.layers[0].capacity != BUDGET:
                errors.append(f"not compressed: capacity {cache.layers[0].capacity}")
            errors += cache_diff(cache, ref_cache)
            errors += sharding_mismatches(cache, mesh)
            errors += ["generate: " + e for e in sharding_mismatches(gen_cache, mesh)]
            if len(cache.layers[0].keys.sharding.device_set) != 8:
                errors.append("cache is not spread over the 8 devices")
            return errors

        record(results, key, run)


def observation(layer) -> Observation:
    rng = np.random.default_rng(1)
    c = CONFIG
    q = jnp.asarray(rng.normal(size=(BATCH, c.num_attention_heads, 4, c.head_dim)), jnp.float32)
    return Observation(
        queries=q, raw_queries=q,
        query_positions=jnp.broadcast_to(jnp.arange(T - 4, T, dtype=jnp.int32), (BATCH, 4)),
        hidden=jnp.asarray(rng.normal(size=(BATCH, 4, c.hidden_size)), jnp.float32),
        inv_freq=jnp.asarray(rope.inv_freq(c.head_dim, c.rope_theta, None)),
        layer=0, num_layers=c.num_hidden_layers, scale=c.head_dim**-0.5,
    )


def cross_shard(budget: int, axis: int) -> Compressor:
    """A control that is NOT per head/row: scores normalised across batch (0) or heads (1)."""

    def prefill(cache, obs, state):
        norms = jnp.linalg.norm(cache.keys, axis=-1)
        return keep_topk(cache, norms / jnp.sum(norms, axis=axis, keepdims=True), budget), state

    return Compressor(init=lambda cache: (), prefill=prefill, decode=lambda c, o, s: (c, s))


def check_collectives(results: dict, model: Llama) -> None:
    """Compressors act per head: their compiled HLO has no collective on a sharded cache."""
    tokens, lengths = prompt()
    layer = kvjax.prefill(model, tokens, lengths=lengths)[0].layers[0]
    obs = observation(layer)
    for shape in MESHES:
        mesh = sharding.make_mesh(*shape)
        cache, sobs = sharding.shard_cache(layer, mesh), sharding.shard_observation(obs, mesh)
        comps = dict(compressors(), control=cross_shard(BUDGET, 0 if shape[1] == 1 else 1))
        for name, comp in comps.items():
            comp = comp or kvjax.compress.identity()

            def run(comp=comp, name=name, cache=cache, sobs=sobs, mesh=mesh):
                def fn(c, o):
                    out, _ = comp.prefill(c, o, comp.init(c))
                    return sharding.constrain_cache(out, mesh)

                found = sharding.collectives(fn, cache, sobs)
                if name == "control":
                    return [] if found else ["control found no collective: the check is blind"]
                return [f"collectives in compiled HLO: {found}"] if found else []

            record(results, f"hlo/{shape[0]}x{shape[1]}/{name}", run)


def check_errors(results: dict, model: Llama) -> None:
    tokens, lengths = prompt()
    gqa2 = Llama(LlamaConfig.tiny(), rngs=nnx.Rngs(0))  # 2 KV heads

    def expect(fn, exc, words):
        try:
            fn()
        except exc as e:
            missing = [w for w in words if w not in str(e)]
            return [f"message {str(e)!r} lacks {missing}"] if missing else []
        return [f"no {exc.__name__} raised"]

    cases = {
        "mesh_size": lambda: expect(lambda: sharding.make_mesh(3, 3), ValueError, ["devices"]),
        "mesh_model": lambda: expect(lambda: sharding.make_mesh(None, 3), ValueError, ["model"]),
        "heads": lambda: expect(
            lambda: kvjax.generate(gqa2, tokens, 2, mesh=sharding.make_mesh(2, 4)),
            ValueError, ["'model'", "num_key_value_heads", "[1, 2]"]),
        "batch": lambda: expect(
            lambda: kvjax.prefill(model, tokens[:3], lengths=lengths[:3],
                                  mesh=sharding.make_mesh(2, 4)),
            ValueError, ["'data'", "batch size (3)"]),
        "shard_cache": lambda: expect(
            lambda: sharding.shard_cache(kvjax.cache.init(1, 3, 8, 4, 8), sharding.make_mesh(2, 4)),
            ValueError, ["batch (3)"]),
        "shard_batch": lambda: expect(
            lambda: sharding.shard_batch(np.zeros((3, 4)), sharding.make_mesh(8, 1)),
            ValueError, ["batch size (3)"]),
    }
    for name, fn in cases.items():
        record(results, f"error/{name}", fn)


class Scorer(nnx.Module):
    """A small learned component (a linear token scorer) for the data-parallel check."""

    def __init__(self, rngs: nnx.Rngs):
        self.proj = nnx.Linear(8, 1, rngs=rngs)

    def __call__(self, x):
        return self.proj(x)[..., 0]


def dp_train(mesh, steps: int = 3):
    """SGD on a [A=2, B=8, ...] batch (grad-accum axis first); returns (params, compiled HLO)."""
    graphdef, params = nnx.split(Scorer(nnx.Rngs(0)))
    tx = optax.adam(1e-2)
    opt_state = tx.init(params)
    rng = np.random.default_rng(2)
    batch = {"x": rng.normal(size=(2, 8, 5, 8)).astype(np.float32),
             "y": rng.normal(size=(2, 8, 5)).astype(np.float32)}

    @jax.jit
    def step(params, opt_state, batch):
        def loss(p, mb):
            return jnp.mean((nnx.merge(graphdef, p)(mb["x"]) - mb["y"]) ** 2)

        grads = jax.tree.map(lambda *g: sum(g) / 2, *[
            jax.grad(loss)(params, jax.tree.map(lambda x, i=i: x[i], batch)) for i in range(2)])
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    hlo = ""
    if mesh is not None:
        params, opt_state = sharding.replicate((params, opt_state), mesh)
        batch = sharding.shard_batch(batch, mesh, axis=1)
        hlo = step.lower(params, opt_state, batch).compile().as_text()
    for _ in range(steps):
        params, opt_state = step(params, opt_state, batch)
    return params, hlo


def check_data_parallel(results: dict, model: Llama) -> None:
    ref, _ = dp_train(None)
    for shape in ((8, 1),):

        def run(shape=shape):
            mesh = sharding.make_mesh(*shape)
            params, hlo = dp_train(mesh)
            errors = []
            for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(params),
                                    jax.tree.leaves(ref)):
                if np.abs(np.asarray(a) - np.asarray(b)).max() > 1e-6:
                    errors.append(f"{jax.tree_util.keystr(path)} differs from one device")
                if not a.sharding.is_fully_replicated or len(a.sharding.device_set) != 8:
                    errors.append(f"{jax.tree_util.keystr(path)} not replicated: {a.sharding}")
            if "all-reduce" not in hlo:
                errors.append("no gradient all-reduce in the compiled step")
            return errors

        record(results, f"dp_train/{shape[0]}x{shape[1]}", run)

    def pad():
        tokens, lengths = prompt()
        (pt, pl), n = sharding.pad_batch((tokens[:5], lengths[:5]), sharding.make_mesh(2, 4))
        errors = [] if n == 5 and pt.shape == (6, T) and pl.shape == (6,) else ["bad shapes"]
        if not (np.array_equal(pt[:5], tokens[:5]) and (pt[5:] == tokens[0]).all()
                and np.array_equal(pl, np.r_[lengths[:5], lengths[0]])):
            errors.append("padding rows are not copies of row 0")
        return errors

    record(results, "pad_batch", pad)


def check_train_loop(results: dict, model: Llama) -> None:
    """kvjax.train.train with mesh=(8, 1) == one device (retention gates, 2 steps)."""
    from kvjax import train as kvtrain
    from kvjax.learned import retention_gate

    def run():
        backbone = kvtrain.load_backbone("random:tiny", "float32")
        data = {"source": "recall", "batch_size": 8, "seq_len": 24, "seed": 0, "num_pairs": 2}

        def fit(mesh):
            return kvtrain.train(
                retention_gate.init(backbone, gate_hidden=8, bias_init=3.0, seed=0), backbone,
                retention_gate.loss(6), kvtrain.make_batch_fn(data, backbone.config.vocab_size, 1),
                steps=2, optimizer=kvtrain.optimizer(1e-2), log_every=1, progress=False,
                mesh=mesh,
            )

        one, dp = fit(None), fit(sharding.make_mesh(8, 1))
        errors = []
        for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(nnx.state(dp.component)),
                                jax.tree.leaves(nnx.state(one.component))):
            if np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)).max() > 1e-5:
                errors.append(f"{jax.tree_util.keystr(path)} differs from one device")
        if abs(dp.history[-1]["loss"] - one.history[-1]["loss"]) > 1e-5:
            errors.append(f"loss {dp.history[-1]['loss']} != {one.history[-1]['loss']}")
        return errors

    record(results, "train_loop/8x1", run)


def check_eval_runner(results: dict, model: Llama) -> None:
    """kvjax.eval.runner.sweep with a (2, 4) mesh == without (predictions and scores)."""
    from kvjax.eval import runner
    from kvjax.eval.tokenizer import ByteTokenizer

    def run():
        tok = ByteTokenizer()
        lm = Llama(LlamaConfig.tiny(vocab_size=tok.vocab_size, num_key_value_heads=4,
                                    num_attention_heads=8, head_dim=8), rngs=nnx.Rngs(1))
        kw = dict(methods=["full", "snapkv"], ratios=[0.5], tasks=["niah_single_1"],
                  lengths=[192], num_samples=4, batch_size=4, progress=False, log=None)
        one = runner.sweep(lm, tok, **kw)["cells"]
        sharded = runner.sweep(lm, tok, mesh=sharding.make_mesh(2, 4), **kw)["cells"]
        errors = []
        for key, cell in one.items():
            other = sharded[key]
            if cell["score"] != other["score"] or cell["examples"] != other["examples"]:
                errors.append(f"{key}: sharded sweep differs")
        return errors

    record(results, "eval_runner/2x4", run)


def check_params(results: dict, model: Llama) -> None:
    def run():
        mesh = sharding.make_mesh(2, 4)
        built = sharding.init_sharded(lambda: Llama(CONFIG, rngs=nnx.Rngs(0)), mesh)
        placed = sharding.shard_params(model, mesh)
        errors = []
        q = built.layers[0].self_attn.q_proj.kernel[...]
        if q.sharding.spec != P(None, "model") or q.sharding.mesh != mesh:
            errors.append(f"q_proj kernel sharding {q.sharding}")
        down = placed.layers[1].mlp.down_proj.kernel[...]
        if down.sharding.spec != P("model", None):
            errors.append(f"down_proj kernel sharding {down.sharding}")
        for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(nnx.state(built)),
                                jax.tree.leaves(nnx.state(model))):
            if not np.array_equal(np.asarray(a), np.asarray(b)):
                errors.append(f"init_sharded {jax.tree_util.keystr(path)} != unsharded init")
        again = sharding.shard_params(placed, mesh)
        if again.layers[0].mlp.up_proj.kernel[...] is not placed.layers[0].mlp.up_proj.kernel[...]:
            errors.append("shard_params copied an already placed array")
        return errors

    record(results, "params", run)


def record(results: dict, name: str, fn) -> None:
    try:
        errors = fn()
        results[name] = {"ok": not errors, "detail": "\n".join(errors)}
    except Exception:  # noqa: BLE001 - reported to the test as a failure
        results[name] = {"ok": False, "detail": traceback.format_exc()}


def main(path: str) -> None:
    assert jax.device_count() == 8, jax.devices()
    model = Llama(CONFIG, rngs=nnx.Rngs(0))
    results: dict = {}
    for check in (check_equal, check_collectives, check_errors, check_data_parallel,
                  check_train_loop, check_eval_runner, check_params):
        check(results, model)
    with open(path, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
