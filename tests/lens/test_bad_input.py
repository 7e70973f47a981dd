"""Bad input to `explain`: clear errors naming what is valid."""

from __future__ import annotations

import re

import pytest

import qkv
from qkv.lens import explain

from .conftest import SENTENCE


@pytest.mark.parametrize("text", ["", "   \n"])
def test_empty_text(tiny_causal, text):
    with pytest.raises(ValueError, match="text is empty"):
        explain(text, "it", model=tiny_causal)


def test_absent_token_lists_the_tokens(tiny_causal):
    with pytest.raises(ValueError, match="'cat' is not in the text") as e:
        explain(SENTENCE, "cat", model=tiny_causal)
    assert "0:'The' 1:'dog' 2:'chased'" in str(e.value)
    assert str(e.value).endswith("Pass one of these words, or its position (token index).")


def test_token_inside_a_word_is_not_a_match(tiny_causal):
    with pytest.raises(ValueError, match="not in the text"):
        explain(SENTENCE, "xcite", model=tiny_causal)


def test_occurrence_out_of_range(tiny_causal):
    with pytest.raises(
        ValueError, match=r"occurs 1 time\(s\).*\[1, 1\] \(or -1..-1 from the end\), got 2"
    ):
        explain(SENTENCE, "dog", model=tiny_causal, occurrence=2)
    with pytest.raises(ValueError, match=r"got -2"):
        explain(SENTENCE, "dog", model=tiny_causal, occurrence=-2)
    with pytest.raises(ValueError, match="counts from 1"):
        explain(SENTENCE, "dog", model=tiny_causal, occurrence=0)


def test_index_out_of_range(tiny_causal):
    with pytest.raises(IndexError, match=r"token index 10 out of range: .* valid 0..9, or -10..-1"):
        explain(SENTENCE, 10, model=tiny_causal)
    with pytest.raises(IndexError, match=r"token index -11 out of range"):
        explain(SENTENCE, -11, model=tiny_causal)


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        (
            {"layer": 3},
            r"layer 3 out of range: there are 3 layers in tiny-causal; valid 0..2, or -3..-1",
        ),
        ({"layer": -4}, r"valid 0..2, or -3..-1 counting from the end"),
        (
            {"head": 4},
            r"head 4 out of range: there are 4 heads in tiny-causal; valid 0..3, or -4..-1",
        ),
        ({"head": -5}, r"head -5 out of range"),
    ],
)
def test_layer_and_head_out_of_range(tiny_causal, kw, message):
    with pytest.raises(IndexError, match=message):
        explain(SENTENCE, "it", model=tiny_causal, **kw)


def test_other_arguments(tiny_causal):
    with pytest.raises(ValueError, match="top must be an int ≥ 0"):
        explain(SENTENCE, "it", model=tiny_causal, top=-1)
    with pytest.raises(TypeError, match="layer must be an int"):
        explain(SENTENCE, "it", model=tiny_causal, layer="1")
    with pytest.raises(TypeError, match="model must be a name"):
        explain(SENTENCE, "it", model=42)
    with pytest.raises(TypeError, match="text must be a str"):
        explain(None, "it", model=tiny_causal)
    with pytest.raises(TypeError, match="token must be a token string or an index"):
        explain(SENTENCE, 1.5, model=tiny_causal)


def test_key_after_a_causal_query(tiny_causal):
    with pytest.raises(ValueError, match=r"comes after the query .* cannot see it"):
        explain(SENTENCE, "it", model=tiny_causal, key="excited")


def test_text_beyond_the_context(tiny_causal):
    with pytest.raises(ValueError, match="at most 512"):
        explain("word " * 600, "word", model=tiny_causal)


def test_negative_indices_count_from_the_end_everywhere(tiny_causal):
    r = explain(SENTENCE, -1, model=tiny_causal, layer=-1, head=-1, key=-2, rollout=False)
    assert (r.query.index, r.key.index) == (9, 8)
    assert (r.layers[0].layer, r.layers[0].heads[0].head) == (2, 3)
    assert r.head(-1, -1) is r.head(2, 3) and r.layer(-1) is r.layer(2)
    assert r.token_index(-10) == 0
    for kw in ({"layer": -4}, {"head": -5}):
        with pytest.raises(IndexError, match="counting from the end"):
            explain(SENTENCE, "it", model=tiny_causal, **kw)
    with pytest.raises(IndexError, match=r"head -5 out of range.*valid 0..3, or -4..-1"):
        r.head(2, -5)


def test_truncate_reads_the_first_tokens_and_says_so(tiny_bidir):
    long = "the dog ran . " * 200  # 800 words and stops, over the 512-token context
    with pytest.raises(ValueError, match="truncate=True"):
        explain(long, "dog", model=tiny_bidir)
    r = explain(long, "dog", model=tiny_bidir, truncate=True, occurrence=-1, rollout=False)
    assert len(r.tokens) == 512 and r.tokens[-1].text == "[SEP]"
    assert any("only its first 512 tokens" in n for n in r.notes)
    with pytest.raises(
        ValueError,
        match=r"occurs 128 time\(s\) \(tokens \[2, 6, .*, 42, …, 510\]\).*got 200 \(only the first 512 tokens fit",
    ):
        explain(long, "dog", model=tiny_bidir, truncate=True, occurrence=200)
    short = explain("the dog ran .", "dog", model=tiny_bidir, truncate=True, rollout=False)
    assert not any("first" in n for n in short.notes)


@pytest.mark.parametrize(
    ("text", "token", "said"),
    [
        (REPEATS := "The dog saw the other dog because it was tired.", "dog",
         "'dog' occurs 2 times (tokens 1, 5); this is the 1st (token 1); pick another with --occurrence"),
        (REPEATS, "dog saw", "'dog saw' is several words (2 tokens: 'dog|saw'); the query is the last of them, 'saw' (token 2)"),
        ("The ball's owner ran.", "ball's", "\"ball's\" is split into pieces (3 tokens: \"ball|'|s\")"),
        (REPEATS, "DOG", "'DOG' matched 'dog' ignoring case"),
    ],
)  # fmt: skip
def test_silent_choices_are_said(tiny_causal, text, token, said):
    r = explain(text, token, model=tiny_causal, rollout=False)
    assert sum(n.startswith("The query:") for n in r.notes) == 1
    assert any(said in n for n in r.notes), r.notes
    plain = explain(text, "tired" if "tired" in text else "owner", model=tiny_causal, rollout=False)
    assert not any(n.startswith("The query:") for n in plain.notes)


def test_a_checkpoint_without_tokenizer_json_says_so(tmp_path):
    """The README: "Without tokenizer.json, pass token ids; text gives an error that says so".
    explain reads text only (ids are refused by type), so the error says to add the file, and
    how to read attention from ids instead; with the file the same folder is explained."""
    from tests.models.test_families import build, word_tokenizer

    build("llama", tmp_path)
    no_tokenizer = (
        rf"^{re.escape(tmp_path.name)} has no tokenizer \(its folder has no tokenizer\.json\), "
        r"and the lens reads text; put the checkpoint's tokenizer\.json beside its config\.json\. "
        r"With token ids only, record the attention with qkv\.nn\.capture\(model\)"
    )
    with pytest.raises(ValueError, match=no_tokenizer):
        explain("the dog chased the ball", "dog", model=str(tmp_path))
    with pytest.raises(ValueError, match=no_tokenizer):  # a loaded model: the same
        explain("the dog chased the ball", "dog", model=qkv.load(tmp_path))
    with pytest.raises(TypeError, match=r"^text must be a str, got list$"):
        explain([5, 17, 42, 8], 2, model=str(tmp_path))
    from qkv.lens import head_search

    with pytest.raises(ValueError, match=no_tokenizer):  # was AttributeError in head_search
        head_search(model=str(tmp_path), progress=False)
    word_tokenizer().save(str(tmp_path / "tokenizer.json"))
    r = explain("the dog chased the ball", "dog", model=str(tmp_path))
    assert r.query.index == 1 and r.query.text.strip() == "dog"


def test_the_docstring_names_every_bundled_model():
    from qkv.models.registry import MODELS

    doc = explain.__doc__
    assert all(f'"{name}"' in doc for name in MODELS), (sorted(MODELS), doc[:2000])
