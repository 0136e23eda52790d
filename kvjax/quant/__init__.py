"""Quantized KV caches (KIVI, mixed precision)."""
