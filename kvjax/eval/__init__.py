"""Evaluation: byte-level tokenizer, RULER-style tasks, training mixture, runner, reports.

    from kvjax.eval import tasks, runner, report
    tok = kvjax.eval.load_tokenizer(path)                 # or kvjax.eval.ByteTokenizer()
    sample = tasks.make_sample("niah_single_1", seed=0, length=512, tokenizer=tok)
    results = runner.sweep(model, tok, methods=["full", "snapkv"], ratios=[0.5], ...)
"""

from kvjax.eval import methods, mixture, report, runner, tasks
from kvjax.eval.tasks import TASKS, Sample, load_longbench, make_sample, make_samples, score
from kvjax.eval.tokenizer import ByteTokenizer, HFTokenizer, Tokenizer, load_tokenizer

__all__ = [
    "TASKS",
    "ByteTokenizer",
    "HFTokenizer",
    "Sample",
    "Tokenizer",
    "load_longbench",
    "load_tokenizer",
    "make_sample",
    "make_samples",
    "methods",
    "mixture",
    "report",
    "runner",
    "score",
    "tasks",
]
