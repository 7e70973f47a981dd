"""Each token's own exact span: byte-level BPE splits a character over several tokens."""

from __future__ import annotations

import itertools
import json
import shutil

import pytest

from qkv.lens import explain
from qkv.lens.tokens import make_tokens

TEXT = "Le café 🎉 était fermé parce qu'il était dimanche. 東京は大きい。"


def test_split_characters_get_their_own_bytes_and_labels():
    """smollm2's own token strings for the start of TEXT (byte-level: 'Ġ' is the space byte,
    'ðŁ', 'İ', 'ī' stand for 🎉's bytes F0 9F, 8E, 89); the expected spans are counted by hand
    from the UTF-8 of the text, not by the code under test."""
    text = "Le café 🎉 était"
    toks = ["Le", "ĠcafÃ©", "ĠðŁ", "İ", "ī", "Ġ", "Ã©t", "ait"]
    offs = [(0, 2), (2, 7), (7, 9), (8, 9), (8, 9), (9, 10), (10, 12), (12, 15)]  # the tokenizer's
    got = make_tokens(text, toks, offs)
    assert [(t.byte_start, t.byte_end) for t in got] == [
        (0, 2), (2, 8), (8, 11), (11, 12), (12, 13), (13, 14), (14, 17), (17, 20),
    ]  # fmt: skip
    assert [t.text for t in got] == [
        "Le", " café", " 🎉[1-2/4]", "🎉[3/4]", "🎉[4/4]", " ", "ét", "ait",
    ]  # fmt: skip
    data = text.encode()
    assert b"".join(data[t.byte_start : t.byte_end] for t in got) == data


def test_word_piece_tokens_keep_their_character_spans():
    text = "The dogs ran"
    got = make_tokens(text, ["[CLS]", "the", "dog", "##s", "ran", "[SEP]"],
                      [(0, 0), (0, 3), (4, 7), (7, 8), (9, 12), (0, 0)])  # fmt: skip
    assert [t.text for t in got] == ["[CLS]", "The", "dog", "s", "ran", "[SEP]"]
    assert [(t.byte_start, t.byte_end) for t in got[1:5]] == [(0, 3), (4, 7), (7, 8), (9, 12)]
    assert got[0].special and got[5].special


@pytest.mark.slow
def test_smollm2_tokens_partition_the_bytes(smollm2, tmp_path):
    r = explain(TEXT, "il", model=smollm2, top=3)
    data = TEXT.encode()
    spans = [(t.byte_start, t.byte_end) for t in r.tokens]
    assert spans[0][0] == 0 and spans[-1][1] == len(data)
    assert all(
        a[1] == b[0] and a[0] < a[1] for a, b in itertools.pairwise(spans)
    )  # disjoint, in order
    labels = [t.text for t in r.tokens]
    assert labels[2:5] == [" 🎉[1-2/4]", "🎉[3/4]", "🎉[4/4]"]
    doc = json.loads(r.to_json())
    assert doc["tokens"][3]["bytes"] != doc["tokens"][4]["bytes"]
    assert type(r).from_json(r.to_json()).tokens == r.tokens
    echo = str(r).splitlines()[1]
    assert echo == TEXT  # the terminal echoes the text once
    if shutil.which("node"):
        from .test_views import _tables

        drawn = _tables(r, tmp_path / "r.html")["text"]
        assert "".join(s for cls, s in drawn if cls != "pc") == TEXT  # the page too
        assert sum(cls == "pc" for cls, _ in drawn) == sum(
            "[" in x and "[1" not in x for x in labels
        )
