"""lm_tiny: the project's small byte-level Llama, shipped as `kvjax/assets/lm_tiny`.

    python experiments/train_lm.py --config=configs/lm_tiny.py:gpu --workdir=runs/lm_tiny_gpu
    python experiments/train_lm.py --config=configs/lm_tiny.py:cpu_finetune --workdir=runs/ft

4 layers, hidden 128 (0.8M parameters, 3.3 MB), single-needle retrieval (RULER niah_single_1/2/3)
at 256-512 tokens. The shipped weights: 500 steps of `:gpu` (31 s on one H100) then CPU
fine-tuning with `:cpu_finetune` (docs/results.md has the exact commands and accuracies). The
plain config is the same recipe at CPU batch sizes; from scratch on a 2-core CPU it needs an
estimated 20-60 minutes before retrieval emerges (not run to completion; ~13M tokens at the
4-10k tokens/s measured here). `:micro` is a few steps of a smaller model, for tests.
"""

import ml_collections

from kvjax import train


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = train.lm_config(dict(  # keys and common defaults: kvjax.train.lm_config
        hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, rope_theta=10000.0, max_position_embeddings=1024,
        tie_word_embeddings=True))
    c.data = ml_collections.ConfigDict(dict(
        seed=1, lengths=(256, 512), length_weights=(1.0, 1.0), tokens_per_batch=4096,
        tasks={"niah_single_1": 1.0, "niah_single_2": 1.0, "niah_single_3": 1.0},
        filler=2.0, context_weight=0.1))
    c.eval = ml_collections.ConfigDict(dict(
        tasks=("niah_single_1", "niah_single_2", "niah_single_3"), lengths=(256, 512),
        num_samples=50, batch_size=25, seed=0))
    if arg == "gpu":  # the same model and data, bigger batches: about a minute on one H100
        c.steps = 1500
        c.data.tokens_per_batch = 32768
        c.compute_dtype = "bfloat16"
        c.data_workers = 6
        c.checkpoint_every = 500
        c.log_every = 50
    elif arg == "cpu_finetune":  # continue a (time-limited) `:gpu` run on the CPU
        c.init_from = "runs/lm_tiny_gpu/export"
        c.steps = 400
        c.lr = 1e-3
        c.warmup_steps = 20
        c.checkpoint_every = 100
        c.data.seed = 2
        c.data.tasks = {"niah_single_1": 0.5, "niah_single_2": 2.0, "niah_single_3": 1.0}
        c.data.filler = 1.0
    elif arg == "micro":
        c.model.update(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=2,
                       num_key_value_heads=1, head_dim=16)
        c.steps = 3
        c.warmup_steps = 0
        c.checkpoint_every = 2
        c.log_every = 1
        c.data.lengths = (256,)
        c.data.length_weights = (1.0,)
        c.data.tokens_per_batch = 512
        c.data.tasks = {"niah_single_1": 1.0}
        c.eval.tasks = ("niah_single_1",)
        c.eval.lengths = (256,)
        c.eval.num_samples = 2
        c.eval.batch_size = 2
    elif arg:
        raise ValueError(f"unknown config variant {arg!r}; known: 'gpu', 'cpu_finetune', 'micro'")
    return c
