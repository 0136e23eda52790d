"""Training batches for the project's own language models: RULER-style tasks plus filler text.

A batch is a pure function of (data config, step), so a resumed run sees the same data:

    batch = lm_batch(data, step)     # {"tokens": int32[1, B, L], "weights": float32[1, B, L]}

Each step draws one length bucket L from `data.lengths` (by `data.length_weights`) and
B = max(1, data.tokens_per_batch // L) rows, so short buckets train many examples per step and
long ones teach long context. A row is either a task sample (a name in `kvjax.eval.tasks.TASKS`,
drawn by `data.tasks` weights) laid out as

    <bos> prompt target <eos> <pad>...

with the prompt's own length drawn uniformly from [L / 2, L - target - 1] tokens, or a filler
row (weight `data.filler`): haystack text ("essay" or "words", a fifth each) or, for the other
3/5, random strings of 4-32 characters each written twice, whose second copy is predictable
only by looking back: a dense signal for the copying ("induction") heads that retrieval needs
(Olsson et al., 2022), which the needle targets alone teach slowly. `weights` is the loss
weight of predicting each token from the previous ones (aligned with `tokens`, position 0
unused): 1 on the target and <eos>, COPY_WEIGHT on second copies, `data.context_weight` on
other prompt and filler tokens, 0 on padding. Token ids come from the byte tokenizer
(`kvjax.eval.tokenizer.ByteTokenizer`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from kvjax.eval import tasks as T
from kvjax.eval.tokenizer import ByteTokenizer

_FILLER_KINDS = (0.2, 0.2, 0.6)  # essay, words, copy
_ALNUM = "0123456789abcdefghijklmnopqrstuvwxyz-"
COPY_WEIGHT = 0.5  # loss weight of the second copy in copy rows
TARGET_MARGIN = 48  # tokens kept free for the target and <eos> (a uuid target is 38 bytes)


def check_data(data: Mapping[str, Any]) -> None:
    """ValueError naming the first bad key of a data config."""
    lengths = list(data["lengths"])
    if not lengths or any(int(n) < 64 for n in lengths):
        raise ValueError(f"data.lengths must be a non-empty list of ints >= 64, got {lengths}")
    if len(data["length_weights"]) != len(lengths):
        raise ValueError(f"data.length_weights needs {len(lengths)} entries (one per length), "
                         f"got {list(data['length_weights'])}")
    for name in data["tasks"]:
        T.check_task(name)
    total = sum(float(w) for w in data["tasks"].values()) + float(data["filler"])
    if total <= 0:
        raise ValueError("data.tasks weights plus data.filler must be positive")
    if not 0.0 <= float(data["context_weight"]) <= 1.0:
        raise ValueError(f"data.context_weight must be in [0, 1], got {data['context_weight']}")
    if int(data["tokens_per_batch"]) < max(lengths):
        raise ValueError(f"data.tokens_per_batch ({data['tokens_per_batch']}) must be >= the "
                         f"longest length ({max(lengths)})")


def _row(data: Mapping[str, Any], rng: np.random.Generator, length: int, tok: ByteTokenizer
         ) -> tuple[list[int], list[float]]:
    names = list(data["tasks"])
    probs = np.array([float(data["tasks"][n]) for n in names] + [float(data["filler"])])
    pick = int(rng.choice(len(probs), p=probs / probs.sum()))
    ctx_w = float(data["context_weight"])
    if pick == len(names):  # filler language
        kind = ("essay", "words", "copy")[int(rng.choice(3, p=_FILLER_KINDS))]
        if kind == "copy":  # random strings, each written twice: the copy needs look-back
            ids, weights = [tok.bos_id], [0.0]
            while True:
                n = int(rng.integers(4, 33))
                seg = "".join(_ALNUM[i] for i in rng.integers(0, len(_ALNUM), n))
                first, second = tok.encode(f"{seg} "), tok.encode(f"{seg}. ")
                if len(ids) + len(first) + len(second) > length:
                    return ids, weights
                ids += first + second
                weights += [ctx_w] * len(first) + [COPY_WEIGHT] * len(second)
        text = " ".join(T._fill(T.filler_sentences(kind, rng), length - 1, tok))
        ids = [tok.bos_id] + tok.encode(text)
        return ids, [0.0] + [ctx_w] * (len(ids) - 1)
    hi = length - TARGET_MARGIN
    for attempt in range(5):  # a prompt length the task holds (short buckets, long templates)
        n = hi if attempt == 4 else int(rng.integers(max(hi // 2, 1), hi + 1))
        try:
            sample = T.make_sample(names[pick], int(rng.integers(1 << 31)), n, tok)
            break
        except ValueError:
            continue
    else:
        raise ValueError(f"task {names[pick]!r} does not fit in training length {length}; "
                         "drop it from data.tasks or raise data.lengths")
    prompt = [tok.bos_id] + tok.encode(sample.prompt)
    target = tok.encode(sample.target) + [tok.eos_id]
    ids = prompt + target
    weights = [0.0] + [ctx_w] * (len(prompt) - 1) + [1.0] * len(target)
    return ids[:length], weights[:length]


def lm_batch(data: Mapping[str, Any], step: int) -> dict[str, np.ndarray]:
    """{"tokens": int32[1, B, L], "weights": float32[1, B, L]} for `step` (see module doc)."""
    tok = ByteTokenizer()
    rng = np.random.default_rng([int(data["seed"]), int(step)])
    lengths = [int(n) for n in data["lengths"]]
    w = np.array([float(x) for x in data["length_weights"]])
    length = lengths[int(rng.choice(len(lengths), p=w / w.sum()))]
    rows = max(1, int(data["tokens_per_batch"]) // length)
    tokens = np.full((rows, length), tok.pad_id, np.int32)
    weights = np.zeros((rows, length), np.float32)
    for r in range(rows):
        ids, wts = _row(data, rng, length, tok)
        tokens[r, :len(ids)] = ids
        weights[r, :len(wts)] = wts
    return {"tokens": tokens[None], "weights": weights[None]}
