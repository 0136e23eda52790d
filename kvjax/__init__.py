"""kvjax: KV-cache compression for LLM inference in JAX."""

from kvjax import (
    attention,
    cache,
    compress,
    eval,
    headwise,
    learned,
    lowrank,
    models,
    quant,
    rope,
    sharding,
    sparse,
)
from kvjax.generate import decode_step, generate, prefill, sample

__version__ = "0.1.0"

__all__ = [
    "attention",
    "cache",
    "compress",
    "decode_step",
    "eval",
    "headwise",
    "learned",
    "lowrank",
    "generate",
    "models",
    "prefill",
    "quant",
    "rope",
    "sample",
    "sharding",
    "sparse",
]
