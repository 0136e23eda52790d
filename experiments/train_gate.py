"""Trains TRIM-KV retention gates on a frozen backbone (kvjax/learned/retention_gate.py).

    python experiments/train_gate.py --config=configs/train_gate.py:tiny --workdir=/tmp/gate
    python experiments/train_gate.py --config=configs/train_gate.py \
        --config.backbone=/path/to/lm_small --config.gate.memory=256 --workdir=runs/gate

Writes WORKDIR/checkpoints (rerun with the same workdir to resume), WORKDIR/metrics.jsonl and
.csv, and the trained gates in WORKDIR/component: `gates = retention_gate.load(path, model)`,
then `kvjax.generate(model, tokens, n, compressor=retention_gate.retention_gate(gates, budget=m))`
(or, in an evaluation sweep, the method name "retention_gate('WORKDIR/component')").
"""

from __future__ import annotations

import os

from kvjax import train as kvtrain
from kvjax.learned import retention_gate


def reference_config():
    """The known keys (configs/train_gate.py's defaults)."""
    c = kvtrain.default_config()
    c.gate = retention_gate.defaults()
    return c


def run(config, workdir: str) -> dict:
    """Trains (or resumes) and saves the gates; returns paths and the metric history."""
    model, batch_fn, tx = kvtrain.setup(config, reference_config())
    g = config["gate"]
    comp_cfg = retention_gate.component_config(model, g["gate_hidden"], g["bias_init"],
                                               config["seed"])
    loss_fn = retention_gate.loss(int(g["memory"]), str(g["mode"]),
                                  float(g["capacity_weight"]), float(g["ce_weight"]),
                                  bool(g["remat"]))
    result = kvtrain.train_from_config(
        retention_gate.build(comp_cfg), model, loss_fn, batch_fn, tx, config, workdir,
        kind=retention_gate.KIND, component_config=comp_cfg)
    path = os.path.join(workdir, "component")
    retention_gate.save(path, result.component, comp_cfg, model)
    print(f"saved retention gates to {path}")
    return {"component": path, "step": result.step, "history": result.history}


if __name__ == "__main__":
    kvtrain.run_cli(run, "training config file", "checkpoints, logs, the trained component")
