"""kvjax: KV-cache compression for LLM inference in JAX."""

from kvjax import attention, cache, compress, eval, learned, lowrank, models, quant, rope, sparse
from kvjax.generate import decode_step, generate, prefill, sample

__version__ = "0.1.0"

__all__ = [
    "attention",
    "cache",
    "compress",
    "decode_step",
    "eval",
    "learned",
    "lowrank",
    "generate",
    "models",
    "prefill",
    "quant",
    "rope",
    "sample",
    "sparse",
]
