"""Low-rank and channel-pruned caches (ThinK, SVD, MatryoshkaKV)."""
