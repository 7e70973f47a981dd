"""The record says when its weights are not the softmax of its scores: a softcap or a score_mod
(ALiBi) changes each score q·k × scale before the softmax. Oracle: the softmax of the record's
own scores over the visible keys, computed here in float64."""

from __future__ import annotations

import json

import numpy as np
import pytest

from qkv.attention import alibi, alibi_slopes
from qkv.lens import explain
from qkv.lens.record import from_json

from .conftest import TinyModel

TEXT = "the dog chased the ball because it was excited"


def model(kind: str) -> TinyModel:
    m = TinyModel(causal=True, n_layers=2, seed=4)
    for i, b in enumerate(m.blocks):
        if kind == "alibi":
            b.attn.rope, b.attn.score_mod = None, alibi(alibi_slopes(b.attn.n_heads))
        elif kind == "softcap-layer-1" and i == 1:
            b.attn.softcap = 2.0
    return m


def softmax_gap(r) -> float:
    """max |weight − softmax(score)| over every head's visible keys (top=0: all of them)."""
    gap = 0.0
    for layer in r.to_dict()["layers"]:
        for h in layer["heads"]:
            s = np.array([k["score"] for k in h["keys"]], dtype=np.float64)
            w = np.array([k["weight"] for k in h["keys"]], dtype=np.float64)
            p = np.exp(s - s.max())
            gap = max(gap, float(np.abs(w - p / p.sum()).max()))
    return gap


@pytest.mark.parametrize(
    ("kind", "says"),
    [
        ("plain", None),
        ("alibi", "the score_mod alibi (−slope·|i − j| per head) on every layer"),
        ("softcap-layer-1", "the softcap s → 2·tanh(s/2) on layer 1"),
    ],
)
def test_the_note_says_when_weights_are_not_the_softmax_of_scores(kind, says):
    r = explain(TEXT, "excited", model=model(kind), top=0, progress=False)
    assert r.model.score_steps == says
    noted = [n for n in r.notes if n.startswith("The score column is q·k")]
    if says is None:
        assert softmax_gap(r) < 1e-5 and noted == []
    else:
        assert softmax_gap(r) > 1e-2  # the premise of the note, measured
        assert len(noted) == 1 and says in noted[0]
    back = from_json(json.dumps(r.to_dict()))  # the JSON record keeps it
    assert back.model.score_steps == says


def test_a_bad_score_steps_in_json_is_named():
    r = explain(TEXT, "it", model=model("plain"), top=2, progress=False)
    doc = r.to_dict()
    doc["model_config"]["score_steps"] = 3
    with pytest.raises(ValueError, match=r"model_config\.score_steps.*null or a string"):
        from_json(json.dumps(doc))
