"""`qkv compare`: a thin shell over `qkv.compare` (tiny models stand in for the real ones)."""

from __future__ import annotations

import json
import os
import re

import pytest

import qkv.models
from qkv.cli import main
from tests.lens.conftest import SENTENCE, SENTENCE_B, TinyModel

from .pipes import close_stdout


@pytest.fixture
def loads(monkeypatch):
    """Route qkv.load to a tiny causal model and count the loads."""
    calls, model = [], TinyModel(causal=True)

    def load(name):
        calls.append(name)
        return model

    monkeypatch.setattr(qkv.models, "load", load)
    return calls


def test_compare_prints_the_rule_and_the_movers_and_writes_json(loads, tmp_path, capsys):
    path = tmp_path / "c.json"
    argv = [
        "compare",
        SENTENCE,
        SENTENCE_B,
        "--token",
        "it",
        "--model",
        "tiny",
        "--json",
        str(path),
    ]
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert loads == ["tiny"]  # one model for both texts
    assert "cannot differ" in out and "'excited' (A) vs 'round' (B), token 8" in out
    assert "top 10 movers" in out and f"wrote {path}" in err
    doc = json.loads(path.read_text(encoding="utf-8"))
    assert doc["schema"] == "qkv.compare/1" and doc["query"][0]["index"] == 8
    assert main([*argv[:-2], "--json", "-", "--layer", "2", "--head", "1"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [(h["layer"], h["head"]) for h in doc["heads"]] == [(2, 1)]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([SENTENCE, SENTENCE_B], "--token WORD or --index I"),
        ([SENTENCE, "", "--token", "it"], "TEXT_B is empty"),
        ([SENTENCE, "The dog chased the ball.", "--token", "it"], "TEXT_B: .*'it'"),
        ([SENTENCE, SENTENCE, "--token", "it"], "TEXT_A and TEXT_B are identical"),
        ([SENTENCE, SENTENCE_B, "--token", "it", "--layer", "7"], "error: --layer 7 out of range"),
        ([SENTENCE, SENTENCE_B, "--token", "it", "--head", "-9"], "error: --head -9 out of range"),
        ([SENTENCE, SENTENCE_B, "--token", "it", "--top", "0"], "--top must be"),
        (
            [SENTENCE, SENTENCE_B, "--token", "it", "--json", "/proc/qkv-x.json"],
            "error: --json: cannot write",
        ),
    ],
)
def test_bad_input_names_the_cli_words(loads, capsys, argv, message):
    if "/proc" in " ".join(argv) and not os.path.isdir("/proc/self"):
        pytest.skip("needs Linux's /proc")
    assert main(["compare", *argv, "--model", "tiny"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("qkv compare: error: ") and len(err.strip().splitlines()) == 1
    assert re.search(message, err), err


def test_the_json_is_written_even_when_stdout_is_closed(loads, monkeypatch, tmp_path):
    close_stdout(monkeypatch)
    path = tmp_path / "c.json"
    argv = ["compare", SENTENCE, SENTENCE_B, "--token", "it", "--model", "tiny"]
    assert main([*argv, "--json", str(path)]) == 141
    assert json.loads(path.read_text(encoding="utf-8"))["schema"] == "qkv.compare/1"
