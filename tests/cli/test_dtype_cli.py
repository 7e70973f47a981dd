"""`--dtype` on the commands that load a model: the real smollm2 in bfloat16.

Oracles: a float64 softmax of q·k/√d written here from the q and k that `qkv.nn.capture` records
in a bf16 forward of its own (not the lens' code path), `torch`'s parameter dtypes, and numpy's
read of the exported file. The bf16 model is loaded once for the module; each command loads its
own (that is what --dtype does)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import qkv
import qkv.models
from qkv.cli import main
from qkv.lens import from_json
from qkv.nn import capture
from tests.lens.conftest import SENTENCE, SENTENCE_B

pytestmark = pytest.mark.slow
QUERY = 6  # "it" in SENTENCE (smollm2: The dog chased the ball because it …)
TOL = 1e-5  # the engine's scores and softmax run in float32 from bf16 q and k


@pytest.fixture(scope="module")
def bf16():
    return qkv.load("smollm2", dtype="bfloat16")


def softmax_rows(model, text: str, i: int, layer: int, n: int | None = None) -> np.ndarray:
    """(h, i+1) float64 softmax(q_i·k_j/√d) over the keys a causal query i sees, every head, from
    the q and k of one forward of `model` on the first `n` tokens of `text` (default all; GQA:
    head h reads kv head h // (H/G)). A causal query's row depends only on the tokens up to it,
    but in bf16 a forward of fewer tokens rounds differently (other matmul shapes): `n` is the
    length the command ran (explain and compare run a causal query's prefix, export all).

    The forward here records every layer, whatever the command recorded (`--layer 13`: layer
    13 only): recording never changes what a forward computes, in bf16 too."""
    ids = model.tokenizer.encode(text).ids[:n]
    with torch.inference_mode(), capture(model) as cap:
        model(torch.tensor([ids]))
    rec = cap.layer(layer)
    q, k = rec.q[0].double().numpy(), rec.k[0].double().numpy()  # (h i d), (g j d)
    H, G, d = q.shape[0], k.shape[0], q.shape[-1]
    assert rec.attn_kwargs.get("scale") in (None, d**-0.5)  # smollm2: plain 1/√d
    s = np.stack([k[h // (H // G), : i + 1] @ q[h, i] for h in range(H)]) / np.sqrt(d)
    p = np.exp(s - s.max(-1, keepdims=True))
    return p / p.sum(-1, keepdims=True)


def test_explain_bf16_records_the_dtype_and_the_model_s_own_weights(bf16, tmp_path, capsys):
    out = tmp_path / "r.json"
    argv = ["explain", SENTENCE, "--token", "it", "--dtype", "bf16", "--top", "0"]
    assert main([*argv, "--json", str(out)]) == 0
    said = capsys.readouterr().out
    header = " ".join(said.split("\n• ")[0].split())  # rich wraps at 80 columns
    assert "bfloat16" in header and "30 layers × 9 heads" in header
    assert "runs in bfloat16" in " ".join(said.split())  # the note
    doc = json.loads(out.read_text(encoding="utf-8"))
    assert doc["model_config"]["dtype"] == "bfloat16"
    assert doc["model"] == "smollm2"
    r = from_json(out)
    assert r.model.dtype == "bfloat16" and r.query.index == QUERY
    for layer in (0, 13, 29):
        want = softmax_rows(bf16, SENTENCE, QUERY, layer, n=QUERY + 1)
        for h in range(9):
            got = r.head(layer, h)
            np.testing.assert_allclose(got.weight, want[h][got.index], atol=TOL, rtol=0,
                                       err_msg=f"layer {layer} head {h}")  # fmt: skip
    # and not the float32 model's: its weights differ by far more than TOL
    f32 = softmax_rows(qkv.load("smollm2"), SENTENCE, QUERY, 13, n=QUERY + 1)
    got = r.head(13, 8)
    assert np.abs(got.weight - f32[8][got.index]).max() > 10 * TOL


def test_explain_default_is_float32_with_no_dtype_in_the_header(tmp_path, capsys):
    out = tmp_path / "r.json"
    assert main(["explain", SENTENCE, "--token", "it", "--layer", "13", "--json", str(out)]) == 0
    said = " ".join(capsys.readouterr().out.split())
    header = said.split(" • ")[0]
    assert "kv heads)" in header  # nothing between the kv heads and the closing parenthesis
    for name in ("float32", "bfloat16", "float16", "float64"):
        assert name not in header
    assert "runs in" not in said
    assert json.loads(out.read_text(encoding="utf-8"))["model_config"]["dtype"] == "float32"


@pytest.mark.parametrize("cmd", ["explain", "compare", "export", "heads", "generate"])
def test_a_bad_dtype_exits_2_naming_the_flag_and_the_choices(cmd, capsys, tmp_path):
    args = {
        "explain": [SENTENCE, "--token", "it"],
        "compare": [SENTENCE, SENTENCE_B, "--token", "it"],
        "export": [SENTENCE, "--out", str(tmp_path / "r.npz")],
        "heads": [],
        "generate": ["Hello"],
    }[cmd]
    with pytest.raises(SystemExit) as e:
        main([cmd, *args, "--dtype", "int8"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--dtype" in err and "'int8'" in err
    for name in ("float32", "bfloat16", "float16", "float64", "bf16", "fp16"):
        assert name in err
    assert "Traceback" not in err


@pytest.mark.parametrize("cmd", ["explain", "compare", "export", "heads", "generate", "serve"])
def test_help_lists_dtype(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        main([cmd, "--help"])
    assert e.value.code == 0
    said = " ".join(capsys.readouterr().out.split())
    assert "--dtype DTYPE" in said and "bfloat16" in said


def test_generate_bf16_streams_what_the_bf16_model_generates(bf16, capsys, monkeypatch):
    real, loaded = qkv.models.load, []

    def spy(*args, **kwargs):  # the real load; what it returned is kept
        loaded.append(real(*args, **kwargs))
        return loaded[-1]

    monkeypatch.setattr(qkv.models, "load", spy)
    assert main(["generate", "Hello", "--dtype", "bf16", "--max-new-tokens", "5"]) == 0
    out = capsys.readouterr().out
    (m,) = loaded
    assert {p.dtype for p in m.parameters()} == {torch.bfloat16}
    want = bf16.generate("Hello", 5)  # greedy: the same tokens from the same bf16 weights
    assert want.strip() and out == want + "\n"


def test_compare_bf16_records_the_dtype(bf16, tmp_path, capsys):
    out = tmp_path / "c.json"
    # the texts first differ at token 8 ("excited" / "round"): a causal query before it could
    # not move, and compare would move the query there (a note says so)
    argv = ["compare", SENTENCE, SENTENCE_B, "--index", "8", "--layer", "13", "--head", "8"]
    assert main([*argv, "--dtype", "bf16", "--json", str(out)]) == 0
    shown = capsys.readouterr().out
    assert shown.startswith("smollm2 (bfloat16): ") and "runs in bfloat16" in shown
    doc = json.loads(out.read_text(encoding="utf-8"))
    assert doc["model"]["dtype"] == "bfloat16" and doc["model"]["name"] == "smollm2"
    (h,) = doc["heads"]
    for text, wa in ((SENTENCE, h["weight"][0]), (SENTENCE_B, h["weight"][1])):
        want = softmax_rows(bf16, text, 8, 13, n=9)[8]
        np.testing.assert_allclose(wa, want[h["index"] if text == SENTENCE else h["index_b"]],
                                   atol=TOL, rtol=0)  # fmt: skip


def test_export_bf16_writes_the_bf16_model_s_rows(bf16, tmp_path, capsys):
    out = tmp_path / "rows.npz"
    assert main(["export", SENTENCE, "--out", str(out), "--dtype", "bf16"]) == 0
    assert "30 layers × 9 heads × 10 queries, dense rows" in capsys.readouterr().out
    z = np.load(out)
    assert z["model"] == "smollm2" and z["dtype"] == "bfloat16" and z["weight"].dtype == np.float32
    assert z["weight"].shape == (30, 9, 10, 10)
    for layer in (0, 13, 29):
        want = softmax_rows(bf16, SENTENCE, QUERY, layer)  # (h, QUERY+1)
        got = z["weight"][layer, :, QUERY]
        np.testing.assert_allclose(got[:, : QUERY + 1], want, atol=TOL, rtol=0)
        assert not got[:, QUERY + 1 :].any()  # causal: the later keys get 0
