"""Sparse caches and query-aware selection (Quest, Mustafar)."""
