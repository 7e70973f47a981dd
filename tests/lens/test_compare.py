"""`qkv.compare`: the moved weights equal the difference of the two texts' rows — of the two
`explain` records and of transformers' `output_attentions` on a tiny checkpoint; a causal
query that cannot see the difference is measured unchanged and the comparison moves to the
first differing token; bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import qkv
from qkv.lens import compare, compare_records, explain

from .conftest import SENTENCE, SENTENCE_B

TEXT = "the dog chased the ball because it was excited"  # words of the tiny HF tokenizer
TEXT_B = "the dog chased the ball because it was round"
LENS_TOL = 1e-5  # a lens row vs transformers' probabilities (fp32), as tests/models uses


def full_row(h, n: int, what: str = "weight") -> np.ndarray:
    out = np.zeros(n)
    out[h.index] = getattr(h, what)
    return out


@pytest.mark.parametrize("which", ["tiny_causal", "tiny_bidir"])
def test_moved_weights_are_the_difference_of_the_explain_rows(which, request):
    model = request.getfixturevalue(which)
    r = compare(SENTENCE, SENTENCE_B, "it", model=model)
    q = r.query_a.index
    a = explain(SENTENCE, q, model=model, top=0)
    b = explain(SENTENCE_B, q, model=model, top=0)
    assert r.matched == [j for j in range(len(a.tokens)) if a.tokens[j].text == b.tokens[j].text]
    assert len(r.heads) == model.config.n_layers * model.config.n_heads
    for lay_a, lay_b in zip(a.layers, b.layers, strict=True):
        for ha, hb in zip(lay_a.heads, lay_b.heads, strict=True):
            m = r.head(lay_a.layer, ha.head)
            for what in ("weight", "contribution"):
                ra, rb = full_row(ha, len(a.tokens), what), full_row(hb, len(b.tokens), what)
                got = getattr(m, f"delta_{what}")
                np.testing.assert_array_equal(got, rb[m.index] - ra[m.index])
            assert m.unmatched_a == pytest.approx(1 - m.weight_a.sum(), abs=1e-6)
    assert r.movers(1)[0].delta_weight == max((d for h in r.heads for d in h.delta_weight), key=abs)


@pytest.fixture(scope="module")
def hf_pair(tmp_path_factory):
    """A random llama / bert checkpoint (transformers) and the same files loaded by qkv."""
    fam = pytest.importorskip("tests.models.test_families")
    out = {}
    for mt in ("llama", "bert"):
        folder = tmp_path_factory.mktemp(mt)
        ref = fam.build(mt, folder)
        fam.word_tokenizer().save(str(folder / "tokenizer.json"))
        out[mt] = (ref, qkv.load(folder))
    return out


@pytest.mark.parametrize("mt", ["llama", "bert"])
def test_moved_weights_equal_output_attentions_differences(hf_pair, mt):
    ref, model = hf_pair[mt]
    r = compare(TEXT, TEXT_B, "it", model=model, progress=False)
    atts = []
    for text in (TEXT, TEXT_B):
        with torch.no_grad():
            ids = torch.tensor([model.tokenizer.encode(text).ids])
            atts.append(ref(ids, output_attentions=True).attentions)  # per layer (b h i j)
    ia, ib = r.query_a.index, r.query_b.index
    if mt == "llama":  # causal: "it" cannot see "excited"/"round", so compare moved to it
        assert r.asked is not None and r.asked.text.strip() == "it"
        assert r.tokens_a[ia].text.strip() == "excited" and r.tokens_b[ib].text.strip() == "round"
    else:
        assert r.asked is None and r.tokens_a[ia].text.strip() == "it"
    worst = 0.0
    for m in r.heads:
        wa = atts[0][m.layer][0, m.head, ia].double().numpy()
        wb = atts[1][m.layer][0, m.head, ib].double().numpy()
        want = wb[m.index] - wa[m.index]
        worst = max(worst, float(np.abs(m.delta_weight - want).max()))
    assert worst <= 2 * LENS_TOL
    assert max(h.moved for h in r.heads) > 0.05  # the comparison does move something


def test_causal_query_that_cannot_see_the_difference(tiny_causal):
    r = compare(SENTENCE, SENTENCE_B, "it", model=tiny_causal)
    # derived from the data: the asked-for query's two rows are equal
    a = explain(SENTENCE, "it", model=tiny_causal, top=0)
    b = explain(SENTENCE_B, "it", model=tiny_causal, top=0)
    direct = compare_records(a, b)
    assert r.asked_max_delta == max(h.moved for h in direct.heads) == 0.0
    assert (r.asked.index, r.query_a.index, r.query_b.index) == (6, 8, 8)
    note = next(n for n in r.notes if "cannot differ" in n)
    assert "'excited' (A) vs 'round' (B), token 8" in note and "max |Δweight| = 0" in note
    assert r.matched == [0, 1, 2, 3, 4, 5, 6, 7, 9]
    # the same query in texts that differ before it is compared where it stands
    r2 = compare(
        "The cat chased the ball because it was excited.", SENTENCE, "it", model=tiny_causal
    )
    assert r2.asked is None and r2.query_a.index == 6 and 1 not in r2.matched
    assert max(h.moved for h in r2.heads) > 0


def test_bidirectional_query_is_compared_where_it_stands(tiny_bidir):
    r = compare(SENTENCE, SENTENCE_B, "it", model=tiny_bidir)
    assert r.asked is None and not any("cannot differ" in n for n in r.notes)
    assert max(h.moved for h in r.heads) > 0.01


def test_repr_table_and_json(tiny_causal, tmp_path):
    r = compare(SENTENCE, SENTENCE_B, "it", model=tiny_causal, layer=1)
    assert "\n" not in repr(r) and "'excited'@8 vs 'round'@8" in repr(r)
    assert {h.layer for h in r.heads} == {1}
    top = r.movers(1)[0]
    text = str(r)
    assert "top 10 movers" in text and f"{top.delta_weight:+.2f}" in text
    doc = json.loads(r.to_json(tmp_path / "c.json"))
    assert doc == json.loads((tmp_path / "c.json").read_text(encoding="utf-8"))
    assert doc["schema"] == "qkv.compare/1" and doc["asked"]["text"].strip() == "it"
    h = doc["heads"][0]
    np.testing.assert_array_equal(np.subtract(*h["weight"][::-1]), r.heads[0].delta_weight)


@pytest.mark.parametrize(
    ("a", "b", "token", "match"),
    [
        (SENTENCE, "", "it", "text_b is empty"),
        ("  ", SENTENCE, "it", "text_a is empty"),
        (SENTENCE, SENTENCE, "it", "identical"),
        (SENTENCE, "The dog chased the ball.", "it", "text_b: .*'it'"),
        ("The dog chased the ball because it", SENTENCE, "it", "differ only after text_a ends"),
    ],
)
def test_bad_input(tiny_causal, a, b, token, match):
    with pytest.raises(ValueError, match=match):
        compare(a, b, token, model=tiny_causal)


def test_records_of_different_models_or_cut_rows(tiny_causal, tiny_bidir):
    a = explain(SENTENCE, "it", model=tiny_causal, top=0)
    b = explain(SENTENCE_B, "it", model=tiny_bidir, top=0)
    with pytest.raises(ValueError, match="different models"):
        compare_records(a, b)
    cut = explain(SENTENCE_B, "it", model=tiny_causal, top=1)
    with pytest.raises(ValueError, match="top=0"):
        compare_records(a, cut)
    with pytest.raises(TypeError, match="text_a must be a str"):
        compare(None, SENTENCE, "it", model=tiny_causal)


TEXT_LONGER = "the dog ran and chased the ball because it was excited"  # two words inserted


@pytest.mark.parametrize("mt", ["llama", "bert"])
def test_keys_after_an_insertion_stay_matched(hf_pair, mt):
    """Two words inserted in B shift every later key by 2: the keys are matched by aligning
    the token sequences (written out here by hand), and each pair's movement equals the
    difference of transformers' rows at the two positions."""
    ref, model = hf_pair[mt]
    r = compare(TEXT, TEXT_LONGER, "it", model=model, progress=False)
    want_pairs = [(0, 0), (1, 1)] + [(i, i + 2) for i in range(2, 9)]  # the dog | chased…excited
    assert list(zip(r.matched, r.matched_b, strict=True)) == want_pairs
    assert (r.query_a.index, r.query_b.index) == (6, 8) and r.asked is None
    assert any("'ran'@2, 'and'@3" in n for n in r.notes)
    # moved: (2..8 → 4..10); a causal query at 6 (8 in B) sees 5 of them ('was', 'excited': no)
    said = "5 matched keys the query sees" if mt == "llama" else "7 matched keys"
    assert any(f"{said} stand at other positions in B" in n for n in r.notes), r.notes
    atts = []
    for text in (TEXT, TEXT_LONGER):
        with torch.no_grad():
            ids = torch.tensor([model.tokenizer.encode(text).ids])
            atts.append(ref(ids, output_attentions=True).attentions)
    worst = 0.0
    for m in r.heads:
        wa = atts[0][m.layer][0, m.head, 6].double().numpy()
        wb = atts[1][m.layer][0, m.head, 8].double().numpy()
        assert (m.index_b - m.index >= 0).all()
        worst = max(worst, float(np.abs(m.delta_weight - (wb[m.index_b] - wa[m.index])).max()))
        assert m.unmatched_b == pytest.approx(wb[[2, 3]].sum(), abs=1e-5)  # 'ran', 'and'
    assert worst <= 2 * LENS_TOL
    best = r.movers(1)[0]
    assert (best.key_b - best.key) in (0, 2)


def test_a_change_that_rounds_to_zero_prints_without_a_minus(tiny_causal):
    """Δ −0.001 is printed +0.00: "-0.00" would show a decrease the table cannot resolve."""
    import dataclasses

    r = compare(SENTENCE, SENTENCE_B, "it", model=tiny_causal)
    h = r.heads[0]
    tiny = dataclasses.replace(
        h, weight_b=h.weight_a - 1e-3, contribution_b=h.contribution_a - 1e-3
    )
    r.heads = [tiny] + [dataclasses.replace(x, weight_b=x.weight_a, contribution_b=x.contribution_a)
                        for x in r.heads[1:]]  # fmt: skip
    text = str(r)
    assert "+0.00" in text and "-0.00" not in text
    assert r.movers(1)[0].delta_weight == pytest.approx(-1e-3)  # the value itself is kept
