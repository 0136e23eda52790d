"""Config of experiments/train_matryoshka.py: MatryoshkaKV orthogonal projections.

    python experiments/train_matryoshka.py --config=configs/train_matryoshka.py \
        --workdir=runs/matryoshka
    python experiments/train_matryoshka.py --config=configs/train_matryoshka.py:tiny \
        --workdir=/tmp/mk

The default backbone is runs/lm_small/export (what `experiments/train_lm.py
--config=configs/lm_small.py --workdir=runs/lm_small` exports; override with
--config.backbone=DIR) trained on its own data mixture (configs/lm_small.py's `data`, fewer
tokens per batch); `:tiny` trains a few CPU steps on kvjax/assets/lm_tiny if shipped, else on a
tiny random model, on synthetic recall sequences.

Keys: see `kvjax.train.default_config` and `kvjax.lowrank.matryoshka.defaults`.
"""

import os

from kvjax import train
from kvjax.lowrank import matryoshka

LM_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "lm_small.py")


def get_config(arg: str | None = None):
    c = train.default_config()
    c.backbone = "runs/lm_small/export"  # experiments/train_lm.py --config=configs/lm_small.py
    if os.path.exists(LM_CONFIG):  # train on the backbone's own RULER-style data mixture
        c.data.source = "mixture"
        c.data.mixture = train.lm_mixture_data(LM_CONFIG)
    c.lr = 1e-3
    c.matryoshka = matryoshka.defaults()
    if arg == "tiny":
        train.tiny_overrides(c)
        c.data.source = "recall"
        c.lr = 1e-3
        c.matryoshka.pca_batches = 1
        c.matryoshka.remat = False
    elif arg:
        raise ValueError(f"unknown config variant {arg!r}; known: 'tiny'")
    return c
