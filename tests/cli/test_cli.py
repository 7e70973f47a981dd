"""`qkv explain`, `qkv heads`, `qkv models`: thin shells over the lens (tiny models stand in for
the real ones here; tests/lens covers the real models)."""

from __future__ import annotations

import json
import os

import pytest

import qkv.models
from qkv.cli import main
from qkv.lens import DATA_PATH, from_json
from tests.lens.conftest import SENTENCE, TinyModel


@pytest.fixture(scope="module")
def tiny_models():
    return {"tiny-causal": TinyModel(causal=True), "tiny-bidir": TinyModel(causal=False, seed=1)}


@pytest.fixture
def loads(monkeypatch, tiny_models):
    """Route qkv.load to the tiny models and count the loads."""
    calls = []

    def load(name):
        calls.append(name)
        return tiny_models[name]

    monkeypatch.setattr(qkv.models, "load", load)
    return calls


def test_models_lists_the_bundled_models(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    for info in qkv.models.available():
        assert info.name in out and info.install in out
    assert "(default)" in out


def test_explain_prints_and_writes_every_view(loads, tmp_path, capsys):
    paths = {k: tmp_path / f"r.{k}" for k in ("json", "html", "png")}
    argv = [
        "explain",
        SENTENCE,
        "--token",
        "it",
        "--model",
        "tiny-causal",
        "--key",
        "dog",
        "--top",
        "3",
    ]
    for k, p in paths.items():
        argv += [f"--{k}", str(p)]
    assert main(argv) == 0
    out = capsys.readouterr()
    assert "query it (token 6)" in out.out and "Heads that send 'it' most to 'dog'" in out.out
    r = from_json(paths["json"])
    assert r.query.text == "it" and r.top == 3 and r.key.text == "dog"
    assert paths["html"].read_text().startswith("<!DOCTYPE html>")
    assert paths["png"].read_bytes()[:4] == b"\x89PNG"
    assert loads == ["tiny-causal"]


def test_explain_json_to_stdout_is_pure_json(loads, capsys):
    assert (
        main(
            [
                "explain",
                SENTENCE,
                "--index",
                "7",
                "--model",
                "tiny-bidir",
                "--layer",
                "1",
                "--json",
                "-",
            ]
        )
        == 0
    )
    doc = json.loads(capsys.readouterr().out)
    assert doc["schema"] == "qkv.explain/1" and doc["query"]["text"] == "it"
    assert [lay["layer"] for lay in doc["layers"]] == [1]


def test_explain_reads_a_file(loads, tmp_path, capsys):
    f = tmp_path / "t.txt"
    f.write_text(SENTENCE)
    assert (
        main(
            [
                "explain",
                "--file",
                str(f),
                "--token",
                "excited",
                "--model",
                "tiny-causal",
                "--layer",
                "0",
                "--head",
                "2",
            ]
        )
        == 0
    )
    assert "layer 0 head 2" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--token", "cat"], "'cat' is not in the text. Its tokens are: 0:'The' 1:'dog'"),
        (
            ["--token", "it", "--layer", "9"],
            "layer 9 out of range: tiny-causal has 3 layers, valid 0..2",
        ),
        (["--token", "it", "--head", "-9"], "valid 0..3"),
        (["--token", "it", "--index", "3"], "exactly one"),
        ([], "exactly one"),
    ],
)
def test_explain_bad_input_exits_2_with_a_message(loads, capsys, argv, message):
    assert main(["explain", SENTENCE, "--model", "tiny-causal", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("qkv explain: error:") and message in err


def test_unwritable_output_fails_before_running_and_writes_nothing(loads, tmp_path, capsys):
    rc = main(
        [
            "explain",
            SENTENCE,
            "--token",
            "it",
            "--model",
            "tiny-causal",
            "--json",
            str(tmp_path / "ok.json"),
            "--html",
            str(tmp_path / "missing" / "r.html"),
        ]
    )
    assert rc == 2 and "does not exist" in capsys.readouterr().err
    assert loads == [] and os.listdir(tmp_path) == []


def test_empty_text(loads, capsys):
    assert main(["explain", "", "--token", "it", "--model", "tiny-causal"]) == 2
    assert "text is empty" in capsys.readouterr().err


def test_heads_ranks_heads_on_a_user_file(loads, tmp_path, capsys):
    data = tmp_path / "pairs.jsonl"
    data.write_text("\n".join(DATA_PATH.read_text().splitlines()[:4]) + "\n")
    assert main(["heads", "--model", "tiny-causal", "--data", str(data), "--top", "3"]) == 0
    out = " ".join(capsys.readouterr().out.split())  # undo the terminal's line wrapping
    assert "4 sentences" in out and "Best heads at the deciding word" in out
    assert "is causal" in out and "every head scores 50.0%" in out
    assert main(["heads", "--model", "tiny-bidir", "--data", str(data)]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "Best heads at the pronoun" in out and "is causal" not in out
    assert main(["heads", "--model", "tiny-bidir", "--data", str(tmp_path / "none.jsonl")]) == 2
    assert "no data file" in capsys.readouterr().err
