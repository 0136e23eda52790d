"""Config of experiments/train_gate.py: TRIM-KV retention gates on a frozen backbone.

    python experiments/train_gate.py --config=configs/train_gate.py \
        --workdir=runs/gate
    python experiments/train_gate.py --config=configs/train_gate.py:tiny --workdir=/tmp/gate

Backbone and data: `kvjax.train.lm_backbone_config` (runs/lm_small/export on its own data
mixture; override with --config.backbone=DIR); `:tiny`: `kvjax.train.tiny_overrides` (a few
CPU steps on a tiny backbone, synthetic recall sequences).

Keys: see `kvjax.train.default_config` and `kvjax.learned.retention_gate.defaults`.
"""

import os

from kvjax import train
from kvjax.learned import retention_gate

LM_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "lm_small.py")


def get_config(arg: str | None = None):
    c = train.lm_backbone_config(LM_CONFIG)  # runs/lm_small/export on its own data mixture
    c.gate = retention_gate.defaults()
    if arg == "tiny":
        train.tiny_overrides(c)
        c.gate.gate_hidden = 16
        c.gate.bias_init = 3.0
        c.gate.memory = 12
        c.gate.remat = False
    elif arg:
        raise ValueError(f"unknown config variant {arg!r}; known: 'tiny'")
    return c
