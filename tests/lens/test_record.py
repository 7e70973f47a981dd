"""The qkv.explain/1 document: exact field names, round trip, validation of malformed files."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest

from qkv.lens import SCHEMA, ExplainResult, explain, from_json

from .conftest import SENTENCE


@pytest.fixture(scope="module")
def result(tiny_bidir) -> ExplainResult:
    return explain(SENTENCE, "it", model=tiny_bidir, top=4, key="dog", rollout=True)


def test_core_schema_is_the_issue_s(result):
    doc = json.loads(result.to_json())
    assert doc["schema"] == SCHEMA == "qkv.explain/1"
    assert doc["model"] == "tiny-bidir"
    assert set(doc["tokens"][0]) == {"index", "text", "start", "end", "bytes"}
    assert doc["tokens"][2] == {"index": 2, "text": "dog", "start": 4, "end": 7, "bytes": [4, 7]}
    assert (
        doc["tokens"][0]["text"] == "[CLS]" and doc["tokens"][0]["start"] == doc["tokens"][0]["end"]
    )
    assert doc["query"] == {"index": 7, "text": "it"}
    lay = doc["layers"][0]
    assert {"layer", "heads"} <= set(lay)
    head = lay["heads"][0]
    assert {"head", "keys", "entropy", "output_norm"} <= set(head)
    assert set(head["keys"][0]) == {"index", "score", "weight", "contribution"}
    weights = [k["weight"] for k in head["keys"]]
    assert weights == sorted(weights, reverse=True)
    assert len(doc["rollout"]["values"]) == len(doc["tokens"])


def test_round_trip_is_lossless(result, tmp_path):
    path = tmp_path / "r.json"
    s = result.to_json(path)
    assert path.read_text(encoding="utf-8").strip() == s
    back = from_json(path)
    assert back.to_json() == s
    assert from_json(s).to_json() == s and from_json(json.loads(s)).to_json() == s
    assert ExplainResult.from_json(str(path)).to_dict() == result.to_dict()
    h0, h1 = result.layers[1].heads[2], back.layers[1].heads[2]
    np.testing.assert_array_equal(h0.weight, h1.weight)
    assert h1.keys[0].weight == h0.keys[0].weight and back.heads_to("dog") == result.heads_to("dog")


def _broken(doc: dict, path: list, value) -> dict:
    d = copy.deepcopy(doc)
    obj = d
    for p in path[:-1]:
        obj = obj[p]
    if value is KeyError:
        del obj[path[-1]]
    else:
        obj[path[-1]] = value
    return d


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        (["schema"], "qkv.explain/2", "schema must be 'qkv.explain/1'"),
        (["tokens"], KeyError, "tokens is missing"),
        (["query", "index"], 99, r"query.index must lie in \[0, 12\)"),
        (
            ["layers", 0, "heads", 1, "keys", 0, "weight"],
            "high",
            r"layers\[0\].heads\[1\].keys\[0\].weight must be a finite number",
        ),
        (["layers", 0, "heads", 1, "keys", 0, "index"], -1, r"keys\[0\].index must lie in"),
        (["layers", 0, "heads", 0, "head"], 7, r"heads\[0\].head must lie in \[0, 4\)"),
        (["rollout", "values"], [0.5], "one value per token"),
        (["tokens", 3, "start"], "x", r"tokens\[3\].start must be an integer"),
        (["notes"], [1], "notes must be a list of strings"),
    ],
)
def test_malformed_documents_name_the_field(result, path, value, message):
    doc = _broken(result.to_dict(), path, value)
    with pytest.raises(ValueError, match=message):
        from_json(doc)


def test_not_json_and_missing_files(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not JSON"):
        from_json(bad)
    with pytest.raises(FileNotFoundError, match="no explain record"):
        from_json(tmp_path / "missing.json")
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="must be an object"):
        from_json(tmp_path / "list.json")


def test_the_record_says_which_layers_are_local(tmp_path):
    """A model whose layers 0 and 2 attend through a window of 3 keys (layer 1 globally): the
    record's model summary lists each layer's window, the terminal says which are local, and
    the rows themselves agree — a local layer's query sees exactly 3 keys, the global one all."""
    from qkv.lens.terminal import render_text

    from .conftest import TinyModel

    m = TinyModel(causal=True, seed=3)
    for i in (0, 2):
        m.blocks[i].attn.window = (2, 0)
    try:
        r = explain(SENTENCE, "excited", model=m, top=0)
    finally:
        for i in (0, 2):
            m.blocks[i].attn.window = None
    assert r.model.windows == ((2, 0), None, (2, 0))
    seen = {lay.layer: {len(h.index) for h in lay.heads} for lay in r.layers}
    assert seen == {0: {3}, 1: {r.query.index + 1}, 2: {3}}  # the engine's own rows
    assert "local layers (window 3: each query sees its last 3 keys): 2 of 3; global: 1" in (
        render_text(r, width=200)
    )
    back = from_json(r.to_json())
    assert back.model.windows == r.model.windows
    plain = explain(SENTENCE, "excited", model=m, top=0)
    assert plain.model.windows is None and "local layers" not in render_text(plain, width=200)
