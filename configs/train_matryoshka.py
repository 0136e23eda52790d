"""Config of experiments/train_matryoshka.py: MatryoshkaKV orthogonal projections.

    python experiments/train_matryoshka.py --config=configs/train_matryoshka.py \
        --workdir=runs/matryoshka
    python experiments/train_matryoshka.py --config=configs/train_matryoshka.py:tiny \
        --workdir=/tmp/mk

Backbone and data: `kvjax.train.lm_backbone_config` (runs/lm_small/export on its own data
mixture; override with --config.backbone=DIR); `:tiny`: `kvjax.train.tiny_overrides` (a few
CPU steps on a tiny backbone, synthetic recall sequences).

Keys: see `kvjax.train.default_config` and `kvjax.lowrank.matryoshka.defaults`.
"""

import os

from kvjax import train
from kvjax.lowrank import matryoshka

LM_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "lm_small.py")


def get_config(arg: str | None = None):
    c = train.lm_backbone_config(LM_CONFIG)  # runs/lm_small/export on its own data mixture
    c.lr = 1e-3
    c.matryoshka = matryoshka.defaults()
    if arg == "tiny":
        train.tiny_overrides(c)
        c.lr = 1e-3
        c.matryoshka.pca_batches = 1
        c.matryoshka.remat = False
    elif arg:
        raise ValueError(f"unknown config variant {arg!r}; known: 'tiny'")
    return c
