"""`qkv train` and `qkv experiment projections`: thin shells that write what they promise."""

from __future__ import annotations

import json

import pytest

import qkv
from qkv.cli import main

SMALL = [
    "--records",
    "4",
    "--keys",
    "8",
    "--values",
    "8",
    "--queries",
    "2",
    "-q",
    "--eval-every",
    "10",
]


def test_train_writes_checkpoint_and_metrics(tmp_path, capsys):
    out = tmp_path / "run"
    assert (
        main(["train", "recall", "--out", str(out), "--steps", "20", "--d-model", "32", *SMALL])
        == 0
    )
    metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    assert {"task", "accuracy", "seconds", "steps"} <= metrics.keys()
    assert metrics["task"] == "recall" and metrics["steps"] == 20 and 0 <= metrics["accuracy"] <= 1
    assert metrics["task_params"]["n_records"] == 4 and metrics["model"]["d_model"] == 32
    printed = capsys.readouterr().out
    assert "held-out query accuracy" in printed and f"--model {out}" in printed
    model = qkv.load(out)
    assert model.config.d_model == 32 and model.meta["step"] == 20


@pytest.mark.parametrize("task", ["induction", "copy"])
def test_train_other_tasks(tmp_path, task):
    args = ["train", task, "--out", str(tmp_path), "--steps", "5", "--symbols", "9", "-q"]
    assert main(args) == 0
    assert json.loads((tmp_path / "metrics.json").read_text(encoding="utf-8"))["task"] == task


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--records", "40"], "--records 40 records need as many distinct keys"),
        (["--seq-len", "5"], "--seq-len 5 is too short"),
        (["--symbols", "5"], "task 'recall' has no --symbols"),
        (["--d-model", "0"], "--d-model must be positive"),
        (["--steps", "-1"], "--steps must be a positive int"),
        (["--projections", "no_v", "--d-head", "8"], "--kv-heads·--d-head == --d-model"),
    ],
)
def test_train_bad_parameters(tmp_path, capsys, args, message):
    assert main(["train", "recall", "--out", str(tmp_path / "x"), "-q", *args]) == 2
    assert message in capsys.readouterr().err


def test_train_unwritable_out(tmp_path, capsys):
    (tmp_path / "f").write_text("")
    assert main(["train", "recall", "--out", str(tmp_path / "f" / "run"), "-q"]) == 2
    assert "cannot write a checkpoint" in capsys.readouterr().err


def test_experiment_projections(tmp_path, capsys):
    png, js = tmp_path / "c.png", tmp_path / "r.json"
    args = [
        "experiment",
        "projections",
        "--seeds",
        "2",
        "--steps",
        "20",
        "--png",
        str(png),
        "--json",
        str(js),
    ]
    assert main([*args, *SMALL]) == 0
    table = capsys.readouterr().out
    for v in ("separate", "tied_qk", "tied_qkv", "no_v", "steps to 90%", "final accuracy"):
        assert v in table
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    doc = json.loads(js.read_text(encoding="utf-8"))
    assert len(doc["runs"]) == 8 and {r["variant"] for r in doc["runs"]} == {
        "separate",
        "tied_qk",
        "tied_qkv",
        "no_v",
    }
    assert all(r["steps"] == 20 for r in doc["runs"]) and doc["task"]["n_records"] == 4
    # same budget for every variant, and the parameter counts show what the tying removes
    s = {row["variant"]: row for row in doc["summary"]}
    assert s["tied_qk"]["parameters"] < s["separate"]["parameters"]
    assert s["tied_qkv"]["parameters"] < s["tied_qk"]["parameters"]


def test_experiment_bad_input(tmp_path, capsys):
    base = [
        "experiment",
        "projections",
        "-q",
        "--png",
        str(tmp_path / "c.png"),
        "--json",
        str(tmp_path / "r.json"),
    ]
    assert main([*base, "--variants", "separate,shared"]) == 2
    assert "--variants: unknown ['shared']" in capsys.readouterr().err
    assert main([*base, "--seeds", "0"]) == 2
    assert main(["experiment", "projections", "-q", "--png", str(tmp_path / "no" / "c.png")]) == 2
    assert "does not exist" in capsys.readouterr().err
