"""Data- and tensor-parallel generation throughput: N devices against one.

A random model of Llama-3-8B shape (bfloat16) runs `kvjax.prefill` and `kvjax.generate` on
  * one device (the baseline),
  * dp: mesh (N, 1), N times the baseline batch (each device holds a whole model replica),
  * tp: mesh (1, N), the baseline batch (heads and MLP hidden split over N devices).
The table reports tokens/s and tokens/s per device; `efficiency` is the per-device throughput
over the one-device throughput (1.0 is perfect scaling). `match` says whether the greedy tokens
equal the baseline's (the dp prompt is the baseline prompt tiled N times; in bfloat16,
tensor-parallel reductions round differently, so tp may differ on a random model).

    python experiments/bench_sharding.py --out=bench_sharding.json          # 2+ GPUs
    XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu \\
      python experiments/bench_sharding.py --preset=tiny                    # CPU smoke run

Timings are medians over `--repeats` runs after one compile run; `decode tok/s` subtracts the
prefill time from the generate time.
"""

from __future__ import annotations

import json
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx

import kvjax
from kvjax import sharding
from kvjax.models import Llama, LlamaConfig

PRESETS = {
    "llama3_8b": dict(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, rope_theta=500000.0,
        rope_scaling=(("factor", 8.0), ("high_freq_factor", 4.0), ("low_freq_factor", 1.0),
                      ("original_max_position_embeddings", 8192), ("rope_type", "llama3")),
        max_position_embeddings=131072, rms_norm_eps=1e-5,
    ),
    "tiny": dict(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
        num_attention_heads=16, num_key_value_heads=8, head_dim=8,
    ),
}

FLAGS = flags.FLAGS
flags.DEFINE_enum("preset", "llama3_8b", list(PRESETS), "model shape")
flags.DEFINE_list("modes", ["dp", "tp"], "dp and/or tp")
flags.DEFINE_integer("devices", None, "devices for the sharded runs (default: all)")
flags.DEFINE_integer("batch", 8, "batch per device for dp; global batch for tp and baseline")
flags.DEFINE_integer("prompt_len", 1024, "prompt tokens per row")
flags.DEFINE_integer("new_tokens", 128, "generated tokens per row")
flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"], "default: bfloat16, tiny: float32")
flags.DEFINE_string("compressor", None, "a kvjax.compress factory name taking budget=, e.g. snapkv")
flags.DEFINE_integer("budget", 256, "cache budget per head for --compressor")
flags.DEFINE_integer("repeats", 3, "timed runs per configuration")
flags.DEFINE_string("out", None, "write the results as JSON here")


def _median_time(fn, repeats: int) -> float:
    jax.block_until_ready(fn())  # compile
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def _peak_bytes(devices) -> int | None:
    stats = [d.memory_stats() for d in devices]
    if any(s is None or "peak_bytes_in_use" not in s for s in stats):
        return None
    return int(max(s["peak_bytes_in_use"] for s in stats))


def run_config(config: LlamaConfig, dtype, mesh, tokens: np.ndarray,
               compressor) -> tuple[dict, np.ndarray]:
    """Times prefill and generate of `tokens` on `mesh`; returns (result row, new tokens)."""
    model = sharding.init_sharded(lambda: Llama(config, rngs=nnx.Rngs(0), dtype=dtype), mesh)
    n = mesh.devices.size
    b, t = tokens.shape
    new = FLAGS.new_tokens

    def prefill():
        return kvjax.prefill(model, tokens, compressor, mesh=mesh)[1]

    def generate():
        return kvjax.generate(model, tokens, new, compressor, eos_id=-1, mesh=mesh)

    prefill_s = _median_time(prefill, FLAGS.repeats)
    generate_s = _median_time(generate, FLAGS.repeats)
    cache = kvjax.prefill(model, tokens, compressor, mesh=mesh)[0]
    out = np.asarray(generate()[:, t:])
    decode_s = max(generate_s - prefill_s, 1e-9)
    row = {
        "mesh": dict(mesh.shape), "devices": n, "batch": b,
        "prefill_s": prefill_s, "generate_s": generate_s,
        "prefill_tok_s": b * t / prefill_s,
        "generate_tok_s": b * new / generate_s,
        "decode_tok_s": b * (new - 1) / decode_s,
        "cache_bytes_per_device": kvjax.cache.nbytes(cache) // n,
        "peak_bytes_per_device": _peak_bytes(mesh.devices.flat),
    }
    for key in ("prefill_tok_s", "generate_tok_s", "decode_tok_s"):
        row[key + "_per_device"] = row[key] / n
    return row, out


def main(argv):
    del argv
    devices = jax.devices()
    n = FLAGS.devices or len(devices)
    if not 1 <= n <= len(devices):
        raise ValueError(f"--devices must be in [1, {len(devices)}], got {n}")
    for mode in FLAGS.modes:
        if mode not in ("dp", "tp"):
            raise ValueError(f"--modes entries must be dp or tp, got {mode!r}")
    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[
        FLAGS.dtype or ("float32" if FLAGS.preset == "tiny" else "bfloat16")]
    config = LlamaConfig(**PRESETS[FLAGS.preset])
    compressor = None
    if FLAGS.compressor:
        compressor = getattr(kvjax.compress, FLAGS.compressor)(budget=FLAGS.budget)
    rng = np.random.default_rng(0)
    prompt = rng.integers(0, config.vocab_size, (FLAGS.batch, FLAGS.prompt_len))

    one = sharding.make_mesh(1, 1, devices=devices[:1])
    base, base_out = run_config(config, dtype, one, prompt, compressor)
    base.update(mode="1 device", efficiency=1.0, match=True)
    rows = [base]
    for mode in FLAGS.modes:
        mesh = sharding.make_mesh(*((n, 1) if mode == "dp" else (1, n)), devices=devices[:n])
        tokens = np.tile(prompt, (n, 1)) if mode == "dp" else prompt
        row, out = run_config(config, dtype, mesh, tokens, compressor)
        row.update(
            mode=mode,
            efficiency=row["generate_tok_s_per_device"] / base["generate_tok_s"],
            match=bool(np.array_equal(out[: FLAGS.batch], base_out)),
        )
        rows.append(row)

    print(f"\n{FLAGS.preset} ({jnp.dtype(dtype).name}), prompt {FLAGS.prompt_len}, "
          f"{FLAGS.new_tokens} new tokens, {devices[0].device_kind} x {n}")
    print("| mode | mesh | batch | prefill tok/s/dev | generate tok/s | generate tok/s/dev | "
          "decode tok/s/dev | efficiency | match |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        mesh = "x".join(str(v) for v in r["mesh"].values())
        print(f"| {r['mode']} | {mesh} | {r['batch']} | {r['prefill_tok_s_per_device']:.1f} | "
              f"{r['generate_tok_s']:.1f} | {r['generate_tok_s_per_device']:.1f} | "
              f"{r['decode_tok_s_per_device']:.1f} | {r['efficiency']:.2f} | {r['match']} |")
    if FLAGS.out:
        meta = {"preset": FLAGS.preset, "dtype": jnp.dtype(dtype).name,
                "prompt_len": FLAGS.prompt_len, "new_tokens": FLAGS.new_tokens,
                "compressor": FLAGS.compressor, "budget": FLAGS.budget,
                "device_kind": devices[0].device_kind, "backend": jax.default_backend(),
                "jax": jax.__version__, "host": platform.node()}
        with open(FLAGS.out, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    app.run(main)
