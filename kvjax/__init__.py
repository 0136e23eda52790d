"""kvjax: KV-cache compression for LLM inference in JAX."""

from kvjax import attention, cache, compress, models, rope
from kvjax.generate import decode_step, generate, prefill, sample

__version__ = "0.1.0"

__all__ = [
    "attention",
    "cache",
    "compress",
    "decode_step",
    "generate",
    "models",
    "prefill",
    "rope",
    "sample",
]
