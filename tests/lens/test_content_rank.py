"""The "rank by content" column and its marks tell the truth under `top`: a shown rank is the
key's place by contribution among every key the query sees, or "> k" when the cut record
cannot place it. Oracle: the same query's top=0 record (every visible key), sorted here."""

from __future__ import annotations

import re

import pytest
from rich.console import Console

from qkv.lens import explain
from qkv.lens.terminal import content_flag, content_ranks, head_table

from .conftest import SENTENCE


def true_ranks(full_head) -> dict[int, int]:
    """{key index: 1-based place by contribution among all visible keys}, ties by order."""
    order = sorted(range(len(full_head.index)), key=lambda r: -full_head.contribution[r])
    return {int(full_head.index[r]): n for n, r in enumerate(order, 1)}


@pytest.mark.parametrize("top", [1, 2, 3])
@pytest.mark.parametrize("token", ["excited", "it"])
def test_ranks_are_exact_or_a_true_lower_bound(tiny_causal, token, top):
    cut = explain(SENTENCE, token, model=tiny_causal, top=top)
    full = explain(SENTENCE, token, model=tiny_causal, top=0)
    exact_seen = bound_seen = 0
    for lay_c, lay_f in zip(cut.layers, full.layers, strict=True):
        for h, hf in zip(lay_c.heads, lay_f.heads, strict=True):
            truth = true_ranks(hf)
            for j, (n, exact) in zip(h.index, content_ranks(h, cut.top), strict=True):
                if exact:
                    assert n == truth[int(j)], (lay_c.layer, h.head, int(j))
                    exact_seen += 1
                else:
                    assert truth[int(j)] > top and n <= truth[int(j)]
                    bound_seen += 1
    assert exact_seen and bound_seen  # both kinds occur, so both were checked


@pytest.mark.parametrize("token", ["excited", "it"])
def test_marks_hold_for_the_true_ranks(tiny_causal, token):
    """A key marked "less" in a cut record is at least two places lower by content than by
    weight in truth; one marked "more" at least three places higher; with top=0 the marks
    are exactly the rule applied to the true ranks."""
    cut = explain(SENTENCE, token, model=tiny_causal, top=2)
    full = explain(SENTENCE, token, model=tiny_causal, top=0)
    for lay_c, lay_f in zip(cut.layers, full.layers, strict=True):
        for h, hf in zip(lay_c.heads, lay_f.heads, strict=True):
            truth = true_ranks(hf)
            by_weight = {int(j): n for n, j in enumerate(hf.index, 1)}  # ranked by weight
            for r, (j, w) in enumerate(zip(h.index, h.weight, strict=True)):
                j = int(j)
                mark = content_flag(r + 1, content_ranks(h, cut.top)[r], float(w))
                if mark == "less":
                    assert truth[j] > by_weight[j] + 1 and w > 0.05
                if mark == "more":
                    assert truth[j] + 2 < by_weight[j]
            for r, (j, w) in enumerate(zip(hf.index, hf.weight, strict=True)):
                want = ("less" if truth[int(j)] > r + 2 and w > 0.05
                        else "more" if truth[int(j)] + 2 < r + 1 else "")  # fmt: skip
                assert content_flag(r + 1, content_ranks(hf, 0)[r], float(w)) == want


def test_the_table_shows_a_cut_rank_as_more_than_k(tiny_causal):
    cut = explain(SENTENCE, "excited", model=tiny_causal, top=1)
    shown = 0
    for lay in cut.layers:
        for h in lay.heads:
            c = Console(width=200, record=True)
            c.print(head_table(cut, lay.layer, h))
            cells = re.findall(r"│\s*(> 1|\d+)(?: ←[^│]*)?\s*│\s*$", c.export_text(), re.M)
            ranks = content_ranks(h, 1)
            assert cells == [str(n) if ex else "> 1" for n, ex in ranks]
            shown += sum(not ex for _, ex in ranks)
    assert shown
