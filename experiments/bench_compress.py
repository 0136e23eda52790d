"""Prefill vs compression time per eviction method on a Llama-3-8B-shaped random model.

    python experiments/bench_compress.py                       # 4k and 32k context, GPU
    python experiments/bench_compress.py --contexts=4096 --methods=snapkv,h2o --layers=4
    python experiments/bench_compress.py --tiny                # seconds on CPU (smoke test)

The model has Llama-3-8B's shapes (hidden 4096, 32 query / 8 KV heads, head dim 128, MLP 14336,
vocab 128256, Llama-3 RoPE) in bfloat16 with random weights, but only `--layers` layers (default
2) so it fits next to 32k-token activations and compiles fast; both timings scale linearly
with the layer count, so the ratio is representative. For each context length:

  prefill    jit(kvjax.prefill) without compression (reference attention, chunked into
             query blocks by `kvjax.attention`)
  compress   jit of every layer's `compressor.prefill` on the prefilled caches and the
             layers' observations (captured once), i.e. scoring + top-k + gather alone

Both are medians of `--repeats` runs after one warm-up (compile) run; the table reports
compress / prefill. `--out` writes the rows as JSON.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import kvjax
from kvjax import compress as C
from kvjax.compress.base import Compressor, Observation
from kvjax.models import Llama, LlamaConfig

LLAMA3_8B = dict(
    vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
    num_key_value_heads=8, head_dim=128, rope_theta=500000.0, rms_norm_eps=1e-5,
    max_position_embeddings=131072,
    rope_scaling=tuple(sorted({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                               "high_freq_factor": 4.0,
                               "original_max_position_embeddings": 8192}.items())),
)
TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16)


def methods(ratio: float, num_layers: int, num_kv_heads: int) -> dict[str, Compressor]:
    """The benchmarked compressors at `ratio` (kvpress defaults otherwise)."""
    profile = np.random.default_rng(0).random((num_layers, num_kv_heads))
    return {
        "streaming_llm": C.streaming_llm(ratio),
        "snapkv": C.snapkv(ratio),
        "tova": C.tova(ratio),
        "knorm": C.knorm(ratio),
        "h2o": C.h2o(ratio),
        "expected_attention": C.expected_attention(ratio),
        "pyramidkv": C.pyramidkv(ratio),
        "chunkkv": C.chunkkv(ratio),
        "duo_attention": C.duo_attention(profile, ratio, sink_size=128, recent_size=256),
    }


def _capture() -> Compressor:
    """Keeps the cache; returns the observation's arrays as the layer state."""

    def prefill(cache, obs, state):
        return cache, (obs.queries, obs.raw_queries, obs.query_positions, obs.hidden,
                       obs.inv_freq)

    return Compressor(init=lambda c: (), prefill=prefill, decode=lambda c, o, s: (c, s))


def _median_time(fn: Callable[[], Any], repeats: int) -> float:
    jax.block_until_ready(fn())  # compile + warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run(
    contexts: Sequence[int] = (4096, 32768),
    num_layers: int = 2,
    names: Sequence[str] | None = None,
    ratio: float = 0.5,
    repeats: int = 3,
    tiny: bool = False,
    batch: int = 1,
    log: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """Runs the benchmark; returns one row per (context, method)."""
    shape = TINY if tiny else LLAMA3_8B
    dtype = jnp.float32 if tiny else jnp.bfloat16
    config = LlamaConfig(num_hidden_layers=num_layers, **shape)
    model = Llama(config, rngs=nnx.Rngs(0), dtype=dtype)
    table = methods(ratio, num_layers, config.num_key_value_heads)
    unknown = sorted(set(names or ()) - set(table))
    if unknown:
        raise ValueError(f"unknown methods {unknown}; known: {sorted(table)}")
    chosen = {n: table[n] for n in (names or table)}
    rows = []
    for t in contexts:
        tokens = np.random.default_rng(t).integers(0, config.vocab_size, (batch, t))
        prefill_s = _median_time(lambda tokens=tokens: kvjax.prefill(model, tokens)[1], repeats)
        cache, _, states = kvjax.prefill(model, tokens, compressor=_capture(), return_state=True)
        full_bytes = kvjax.cache.nbytes(cache)
        log(f"context {t}: prefill {prefill_s * 1e3:.1f} ms, cache {full_bytes / 2**20:.1f} MiB "
            f"({num_layers} layers, {jax.default_backend()})")
        for name, comp in chosen.items():
            fn = jax.jit(_compress_all, static_argnames=("comp", "num_layers", "scale", "window"))

            def call(fn=fn, comp=comp, layers=cache.layers, states=states):
                return fn(layers, states, comp=comp, num_layers=num_layers,
                          scale=config.head_dim**-0.5, window=config.sliding_window)

            compress_s = _median_time(call, repeats)
            kept = kvjax.cache.nbytes(call())
            rows.append(dict(context=t, method=name, layers=num_layers, batch=batch,
                             prefill_ms=prefill_s * 1e3, compress_ms=compress_s * 1e3,
                             fraction=compress_s / prefill_s, bytes_kept=kept / full_bytes,
                             backend=jax.default_backend()))
            log(f"  {name:20s} compress {compress_s * 1e3:9.2f} ms = "
                f"{compress_s / prefill_s:7.2%} of prefill, memory kept {kept / full_bytes:.2f}")
    return rows


def _compress_all(layers, states, *, comp, num_layers, scale, window):
    out = []
    for i, (layer, s) in enumerate(zip(layers, states)):
        obs = Observation(queries=s[0], raw_queries=s[1], query_positions=s[2], hidden=s[3],
                          inv_freq=s[4], layer=i, num_layers=num_layers, scale=scale,
                          sliding_window=window)
        out.append(comp.prefill(layer, obs, comp.init(layer))[0])
    return tuple(out)


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| context | method | prefill ms | compress ms | compress / prefill | memory kept |",
             "|---:|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['context']} | {r['method']} | {r['prefill_ms']:.1f} | "
                     f"{r['compress_ms']:.2f} | {r['fraction']:.2%} | {r['bytes_kept']:.2f} |")
    return "\n".join(lines)


def main(argv: Sequence[str]) -> None:
    del argv
    f = flags.FLAGS
    contexts = [int(c) for c in f.contexts] if f.contexts else ([128, 256] if f.tiny
                                                                  else [4096, 32768])
    rows = run(contexts, f.layers, f.methods or None, f.ratio, f.repeats, f.tiny, f.batch)
    print(markdown(rows))
    if f.out:
        with open(f.out, "w") as fh:
            json.dump(rows, fh, indent=2)


if __name__ == "__main__":
    from absl import app, flags

    flags.DEFINE_list("contexts", None, "prompt lengths (default 4096,32768; tiny: 128,256)")
    flags.DEFINE_integer("layers", 2, "decoder layers of the Llama-3-8B-shaped model")
    flags.DEFINE_list("methods", None, "subset of methods (default all)")
    flags.DEFINE_float("ratio", 0.5, "compression_ratio for every method")
    flags.DEFINE_integer("repeats", 3, "timed runs per measurement (median)")
    flags.DEFINE_integer("batch", 1, "batch size")
    flags.DEFINE_bool("tiny", False, "tiny float32 model, short contexts (CPU smoke test)")
    flags.DEFINE_string("out", None, "write the rows as JSON here")
    app.run(main)
