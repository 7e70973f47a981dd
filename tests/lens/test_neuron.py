"""The Q·K neuron view: q and k equal a float64 recomputation from the model's own weights
(RoPE written out here), Σ q⊙k · scale equals the record's score, GQA picks the kv head, and
bad layer/head/key are errors in the CLI's words."""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

import qkv.models
from qkv.cli import main
from qkv.lens import NeuronView, explain, from_json, neuron
from qkv.lens.export import capture_text

from .conftest import SENTENCE, TinyModel


def rope64(x: torch.Tensor, pos: int, base: float) -> torch.Tensor:
    """Half-split RoPE in float64: pair p = (x[p], x[p + d/2]) rotated by pos · base^(−2p/d)."""
    d = x.shape[-1]
    ang = pos * base ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)  # (d/2,)
    c, s = ang.cos(), ang.sin()
    a, b = x[..., : d // 2], x[..., d // 2 :]
    return torch.cat((a * c - b * s, a * s + b * c), -1)


def attention_inputs(model: TinyModel, ids: list[int]) -> list[torch.Tensor]:
    """x (i m) entering each layer's attention (after its pre-norm), float64."""
    seen = []
    hooks = [
        b.attn.register_forward_pre_hook(lambda _m, a: seen.append(a[0][0].double()))
        for b in model.blocks
    ]
    try:
        with torch.no_grad():
            model(torch.tensor([ids]))
    finally:
        for h in hooks:
            h.remove()
    return seen


@pytest.mark.parametrize("layer", [0, 2])
@pytest.mark.parametrize("head", [0, 1, 2, 3])
def test_q_and_k_are_x_w_after_rope_in_float64(tiny_causal, layer, head):
    ids = tiny_causal.tokenizer.encode(SENTENCE).ids
    i, j = 8, 1  # 'excited' · 'dog'
    v = neuron(SENTENCE, "excited", "dog", layer=layer, head=head, model=tiny_causal)
    attn = tiny_causal.blocks[layer].attn
    g = head // (attn.n_heads // attn.n_kv_heads)
    x = attention_inputs(tiny_causal, ids[: i + 1])[layer]  # (i m)
    q = rope64(x[i] @ attn.W_Q[head].detach().double(), i, attn.rope.base)  # (d,)
    k = rope64(x[j] @ attn.W_K[g].detach().double(), j, attn.rope.base)
    assert (v.query.index, v.key.index, v.kv_head, v.rope_dims) == (i, j, g, 8)
    np.testing.assert_allclose(v.q, q.numpy(), rtol=0, atol=2e-5 * q.abs().max().item())
    np.testing.assert_allclose(v.k, k.numpy(), rtol=0, atol=2e-5 * k.abs().max().item())
    np.testing.assert_allclose(v.product, (q * k).numpy(), atol=1e-4 * (q * k).abs().max().item())
    assert v.score == pytest.approx((q @ k).item() / np.sqrt(8), rel=1e-5, abs=1e-6)


def test_gqa_heads_of_one_group_share_k_and_not_q(tiny_causal):
    views = [neuron(SENTENCE, "it", "dog", layer=1, head=h, model=tiny_causal) for h in range(4)]
    assert [v.kv_head for v in views] == [0, 0, 1, 1]
    np.testing.assert_array_equal(views[0].k, views[1].k)
    assert not np.allclose(views[1].k, views[2].k)
    assert not np.allclose(views[0].q, views[1].q)


@pytest.mark.parametrize("fixture", ["tiny_causal", "tiny_bidir"])
def test_sum_times_scale_is_the_records_score(request, fixture):
    model = request.getfixturevalue(fixture)
    for layer, head in ((0, 0), (1, 3), (2, 2)):
        r = explain(SENTENCE, "it", model=model, layer=layer, head=head, key="dog", progress=False)
        v = neuron(SENTENCE, "it", "dog", layer=layer, head=head, model=model)
        held = r.head(layer, head).key(v.key.index).score
        assert v.dot * v.scale == pytest.approx(held, rel=1e-5, abs=1e-6)
        assert v.score == pytest.approx(held, rel=1e-5, abs=1e-6)
    assert v.rope_dims == (8 if fixture == "tiny_causal" else 0)


def test_top_dims_and_running_share():
    v = NeuronView(0, 0, 0, None, None, [1.0, -2.0, 3.0, 0.5], [2.0, 1.0, 1.0, -4.0], 0.5)
    assert v.product.tolist() == [2.0, -2.0, 3.0, -2.0]
    assert v.top(2).tolist() == [2, 0]  # |3| first, then the first of the ties at |2|
    assert v.share().tolist() == [3.0, 5.0, 3.0, 1.0]  # Σ = 1: the shares end at 1
    assert v.score == 0.5


def test_bad_layer_head_key_name_the_range(tiny_causal):
    with pytest.raises(IndexError, match=r"layer 5 out of range.*valid 0\.\.2"):
        neuron(SENTENCE, "it", "dog", layer=5, head=0, model=tiny_causal)
    with pytest.raises(IndexError, match=r"head 4 out of range.*valid 0\.\.3"):
        neuron(SENTENCE, "it", "dog", layer=0, head=4, model=tiny_causal)
    with pytest.raises(ValueError, match="comes after the query"):
        neuron(SENTENCE, "it", "excited", layer=0, head=0, model=tiny_causal)
    with pytest.raises(ValueError, match="cat"):
        neuron(SENTENCE, "it", "cat", layer=0, head=0, model=tiny_causal)


@pytest.fixture
def tiny_load(monkeypatch, tiny_causal):
    monkeypatch.setattr(qkv.models, "load", lambda name: tiny_causal)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--layer", "1", "--key", "dog"], "--neuron shows one head"),
        (["--layer", "1", "--head", "2"], "--key WORD"),
        (["--layer", "7", "--head", "0", "--key", "dog"], "layer 7"),
        (["--layer", "0", "--head", "9", "--key", "dog"], "head 9"),
        (["--layer", "0", "--head", "0", "--key-index", "40"], "--key-index 40"),
    ],
)
def test_cli_neuron_bad_input_exits_2(tiny_load, capsys, argv, message):
    rc = main(["explain", SENTENCE, "--model", "tiny-causal", "--token", "it", "--neuron", *argv])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("qkv explain: error:") and message in err, err


def test_cli_neuron_prints_the_identity_and_writes_the_record(tiny_load, tmp_path, capsys):
    out = tmp_path / "r.json"
    argv = ["--token", "excited", "--key", "dog", "--layer", "2", "--head", "3", "--neuron"]
    assert main(["explain", SENTENCE, "--model", "tiny-causal", *argv, "--json", str(out)]) == 0
    text = capsys.readouterr().out
    r = from_json(out)
    v = r.neuron
    assert (v.layer, v.head, v.kv_head, v.query.index, v.key.index) == (2, 3, 1, 8, 1)
    assert v.score == pytest.approx(r.head(2, 3).key(1).score, rel=1e-5)
    assert json.loads(out.read_text())["neuron"]["score"] == pytest.approx(v.score)
    assert "Q·K neuron view · layer 2 head 3 (kv head 1)" in text
    assert f"× scale {v.scale:.6g} = score {v.score:.6g}" in text
    assert f"(the record's score for this key: {r.head(2, 3).key(1).score:.6g})" in text
    top = int(v.top(1)[0])
    assert f"{v.q[top]:+.3f}" in text and f"{v.product[top]:+.3f}" in text
    assert "after RoPE (8 of 8 dims rotated)" in text


def test_record_round_trips_and_rejects_a_broken_view(tiny_causal):
    r = explain(SENTENCE, "it", model=tiny_causal, layer=0, head=1, key="dog", progress=False)
    assert "neuron" not in r.to_dict()  # absent unless asked for: old documents unchanged
    r.neuron = neuron(SENTENCE, "it", "dog", layer=0, head=1, model=tiny_causal)
    back = from_json(r.to_json())
    np.testing.assert_array_equal(back.neuron.q, r.neuron.q)
    np.testing.assert_array_equal(back.neuron.k, r.neuron.k)
    assert back.neuron.score == r.neuron.score and back.neuron.rope_dims == 8
    doc = r.to_dict()
    del doc["neuron"]["k"]
    with pytest.raises(ValueError, match="neuron: not a valid neuron view"):
        from_json(doc)


def test_llama_q_and_k_match_transformers_projections_and_rotary(tmp_path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("tokenizers")
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    from tests.models.test_families import build, word_tokenizer

    ref = build("llama", tmp_path)
    word_tokenizer().save(str(tmp_path / "tokenizer.json"))
    model = qkv.models.load(tmp_path)
    text = "the dog chased the ball because it was excited"
    i, j, layer = 8, 1, 1
    ids = torch.tensor([model.tokenizer.encode(text).ids])
    got: dict[str, torch.Tensor] = {}
    attn = ref.model.layers[layer].self_attn
    hooks = [
        attn.q_proj.register_forward_hook(lambda _m, _a, o: got.__setitem__("q", o)),
        attn.k_proj.register_forward_hook(lambda _m, _a, o: got.__setitem__("k", o)),
    ]
    with torch.no_grad():
        ref(ids)
        pos = torch.arange(ids.shape[1])[None]
        cos, sin = ref.model.rotary_emb(got["q"], pos)
    for h in hooks:
        h.remove()
    c = ref.config
    d = c.hidden_size // c.num_attention_heads
    q = got["q"].view(1, -1, c.num_attention_heads, d).transpose(1, 2)  # (b h i d)
    k = got["k"].view(1, -1, c.num_key_value_heads, d).transpose(1, 2)  # (b g j d)
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    assert isinstance(transformers.__version__, str)
    for head in range(c.num_attention_heads):
        v = neuron(text, "excited", "dog", layer=layer, head=head, model=model)
        g = head // (c.num_attention_heads // c.num_key_value_heads)
        assert v.kv_head == g
        tol = 1e-5 * q[0, head].abs().max().item()
        np.testing.assert_allclose(v.q, q[0, head, i].double().numpy(), atol=tol)
        np.testing.assert_allclose(v.k, k[0, g, j].double().numpy(), atol=tol * 10)
        assert v.score == pytest.approx((q[0, head, i] @ k[0, g, j]).item() / np.sqrt(d), rel=1e-4)


@pytest.fixture(scope="module")
def with_neuron(tiny_causal):
    r = explain(SENTENCE, "excited", model=tiny_causal, key="dog", top=3)  # every head
    r.neuron = neuron(SENTENCE, "excited", "dog", layer=2, head=3, model=tiny_causal)
    return r


def by_size(v: NeuronView) -> tuple[list[int], list[float]]:
    """The dims by |q_d k_d| (largest first, ties by dim) and every q_d k_d, in plain Python."""
    p = [a * b for a, b in zip(v.q.tolist(), v.k.tolist(), strict=True)]
    return sorted(range(len(p)), key=lambda d: (-abs(p[d]), d)), p


def neuron_section(r, path) -> dict:
    r.to_html(path)
    stub = Path(__file__).with_name("dom_stub.js")
    out = subprocess.run(
        ["node", str(stub), str(path), "neuron"], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.splitlines()[-1])


def span(html: str, name: str) -> float:
    return float(re.search(rf"<span id={name}>([^<]+)</span>", html).group(1))


@pytest.mark.skipif(shutil.which("node") is None, reason="node.js runs the page's script")
def test_html_neuron_section_shows_the_identity_and_the_bars(with_neuron, tmp_path):
    r, v = with_neuron, with_neuron.neuron
    held = r.head(2, 3).key(1).score  # the record's own score: computed without the neuron view
    s = neuron_section(r, tmp_path / "n.html")
    html = s["html"]
    assert s["display"] != "none" and "Q·K neuron view · layer 2 head 3 (kv head 1)" in html
    assert span(html, "nrec") == pytest.approx(held, rel=1e-5)
    assert span(html, "nscore") == pytest.approx(held, rel=1e-5)
    assert span(html, "ndot") * span(html, "nscale") == pytest.approx(held, rel=1e-5)
    assert span(html, "nscale") == pytest.approx(1 / np.sqrt(8), rel=1e-5)
    bars = re.findall(r'<rect class="nbar" data-d="(\d+)" data-p="([^"]+)"', html)
    order, p = by_size(v)
    assert [int(d) for d, _ in bars] == order  # d = 8 ≤ 16: every dim, largest |q_d k_d| first
    np.testing.assert_allclose([float(x) for _, x in bars], [p[d] for d in order], rtol=1e-12)
    assert sum(p) * v.scale == pytest.approx(held, rel=1e-5)
    assert "http" not in html and "src=" not in html  # drawn inline, nothing fetched


@pytest.mark.skipif(shutil.which("node") is None, reason="node.js runs the page's script")
def test_html_neuron_section_can_fail_and_hides_without_a_view(with_neuron, tiny_causal, tmp_path):
    r = copy.copy(with_neuron)
    r.neuron = copy.copy(with_neuron.neuron)
    r.neuron.scale *= 2  # a wrong scale: the page's score no longer equals the record's
    html = neuron_section(r, tmp_path / "bad.html")["html"]
    assert span(html, "nscore") != pytest.approx(span(html, "nrec"), rel=1e-3)
    r.neuron = None
    assert neuron_section(r, tmp_path / "none.html") == {"display": "none", "html": ""}
    one = explain(SENTENCE, "excited", model=tiny_causal, layer=2, head=3, key="dog")
    one.neuron = with_neuron.neuron  # a one-head record, as `--layer 2 --head 3 --neuron` writes
    html = neuron_section(one, tmp_path / "one.html")["html"]
    assert span(html, "nrec") == pytest.approx(one.head(2, 3).key(1).score, rel=1e-5)


def test_png_bars_are_the_views_products(with_neuron, tmp_path):
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    from qkv.lens.png import draw_neuron

    v = with_neuron.neuron
    order, p = by_size(v)
    fig, ax = plt.subplots()
    bars = draw_neuron(ax, v, 5)
    np.testing.assert_allclose([b.get_width() for b in bars], [p[d] for d in order[:5]], rtol=1e-12)
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert labels == [f"d {d}  q {v.q[d]:+.3f}  k {v.k[d]:+.3f}" for d in order[:5]]
    assert f"= score {with_neuron.head(2, 3).key(1).score:.6g}" in ax.get_title()
    plt.close(fig)
    with_view, without = tmp_path / "n.png", tmp_path / "plain.png"
    with_neuron.to_png(with_view)
    r = copy.copy(with_neuron)
    r.neuron = None
    r.to_png(without)
    a, b = plt.imread(with_view), plt.imread(without)
    assert a.shape[0] > b.shape[0] + 200 and a.shape[1] >= b.shape[1]  # the bars stacked below
    np.testing.assert_array_equal(a[: b.shape[0], : b.shape[1]], b)  # the head's figure unchanged


@pytest.mark.parametrize("fixture", ["tiny_causal", "tiny_bidir"])
def test_capture_neuron_equals_the_one_shot_view(request, fixture):
    model = request.getfixturevalue(fixture)
    cap = capture_text(SENTENCE, model=model, progress=False)
    for layer, head, key in ((0, 0, "dog"), (1, 3, "ball"), (-1, -2, 1)):
        got = cap.neuron("excited", key, layer=layer, head=head)
        want = neuron(SENTENCE, "excited", key, layer=layer, head=head, model=model)
        assert (got.layer, got.head, got.kv_head, got.rope_dims, got.scale) == (
            want.layer, want.head, want.kv_head, want.rope_dims, want.scale
        )  # fmt: skip
        assert (got.query, got.key) == (want.query, want.key)
        np.testing.assert_allclose(got.q, want.q, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(got.k, want.k, rtol=1e-5, atol=1e-6)
        held = cap.explain("excited", key=key).head(layer, head).key(want.key.index).score
        assert got.score == pytest.approx(held, rel=1e-5, abs=1e-6)
    assert got.layer == 2 and got.head == 2 and got.key.index == 1
    with pytest.raises(IndexError, match=r"head 4 out of range"):
        cap.neuron("it", "dog", layer=0, head=4)
    with pytest.raises(ValueError, match="needs a key"):
        cap.neuron("it", None, layer=0, head=0)
