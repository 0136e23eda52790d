"""RULER-style task generators, the byte tokenizer and scoring (no model involved)."""

from __future__ import annotations

import collections
import json
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvjax.eval import tasks as T
from kvjax.eval.tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer

TOK = ByteTokenizer()
LENGTHS = {"niah_single_1": 300, "niah_single_2": 300, "niah_single_3": 300,
           "niah_multikey": 600, "niah_multivalue": 600, "niah_multiquery": 700, "vt": 600,
           "cwe": 600, "fwe": 400}


def n_tokens(sample: T.Sample) -> int:
    return 1 + len(TOK.encode(sample.prompt))  # BOS


@pytest.mark.parametrize("task", list(T.TASKS))
def test_deterministic_per_seed(task):
    a = T.make_sample(task, 3, LENGTHS[task], TOK)
    b = T.make_sample(task, 3, LENGTHS[task], TOK)
    c = T.make_sample(task, 4, LENGTHS[task], TOK)
    assert a == b
    assert a.prompt != c.prompt


@pytest.mark.parametrize("task", list(T.TASKS))
@pytest.mark.parametrize("scale", [1, 3])
def test_length_budget(task, scale):
    length = LENGTHS[task] * scale
    s = T.make_sample(task, 0, length, TOK)
    assert n_tokens(s) <= length
    assert n_tokens(s) >= length - 90  # filled to within one filler sentence / list entry


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000), task=st.sampled_from(
    ["niah_single_1", "niah_single_2", "niah_single_3", "niah_multikey", "niah_multivalue",
     "niah_multiquery", "vt"]), scale=st.sampled_from([1, 2, 4]))
def test_needles_exact_and_at_their_depths(seed, task, scale):
    s = T.make_sample(task, seed, LENGTHS[task] * scale, TOK)
    expected = {"niah_multikey": 4, "niah_multivalue": 4, "niah_multiquery": 4, "vt": 5}
    assert len(s.needles) == expected.get(task, 1)
    head_end = s.prompt.index("\n") + 1
    tail_start = s.prompt.rindex("\n")
    body = s.prompt[head_end:tail_start]
    needle_chars = sum(len(n.text) + 1 for n in s.needles)
    filler_chars = len(body) + 1 - needle_chars
    longest = max(len(x) for x in re.split(r"(?<=\.) ", body)) + 1
    for n in s.needles:
        assert s.prompt.count(n.text) == 1  # exactly once
        assert s.prompt[n.offset:n.offset + len(n.text)] == n.text
        before = s.prompt[head_end:n.offset]
        filler_before = len(before) - sum(len(m.text) + 1 for m in s.needles
                                          if m.offset < n.offset)
        assert abs(filler_before / filler_chars - n.depth) < 1e-9  # the depth it says
    # the haystack holds no other needle-like text
    pattern = r"VAR [A-Z]{5} =" if task == "vt" else "The special magic"
    assert len(re.findall(pattern, body)) == len(s.needles)
    assert longest < len(body)


@pytest.mark.parametrize("depth", [0.0, 0.25, 0.5, 0.9, 1.0])
def test_requested_depth_is_honoured(depth):
    s = T.make_sample("niah_single_2", 1, 2000, TOK, depths=[depth])
    sentence = 100 / 1800  # a filler sentence is < 100 characters of ~1800
    assert abs(s.needles[0].depth - depth) <= sentence


def test_answers_match_needles():
    s = T.make_sample("niah_multiquery", 5, 800, TOK)
    values = {n.key: n.value for n in s.needles}
    asked = s.prompt[s.prompt.rindex("for ") + 4:-len(" are:")].replace(" and ", ", ")
    assert s.answers == tuple(values[k] for k in asked.split(", "))
    s = T.make_sample("niah_multivalue", 5, 800, TOK)
    assert sorted(s.answers) == sorted(n.value for n in s.needles)
    assert len({n.key for n in s.needles}) == 1
    s = T.make_sample("niah_single_3", 5, 400, TOK)
    assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}",
                        s.answers[0])
    s = T.make_sample("vt", 5, 800, TOK)
    value = s.needles[0].value
    assert s.needles[0].text == f"VAR {s.answers[0]} = {value}."
    for prev, cur in zip(s.answers, s.answers[1:]):
        assert f"VAR {cur} = VAR {prev}." in s.prompt
    assert [n.depth for n in s.needles] == sorted(n.depth for n in s.needles)


@pytest.mark.parametrize("length", [600, 3000])
def test_aggregation_answers_are_the_most_frequent(length):
    s = T.make_sample("cwe", 2, length, TOK)
    listed = re.findall(r"\d+\. (\w+)", s.prompt)
    counts = collections.Counter(listed)
    k = len(s.answers)
    assert sorted(s.answers) == sorted(w for w, _ in counts.most_common(k))
    assert min(counts[w] for w in s.answers) > max(
        c for w, c in counts.items() if w not in s.answers)
    s = T.make_sample("fwe", 2, length, TOK)
    coded = s.prompt.split("\n")[1].split()
    counts = collections.Counter(coded)
    assert s.answers == tuple(w for w, _ in counts.most_common(3))


def test_scoring_is_ruler_string_match():
    assert T.string_match_all("The numbers are 12 and 34.", ["12", "34"]) == 1.0
    assert T.string_match_all("only 12", ["12", "34"]) == 0.5
    assert T.string_match_all("APPLE", ["apple"]) == 1.0
    assert T.string_match_part("only 12", ["12", "34"]) == 1.0
    assert T.string_match_part("none", ["12", "34"]) == 0.0
    assert T.qa_f1("the Eiffel Tower", ["Eiffel Tower"]) == 1.0
    assert 0 < T.qa_f1("Eiffel", ["Eiffel Tower"]) < 1
    s = T.make_sample("niah_single_1", 0, 300, TOK)
    assert T.score(s, s.target) == 1.0 and T.score(s, " 0000000.") == 0.0


def test_bad_inputs_name_the_accepted_values():
    with pytest.raises(ValueError, match="known tasks: niah_single_1"):
        T.make_sample("niah_single_9", 0, 512, TOK)
    with pytest.raises(ValueError, match="too short for task 'niah_multiquery'.*use length >="):
        T.make_sample("niah_multiquery", 0, 200, TOK)
    with pytest.raises(ValueError, match="too short"):
        T.make_sample("vt", 0, 100, TOK)
    with pytest.raises(ValueError, match="length must be a positive int"):
        T.make_sample("vt", 0, 0, TOK)
    with pytest.raises(ValueError, match="value_type must be one of"):
        T.make_sample("niah_single_1", 0, 512, TOK, value_type="date")
    with pytest.raises(ValueError, match="depths must be 1 numbers in"):
        T.make_sample("niah_single_1", 0, 512, TOK, depths=[1.5])


def test_byte_tokenizer_round_trip_and_hf_parity(tmp_path):
    text = "Hello wörld! 12 ☃\n\tend"
    ids = TOK.encode(text)
    assert ids == list(text.encode("utf-8")) and TOK.decode(ids + [TOK.eos_id]) == text
    TOK.save(tmp_path)
    assert isinstance(load_tokenizer(tmp_path), ByteTokenizer)
    import tokenizers

    hf = HFTokenizer(tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json")),
                     "<bos>", "<eos>", "<pad>")
    assert hf.encode(text) == ids and hf.decode(ids) == text
    assert (hf.bos_id, hf.eos_id, hf.pad_id) == (TOK.bos_id, TOK.eos_id, TOK.pad_id)


def test_load_tokenizer_hf_and_missing(tmp_path):
    spec = ByteTokenizer().to_hf_json()
    spec["added_tokens"].append({"id": 259, "content": "<sep>", "single_word": False,
                                 "lstrip": False, "rstrip": False, "normalized": False,
                                 "special": True})
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<eos>"}))
    tok = load_tokenizer(tmp_path)
    assert isinstance(tok, HFTokenizer)
    assert tok.encode("ab") == [97, 98] and tok.eos_id == 258 and tok.bos_id is None
    with pytest.raises(FileNotFoundError, match="tokenizer file .*tokenizer.json not found"):
        load_tokenizer(tmp_path / "nowhere")


def test_longbench_loader(tmp_path):
    rows = [{"context": "word " * 400, "input": "What?", "answers": ["yes"], "dataset": "qa"},
            {"context": "short", "input": "Who?", "answers": ["Ann", "Anne"]}]
    path = tmp_path / "lb.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    samples = T.load_longbench(path, TOK, length=300)
    assert [s.task for s in samples] == ["qa", "lb.jsonl"]
    assert 1 + len(TOK.encode(samples[0].prompt)) <= 300
    assert samples[0].prompt.startswith(T.LONGBENCH_TEMPLATE.split("{")[0] + "word")
    assert samples[0].prompt.endswith("Question: What?\nAnswer:")
    assert samples[1].answers == ("Ann", "Anne") and "short" in samples[1].prompt
    assert T.score(samples[1], "Anne") == 1.0
    assert T.score(samples[1], "It was Anne.") == 0.5  # token F1: 1/3 precision
    path.write_text(json.dumps({"context": "x", "answers": []}))
    with pytest.raises(ValueError, match="lacks field"):
        T.load_longbench(path, TOK)
    with pytest.raises(FileNotFoundError):
        T.load_longbench(tmp_path / "missing.jsonl", TOK)
