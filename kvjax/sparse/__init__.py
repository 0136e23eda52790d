"""Sparse caches and query-aware selection (Quest, Mustafar).

    kvjax.sparse.quest(token_budget=1024, page_size=16)   # attention reads the top pages
    kvjax.sparse.mustafar.mustafar(sparsity=0.5)          # per-token magnitude pruning
"""

from kvjax.sparse import mustafar
from kvjax.sparse.mustafar import MustafarLayerCache
from kvjax.sparse.quest import QuestLayerCache, quest

__all__ = ["MustafarLayerCache", "QuestLayerCache", "mustafar", "quest"]
