"""The lens' numbers against an explicit float64 oracle on tiny random models.

The oracle sees only each attention module's input x (a forward pre-hook, not the capture)
and the module's weights, and recomputes q, k, v, RoPE, the full softmax matrix, the
contributions ‖w·v W_O^h‖, the layer norm ‖Σ_h w·v W_O^h‖ and the rollout by hand.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from qkv.lens import explain
from qkv.lens import rollout as rollout_module
from qkv.lens.lookup import layer_contributions, value_norms
from qkv.nn import MultiHeadAttention

from .conftest import SENTENCE, SENTENCE_B

TOL = {"weight": 2e-6, "score": 1e-5, "rel": 1e-5}  # fp32 model vs fp64 oracle


def rope64(x: torch.Tensor, base: float) -> torch.Tensor:
    """Half-split rotary embedding (HF Llama layout), written out: pair p = (x[p], x[p + d/2])."""
    d = x.shape[-1]
    theta = base ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = torch.arange(x.shape[-2], dtype=torch.float64)[:, None] * theta
    cos, sin = ang.cos(), ang.sin()
    a, b = x[..., : d // 2], x[..., d // 2 :]
    return torch.cat((a * cos - b * sin, a * sin + b * cos), -1)


def forward_inputs(model, text: str, mods: list) -> list[torch.Tensor]:
    """The first input (1 i m) of each module of `mods` in one forward of `text` (pre-hooks)."""
    inputs: list[torch.Tensor] = []
    hooks = [m.register_forward_pre_hook(lambda mod, args: inputs.append(args[0])) for m in mods]
    try:
        with torch.no_grad():
            model(torch.tensor([model.tokenizer.encode(text).ids]))
    finally:
        for h in hooks:
            h.remove()
    return inputs


def oracle(model, text: str) -> list[dict]:
    """Per layer: weights (h i j), scores, contributions (h i j), out norms (h i), layer contribution (i j)."""
    mods = [m for m in model.modules() if isinstance(m, MultiHeadAttention)]
    inputs = forward_inputs(model, text, mods)
    with torch.no_grad():
        return [_layer64(mod, x) for mod, x in zip(mods, inputs, strict=True)]


def _layer64(mod: MultiHeadAttention, x: torch.Tensor) -> dict:
    """One layer in float64 from its input x (1 i m)."""
    x = x[0].double()  # (i m)
    P = {
        n: (None if p is None else p.double())
        for n, p in (("Q", mod.W_Q), ("K", mod.W_K), ("V", mod.W_V), ("O", mod.W_O))
    }
    q = torch.einsum("im,hmd->hid", x, P["Q"])
    k = torch.einsum("im,hmd->hid", x, P["K"])
    v = torch.einsum("im,hmd->hid", x, P["V"])
    if mod.b_Q is not None:
        q, k, v = (
            q + mod.b_Q.double()[:, None],
            k + mod.b_K.double()[:, None],
            v + mod.b_V.double()[:, None],
        )
    if mod.rope is not None:
        q, k = rope64(q, mod.rope.base), rope64(k, mod.rope.base)
    G = mod.n_heads // mod.n_kv_heads
    k, v = k.repeat_interleave(G, 0), v.repeat_interleave(G, 0)
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])  # (h i j)
    S = s.shape[-1]
    logits = (
        s.masked_fill(torch.ones(S, S, dtype=torch.bool).triu(1), float("-inf"))
        if mod.causal
        else s
    )
    w = torch.softmax(logits, -1)
    vo = torch.einsum("hjd,hdm->hjm", v, P["O"])  # (h j m)
    contrib = w * vo.norm(dim=-1)[:, None, :]  # (h i j)
    outn = torch.einsum("hij,hjm->him", w, vo).norm(dim=-1)  # (h i)
    layer_c = torch.einsum("hij,hjm->ijm", w, vo).norm(dim=-1)  # (i j)
    return {"w": w, "s": s, "c": contrib, "out": outn, "lc": layer_c}


def rollout64(orc: list[dict], i: int) -> np.ndarray:
    S = orc[0]["w"].shape[-1]
    R = torch.eye(S, dtype=torch.float64)
    for lay in orc:
        R = (0.5 * lay["w"].mean(0) + 0.5 * torch.eye(S, dtype=torch.float64)) @ R
    return R[i].numpy()


@pytest.mark.parametrize("which", ["tiny_causal", "tiny_bidir"])
def test_every_number_matches_the_float64_oracle(which, request):
    model = request.getfixturevalue(which)
    r = explain(SENTENCE, "it", model=model, top=0, rollout=True)
    orc = oracle(model, SENTENCE)
    i = r.query.index
    assert len(r.layers) == len(orc)
    for lay, o in zip(r.layers, orc, strict=True):
        for h in lay.heads:
            vis = np.arange(i + 1) if model.config.causal else np.arange(len(r.tokens))
            assert sorted(h.index.tolist()) == vis.tolist()
            np.testing.assert_allclose(
                h.weight, o["w"][h.head, i, h.index].numpy(), atol=TOL["weight"], rtol=0
            )
            np.testing.assert_allclose(
                h.score, o["s"][h.head, i, h.index].numpy(), atol=TOL["score"], rtol=TOL["rel"]
            )
            np.testing.assert_allclose(
                h.contribution, o["c"][h.head, i, h.index].numpy(), rtol=TOL["rel"], atol=1e-7
            )
            assert h.output_norm == pytest.approx(float(o["out"][h.head, i]), rel=TOL["rel"])
            p = o["w"][h.head, i, vis].numpy()
            assert h.entropy == pytest.approx(float(-(p * np.log(p)).sum()), rel=TOL["rel"])
            assert np.all(np.diff(h.weight) <= 0), "keys must be ranked by weight"
            assert h.top_weight == int(vis[np.argmax(o["w"][h.head, i, vis].numpy())])
            assert h.top_contribution == int(vis[np.argmax(o["c"][h.head, i, vis].numpy())])
            assert h.kv_head == h.head // (model.config.n_heads // model.config.n_kv_heads)
        np.testing.assert_allclose(
            lay.weight, o["w"][:, i, lay.index].mean(0).numpy(), atol=TOL["weight"]
        )
        np.testing.assert_allclose(
            lay.contribution, o["lc"][i, lay.index].numpy(), rtol=1e-5, atol=1e-7
        )
    np.testing.assert_allclose(r.rollout.values, rollout64(orc, i), atol=1e-6)
    assert r.rollout.values.sum() == pytest.approx(1.0, abs=1e-6)


def test_top_k_keeps_the_chosen_key_and_the_true_argmaxes(tiny_causal):
    full = explain(SENTENCE, "it", model=tiny_causal, top=0)
    r = explain(SENTENCE, "it", model=tiny_causal, top=2, key="The")
    pins = {0, r.query.index}  # the first token and the query: kept whatever their rank
    for lay_f, lay in zip(full.layers, r.layers, strict=True):
        for hf, h in zip(lay_f.heads, lay.heads, strict=True):
            by_w = hf.index[:2].tolist()
            by_c = hf.index[np.argsort(-hf.contribution, kind="stable")][:2].tolist()
            other = next(j for j in hf.index.tolist() if j not in pins)  # most weight besides
            assert set(h.index.tolist()) == {*by_w, *by_c, *pins, other}
            assert h.index[:2].tolist() == by_w and np.all(np.diff(h.weight) <= 0)
            assert (h.top_weight, h.top_contribution) == (hf.top_weight, hf.top_contribution)
            assert h.entropy == hf.entropy
        by_w = lay_f.index[:3].tolist()  # a layer keeps at least its top 3 (LAYER_KEYS)
        lay_c = lay_f.index[np.argsort(-lay_f.contribution, kind="stable")][:3].tolist()
        other = next(j for j in lay_f.index.tolist() if j not in pins)
        assert set(lay.index.tolist()) == {*by_w, *lay_c, *pins, other}
    # heads_to ranks by the exact weight on the key
    want = sorted(
        ((lay.layer, h.head, h.key(0).weight) for lay in full.layers for h in lay.heads),
        key=lambda t: -t[2],
    )
    got = [(layer, head, k.weight) for layer, head, k in r.heads_to("The")]
    assert got == want


def test_heads_to_refuses_a_key_it_did_not_keep(tiny_bidir):
    r = explain(SENTENCE, "it", model=tiny_bidir, top=1)
    kept = {j for lay in r.layers for h in lay.heads for j in h.index.tolist()}
    missing = next(j for j in range(len(r.tokens)) if j not in kept)
    with pytest.raises(ValueError, match="rerun explain with key="):
        r.heads_to(missing)


def test_causal_query_cannot_see_the_deciding_word(tiny_causal):
    a = explain(SENTENCE, "it", model=tiny_causal, top=0)
    b = explain(SENTENCE_B, "it", model=tiny_causal, top=0)
    for la, lb in zip(a.layers, b.layers, strict=True):
        for ha, hb in zip(la.heads, lb.heads, strict=True):
            np.testing.assert_array_equal(ha.index, hb.index)
            np.testing.assert_allclose(ha.weight, hb.weight, atol=1e-7)
    assert any("cannot change its lookups" in n for n in a.notes)


def test_layer_and_head_filters(tiny_causal):
    full = explain(SENTENCE, "excited", model=tiny_causal, top=0)
    one = explain(SENTENCE, "excited", model=tiny_causal, top=0, layer=1, head=3, rollout=False)
    assert [lay.layer for lay in one.layers] == [1] and [h.head for h in one.layers[0].heads] == [3]
    np.testing.assert_allclose(one.head(1, 3).weight, full.head(1, 3).weight, atol=1e-6)
    neg = explain(SENTENCE, "excited", model=tiny_causal, layer=-1, head=-1, rollout=False)
    assert (neg.layers[0].layer, neg.layers[0].heads[0].head) == (2, 3)
    assert one.rollout is None


def test_rollout_through_a_chosen_layer(tiny_bidir):
    r = explain(SENTENCE, "it", model=tiny_bidir, layer=1, rollout=True)
    orc = oracle(tiny_bidir, SENTENCE)
    assert r.rollout.through_layer == 1
    np.testing.assert_allclose(r.rollout.values, rollout64(orc[:2], r.query.index), atol=1e-6)


def test_token_by_index_word_and_occurrence(tiny_bidir):
    text = "The dog saw the other dog."
    r1 = explain(text, "dog", model=tiny_bidir, occurrence=2, rollout=False)
    r2 = explain(text, 6, model=tiny_bidir, rollout=False)  # [CLS] The dog saw the other dog
    assert r1.query == r2.query and r1.query.text == "dog" and r1.query.index == 6
    assert explain(text, "[SEP]", model=tiny_bidir, rollout=False).query.index == len(r1.tokens) - 1
    assert (
        explain(text, "DOG", model=tiny_bidir, rollout=False).query.index == 2
    )  # case-insensitive fallback


@pytest.mark.parametrize("j", [5, 200])  # direct product below the crossover, Gram route above
def test_value_norms_both_routes(j):
    g = torch.Generator().manual_seed(0)
    vh = torch.randn(3, j, 16, generator=g)
    W_O = torch.randn(3, 16, 40, generator=g)
    want = torch.einsum("hje,hem->hjm", vh.double(), W_O.double()).norm(dim=-1)
    torch.testing.assert_close(value_norms(vh, W_O).double(), want, rtol=1e-5, atol=1e-6)


def test_layer_contributions_prune_exactly():
    """The bound-ordered scan returns the exact top-k of the layer norm without computing all."""
    g = torch.Generator().manual_seed(1)
    H, J, E, M, top = 4, 1500, 8, 24, 5
    w = torch.softmax(3 * torch.randn(H, J, generator=g, dtype=torch.float64), -1)
    vh, W_O = torch.randn(H, J, E, generator=g), torch.randn(H, E, M, generator=g)
    full = torch.einsum("hj,hje,hem->jm", w, vh.double(), W_O.double()).norm(dim=-1).numpy()
    bound = (w * value_norms(vh, W_O).double()).sum(0).numpy()
    assert np.all(bound >= full * (1 - 1e-6))
    cand, need = np.arange(J), np.array([7, 9])
    got = layer_contributions(w, vh, W_O, bound, cand, need, top)
    done = ~np.isnan(got)
    assert done.sum() < J / 2  # it pruned
    np.testing.assert_allclose(got[done], full[done], rtol=1e-5)
    assert set(np.argsort(-np.nan_to_num(got, nan=-1))[:top]) == set(np.argsort(-full)[:top])
    assert done[need].all()


@pytest.mark.parametrize("which", ["tiny_causal", "tiny_bidir"])
def test_rollout_in_one_row_chunks(which, request, monkeypatch):
    """Chunking the rows (one query row at a time, causal prefixes) changes nothing."""
    model = request.getfixturevalue(which)
    want = explain(SENTENCE, "was", model=model, rollout=True).rollout.values
    monkeypatch.setattr(rollout_module, "CHUNK_ELEMENTS", 1)
    got = explain(SENTENCE, "was", model=model, rollout=True).rollout.values
    np.testing.assert_allclose(got, want, atol=1e-7)
    i = explain(SENTENCE, "was", model=model, layer=0, head=0).query.index
    np.testing.assert_allclose(got, rollout64(oracle(model, SENTENCE), i), atol=1e-6)


REPEATS = "The dog saw the other dog because it was tired."  # "dog" at tokens 1 and 5


def test_key_occurrence_picks_the_repeat_and_heads_to_follows_it(tiny_causal):
    """--key WORD used to take the first occurrence only, and heads_to() re-read the word."""
    full = explain(REPEATS, "it", model=tiny_causal, top=0, rollout=False)
    r = explain(REPEATS, "it", model=tiny_causal, top=1, key="dog", key_occurrence=2)
    assert r.key.index == 5 and r.key.text == "dog"
    want = sorted(
        ((lay.layer, h.head, h.key(5).weight) for lay in full.layers for h in lay.heads),
        key=lambda t: -t[2],
    )
    assert [(lay, h, k.weight) for lay, h, k in r.heads_to()] == want  # the record's own key
    assert [k.index for _, _, k in r.heads_to("dog", occurrence=2)] == [5] * len(want)
    assert [k.index for _, _, k in full.heads_to("dog", occurrence=-1)] == [5] * len(want)
    assert explain(REPEATS, "it", model=tiny_causal, key=-6, rollout=False).key.index == 5
    assert any(
        "'dog' occurs 2 times (tokens 1, 5); this is the 2nd (token 5)" in n for n in r.notes
    )


def test_heads_to_error_advises_a_key_that_picks_the_same_token(tiny_bidir):
    r = explain(REPEATS, "it", model=tiny_bidir, top=1, rollout=False)
    kept = {j for lay in r.layers for h in lay.heads for j in h.index.tolist()}
    missing = next(j for j in range(len(r.tokens)) if j not in kept)
    with pytest.raises(
        ValueError, match=rf"\(token {missing}\).*rerun explain with key={missing} "
    ):
        r.heads_to(missing)
    # the advice is right: that rerun keeps the token in every head
    again = explain(REPEATS, "it", model=tiny_bidir, top=1, key=missing, rollout=False)
    assert len(again.heads_to()) == sum(len(lay.heads) for lay in again.layers)


def test_layer_aggregates_do_not_depend_on_top(tiny_causal, tiny_bidir):
    """With top=1 the per-layer table showed a second entry that was not the layer's second."""
    for model in (tiny_causal, tiny_bidir):
        full = explain(REPEATS, "it", model=model, top=0, rollout=False)
        for top in (1, 2):
            r = explain(REPEATS, "it", model=model, top=top, rollout=False)
            for lay_f, lay in zip(full.layers, r.layers, strict=True):
                assert lay.index[:3].tolist() == lay_f.index[:3].tolist()
                by_c = lay_f.index[np.argsort(-lay_f.contribution, kind="stable")][:3]
                got = lay.index[np.argsort(-lay.contribution, kind="stable")][:3]
                assert got.tolist() == by_c.tolist()


def test_every_head_keeps_its_sinks_and_the_next_key(tiny_bidir):
    """The "focused heads" view needs the key with most weight besides the sinks, exactly."""
    full = explain(REPEATS, "it", model=tiny_bidir, top=0, rollout=False)
    r = explain(REPEATS, "it", model=tiny_bidir, top=1, rollout=False)
    sinks = {0, r.query.index, len(r.tokens) - 1}  # [CLS], the query, [SEP]
    for lay_f, lay in zip(full.layers, r.layers, strict=True):
        for hf, h in zip(lay_f.heads, lay.heads, strict=True):
            assert sinks <= set(h.index.tolist())
            first = lambda x: next(j for j in x.index.tolist() if j not in sinks)  # noqa: E731
            assert first(h) == first(hf)
