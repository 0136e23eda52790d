"""Low-rank and channel-pruned caches (ThinK, SVD, MatryoshkaKV)."""

from kvjax.lowrank import matryoshka
from kvjax.lowrank.matryoshka import LowRankLayerCache
from kvjax.lowrank.matryoshka import matryoshka as matryoshka_kv
from kvjax.lowrank.svd import SVDLayerCache, svd
from kvjax.lowrank.think import ThinKLayerCache, think

__all__ = [
    "LowRankLayerCache",
    "SVDLayerCache",
    "ThinKLayerCache",
    "matryoshka",
    "matryoshka_kv",
    "svd",
    "think",
]
