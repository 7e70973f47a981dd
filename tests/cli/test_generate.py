"""`qkv generate`: a thin shell over `model.generate` on the real smollm2 (whose tokens are tested
against transformers in tests/models); here, that the command streams exactly what the library
returns, for each option, and that bad input exits 2 with a message."""

from __future__ import annotations

import dataclasses

import pytest

import qkv.models
from qkv.cli import main

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def smollm2():
    return qkv.models.load("smollm2")


@pytest.fixture
def loads(monkeypatch, smollm2):
    """qkv.load returns the one loaded smollm2 (minilm as itself); the names asked are kept."""
    calls = []
    real = qkv.models.load

    def load(name, *, dtype=None):
        calls.append(name)
        return smollm2 if name == "smollm2" and dtype is None else real(name, dtype=dtype)

    monkeypatch.setattr(qkv.models, "load", load)
    return calls


@pytest.mark.parametrize(
    "argv, kwargs",
    [
        ([], {}),
        (["--chat"], {"chat": True}),
        (["--temperature", "0.8", "--top-k", "20", "--seed", "3"],
         {"temperature": 0.8, "top_k": 20, "seed": 3}),
    ],
)  # fmt: skip
def test_streams_what_generate_returns(smollm2, loads, capsys, argv, kwargs):
    assert main(["generate", PROMPT, "--max-new-tokens", "12", *argv]) == 0
    out = capsys.readouterr().out
    want = smollm2.generate(PROMPT, 12, **kwargs)
    assert want and out == want + "\n"
    assert loads == ["smollm2"]


def test_reads_the_prompt_from_a_file(smollm2, loads, tmp_path, capsys):
    f = tmp_path / "prompt.txt"
    f.write_text(PROMPT, encoding="utf-8")
    assert main(["generate", "--file", str(f), "--max-new-tokens", "6"]) == 0
    assert capsys.readouterr().out == smollm2.generate(PROMPT, 6) + "\n"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["hi", "--model", "minilm"], "'minilm' is not a decoder"),
        (["hi", "--model", "smolm2"], "did you mean 'smollm2'"),
        (
            ["hi", "--model", "nope"],
            "--model 'nope' is not a bundled model: choose one of ['smollm2', 'gemma3'] (or give",
        ),  # the decoders only
        ([""], "prompt is empty"),
        (["   "], "prompt is only whitespace"),
        ([], "pass the prompt as an argument or with --file PATH\n"),
        (["hi", "--file", "x.txt"], "either as an argument or with --file"),
        (["--file", "/nonexistent/p.txt"], "no prompt file"),
        (["hi", "--temperature", "-1"], "temperature must be"),
        (["hi", "--max-new-tokens", "0"], "--max-new-tokens"),
        (["hi " * 9000], "exceeds smollm2's context of 8192 tokens"),  # fails before prefill
    ],
)
def test_bad_input_exits_2_with_a_message(loads, capsys, argv, message):
    assert main(["generate", *argv]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("qkv generate: error:") and message in captured.err
    assert captured.out == ""


def test_truncate_keeps_the_prompt_end(smollm2, loads, monkeypatch, capsys):
    # a 32-token context stands in for 8192 so the test stays fast; the check is the same code
    monkeypatch.setattr(smollm2, "config", dataclasses.replace(smollm2.config, max_positions=32))
    long = " ".join(["word"] * 40)
    assert main(["generate", long, "--max-new-tokens", "4"]) == 2
    assert "context of 32 tokens" in capsys.readouterr().err
    assert main(["generate", long, "--max-new-tokens", "4", "--truncate"]) == 0
    want = smollm2.generate(long, 4, truncate=True)
    assert capsys.readouterr().out == want + "\n"
    assert want == smollm2.tokenizer.decode(list(smollm2.generate_ids(
        smollm2.tokenizer.encode(long).ids[-28:], 4)))  # fmt: skip
