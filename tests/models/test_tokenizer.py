"""The shared Tokenizer wrapper (uses the minilm package's tokenizer.json, no model weights)."""

import re

import pytest
import tokenizers
import torch

from qkv.models import bert
from qkv.models.tokenizer import Encoding, Tokenizer


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.from_file(
        bert.package_dir() / "tokenizer.json", max_length=16, name="tiny-bert"
    )


def test_encode_and_decode(tok):
    enc = tok.encode("Hello, World")
    assert isinstance(enc, Encoding)
    assert enc.tokens == ["[CLS]", "hello", ",", "world", "[SEP]"]
    assert enc.offsets == [(0, 0), (0, 5), (5, 6), (7, 12), (0, 0)]
    assert tok.decode(enc.ids) == "hello, world"
    assert (
        tok.decode(torch.tensor(enc.ids), skip_special_tokens=False) == "[CLS] hello, world [SEP]"
    )
    assert tok.encode("Hello", add_special_tokens=False).tokens == ["hello"]


def test_wrapped_settings_are_off():
    raw = tokenizers.Tokenizer.from_file(str(bert.package_dir() / "tokenizer.json"))
    assert raw.padding is not None  # the file pads to 128 ...
    t = Tokenizer(raw)
    assert len(t.encode("hi")) == 3  # ... the wrapper does not
    assert raw.padding is not None  # and leaves the caller's tokenizer alone


def test_batch_padding_sides(tok):
    b = tok.encode_batch(["a b c", "d"])
    assert b.ids.tolist() == [[101, 1037, 1038, 1039, 102], [101, 1040, 102, 0, 0]]
    assert b.attention_mask.tolist() == [[True] * 5, [True] * 3 + [False] * 2]
    left = Tokenizer(tok.backend, padding_side="left", pad_id=7).encode_batch(["a b c", "d"])
    assert left.ids[1].tolist() == [7, 7, 101, 1040, 102]
    assert left.attention_mask[1].tolist() == [False, False, True, True, True]


def test_errors(tok):
    with pytest.raises(ValueError, match="empty text"):
        tok.encode("")
    with pytest.raises(ValueError, match="no tokens"):
        tok.encode("   ")
    with pytest.raises(TypeError, match="str"):
        tok.encode(3)
    with pytest.raises(
        ValueError, match=r"20 tokens but tiny-bert takes at most 16.*truncate=True"
    ):
        tok.encode("x " * 18)
    assert len(tok.encode("x " * 18, truncate=True)) == 16
    with pytest.raises(TypeError, match="list of str"):
        tok.encode_batch("abc")
    with pytest.raises(ValueError, match="empty"):
        tok.encode_batch([])
    with pytest.raises(FileNotFoundError):
        Tokenizer.from_file("/nonexistent/tokenizer.json")
    with pytest.raises(TypeError, match=r"tokenizers\.Tokenizer"):
        Tokenizer("not a tokenizer")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        # tokenizers' own words for this one are "expected `,` or `}` at line 1 column 7": a
        # syntax error in valid JSON
        ('{"not": "a tokenizer"}',
         r'is JSON but not a Hugging Face tokenizers file: it has no "model" field \(its keys: '
         r"'not'\); use the tokenizer\.json saved with the model$"),
        ("{}", r'is JSON but not a Hugging Face tokenizers file: it has no "model" field '
               r"\(its keys: none\)"),
        ('["model"]', r"must hold a JSON object \(a tokenizers file\), got a list$"),
        ('{"model": 1,', r"is not valid JSON: Expecting property name enclosed in double quotes: "
                         r"line 1 column 13 \(char 12\)$"),
        ('{"model": {"type": "Nope"}}',
         r"is not a tokenizer\.json that tokenizers \S+ can read: data did not match any variant"),
    ],
)  # fmt: skip
def test_a_file_that_is_no_tokenizer_says_what_is_wrong(tmp_path, text, message):
    path = tmp_path / "tokenizer.json"
    path.write_text(text)
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))} {message}"):
        Tokenizer.from_file(path)
