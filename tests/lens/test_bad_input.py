"""Bad input to `explain`: clear errors naming what is valid."""

from __future__ import annotations

import pytest

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


def test_token_inside_a_word_is_not_a_match(tiny_causal):
    with pytest.raises(ValueError, match="not in the text"):
        explain(SENTENCE, "xcite", model=tiny_causal)


def test_occurrence_out_of_range(tiny_causal):
    with pytest.raises(ValueError, match=r"occurs 1 time\(s\).*\[1, 1\], got 2"):
        explain(SENTENCE, "dog", model=tiny_causal, occurrence=2)
    with pytest.raises(ValueError, match="counts from 1"):
        explain(SENTENCE, "dog", model=tiny_causal, occurrence=0)


def test_index_out_of_range(tiny_causal):
    with pytest.raises(IndexError, match=r"valid range \[0, 9\]"):
        explain(SENTENCE, 10, model=tiny_causal)


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"layer": 3}, r"layer 3 out of range: tiny-causal has 3 layers, valid 0..2"),
        ({"layer": -4}, r"valid 0..2"),
        ({"head": 4}, r"head 4 out of range: tiny-causal has 4 heads, valid 0..3"),
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
