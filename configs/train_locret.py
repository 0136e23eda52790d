"""Config of experiments/train_locret.py: Locret retaining heads on a frozen backbone.

    python experiments/train_locret.py --config=configs/train_locret.py \
        --workdir=runs/locret
    python experiments/train_locret.py --config=configs/train_locret.py:tiny --workdir=/tmp/lr

Optimizer defaults follow the reference code (AdamW 5e-4, betas 0.9/0.95, linear warmup and
decay; the reference clips gradient values at 0.5, here the global norm). Keys: see
`kvjax.train.default_config` and `kvjax.learned.locret.defaults`.
"""

import os

from kvjax import train
from kvjax.learned import locret

LM_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "lm_small.py")


def get_config(arg: str | None = None):
    c = train.lm_backbone_config(LM_CONFIG)  # runs/lm_small/export on its own data mixture
    c.lr = 5e-4
    c.b2 = 0.95
    c.schedule = "linear"
    c.clip_norm = 0.5
    c.locret = locret.defaults()
    if arg == "tiny":
        train.tiny_overrides(c)
        c.locret.head_hidden = 16
        c.locret.query_window = 8
    elif arg:
        raise ValueError(f"unknown config variant {arg!r}; known: 'tiny'")
    return c
