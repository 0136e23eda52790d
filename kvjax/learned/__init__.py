"""Learned compression components (retention gates, Locret) and their shared plumbing.

    gates = kvjax.learned.retention_gate.load("runs/gate/component", model)
    comp = kvjax.learned.retention_gate.retention_gate(gates, budget=512)
    out = kvjax.generate(model, tokens, 32, compressor=comp)                 # one-shot prefill
    out = kvjax.learned.evict.generate(model, tokens, 32, comp, budget=512, chunk_size=256)

Training: `kvjax.train.train` with each method's `loss(...)`; see experiments/train_*.py.
"""

from kvjax.learned import backbone, evict, locret, retention_gate

__all__ = ["backbone", "evict", "locret", "retention_gate"]
