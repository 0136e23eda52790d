"""Evaluation: tokenizer, RULER-style tasks, runner, reports."""
