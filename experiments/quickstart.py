"""Quickstart: build a tiny random Llama, prefill, compress, generate, print memory.

    python experiments/quickstart.py
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx

import kvjax
from kvjax.models import Llama, LlamaConfig

FLAGS = flags.FLAGS
flags.DEFINE_integer("prompt_len", 256, "prompt length in tokens")
flags.DEFINE_integer("batch", 2, "batch size")
flags.DEFINE_integer("new_tokens", 16, "tokens to generate")


def main(argv):
    del argv
    model = Llama(LlamaConfig.tiny(num_hidden_layers=4), rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, model.config.vocab_size, (FLAGS.batch, FLAGS.prompt_len))
    compressor = kvjax.compress.identity()
    cache, logits = kvjax.prefill(model, tokens, compressor=compressor)
    print(f"prefill: {FLAGS.batch} x {FLAGS.prompt_len} tokens, logits {logits.shape}")
    print(f"cache: {cache.num_layers} layers, lengths {np.asarray(cache.layers[0].lengths[0])}, "
          f"{kvjax.cache.nbytes(cache) / 2**10:.1f} KiB")
    out = kvjax.generate(model, tokens, FLAGS.new_tokens, compressor=compressor)
    print(f"generated: {np.asarray(out[:, FLAGS.prompt_len:])}")
    print(f"backend: {jax.default_backend()}, dtype {jnp.dtype(model.dtype).name}")


if __name__ == "__main__":
    app.run(main)
