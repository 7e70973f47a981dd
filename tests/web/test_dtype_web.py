"""The explorer in bfloat16 (`qkv serve --dtype bf16`, `Explorer(..., dtype=)`): the model is
loaded in that dtype, /api/run says so (and the page's status line shows it), /api/lookup's
record carries it, and its weights are the bf16 model's own.

Oracles: torch's parameter dtypes, and a float64 softmax of q·k/√d written here from the q and
k that `qkv.nn.capture` records in a bf16 forward of its own."""

from __future__ import annotations

import httpx
import numpy as np
import pytest
import torch

from qkv.lens import from_json
from qkv.nn import MultiHeadAttention, capture
from qkv.web import Explorer, Server

from .conftest import SENTENCE
from .test_browser import open_page, run_text

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def bf16_server():
    """The explorer over smollm2 loaded by the Explorer itself in bfloat16, on a free port."""
    ex = Explorer(["smollm2"], dtype="bfloat16")
    srv = Server(ex, port=0).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def http(bf16_server):
    with httpx.Client(base_url=bf16_server.url, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def seed(http):
    r = http.post("/api/run", json={"model": "smollm2", "text": SENTENCE, "client": "bf16"})
    assert r.status_code == 200, r.text
    return r.json()


def test_the_explorer_loads_the_model_in_its_dtype(bf16_server):
    m = bf16_server.explorer.model("smollm2")
    attn = [a for a in m.modules() if isinstance(a, MultiHeadAttention)]
    assert len(attn) == 30
    for a in attn:
        assert {p.dtype for p in a.parameters()} == {torch.bfloat16}


def test_run_and_lookup_say_bfloat16_and_give_the_bf16_model_s_weights(bf16_server, http, seed):
    assert seed["dtype"] == "bfloat16"
    assert (seed["layers"], seed["heads"]) == (30, 9)
    q = 8  # "excited": the server runs every token of the text, and captures every layer
    r = http.post("/api/lookup", json={"id": seed["id"], "query": q, "layer": 13, "head": 8,
                                        "top": 0})  # fmt: skip
    assert r.status_code == 200, r.text
    doc = r.json()
    assert doc["model_config"]["dtype"] == "bfloat16"
    got = from_json({k: v for k, v in doc.items() if k not in ("neuron_dims", "server_ms")})
    assert got.model.dtype == "bfloat16"
    h = got.head(13, 8)

    m = bf16_server.explorer.model("smollm2")
    ids = m.tokenizer.encode(SENTENCE).ids
    with torch.inference_mode(), capture(m) as cap:  # every layer captured, as the server's run
        m(torch.tensor([ids]))
    rec = cap.layer(13)
    qv, k = rec.q[0, 8, q].double().numpy(), rec.k[0, 8 // 3, : q + 1].double().numpy()
    s = k @ qv / np.sqrt(len(qv))
    p = np.exp(s - s.max())
    p /= p.sum()
    np.testing.assert_allclose(h.weight, p[h.index], atol=1e-5, rtol=0)


def test_the_model_list_says_bfloat16(bf16_server, http, seed):
    (m,) = http.get("/api/models").json()["models"]
    assert m["name"] == "smollm2" and m["loaded"] and m["dtype"] == "bfloat16"


def test_a_float32_server_says_float32(server):
    with httpx.Client(base_url=server.url, timeout=120) as c:
        r = c.post("/api/run", json={"model": "smollm2", "text": "Hello there.", "client": "f32"})
    assert r.status_code == 200, r.text
    assert r.json()["dtype"] == "float32"


def test_the_status_line_shows_bfloat16(bf16_server, browser):
    page, seen = open_page(browser, bf16_server)
    run_text(page, SENTENCE)
    status = page.locator("#status").inner_text()
    assert "bfloat16" in status and "30 layers × 9 heads" in status, status
    assert seen["errors"] == [], seen["errors"]
    page.close()


def test_a_float32_status_line_names_no_dtype(server, browser):
    page, seen = open_page(browser, server)
    run_text(page, "Hello there.")
    status = page.locator("#status").inner_text()
    assert "layers × " in status and "float" not in status, status
    assert seen["errors"] == [], seen["errors"]
    page.close()
