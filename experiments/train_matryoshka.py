"""Trains MatryoshkaKV projections on a frozen backbone (kvjax/lowrank/matryoshka.py).

    python experiments/train_matryoshka.py --config=configs/train_matryoshka.py:tiny \
        --workdir=/tmp/mk
    python experiments/train_matryoshka.py --config=configs/train_matryoshka.py \
        --config.backbone=/path/to/lm_small --workdir=runs/matryoshka

Starts from PCA of the backbone's keys/values (saved untrained as WORKDIR/pca, the plain PCA
truncation baseline), writes WORKDIR/checkpoints (rerun to resume), WORKDIR/metrics.jsonl and
.csv, and the trained projections in WORKDIR/component: `proj = matryoshka.load(path, model)`,
then `kvjax.generate(..., compressor=matryoshka.matryoshka(proj, key_rank=r, value_rank=r))`,
or in an evaluation sweep "matryoshka('WORKDIR/component')" vs "matryoshka('WORKDIR/pca')".
"""

from __future__ import annotations

import os

from kvjax import train as kvtrain
from kvjax.lowrank import matryoshka


def reference_config():
    """The known keys (configs/train_matryoshka.py's defaults)."""
    c = kvtrain.default_config()
    c.matryoshka = matryoshka.defaults()
    return c


def run(config, workdir: str) -> dict:
    """PCA-initialises, trains (or resumes) and saves the projections."""
    model, batch_fn, tx = kvtrain.setup(config, reference_config())
    mc = config["matryoshka"]
    fractions = tuple(float(f) for f in mc["rank_fractions"])
    matryoshka.rank_choices(model.config.head_dim, fractions)  # validates
    n_pca = kvtrain.check_int("matryoshka.pca_batches", mc["pca_batches"], 1)
    calib = kvtrain.make_batch_fn(config["data"], model.config.vocab_size, 1)
    far = 1 << 30  # calibration batches: steps no training run reaches
    proj = matryoshka.pca_init(model, (calib(far + i)["tokens"][0] for i in range(n_pca)))
    matryoshka.save(os.path.join(workdir, "pca"), proj, model)
    loss_fn = matryoshka.loss(fractions, float(mc["ce_weight"]), bool(mc["remat"]))
    result = kvtrain.train_from_config(
        proj, model, loss_fn, batch_fn, tx, config, workdir, kind=matryoshka.KIND,
        component_config=matryoshka.component_config(model))
    path = os.path.join(workdir, "component")
    matryoshka.save(path, result.component, model)
    print(f"saved MatryoshkaKV projections to {path} (PCA baseline: {workdir}/pca)")
    return {"component": path, "pca": os.path.join(workdir, "pca"), "step": result.step,
            "history": result.history}


if __name__ == "__main__":
    kvtrain.run_cli(run, "training config file", "checkpoints, logs, the trained component")
