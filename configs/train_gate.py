"""Config of experiments/train_gate.py: TRIM-KV retention gates on a frozen backbone.

    python experiments/train_gate.py --config=configs/train_gate.py \
        --workdir=runs/gate
    python experiments/train_gate.py --config=configs/train_gate.py:tiny --workdir=/tmp/gate

The default backbone is runs/lm_small/export (what `experiments/train_lm.py
--config=configs/lm_small.py --workdir=runs/lm_small` exports; override with
--config.backbone=DIR) trained on its own data mixture (configs/lm_small.py's `data`, fewer
tokens per batch); `:tiny` trains a few CPU steps on kvjax/assets/lm_tiny if shipped, else on a
tiny random model, on synthetic recall sequences.

Keys: see `kvjax.train.default_config` and `kvjax.learned.retention_gate.defaults`.
"""

import os

from kvjax import train
from kvjax.learned import retention_gate

LM_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "lm_small.py")


def get_config(arg: str | None = None):
    c = train.default_config()
    c.backbone = "runs/lm_small/export"  # experiments/train_lm.py --config=configs/lm_small.py
    if os.path.exists(LM_CONFIG):  # train on the backbone's own RULER-style data mixture
        c.data.source = "mixture"
        c.data.mixture = train.lm_mixture_data(LM_CONFIG)
    c.gate = retention_gate.defaults()
    if arg == "tiny":
        train.tiny_overrides(c)
        c.data.source = "recall"
        c.gate.gate_hidden = 16
        c.gate.bias_init = 3.0
        c.gate.memory = 12
        c.gate.remat = False
    elif arg:
        raise ValueError(f"unknown config variant {arg!r}; known: 'tiny'")
    return c
