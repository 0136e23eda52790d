"""Config of experiments/evaluate.py: methods x compression ratios x RULER-style tasks x lengths.

    python experiments/evaluate.py --config=configs/eval_ruler.py --workdir=runs/eval_small \
        --config.model=runs/lm_small/export
    python experiments/evaluate.py --config=configs/eval_ruler.py:tiny --workdir=runs/eval_tiny

`model`: an HF-format checkpoint directory (config.json + safetensors + tokenizer.json), or
"asset:lm_tiny" (the shipped model). `methods`: names resolved by `kvjax.eval.methods` ("full",
"snapkv", "kivi2", "chain(snapkv,kivi4)", "snapkv(window=32)", ...); "all" expands to every
eviction method found in kvjax.compress that needs no extra argument. `ratios`: compression
ratios (fraction of the cache removed, kvpress semantics). Sequences are tuples (override as
--config.methods="('full','snapkv')"). Rerunning with the same workdir resumes the sweep.
"""

import ml_collections

SUITE = ("niah_single_1", "niah_single_2", "niah_single_3", "niah_multikey", "niah_multivalue",
         "niah_multiquery", "vt", "cwe", "fwe")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.model = ""
    c.dtype = ""  # parameter/compute dtype; default the checkpoint's
    c.methods = ("full", "all")
    c.ratios = (0.25, 0.5, 0.75, 0.9)
    c.tasks = SUITE
    c.lengths = (4096,)
    c.num_samples = 50
    c.batch_size = 25
    c.seed = 0
    c.title = ""
    c.time_limit_s = 0.0  # >0: start no new cell after this many seconds (rerun to resume)
    if arg == "tiny":
        c.model = "asset:lm_tiny"
        c.ratios = (0.25, 0.5, 0.75)
        c.tasks = ("niah_single_1", "niah_single_2", "niah_single_3")
        c.lengths = (512,)
        c.num_samples = 20
        c.batch_size = 20
    elif arg:
        raise ValueError(f"unknown config variant {arg!r}; known: 'tiny'")
    return c
