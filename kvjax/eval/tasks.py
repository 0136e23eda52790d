"""RULER-style long-context tasks, a LongBench-format loader, and RULER's scoring.

RULER (Hsieh et al., 2024, "RULER: What's the Real Context Size of Your Long-Context Language
Models?") builds synthetic prompts of a chosen length in tokens: needles hidden at chosen depths
of a haystack (needle-in-a-haystack with one or several keys, values or queries), variable
tracking (a chain of assignments), and aggregation (common-words and frequent-words extraction).
This module generates the same kinds of prompts, deterministically from a seed:

    sample = make_sample("niah_single_1", seed=0, length=512, tokenizer=ByteTokenizer())
    sample.prompt        # ends with the answer prefix; the model continues it
    sample.answers       # the references; score(sample, prediction) in [0, 1]
    sample.needles       # (text, key, value, depth, offset) of every inserted needle

`length` is a budget in tokens of `tokenizer` (the beginning-of-sequence token included when the
tokenizer has one): the prompt never exceeds it and fills it to within one filler sentence.
Haystacks are RULER's repeated "noise" sentences, sentences drawn from the word list shipped in
`kvjax/assets/text/words.txt`, or the project's own essays (`kvjax/assets/text/essays.txt`).
Templates are shortened RULER templates (the project's byte-level models have short contexts):
the prompt ends with an answer prefix (for needles it mirrors the needle, as RULER's does).

Task presets (`TASKS`), after RULER's synthetic suite:
  niah_single_1/2/3    one needle; haystack noise/words/essay; value number/word/uuid
  niah_multikey        one queried needle among 4 needles with other keys
  niah_multivalue      one key with 4 values; all are asked for
  niah_multiquery      4 needles; the values of all 4 keys are asked for
  vt                   variable tracking: 1 chain of 4 hops (5 variables) in noise
  cwe                  common words: the 10 (scaled down for short lengths) most common words of
                       a numbered list (each 30 times, others 3 times; scaled likewise)
  fwe                  frequent words: the 3 most frequent coded words of Zipf(2) text

Scoring (RULER `string_match_all`): the fraction of references that occur in the prediction,
case-insensitively; `string_match_part` (any reference) and LongBench's token F1 are also here.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import json
import os
import re
import string
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import numpy as np

from kvjax.eval.tokenizer import Tokenizer

TEXT_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets",
                        "text")
NOISE = ("The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.",
         "There and back again.")
HAYSTACKS = ("noise", "words", "essay")
VALUE_TYPES = ("number", "word", "uuid")


class Needle(NamedTuple):
    """One inserted needle: its text, key and value, depth in [0, 1] (the fraction of the
    haystack's characters before it) and character offset in the prompt."""

    text: str
    key: str
    value: str
    depth: float
    offset: int


class Sample(NamedTuple):
    """A prompt with its references.

    task: task name; seed, length: what generated it (length 0 for loaded data);
    prompt: the text the model continues; answers: the references; target: the canonical
    completion (used for training; ends the answer, the model then emits end-of-sequence);
    needles: the needles in the prompt; metric: "match_all", "match_part" or "qa_f1".
    """

    task: str
    seed: int
    length: int
    prompt: str
    answers: tuple[str, ...]
    target: str
    needles: tuple[Needle, ...] = ()
    metric: str = "match_all"


# --- word lists and filler -----------------------------------------------------------------


@functools.cache
def words() -> tuple[str, ...]:
    """The shipped word list (lowercase, unique)."""
    with open(os.path.join(TEXT_DIR, "words.txt"), encoding="utf-8") as f:
        return tuple(dict.fromkeys(w.strip() for w in f if w.strip()))


@functools.cache
def essay_sentences() -> tuple[str, ...]:
    """The sentences of the project's essays, in order."""
    with open(os.path.join(TEXT_DIR, "essays.txt"), encoding="utf-8") as f:
        text = " ".join(f.read().split())
    return tuple(s for s in re.split(r"(?<=[.!?])\s+", text) if s)


def filler_sentences(kind: str, rng: np.random.Generator) -> Iterator[str]:
    """An endless stream of haystack sentences of `kind` (one of HAYSTACKS)."""
    if kind == "noise":
        while True:
            yield from NOISE
    elif kind == "words":
        vocab = words()
        while True:
            n = int(rng.integers(5, 13))
            picked = [vocab[i] for i in rng.integers(0, len(vocab), n)]
            yield " ".join(picked).capitalize() + "."
    elif kind == "essay":
        sents = essay_sentences()
        i = int(rng.integers(len(sents)))
        while True:
            yield sents[i % len(sents)]
            i += 1
    else:
        raise ValueError(f"haystack must be one of {HAYSTACKS}, got {kind!r}")


def _count(tokenizer: Tokenizer, text: str) -> int:
    return len(tokenizer.encode(text))


def _fill(stream: Iterator[str], budget: int, tokenizer: Tokenizer, sep: str = " ") -> list[str]:
    """Sentences from `stream` whose joined token count stays within `budget` (once one does
    not fit, up to 16 more are tried, so the budget is filled to within a short sentence)."""
    out, used, misses = [], 0, 0
    for sent in stream:
        n = _count(tokenizer, sent + sep)
        if used + n > budget:
            misses += 1
            if misses > 16:
                break
            continue
        out.append(sent)
        used += n
    return out


def _bos(tokenizer: Tokenizer) -> int:
    return 1 if getattr(tokenizer, "bos_id", None) is not None else 0


def _insert(pieces: list[str], needles: Sequence[tuple[str, str, str]], depths: Sequence[float],
            sep: str = " ") -> tuple[str, list[tuple[int, float]]]:
    """Joins filler `pieces` with needle texts inserted at the boundaries nearest `depths`.

    Returns the text and, per needle (in the given order), (char offset, depth), depth being
    the fraction of filler characters before the needle.
    """
    lengths = np.array([len(p) + len(sep) for p in pieces], np.float64)
    total = max(float(lengths.sum()), 1.0)
    bounds = np.concatenate([[0.0], np.cumsum(lengths)]) / total  # depth of boundary i
    slots = [int(np.argmin(np.abs(bounds - d))) for d in depths]
    order = sorted(range(len(needles)), key=lambda j: (slots[j], j))
    parts: list[str] = []
    placed: dict[int, tuple[int, float]] = {}
    offset, nxt = 0, 0
    for i in range(len(pieces) + 1):
        while nxt < len(order) and slots[order[nxt]] == i:
            j = order[nxt]
            placed[j] = (offset, float(bounds[i]))
            parts.append(needles[j][0])
            offset += len(needles[j][0]) + len(sep)
            nxt += 1
        if i < len(pieces):
            parts.append(pieces[i])
            offset += len(pieces[i]) + len(sep)
    return sep.join(parts), [placed[j] for j in range(len(needles))]


def _too_short(task: str, length: int, needed: int) -> ValueError:
    return ValueError(
        f"length {length} is too short for task {task!r}: its template and needles alone take "
        f"{needed} tokens; use length >= {needed + 16}"
    )


# --- values --------------------------------------------------------------------------------


def _value(kind: str, rng: np.random.Generator) -> str:
    if kind == "number":
        return str(int(rng.integers(1_000_000, 10_000_000)))
    if kind == "word":
        vocab = words()
        return vocab[int(rng.integers(len(vocab)))]
    if kind == "uuid":
        hexs = "".join("0123456789abcdef"[i] for i in rng.integers(0, 16, 32))
        return f"{hexs[:8]}-{hexs[8:12]}-{hexs[12:16]}-{hexs[16:20]}-{hexs[20:]}"
    raise ValueError(f"value type must be one of {VALUE_TYPES}, got {kind!r}")


def _distinct(draw: Callable[[], str], n: int, exclude: set[str] = frozenset()) -> list[str]:
    out: list[str] = []
    seen = set(exclude)
    for _ in range(100 * n + 100):
        v = draw()
        if v not in seen:
            out.append(v)
            seen.add(v)
            if len(out) == n:
                return out
    raise ValueError(f"could not draw {n} distinct values")


# --- generators ----------------------------------------------------------------------------


_VTYPE_PLURAL = {"number": "numbers", "word": "words", "uuid": "uuids"}


def niah(task: str, seed: int, length: int, tokenizer: Tokenizer, *, haystack: str = "essay",
         value_type: str = "number", num_keys: int = 1, num_values: int = 1,
         num_queries: int = 1, depths: Sequence[float] | None = None) -> Sample:
    """Needle in a haystack (RULER niah_single / multikey / multivalue / multiquery).

    Needle: "The special magic {type} for {key} is: {value}." num_keys needles with distinct
    keys; num_values needles for each key (multi-value); the first num_queries keys are asked
    for. depths: one per needle (keys-major order), default uniform random.
    """
    if value_type not in VALUE_TYPES:
        raise ValueError(f"value_type must be one of {VALUE_TYPES}, got {value_type!r}")
    if haystack not in HAYSTACKS:
        raise ValueError(f"haystack must be one of {HAYSTACKS}, got {haystack!r}")
    if not 1 <= num_queries <= num_keys:
        raise ValueError(f"num_queries must be in [1, num_keys={num_keys}], got {num_queries}")
    if num_values < 1:
        raise ValueError(f"num_values must be >= 1, got {num_values}")
    rng = np.random.default_rng([seed, 1])
    vocab = words()
    keys = _distinct(lambda: vocab[int(rng.integers(len(vocab)))], num_keys)
    vtype = _VTYPE_PLURAL[value_type][:-1]
    values = [_distinct(lambda: _value(value_type, rng), num_values, set(keys))
              for _ in keys]
    needles = [(f"The special magic {vtype} for {k} is: {v}.", k, v)
               for k, vs in zip(keys, values) for v in vs]
    n = len(needles)
    if depths is None:
        depths = [float(d) for d in rng.uniform(0.0, 1.0, n)]
    elif len(depths) != n or not all(0.0 <= d <= 1.0 for d in depths):
        raise ValueError(f"depths must be {n} numbers in [0, 1], got {depths!r}")
    asked = keys[:num_queries]
    plural = _VTYPE_PLURAL[value_type]
    head = f"Remember the special magic {plural} in the text below.\n"
    ask = asked[0] if num_queries == 1 else ", ".join(asked[:-1]) + " and " + asked[-1]
    if num_values == 1 and num_queries == 1:
        tail = f"\nThe special magic {vtype} for {ask} is:"
    else:
        tail = f"\nThe special magic {plural} for {ask} are:"
    answers = tuple(v for k in asked for v in values[keys.index(k)])
    fixed = _bos(tokenizer) + _count(tokenizer, head + tail) + sum(
        _count(tokenizer, t + " ") for t, _, _ in needles)
    if fixed > length:
        raise _too_short(task, length, fixed)
    pieces = _fill(filler_sentences(haystack, rng), length - fixed, tokenizer)
    body, placed = _insert(pieces, needles, depths)
    prompt = head + body + tail
    found = tuple(Needle(t, k, v, d, len(head) + off)
                  for (t, k, v), (off, d) in zip(needles, placed))
    return Sample(task, seed, length, prompt, answers, " " + ", ".join(answers) + ".", found)


def _var_name(rng: np.random.Generator) -> str:
    return "".join(string.ascii_uppercase[i] for i in rng.integers(0, 26, 5))


def vt(task: str, seed: int, length: int, tokenizer: Tokenizer, *, num_chains: int = 1,
       num_hops: int = 4, haystack: str = "noise") -> Sample:
    """Variable tracking (RULER vt): "VAR X0 = 12345." then "VAR Xi = VAR Xi-1." for num_hops
    hops, spread in order through the haystack; other chains (other values) are distractors.
    The answer is every variable of the first chain."""
    if num_chains < 1 or num_hops < 1:
        raise ValueError(f"num_chains and num_hops must be >= 1, got {num_chains}, {num_hops}")
    rng = np.random.default_rng([seed, 2])
    names = _distinct(lambda: _var_name(rng), num_chains * (num_hops + 1))
    vals = _distinct(lambda: str(int(rng.integers(10_000, 100_000))), num_chains)
    chains = [names[c * (num_hops + 1):(c + 1) * (num_hops + 1)] for c in range(num_chains)]
    needles, depths = [], []
    for chain, val in zip(chains, vals):
        needles.append((f"VAR {chain[0]} = {val}.", chain[0], val))
        for prev, cur in zip(chain, chain[1:]):
            needles.append((f"VAR {cur} = VAR {prev}.", cur, val))
        depths.extend(sorted(float(d) for d in rng.uniform(0.0, 1.0, num_hops + 1)))
    head = "Track the chain of variable assignments hidden in the text below.\n"
    tail = f"\nAnswer: the variables assigned the value {vals[0]} are:"
    fixed = _bos(tokenizer) + _count(tokenizer, head + tail) + sum(
        _count(tokenizer, t + " ") for t, _, _ in needles)
    if fixed > length:
        raise _too_short(task, length, fixed)
    pieces = _fill(filler_sentences(haystack, rng), length - fixed, tokenizer)
    body, placed = _insert(pieces, needles, depths)
    found = tuple(Needle(t, k, v, d, len(head) + off)
                  for (t, k, v), (off, d) in zip(needles, placed))
    answers = tuple(chains[0])
    return Sample(task, seed, length, head + body + tail, answers, " " + " ".join(answers) + ".",
                  found)


def cwe(task: str, seed: int, length: int, tokenizer: Tokenizer, *, num_cw: int | None = None,
        freq_cw: int | None = None, freq_ucw: int | None = None) -> Sample:
    """Common-words extraction (RULER cwe): a shuffled numbered list where num_cw words occur
    freq_cw times and the others freq_ucw times; the answer is the common words.

    Defaults follow RULER (10 words x 30, others x 3) where the length holds them; shorter
    lengths scale down: num_cw = min(10, max(2, entries // 12)), freq_cw = min(30,
    max(3, entries // (2 num_cw))), freq_ucw = max(1, freq_cw // 10), entries being how many
    list entries fit.
    """
    rng = np.random.default_rng([seed, 3])
    head = "Below is a numbered list of words. Memorize the ones that appear most often.\n"
    vocab = words()
    avg_entry = _count(tokenizer, "100. " + "x" * int(np.mean([len(w) for w in vocab])) + " ")
    budget_guess = length - _bos(tokenizer) - _count(tokenizer, head) - 60
    entries = max(budget_guess // max(avg_entry, 1), 0)
    num_cw = num_cw if num_cw is not None else min(10, max(2, entries // 12))
    freq_cw = freq_cw if freq_cw is not None else min(30, max(3, entries // (2 * num_cw)))
    freq_ucw = freq_ucw if freq_ucw is not None else max(1, freq_cw // 10)
    if not (num_cw >= 1 and freq_cw > freq_ucw >= 1):
        raise ValueError(f"need num_cw >= 1 and freq_cw > freq_ucw >= 1, got {num_cw}, "
                         f"{freq_cw}, {freq_ucw}")
    tail = f"\nAnswer: the {num_cw} most common words in the list are:"
    perm = rng.permutation(len(vocab))
    common = [vocab[i] for i in perm[:num_cw]]
    others = [vocab[i] for i in perm[num_cw:]]
    fixed = _bos(tokenizer) + _count(tokenizer, head + tail)

    def build(n_ucw: int) -> str:
        items = common * freq_cw + others[:n_ucw] * freq_ucw
        order = np.random.default_rng([seed, 4, n_ucw]).permutation(len(items))
        return " ".join(f"{i + 1}. {items[j]}" for i, j in enumerate(order))

    if fixed + _count(tokenizer, build(0)) > length:
        raise _too_short(task, length, fixed + _count(tokenizer, build(0)))
    lo, hi = 0, len(others)  # largest n_ucw that fits (token count grows with n_ucw)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fixed + _count(tokenizer, build(mid)) <= length:
            lo = mid
        else:
            hi = mid - 1
    body = build(lo)
    first = sorted(common, key=lambda w: body.index(f". {w} ") if f". {w} " in body
                   else body.index(f". {w}"))
    return Sample(task, seed, length, head + body + tail, tuple(common),
                  " " + " ".join(first) + ".")


def fwe(task: str, seed: int, length: int, tokenizer: Tokenizer, *, alpha: float = 2.0,
        vocab_size: int = 40, num_answers: int = 3) -> Sample:
    """Frequent-words extraction (RULER fwe): coded words (random 3-6 letters) drawn from a
    Zipf(alpha) distribution over a vocabulary of vocab_size; the answer is the num_answers most
    frequent ones (ties broken by redrawing until the top num_answers + 1 counts differ)."""
    if alpha <= 1.0:
        raise ValueError(f"alpha must be > 1, got {alpha}")
    rng = np.random.default_rng([seed, 5])
    vocab = _distinct(
        lambda: "".join(string.ascii_lowercase[i] for i in rng.integers(0, 26,
                                                                        int(rng.integers(3, 7)))),
        vocab_size)
    head = f"Track the frequency of each coded word below. Find the {num_answers} most frequent.\n"
    tail = f"\nAnswer: the {num_answers} most frequent coded words are:"
    fixed = _bos(tokenizer) + _count(tokenizer, head + tail)
    if fixed + 20 > length:
        raise _too_short(task, length, fixed + 20)
    for _ in range(100):
        ranks = rng.zipf(alpha, 4 * length)
        ranks = ranks[ranks <= vocab_size] - 1
        coded, used = [], 0
        for r in ranks:
            n = _count(tokenizer, vocab[r] + " ")
            if fixed + used + n > length:
                break
            coded.append(vocab[r])
            used += n
        counts = collections.Counter(coded).most_common()
        if len(counts) > num_answers and counts[num_answers - 1][1] > counts[num_answers][1]:
            break
    else:
        raise ValueError(f"length {length} is too short for task {task!r} to have "
                         f"{num_answers} distinct most frequent words")
    top = tuple(w for w, _ in counts[:num_answers])
    return Sample(task, seed, length, head + " ".join(coded) + tail, top,
                  " " + " ".join(top) + ".")


# --- registry ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    generator: Callable[..., Sample]
    options: tuple[tuple[str, Any], ...] = ()


TASKS: dict[str, TaskSpec] = {
    "niah_single_1": TaskSpec(niah, (("haystack", "noise"), ("value_type", "number"))),
    "niah_single_2": TaskSpec(niah, (("haystack", "words"), ("value_type", "word"))),
    "niah_single_3": TaskSpec(niah, (("haystack", "essay"), ("value_type", "uuid"))),
    "niah_multikey": TaskSpec(niah, (("haystack", "words"), ("num_keys", 4))),
    "niah_multivalue": TaskSpec(niah, (("haystack", "essay"), ("num_values", 4))),
    "niah_multiquery": TaskSpec(niah, (("haystack", "essay"), ("num_keys", 4),
                                       ("num_queries", 4))),
    "vt": TaskSpec(vt),
    "cwe": TaskSpec(cwe),
    "fwe": TaskSpec(fwe),
}


def check_task(name: str) -> TaskSpec:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}")
    return TASKS[name]


def make_sample(task: str, seed: int, length: int, tokenizer: Tokenizer, **options: Any) -> Sample:
    """One prompt of `task` (a name in TASKS), at most `length` tokens, determined by `seed`.

    options override the preset's generator arguments (e.g. depths=[0.5], num_keys=8).
    """
    spec = check_task(task)
    if isinstance(length, bool) or not isinstance(length, (int, np.integer)) or length < 1:
        raise ValueError(f"length must be a positive int, got {length!r}")
    return spec.generator(task, int(seed), int(length), tokenizer,
                          **{**dict(spec.options), **options})


def make_samples(task: str, n: int, length: int, tokenizer: Tokenizer, seed: int = 0,
                 **options: Any) -> list[Sample]:
    """`n` samples with seeds derived from (seed, task, length): reproducible per cell."""
    base = int(np.random.default_rng([seed, length, *task.encode()]).integers(1 << 30))
    return [make_sample(task, base + i, length, tokenizer, **options) for i in range(n)]


# --- LongBench-format data -----------------------------------------------------------------

LONGBENCH_TEMPLATE = ("Read the text below and answer the question.\n\n{context}\n\nQuestion: "
                      "{input}\nAnswer:")


def load_longbench(path: str | os.PathLike, tokenizer: Tokenizer, length: int | None = None,
                   template: str = LONGBENCH_TEMPLATE, metric: str = "qa_f1",
                   limit: int | None = None) -> list[Sample]:
    """Samples from a LongBench-format jsonl file (one object per line with "context", "input",
    "answers" (a list) and optionally "dataset").

    length: truncate prompts longer than this many tokens in the middle of the context, as
    LongBench does (keeps the first and last halves). metric: how `score` compares the
    prediction with the answers ("qa_f1", "match_part" or "match_all").
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"LongBench file {path} not found")
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {sorted(METRICS)}, got {metric!r}")
    out = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f):
            if not line.strip():
                continue
            if limit is not None and len(out) >= limit:
                break
            row = json.loads(line)
            missing = [k for k in ("context", "input", "answers") if k not in row]
            if missing:
                raise ValueError(f"{path}:{i + 1} lacks field(s) {missing}; LongBench rows "
                                 "have context, input and answers")
            answers = row["answers"]
            answers = (answers,) if isinstance(answers, str) else tuple(answers)
            context = row["context"]
            if length is not None:
                context = _truncate_middle(context, template, row["input"], length, tokenizer)
            prompt = template.format(context=context, input=row["input"])
            out.append(Sample(row.get("dataset", os.path.basename(path)), i, length or 0, prompt,
                              answers, " " + answers[0] if answers else "", (), metric))
    return out


def _truncate_middle(context: str, template: str, question: str, length: int,
                     tokenizer: Tokenizer) -> str:
    rest = _count(tokenizer, template.format(context="", input=question)) + _bos(tokenizer)
    budget = length - rest
    if budget < 2:
        raise ValueError(f"length {length} leaves no room for the context ({rest} tokens of "
                         "template and question)")
    ids = tokenizer.encode(context)
    if len(ids) <= budget:
        return context
    half = budget // 2
    return tokenizer.decode(ids[:half]) + tokenizer.decode(ids[len(ids) - (budget - half):])


# --- scoring -------------------------------------------------------------------------------


def string_match_all(prediction: str, answers: Sequence[str]) -> float:
    """RULER: fraction of references contained in the prediction (case-insensitive)."""
    pred = prediction.lower()
    return float(np.mean([a.lower() in pred for a in answers])) if answers else 0.0


def string_match_part(prediction: str, answers: Sequence[str]) -> float:
    """RULER (QA tasks): 1 if any reference is contained in the prediction."""
    pred = prediction.lower()
    return float(any(a.lower() in pred for a in answers))


def _normalize(text: str) -> list[str]:
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return text.split()


def qa_f1(prediction: str, answers: Sequence[str]) -> float:
    """LongBench's qa_f1_score: the best token-level F1 over the references (SQuAD
    normalisation: lowercase, no punctuation or articles)."""
    best = 0.0
    pred = _normalize(prediction)
    for a in answers:
        ref = _normalize(a)
        common = collections.Counter(pred) & collections.Counter(ref)
        same = sum(common.values())
        if same == 0:
            continue
        p, r = same / len(pred), same / len(ref)
        best = max(best, 2 * p * r / (p + r))
    return best


METRICS: dict[str, Callable[[str, Sequence[str]], float]] = {
    "match_all": string_match_all,
    "match_part": string_match_part,
    "qa_f1": qa_f1,
}


def score(sample: Sample, prediction: str) -> float:
    """The sample's metric of `prediction` against its answers, in [0, 1]."""
    return METRICS[sample.metric](prediction, sample.answers)
