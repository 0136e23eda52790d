"""Quantized KV caches (KIVI, mixed precision).

    kvjax.quant.kivi(bits=2, group_size=32, residual=128)       # a Compressor
    kvjax.quant.mixed_precision(scorer, high_fraction=0.2, high_bits=8, low_bits=2)
"""

from kvjax.quant import packing
from kvjax.quant.kivi import QuantizedLayerCache, from_dense, kivi, quantized_attend
from kvjax.quant.mixed import MixedPrecisionLayerCache, mixed_attend, mixed_precision

__all__ = [
    "MixedPrecisionLayerCache",
    "QuantizedLayerCache",
    "from_dense",
    "kivi",
    "mixed_attend",
    "mixed_precision",
    "packing",
    "quantized_attend",
]
