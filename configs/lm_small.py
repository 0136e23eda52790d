"""lm_small: the project's GPU-trained byte-level Llama for accuracy benchmarks (4k context).

    python experiments/train_lm.py --config=configs/lm_small.py --workdir=runs/lm_small

Trains in 3.4 minutes on one H100 (bf16 compute, cuDNN flash attention; measured: 5000 steps of
64k tokens at 1.84M tokens/s) on the whole RULER-style suite at 512-4096 tokens plus filler text
and copy drills; full-cache accuracy at 4096 tokens: 92.2% average over the 9 tasks (see
docs/results.md). `time_limit_s` ends training between checkpoints if the GPU is slower.
Evaluate with `experiments/evaluate.py --config=configs/eval_ruler.py
--config.model=runs/lm_small/export`.
`:cpu_check` runs the same code path in a minute on a CPU (pipeline check only).
"""

import ml_collections

from kvjax import train

SUITE = ("niah_single_1", "niah_single_2", "niah_single_3", "niah_multikey", "niah_multivalue",
         "niah_multiquery", "vt", "cwe", "fwe")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = train.lm_config(dict(
        hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=8,
        num_key_value_heads=4, head_dim=32, rope_theta=100000.0, max_position_embeddings=4096,
        tie_word_embeddings=True))
    c.compute_dtype = "bfloat16"
    c.steps = 5000
    c.lr = 2e-3
    c.checkpoint_every = 1000
    c.log_every = 250
    c.data_workers = 12
    c.data = ml_collections.ConfigDict(dict(
        seed=1, lengths=(512, 1024, 2048, 4096), length_weights=(0.3, 0.2, 0.2, 0.3),
        tokens_per_batch=65536, tasks={t: 1.0 for t in SUITE}, filler=2.0,
        context_weight=0.1))
    c.eval = ml_collections.ConfigDict(dict(
        tasks=SUITE, lengths=(4096,), num_samples=50, batch_size=50, seed=0))
    if arg == "cpu_check":
        c.compute_dtype = "float32"
        c.model.update(hidden_size=64, intermediate_size=128, num_hidden_layers=2)
        c.steps = 4
        c.warmup_steps = 0
        c.checkpoint_every = 2
        c.log_every = 1
        c.time_limit_s = 600.0
        c.data_workers = 2
        c.data.lengths = (1024,)
        c.data.length_weights = (1.0,)
        c.data.tokens_per_batch = 2048
        c.eval.lengths = (1024,)
        c.eval.num_samples = 2
        c.eval.batch_size = 2
    elif arg:
        raise ValueError(f"unknown config variant {arg!r}; known: 'cpu_check'")
    return c
