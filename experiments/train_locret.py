"""Trains Locret retaining heads on a frozen backbone (kvjax/learned/locret.py).

    python experiments/train_locret.py --config=configs/train_locret.py:tiny --workdir=/tmp/lr
    python experiments/train_locret.py --config=configs/train_locret.py \
        --config.backbone=/path/to/lm_small --workdir=runs/locret

Writes WORKDIR/checkpoints (rerun with the same workdir to resume), WORKDIR/metrics.jsonl and
.csv, and the trained heads in WORKDIR/component: `heads = locret.load(path, model)`, then
`kvjax.learned.evict.generate(model, tokens, n, locret.locret(heads, budget=b, stabilizers=s),
budget=b, chunk_size=...)`, `kvjax.generate(..., compressor=locret.locret(...))`, or in an
evaluation sweep the method name "locret('WORKDIR/component', stabilizers=s)".
"""

from __future__ import annotations

import os

from kvjax import train as kvtrain
from kvjax.learned import locret


def reference_config():
    """The known keys (configs/train_locret.py's defaults)."""
    c = kvtrain.default_config()
    c.locret = locret.defaults()
    return c


def run(config, workdir: str) -> dict:
    """Trains (or resumes) and saves the heads; returns paths and the metric history."""
    model, batch_fn, tx = kvtrain.setup(config, reference_config())
    lc = config["locret"]
    seq_len = int(config["data"]["seq_len"])
    kvtrain.check_int("locret.query_window", lc["query_window"], 1, seq_len - 1)
    comp_cfg = locret.component_config(model, lc["head_hidden"], config["seed"])
    loss_fn = locret.loss(int(lc["query_window"]), str(lc["target"]), float(lc["smooth_weight"]))
    result = kvtrain.train_from_config(
        locret.build(comp_cfg), model, loss_fn, batch_fn, tx, config, workdir,
        kind=locret.KIND, component_config=comp_cfg)
    path = os.path.join(workdir, "component")
    locret.save(path, result.component, comp_cfg, model)
    print(f"saved retaining heads to {path}")
    return {"component": path, "step": result.step, "history": result.history}


if __name__ == "__main__":
    kvtrain.run_cli(run, "training config file", "checkpoints, logs, the trained component")
