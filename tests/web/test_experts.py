"""The explorer on mixture-of-experts models: the experts the clicked token was routed to.

A tiny random gpt-oss (two sparse layers) and qwen3_moe (layer 1 dense, `mlp_only_layers`)
checkpoint, built as tests/models build them, served on 127.0.0.1. Oracles, none of them the
server's capture: transformers' own routers (`*TopKRouter`: the experts and weights the reference
model chose), the experts `SparseMoE.forward` itself used in a plain forward of our model (its
`choose`, recorded by wrapping it), and `qkv.explain`'s `r.experts` (a fresh forward of its own,
token i alone). A dense model's lookup has no "experts"; the page draws the line in Chromium.
"""

from __future__ import annotations

import re

import httpx
import numpy as np
import pytest
import torch

import qkv
from qkv.nn import SparseMoE
from qkv.web import Explorer, Server

pytestmark = pytest.mark.slow
transformers = pytest.importorskip("transformers", reason="transformers is the routing oracle")

TEXT = "the dog chased the ball because it was excited"
IT = 6  # "it"
FRESH = 1e-5  # weights of a fresh forward over tokens 0..i (float32 sums in another order)


def _moe(kind: str, folder):
    from tests.models import test_families_gptoss as gptoss
    from tests.models import test_families_moe as moe

    if kind == "gpt_oss":
        return gptoss.build(folder)
    ref = moe.build(kind, folder)
    moe.word_tokenizer().save(str(folder / "tokenizer.json"))
    return ref


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """{name: (transformers model or None, qkv model)} and an httpx client on their explorer."""
    from tests.models.test_families import build as build_dense
    from tests.models.test_families import word_tokenizer

    base, models = tmp_path_factory.mktemp("models"), {}
    for kind in ("gpt_oss", "qwen3_moe", "llama"):  # each served by its folder's name
        folder = base / kind
        folder.mkdir()
        if kind == "llama":
            ref = None
            build_dense("llama", folder)
            word_tokenizer().save(str(folder / "tokenizer.json"))
        else:
            ref = _moe(kind, folder)
        models[kind] = (ref, qkv.load(folder))
    ex = Explorer([base / k for k in models], loaded={k: m for k, (_, m) in models.items()})
    srv = Server(ex, port=0).start()
    try:
        with httpx.Client(base_url=srv.url, timeout=120) as c:
            yield models, c, srv
    finally:
        srv.stop()


def looked_up(c, model: str, query: int, layer: int = 0) -> dict:
    run = c.post("/api/run", json={"model": model, "text": TEXT})
    assert run.status_code == 200, run.text
    r = c.post(
        "/api/lookup", json={"id": run.json()["id"], "query": query, "layer": layer, "head": 0}
    )
    assert r.status_code == 200, r.text
    return r.json()


def transformers_routing(ref, ids: list[int]) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """layer → (experts (n k), weights (n k)) that transformers' routers chose."""
    seen, hooks = {}, []
    for name, mod in ref.named_modules():
        if type(mod).__name__.endswith("TopKRouter"):
            layer = int(re.search(r"layers\.(\d+)\.", name)[1])

            def fn(mod, args, out, layer=layer):
                seen[layer] = (out[2].numpy(), out[1].double().numpy())

            hooks.append(mod.register_forward_hook(fn))
    try:
        with torch.no_grad():
            ref(torch.tensor([ids]))
    finally:
        for h in hooks:
            h.remove()
    return seen


def forward_routing(model, ids: list[int]) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """layer → (experts (n k), weights (n k)) that SparseMoE.forward itself used (its own call
    of `choose`, wrapped), in a plain full forward of our model."""
    seen = {}
    for n, b in enumerate(model.blocks):
        if isinstance(b.mlp, SparseMoE):
            real = b.mlp.choose

            def spy(h, real=real, n=n):
                w, idx = real(h)
                seen[n] = (idx.numpy(), w.double().numpy())
                return w, idx

            b.mlp.choose = spy
    try:
        with torch.no_grad():
            model(torch.tensor([ids]))
    finally:
        for b in model.blocks:
            b.mlp.__dict__.pop("choose", None)
    return seen


@pytest.mark.parametrize("kind", ["gpt_oss", "qwen3_moe"])
def test_lookup_experts_are_the_models_routing(served, kind):
    from tests.models.test_families_moe import assert_routing_is_clear

    models, c, _ = served
    ref, model = models[kind]
    ids = model.tokenizer.encode(TEXT).ids
    assert_routing_is_clear(model, torch.tensor([ids]))  # no near tie: a fair comparison
    hf, ours = transformers_routing(ref, ids), forward_routing(model, ids)
    sparse = [n for n, b in enumerate(model.blocks) if isinstance(b.mlp, SparseMoE)]
    assert sorted(hf) == sorted(ours) == sparse
    assert sparse == ([0, 1] if kind == "gpt_oss" else [0])  # qwen3_moe: layer 1 is dense
    for i in (0, IT, len(ids) - 1):
        doc = looked_up(c, kind, i, layer=1)
        got = doc["experts"]["layers"]
        assert [x["layer"] for x in got] == sparse  # every sparse layer, whatever layer shown
        one = qkv.explain(TEXT, i, model=model, top=3, progress=False).experts.to_dict()
        for x, e in zip(got, one["layers"], strict=True):
            n = x["layer"]
            assert x["n_experts"] == e["n_experts"] == 4
            assert x["experts"] == ours[n][0][i].tolist() == e["experts"]  # best first
            assert x["experts"] == hf[n][0][i].tolist()
            np.testing.assert_array_equal(x["weights"], ours[n][1][i])  # the forward's numbers
            np.testing.assert_allclose(x["weights"], e["weights"], atol=FRESH)
            np.testing.assert_allclose(x["weights"], hf[n][1][i], atol=FRESH)
        rec = qkv.lens.from_json({k: v for k, v in doc.items() if k not in ("neuron_dims", "server_ms")})  # fmt: skip
        assert rec.experts.to_dict() == doc["experts"]  # one schema: the lens reads it back


def test_the_check_can_fail(served):
    """Another token's experts differ somewhere: the comparison above can tell tokens apart."""
    _, c, _ = served
    a = looked_up(c, "gpt_oss", IT)["experts"]
    assert any(looked_up(c, "gpt_oss", j)["experts"] != a for j in range(IT))


def test_a_dense_model_has_no_experts(served):
    _, c, _ = served
    doc = looked_up(c, "llama", IT)
    assert "experts" not in doc and doc["layers"][0]["heads"][0]["keys"]
    run = c.post("/api/run", json={"model": "llama", "text": TEXT}).json()
    r = c.post("/api/export", json={"id": run["id"], "query": IT, "layer": 0, "head": 0,
                                    "format": "json"})  # fmt: skip
    assert r.status_code == 200 and '"experts"' not in r.text


def test_bad_requests_on_a_moe_model_keep_their_errors(served):
    _, c, _ = served
    run = c.post("/api/run", json={"model": "gpt_oss", "text": TEXT}).json()
    n = len(run["tokens"])
    for body, says in (
        ({"query": n, "layer": 0, "head": 0}, f"query must be an integer in [0, {n})"),
        ({"query": 0, "layer": 2, "head": 0}, "layer must be an integer in [0, 2)"),
        ({"query": 0, "layer": 0, "head": 0, "experts": 1}, 'unknown field "experts"'),
    ):
        r = c.post("/api/lookup", json={"id": run["id"], **body})
        assert r.status_code == 400 and says in r.json()["error"], r.text


def test_the_page_shows_the_experts(served, browser, shots):
    """Chromium under the page's own CSP (waits by locator, no evaluated strings): click 'it'
    on gpt-oss; the line names the experts and weights of the record (3 significant digits, as
    JavaScript's toPrecision(3) and Python's "#.3g" print them), one cell per sparse layer, a
    cell opens its layer; none on the dense model; no console errors."""
    from playwright.sync_api import expect

    models, _, srv = served
    page = browser.new_page(viewport={"width": 1440, "height": 1000})
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.goto(srv.url)
    page.wait_for_selector("#model option", state="attached")
    page.select_option("#model", "gpt_oss")
    page.fill("#text", TEXT)
    page.click("#run")
    page.wait_for_selector("#experts-line")
    page.locator("#tokens .chip", has_text=re.compile(r"^it$")).click()
    expect(page.locator("#lookup h2")).to_contain_text("(token 6)")
    page.select_option("#layer", "1")
    line = page.locator("#experts-line")
    expect(line).to_contain_text("in layer 1")
    want = qkv.explain(TEXT, IT, model=models["gpt_oss"][1], progress=False).experts.layers[1]
    pairs = ", ".join(f"{e} ({w:#.3g})" for e, w in zip(want.experts, want.weights, strict=True))
    assert line.inner_text() == f'experts of "it" in layer 1: {pairs} of 4'
    assert page.locator("#experts-row td").count() == 2
    assert page.locator("#experts-row td.sel").get_attribute("data-l") == "1"
    page.locator("#experts-row td[data-l='0']").click()  # a cell opens its layer
    expect(line).to_contain_text("in layer 0")
    assert page.locator("#layer").input_value() == "0"
    page.screenshot(path=str(shots / "explorer-experts.png"), full_page=True)
    page.select_option("#model", "llama")
    page.click("#run")
    expect(page.locator("#status")).to_contain_text("llama")
    expect(page.locator("#lookup h2")).to_be_visible()
    expect(page.locator("#experts")).to_have_count(0)
    assert "null" not in page.locator("#lookup").inner_text()  # nothing drawn in its place
    assert errors == [], errors
    page.close()
