"""The bundled Winograd-style pairs and the head search."""

from __future__ import annotations

import json
from collections import defaultdict

import numpy as np
import pytest

from qkv.lens import DATA_PATH, explain, head_search, load_examples
from qkv.lens.tokens import word_spans


def test_bundled_data_is_at_least_60_minimal_pairs():
    exs = load_examples()
    pairs = defaultdict(list)
    for ex in exs:
        pairs[ex.pair].append(ex)
    assert len(pairs) >= 60 and all(len(v) == 2 for v in pairs.values())
    assert len({ex.text for ex in exs}) == len(exs)
    for a, b in pairs.values():
        assert a.candidates == b.candidates and a.query == b.query and a.answer != b.answer
        wa, wb = a.text.split(), b.text.split()
        diff = [(x, y) for x, y in zip(wa, wb, strict=True) if x != y]
        assert len(diff) == 1, (a.text, b.text)  # one word flips the answer ...
        assert (
            diff[0][0].strip(".") == a.word and diff[0][1].strip(".") == b.word
        )  # ... and it is `word`
        for ex in (a, b):
            (q,) = word_spans(ex.text, ex.query)  # the pronoun occurs once
            for c in ex.candidates:
                (sp,) = word_spans(ex.text, c)  # each candidate once, before the pronoun
                assert sp[1] <= q[0]
            (w,) = word_spans(ex.text, ex.word)
            assert w[0] > q[1]  # the deciding word comes after the pronoun
    assert DATA_PATH.name == "winograd.jsonl"


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", "not JSON"),
        ("[1]", "must be a JSON object"),
        (
            json.dumps(
                {
                    "text": "A dog saw a cat.",
                    "query": "it",
                    "candidates": ["dog", "cat"],
                    "answer": "dog",
                }
            ),
            "query 'it' is not a word",
        ),
        (
            json.dumps(
                {
                    "text": "The dog saw it.",
                    "query": "it",
                    "candidates": ["dog", "cat"],
                    "answer": "dog",
                }
            ),
            "candidate 'cat' must occur",
        ),
        (
            json.dumps(
                {
                    "text": "The dog saw the cat, it ran.",
                    "query": "it",
                    "candidates": ["dog", "cat"],
                    "answer": "cow",
                }
            ),
            "answer 'cow' is not one of the candidates",
        ),
        (
            json.dumps(
                {
                    "text": "The dog saw the cat, it ran.",
                    "query": "it",
                    "candidates": ["dog"],
                    "answer": "dog",
                }
            ),
            "at least two words",
        ),
        (
            json.dumps(
                {
                    "text": "The dog saw the cat, it ran.",
                    "query": "it",
                    "candidates": ["dog", "cat"],
                    "answer": "dog",
                    "word": "fled",
                }
            ),
            "word 'fled' is not a word",
        ),
    ],
)
def test_bad_data_files(tmp_path, line, message):
    p = tmp_path / "d.jsonl"
    p.write_text(line + "\n")
    with pytest.raises(ValueError, match=message) as e:
        load_examples(p)
    assert f"{p}:1" in str(e.value)


def test_missing_or_empty_data(tmp_path):
    with pytest.raises(FileNotFoundError, match="no data file"):
        load_examples(tmp_path / "nope.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="holds no examples"):
        load_examples(tmp_path / "empty.jsonl")


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    lines = DATA_PATH.read_text().splitlines()[:12]
    p = tmp_path_factory.mktemp("d") / "pairs.jsonl"
    p.write_text("\n".join(lines) + "\n")
    return p


def test_causal_pronoun_cannot_separate_a_pair(tiny_causal, small_data):
    s = head_search(tiny_causal, small_data, progress=False)
    q = s.scores["query"]
    assert q.n == 12 and q.n_pairs == 6 and q.accuracy.shape == (3, 4)
    np.testing.assert_array_equal(q.accuracy, 0.5)  # identical lookups, opposite answers
    np.testing.assert_array_equal(q.pair_accuracy, 0.0)
    assert q.baseline == 0.5 and q.baseline_pair == 0.0
    out = " ".join(str(s).split())  # undo line wrapping
    assert "is causal" in out and "every head scores 50.0%" in out and "deciding word" in out
    assert "Best heads at the pronoun" not in out  # a table of identical 50% rows says nothing


@pytest.mark.parametrize("which", ["tiny_causal", "tiny_bidir"])
def test_accuracy_matches_explain(which, request, small_data):
    model = request.getfixturevalue(which)
    s = head_search(model, small_data, progress=False)
    for at in ("query", "word"):
        sc = s.scores[at]
        right = np.zeros_like(sc.accuracy)
        for ex in load_examples(small_data):
            r = explain(
                ex.text, ex.query if at == "query" else ex.word, model=model, top=0, rollout=False
            )
            cands = [r.token_index(c) for c in ex.candidates]
            for lay in r.layers:
                for h in lay.heads:
                    w = [h.key(c).weight for c in cands]
                    right[lay.layer, h.head] += ex.candidates[int(np.argmax(w))] == ex.answer
        np.testing.assert_allclose(sc.accuracy, right / sc.n)
        assert [t[:2] for t in sc.best(3)] == [t[:2] for t in sc.best(12)[:3]]
