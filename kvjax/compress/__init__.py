"""Compression transforms: each method is a `Compressor` over one layer's cache."""

from kvjax.compress.base import (
    Compressor,
    Observation,
    chain,
    identity,
    keep_topk,
    valid_slots,
)

__all__ = ["Compressor", "Observation", "chain", "identity", "keep_topk", "valid_slots"]
