"""Quickstart: load the shipped byte-level model, compress its KV cache, measure accuracy.

    pip install -e . && python experiments/quickstart.py

Trains nothing: it loads `lm_tiny` (shipped in kvjax/assets, trained by
`experiments/train_lm.py --config=configs/lm_tiny.py`), answers one needle-in-a-haystack prompt
with the full and a compressed cache, then sweeps 3 methods x 3 compression ratios over
single-needle tasks and prints the accuracy table (a few minutes on a laptop CPU).
"""

from __future__ import annotations

import os
import time

from absl import app, flags

import kvjax
from kvjax.eval import methods as M
from kvjax.eval import report, runner, tasks
from kvjax.eval.tokenizer import load_tokenizer

ASSET = os.path.join(os.path.dirname(os.path.abspath(kvjax.__file__)), "assets", "lm_tiny")
PREFERRED = ("streaming_llm", "snapkv", "knorm", "tova", "h2o", "expected_attention")

FLAGS = flags.FLAGS
flags.DEFINE_string("model", ASSET, "HF-format checkpoint directory (default: shipped lm_tiny)")
flags.DEFINE_list("methods", [], "3 compression methods (default: the first of "
                  f"{', '.join(PREFERRED)} that exist, then any other found)")
flags.DEFINE_list("ratios", ["0.25", "0.5", "0.75"], "compression ratios (fraction removed)")
flags.DEFINE_integer("length", 512, "prompt length in tokens")
flags.DEFINE_integer("num_samples", 12, "prompts per task")
flags.DEFINE_string("out", "", "write results.json / results.md / accuracy.png here")


def default_methods(n: int = 3) -> list[str]:
    """Up to `n` landed eviction methods, preferring well-known ones."""
    table = M.method_table()
    found = [m for m in PREFERRED if m in table]
    others = sorted(m for m in table if m not in found and m not in ("full", "identity")
                    and M.takes_ratio(m, table))
    picked = []
    for m in found + others:
        try:
            M.build(m, 0.5, table)
        except (TypeError, ValueError):
            continue
        picked.append(m)
        if len(picked) == n:
            break
    return picked


def main(argv):
    del argv
    start = time.perf_counter()
    model = kvjax.models.load(FLAGS.model)
    tok = load_tokenizer(FLAGS.model)
    c = model.config
    print(f"model: {c.num_hidden_layers} layers, hidden {c.hidden_size}, "
          f"{c.num_attention_heads} query / {c.num_key_value_heads} KV heads, vocab "
          f"{c.vocab_size} (bytes)")

    sample = tasks.make_sample("niah_single_1", seed=7, length=FLAGS.length, tokenizer=tok)
    print(f"\nprompt ({FLAGS.length} tokens), last 120 characters:\n  ...{sample.prompt[-120:]!r}")
    print(f"needle at depth {sample.needles[0].depth:.2f}: {sample.needles[0].text!r}")
    tokens, lengths = runner.encode_prompts([sample], tok, FLAGS.length)
    methods = FLAGS.methods or default_methods()
    for name in ["full"] + methods[:1]:
        comp = M.build(name, 0.5)
        pred = runner.predict(model, tok, [sample], FLAGS.length, comp, 16, 1)[0]
        cache, _ = kvjax.prefill(model, tokens, comp, lengths=lengths)
        print(f"  {name:>14s}: answer {pred!r:14s} cache {kvjax.cache.nbytes(cache) / 1024:.0f} "
              f"KiB")

    print(f"\nsweep: methods {methods} x ratios {FLAGS.ratios} x 3 single-needle tasks")
    results = runner.sweep(
        model, tok, methods=["full"] + methods, ratios=[float(r) for r in FLAGS.ratios],
        tasks=["niah_single_1", "niah_single_2", "niah_single_3"], lengths=[FLAGS.length],
        num_samples=FLAGS.num_samples, batch_size=FLAGS.num_samples,
        results_path=os.path.join(FLAGS.out, "results.json") if FLAGS.out else None,
        log=None)
    print()
    print(report.accuracy_table(results))
    if FLAGS.out:
        with open(os.path.join(FLAGS.out, "results.md"), "w") as f:
            f.write(report.accuracy_table(results))
        report.plot_accuracy(results, os.path.join(FLAGS.out, "accuracy.png"))
    print(f"done in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    app.run(main)
