"""The explorer's HTTP API against the real app on uvicorn (httpx over 127.0.0.1).

Oracles: the lens' one-shot `qkv.explain` / `qkv.compare` (a fresh forward of their own, not the
server's kept capture), a float64 softmax row and q·k written here from the model's own
projections, and DESIGN.md's measured 0.72 / 0.74."""

from __future__ import annotations

import json
import re

import httpx
import numpy as np
import pytest

from qkv.lens import compare, explain, from_json

from .conftest import SENTENCE, SENTENCE_B

pytestmark = pytest.mark.slow
EXACT = 1e-6  # float32 rows from the kept capture vs the one-shot record's (same math, new forward)


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def seed(http):
    r = http.post("/api/run", json={"model": "smollm2", "text": SENTENCE, "client": "seed"})
    assert r.status_code == 200, r.text
    return r.json()


def test_run_returns_the_tokens_and_shape(seed):
    assert [t[0] for t in seed["tokens"]] == ["The", " dog", " chased", " the", " ball", " because",
                                              " it", " was", " excited", "."]  # fmt: skip
    assert (seed["layers"], seed["heads"], seed["causal"], seed["context"]) == (30, 9, True, 8192)
    for text, start, end in seed["tokens"]:
        assert SENTENCE[start:end] == text


def test_lookup_is_the_lens_record(http, seed, smollm2):
    r = http.post(
        "/api/lookup", json={"id": seed["id"], "query": 8, "layer": 13, "head": 8, "top": 0}
    )
    assert r.status_code == 200, r.text
    doc = r.json()
    got = from_json({k: v for k, v in doc.items() if k not in ("neuron_dims", "server_ms")})
    ref = explain(SENTENCE, "excited", model=smollm2, layer=13, head=8, top=0, progress=False)
    h, w = got.head(13, 8), ref.head(13, 8)
    assert h.index.tolist() == w.index.tolist()
    for col in ("score", "weight", "contribution"):
        np.testing.assert_allclose(getattr(h, col), getattr(w, col), rtol=EXACT, atol=EXACT)
    assert round(h.key(1).weight, 2) == 0.72  # "dog", DESIGN.md
    assert doc["neuron"]["key"]["index"] == 1  # default key: the head's top weight


def test_lookup_rows_match_a_float64_softmax(http, seed, smollm2):
    """weight_j = softmax_j(q·k_j/√d) for query 'excited' in layer 13 head 8, from the kept q and k
    of the neuron views of every key (each view is one q, k pair), softmax written here."""
    scores = []
    for j in range(9):
        d = http.post("/api/lookup", json={"id": seed["id"], "query": 8, "layer": 13, "head": 8,
                                           "key": j, "top": 0}).json()  # fmt: skip
        q, k = np.array(d["neuron"]["q"]), np.array(d["neuron"]["k"])
        assert d["neuron_dims"]["score"] == pytest.approx(
            float(q @ k) * d["neuron"]["scale"], rel=1e-12
        )
        scores.append(float(q @ k) / np.sqrt(len(q)))
        top = np.argsort(-np.abs(q * k), kind="stable")[:16]
        assert d["neuron_dims"]["dims"] == top.tolist()
    s = np.array(scores)
    p = np.exp(s - s.max())
    p /= p.sum()
    rec = from_json({k: v for k, v in d.items() if k not in ("neuron_dims", "server_ms")})
    h = rec.head(13, 8)
    np.testing.assert_allclose(h.weight, p[h.index], atol=1e-5)


def test_grid_is_every_heads_weight_and_entropy(http, seed, smollm2):
    r = http.post("/api/grid", json={"id": seed["id"], "query": 8, "key": 4})
    assert r.status_code == 200, r.text
    g = r.json()
    ref = explain(SENTENCE, "excited", model=smollm2, top=0, progress=False)
    for lay in ref.layers:
        for h in lay.heads:
            assert g["weight"][lay.layer][h.head] == pytest.approx(h.key(4).weight, abs=EXACT)
            assert g["entropy"][lay.layer][h.head] == pytest.approx(h.entropy, abs=1e-5)
    assert np.shape(g["weight"]) == (30, 9)


def test_compare_is_the_lens_compare(http, smollm2):
    r = http.post(
        "/api/compare", json={"model": "smollm2", "a": SENTENCE, "b": SENTENCE_B, "query": 8}
    )
    assert r.status_code == 200, r.text
    doc = r.json()
    ref = compare(SENTENCE, SENTENCE_B, 8, model=smollm2, progress=False)
    got = next(h for h in doc["heads"] if (h["layer"], h["head"]) == (13, 8))
    want = ref.head(13, 8)
    assert got["index"] == want.index.tolist()
    np.testing.assert_allclose(got["weight"][1], want.weight_b, atol=EXACT)
    np.testing.assert_allclose(
        got["delta_weight"], np.subtract(got["weight"][1], got["weight"][0]), atol=1e-12
    )
    assert round(got["weight"][1][got["index"].index(4)], 2) == 0.74  # "ball", DESIGN.md
    assert doc["moved"][13][8] == pytest.approx(want.moved, abs=EXACT)
    assert max(max(r) for r in doc["moved"]) == pytest.approx(
        max(h.moved for h in ref.heads), abs=EXACT
    )


def test_clicks_do_not_rerun_the_model(http, smollm2):
    """One forward per text: a run calls the model once; lookups, grids and exports after it
    call it zero times."""
    calls = []
    hook = smollm2.register_forward_pre_hook(lambda *_: calls.append(1))  # a run stops early
    try:
        cid = http.post("/api/run", json={"model": "smollm2", "text": SENTENCE}).json()["id"]
        assert len(calls) == 1
        for q, layer, head in ((8, 13, 8), (6, 0, 0), (2, 29, 3), (9, 5, 5)):
            assert (
                http.post(
                    "/api/lookup", json={"id": cid, "query": q, "layer": layer, "head": head}
                ).status_code
                == 200
            )
            assert http.post("/api/grid", json={"id": cid, "query": q, "key": 0}).status_code == 200
        assert (
            http.post(
                "/api/export",
                json={"id": cid, "query": 8, "layer": 13, "head": 8, "format": "json"},
            ).status_code
            == 200
        )
        assert len(calls) == 1
    finally:
        hook.remove()


def test_export_json_and_png(http, seed):
    base = {"id": seed["id"], "query": 8, "layer": 13, "head": 8, "key": 4}
    r = http.post("/api/export", json={**base, "format": "json"})
    assert r.status_code == 200 and "attachment" in r.headers["content-disposition"]
    rec = from_json(r.text)
    assert rec.neuron is not None and rec.neuron.key.index == 4
    assert rec.head(13, 8).key(4).weight == pytest.approx(0.0225, abs=5e-4)
    p = http.post("/api/export", json={**base, "format": "png"})
    assert p.status_code == 200 and p.headers["content-type"] == "image/png"
    assert p.content[:8] == b"\x89PNG\r\n\x1a\n"


BAD = [
    ("/api/run", {"model": "gemma3", "text": "hi"}, 400, 'model must be one of ["smollm2"] (fixed when the server started), got "gemma3"'),
    ("/api/run", {"model": "../../../etc/passwd", "text": "hi"}, 400, "fixed when the server started"),
    ("/api/run", {"model": "smollm2", "text": ""}, 400, "text is empty"),
    ("/api/run", {"model": "smollm2", "text": 7}, 400, "text must be a string, got 7"),
    ("/api/run", {"model": "smollm2", "text": "dog " * 9000}, 400, "takes at most 8192"),
    ("/api/run", {"model": "smollm2", "text": "x" * 100_001}, 400, "at most 100000"),
    ("/api/run", [1, 2], 400, "request body must be a JSON object, got an array"),
    ("/api/lookup", {"id": "nope", "query": 0, "layer": 0, "head": 0}, 404, "no kept run"),
    ("/api/lookup", {"id": "SEED", "query": 10, "layer": 0, "head": 0}, 400, "query must be an integer in [0, 10)"),
    ("/api/lookup", {"id": "SEED", "query": 8, "layer": 30, "head": 0}, 400, "layer must be an integer in [0, 30)"),
    ("/api/lookup", {"id": "SEED", "query": 8, "layer": 0, "head": -1}, 400, "head must be an integer in [0, 9)"),
    ("/api/lookup", {"id": "SEED", "query": 8, "layer": 0, "head": True}, 400, "head must be an integer in [0, 9) (a head of smollm2), got true"),
    ("/api/lookup", {"id": "SEED", "query": 3, "layer": 0, "head": 0, "key": 8}, 400, "comes after the query"),
    ("/api/lookup", {"id": "SEED", "query": 3, "layer": 0}, 400, "head is missing"),
    ("/api/grid", {"id": "SEED", "query": 3}, 400, "key is missing"),
    ("/api/compare", {"model": "smollm2", "a": SENTENCE, "b": SENTENCE, "query": 8}, 400, "identical"),
    ("/api/compare", {"model": "smollm2", "a": SENTENCE, "b": SENTENCE_B, "query": "it"}, 400, "query must be a token position"),
    ("/api/export", {"id": "SEED", "query": 8, "layer": 0, "head": 0, "format": "exe"}, 400, 'format must be "json" or "png", got "exe"'),
    ("/api/compare", {"model": "smollm2", "a": "dog " * 1100, "b": "cat " * 1100, "query": 8}, 400, "compare takes at most 1024"),
    ("/api/lookup", {"query": 0, "layer": 0, "head": 0}, 400, "id is missing: pass the id that /api/run returned"),
    ("/api/grid", {"id": 7, "query": 0, "key": 0}, 400, "id must be the string that /api/run returned, got 7"),
    ("/api/lookup", {"id": "SEED", "query": 8, "layer": 0, "head": 0, "tops": 0}, 400, 'unknown field "tops" for /api/lookup; its fields are id, query, layer, head, key, top'),
    ("/api/run", {"model": "smollm2", "txt": "hi"}, 400, 'unknown field "txt" for /api/run'),
    ("/api/compare", {"model": "smollm2", "a": "The dog ran", "b": "The cat", "query": 2}, 400, "query must be a token of both texts, an integer in [0, 2) (a has 3 tokens, b 2), got 2"),
    ("/api/compare", {"model": "smollm2", "a": "The dog", "b": "The cat", "query": 10**30}, 400, "query must be a token of both texts"),
    ("/api/compare", {"model": "smollm2", "a": SENTENCE, "b": SENTENCE, "query": 8}, 400, "a and b are identical"),
    # JSON's words, not Python's (NoneType, list, True, None); a missing field says so
    ("/api/run", None, 400, "request body must be a JSON object, got null"),
    ("/api/run", "text", 400, 'request body must be a JSON object, got "text"'),
    ("/api/run", {"text": "hi"}, 400, 'model is missing: pass one of ["smollm2"]'),
    ("/api/run", {"model": None, "text": "hi"}, 400, 'model must be one of ["smollm2"] (fixed when the server started), got null'),
    ("/api/run", {"model": ["smollm2"], "text": "hi"}, 400, "got an array"),
    ("/api/run", {"model": "smollm2"}, 400, "text is missing: pass the text as a string"),
    ("/api/run", {"model": "smollm2", "text": None}, 400, "text must be a string, got null"),
    ("/api/run", {"model": "smollm2", "text": {"a": 1}}, 400, "text must be a string, got an object"),
    ("/api/run", {"model": "smollm2", "text": "hi", "client": False}, 400, "client must be 1–64 printable ASCII characters, got false"),
    ("/api/lookup", {"id": "SEED", "query": True, "layer": 0, "head": 0}, 400, "query must be an integer in [0, 10) (a token of the 10), got true"),
    ("/api/lookup", {"id": "SEED", "query": None, "layer": 0, "head": 0}, 400, "query must be an integer in [0, 10) (a token of the 10), got null"),
    ("/api/lookup", {"id": "SEED", "query": "8", "layer": 0, "head": 0}, 400, 'got "8"'),
    ("/api/lookup", {"id": "SEED", "query": 8, "layer": 0, "head": 0, "top": -1}, 400, "top must be an integer in [0, 1048576] (0 = every key), got -1"),
    ("/api/lookup", {"id": "SEED", "query": 8, "layer": 0, "head": 0, "top": 2.5}, 400, "got 2.5"),
    ("/api/lookup", {"id": None, "query": 8, "layer": 0, "head": 0}, 400, "id must be the string that /api/run returned, got null"),
    ("/api/grid", {"id": [1], "query": 0, "key": 0}, 400, "id must be the string that /api/run returned, got an array"),
    ("/api/export", {"id": "SEED", "query": 8, "layer": 0, "head": 0}, 400, 'format is missing: pass "json" or "png"'),
    ("/api/compare", {"model": "smollm2", "a": SENTENCE, "b": SENTENCE_B}, 400, "query is missing: pass a token position"),
    ("/api/compare", {"model": "smollm2", "a": SENTENCE, "b": SENTENCE_B, "query": False}, 400, "query must be a token position (an integer ≥ 0), got false"),
    ("/api/run", {"model": "smollm2", "text": "a \ud800 b"}, 400, "text holds an unpaired surrogate (U+D800 at character 2); send valid Unicode"),
    ("/api/compare", {"model": "smollm2", "a": SENTENCE, "b": "x\udfff", "query": 0}, 400, "b holds an unpaired surrogate (U+DFFF at character 1)"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("path", "body", "status", "says"), BAD, ids=[f"{p}-{s}" for p, b, s, s in BAD]
)
def test_bad_requests_get_a_json_4xx(http, seed, path, body, status, says):
    if isinstance(body, dict) and body.get("id") == "SEED":
        body = {**body, "id": seed["id"]}
    r = http.post(path, content=json.dumps(body), headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    assert says in r.json()["error"]
    for python in ("truncate=", "text_a", "text_b", "sys.", "Traceback"):  # not the API's words
        assert python not in r.json()["error"]
    assert not re.search(
        r"\b(None|True|False|NoneType|list|dict|str|int|bool)\b", r.json()["error"]
    )


def test_body_size_type_and_method_are_bounded(http, server):
    limit = server.explorer.limits.max_body_kib << 10
    r = http.post(
        "/api/run", content=b" " * (limit + 1), headers={"content-type": "application/json"}
    )
    assert r.status_code == 413 and "at most" in r.json()["error"]
    r = http.post(
        "/api/run", content=b'{"model": "smollm2"', headers={"content-type": "application/json"}
    )
    assert r.status_code == 400 and "not JSON" in r.json()["error"]
    for body, says in (
        (b"[" * 100_000 + b"]" * 100_000, "nests arrays or objects too deep"),  # was a 500
        (b'{"model": "smollm2", "text": "hi", "client": ' + b"9" * 5000 + b"}", "number too long"),
    ):
        r = http.post("/api/run", content=body, headers={"content-type": "application/json"})
        assert r.status_code == 400 and says in r.json()["error"], r.text
        assert "set_int_max_str_digits" not in r.json()["error"]
    r = http.post(
        "/api/run",
        content=json.dumps({"model": "smollm2", "text": "hi"}),
        headers={"content-type": "text/plain"},
    )
    assert r.status_code == 415
    assert http.get("/api/run").status_code == 405
    assert http.get("/api/nothing").json()["error"].startswith("no such page")
    r = http.get("/api/progress")
    assert r.status_code == 400 and "pass ?client=ID" in r.json()["error"]
    assert http.get("/api/models").status_code == 200  # still answers


def test_page_and_assets_come_from_the_package(http):
    page = http.get("/")
    assert (
        page.status_code == 200 and "default-src 'none'" in page.headers["content-security-policy"]
    )
    for name in ("explorer.js", "explorer.css"):
        assert f"/static/{name}" in page.text
        assert http.get(f"/static/{name}").status_code == 200
    for text in (
        page.text,
        http.get("/static/explorer.js").text,
        http.get("/static/explorer.css").text,
    ):
        assert "http://" not in text.replace("http://www.w3.org/2000/svg", "")
        assert "https://" not in text and "//cdn" not in text


def test_host_header_must_be_loopback(http):
    r = http.get("/api/models", headers={"host": "attacker.example:8000"})
    assert r.status_code == 400 and "not served" in r.json()["error"]
    assert http.get("/api/models", headers={"host": "localhost"}).status_code == 200


def test_a_failure_inside_is_a_500_and_the_server_goes_on(http, seed, monkeypatch):
    from qkv.web import payload

    def broken(*_):
        raise RuntimeError("kaboom")

    monkeypatch.setattr(payload, "grid", broken)
    r = http.post("/api/grid", json={"id": seed["id"], "query": 8, "key": 1})
    assert r.status_code == 500 and r.json()["error"] == "internal error: RuntimeError: kaboom"
    monkeypatch.undo()
    assert http.post("/api/grid", json={"id": seed["id"], "query": 8, "key": 1}).status_code == 200


def test_a_second_model_bidirectional(smollm2):
    """The picker's models are the server's: minilm beside smollm2, by name; its record is the
    lens' one-shot one, and DESIGN.md's numbers hold (layer 3 head 7 from 'it': dog 0.20 / ball
    0.08 after 'excited', 0.08 / 0.23 after 'round')."""
    import qkv
    from qkv.web import Explorer, Server

    minilm = qkv.load("minilm")
    srv = Server(
        Explorer(["smollm2", "minilm"], loaded={"smollm2": smollm2, "minilm": minilm}), port=0
    ).start()
    try:
        with httpx.Client(base_url=srv.url, timeout=120) as c:
            assert [m["name"] for m in c.get("/api/models").json()["models"]] == [
                "smollm2",
                "minilm",
            ]
            got = {}
            for text in (SENTENCE, SENTENCE_B):
                run = c.post("/api/run", json={"model": "minilm", "text": text}).json()
                assert run["causal"] is False and run["tokens"][0][0] == "[CLS]"
                it = next(i for i, t in enumerate(run["tokens"]) if t[0] == "it")
                d = c.post(
                    "/api/lookup",
                    json={"id": run["id"], "query": it, "layer": 3, "head": 7, "top": 0},
                ).json()
                rec = from_json(
                    {k: v for k, v in d.items() if k not in ("neuron_dims", "server_ms")}
                )
                ref = explain(text, "it", model=minilm, layer=3, head=7, top=0, progress=False)
                np.testing.assert_allclose(rec.head(3, 7).weight, ref.head(3, 7).weight, atol=EXACT)
                dog, ball = (rec.head(3, 7).key(rec.token_index(w)).weight for w in ("dog", "ball"))
                got[text] = (round(dog, 2), round(ball, 2))
            assert got == {SENTENCE: (0.20, 0.08), SENTENCE_B: (0.08, 0.23)}
    finally:
        srv.stop()


def test_null_means_the_default_for_optional_fields(http, seed):
    """ "top": null was refused while "key": null took the default: null now means what leaving
    a field out means, for each optional field (key, top, client). Oracle: the same request
    with the defaults written out (top 20, the head's own top key)."""
    base = {"id": seed["id"], "query": 8, "layer": 13, "head": 8}
    answers = [
        http.post("/api/lookup", json={**base, **extra})
        for extra in ({}, {"key": None, "top": None}, {"top": 20, "key": 1})
    ]
    assert [r.status_code for r in answers] == [200, 200, 200], answers[1].text
    docs = [{k: v for k, v in r.json().items() if k != "server_ms"} for r in answers]
    assert docs[1]["top"] == 20 and docs[1]["neuron"]["key"]["index"] == 1  # "dog"
    assert docs[0] == docs[1]
    for k in ("top", "layers", "query"):
        assert docs[1][k] == docs[2][k]
    r = http.post("/api/run", json={"model": "smollm2", "text": SENTENCE, "client": None})
    assert r.status_code == 200, r.text


def test_a_busy_answer_counts_its_jobs_in_english(smollm2):
    """One job waiting: "1 job queued or running", not "1 jobs"."""
    import asyncio
    import threading

    from qkv.web import Explorer, Limits
    from qkv.web.session import Busy

    ex = Explorer(["smollm2"], Limits(workers=1, max_queue=1), loaded={"smollm2": smollm2})
    gate = threading.Event()

    async def main():
        first = asyncio.create_task(ex.call(gate.wait, 30))
        await asyncio.sleep(0.05)
        try:
            with pytest.raises(Busy, match=r"busy: 1 job queued or running \(at most 1\)"):
                await ex.call(int)
        finally:
            gate.set()
            await first

    try:
        asyncio.run(main())
    finally:
        ex.close()


def png_size(data: bytes) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_a_png_of_every_key_draws_at_most_100(http, monkeypatch):
    """ "every key" (top 0) drew one bar per key: a 5,261-token text made a 1,100 × 162,170 px
    image in 62 s, holding the pyplot lock. One head's PNG draws at most 100 keys: the top 50
    by weight ∪ the top 50 by contribution, and its title says how many of how many. Oracle:
    the JSON export's every key, ranked here."""
    import matplotlib.axes
    import matplotlib.figure

    run = http.post("/api/run", json={"model": "smollm2", "text": " ".join([SENTENCE] * 30)})
    n = len(run.json()["tokens"])  # 300
    base = {"id": run.json()["id"], "query": n - 1, "layer": 29, "head": 0, "top": 0}
    rec = from_json(http.post("/api/export", json={**base, "format": "json"}).text)
    h = rec.head(29, 0)
    w, c = h.weight.tolist(), h.contribution.tolist()
    assert len(w) == n > 200
    keep = set(sorted(range(n), key=lambda k: -w[k])[:50])
    keep |= set(sorted(range(n), key=lambda k: -c[k])[:50])

    bars, titles = [], []
    barh, suptitle = matplotlib.axes.Axes.barh, matplotlib.figure.Figure.suptitle
    monkeypatch.setattr(matplotlib.axes.Axes, "barh",
                        lambda self, y, x, *a, **k: (bars.append(np.asarray(x)), barh(self, y, x, *a, **k))[1])  # fmt: skip
    monkeypatch.setattr(matplotlib.figure.Figure, "suptitle",
                        lambda self, t, *a, **k: (titles.append(t), suptitle(self, t, *a, **k))[1])  # fmt: skip
    p = http.post("/api/export", json={**base, "format": "png"})
    assert p.status_code == 200, p.text
    width, height = png_size(p.content)
    assert len(bars[0]) == len(bars[1]) == len(keep) <= 100, [len(b) for b in bars]  # (+ neuron)
    np.testing.assert_allclose(sorted(bars[0]), sorted(w[k] for k in keep), rtol=1e-6)
    np.testing.assert_allclose(sorted(bars[1]), sorted(c[k] for k in keep), rtol=1e-6)
    assert f"the {len(keep)} of its {n} keys with most weight or contribution" in titles[0]
    assert height <= (1.2 + 0.28 * 100) * 110 + 10, (width, height)
