"""Which share of a needle's tokens each compressor keeps, per layer and KV head.

    python experiments/needle_coverage.py --model=runs/lm_small/export \
        --locret=runs/learned/train/locret/component --ratio=0.9 --seeds=3

Prefills niah_single_1 prompts (4096 tokens) with each method at `--ratio` and prints, for
every layer, the fraction of the needle sentence's token positions that survive in each KV head
(the byte tokenizer maps one character to one token). Used in docs/results.md to see where
Locret's selection differs from SnapKV's.
"""

from __future__ import annotations

import argparse

import numpy as np

import kvjax
from kvjax.compress import snapkv
from kvjax.eval import tasks
from kvjax.eval.tokenizer import ByteTokenizer
from kvjax.learned import locret


def coverage(cache, start: int, size: int) -> list[list[float]]:
    """[layer][head] share of slots [start, start + size) kept (row 0)."""
    span = set(range(start, start + size))
    return [[len(span & set(p.tolist())) / size for p in np.asarray(layer.positions)[0]]
            for layer in cache.layers]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--locret", required=True, help="a saved Locret component directory")
    ap.add_argument("--ratio", type=float, default=0.9)
    ap.add_argument("--length", type=int, default=4096)
    ap.add_argument("--seeds", type=int, default=3)
    args = ap.parse_args(argv)
    tok = ByteTokenizer()
    model = kvjax.models.load(args.model)
    methods = {"locret": locret.locret(locret.load(args.locret), compression_ratio=args.ratio,
                                       stabilizers=64),
               "snapkv": snapkv(compression_ratio=args.ratio)}
    for seed in range(args.seeds):
        s = tasks.make_sample("niah_single_1", seed, args.length, tok)
        ids = np.asarray(tok.encode(s.prompt))[None]
        needle = s.needles[0]
        start = needle.offset + ids.shape[1] - len(s.prompt.encode())  # (leading specials)
        print(f"seed {seed}: {needle.text!r} at token {start}")
        for name, comp in methods.items():
            cache, _ = kvjax.prefill(model, ids, comp)
            for i, row in enumerate(coverage(cache, start, len(needle.text))):
                print(f"  {name:7s} layer {i}: {np.round(row, 2).tolist()}")


if __name__ == "__main__":
    main()
