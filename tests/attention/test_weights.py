"""attention_weights recomputes exact softmax rows from q, k and the LSE."""

from __future__ import annotations

import pytest
import torch

import qkv
from qkv.attention import reference_attention

from .conftest import err, make_qkv

CASES = [
    dict(),
    dict(causal=True),
    dict(window=(7, 3)),
    dict(causal=True, softcap=2.0, score_mod=qkv.alibi(8)),
    dict(mask_mod=qkv.document_mask(torch.arange(203) // 50)),
]


@pytest.mark.parametrize("kw", CASES, ids=["none", "causal", "window", "mods", "document"])
@pytest.mark.parametrize("rows", [None, 0, [112, 3, 3], slice(10, 20), torch.tensor([-1])], ids=str)
def test_rows_equal_reference_weights(kw, rows):
    q, k, v = make_qkv(2, 8, 2, 113, 203, 32, dtype=torch.float64)
    truth = reference_attention(q, k, v, **kw).weights
    idx = torch.arange(113)[rows] if rows is not None else torch.arange(113)
    idx = idx.view(-1)
    _, lse = qkv.attention(q, k, v, return_lse=True, backend="tiled", **kw)
    for given in (lse, None):
        w = qkv.attention_weights(q, k, given, rows=rows, **kw)
        assert w.shape == (2, 8, idx.numel(), 203)
        assert err(w, truth[:, :, idx]) < 1e-12


def test_float32_rows_match_and_sum_to_one():
    q, k, v = make_qkv(1, 9, 3, 1, 4096, 64)  # one decode step against 4096 cached keys
    out, lse = qkv.attention(q, k, v, causal=True, return_lse=True)
    w = qkv.attention_weights(q, k, lse, rows=[0], causal=True)
    assert err(w.sum(-1), torch.ones(1, 9, 1)) < 1e-5
    assert err(w.to(v.dtype) @ v.repeat_interleave(3, 1), out) < 1e-5


def test_empty_row_weights_are_zero():
    q, k, v = make_qkv(1, 2, 2, 9, 4, 8)
    _, lse = qkv.attention(q, k, v, causal=True, return_lse=True)
    w = qkv.attention_weights(q, k, lse, rows=[0, 8], causal=True)
    assert torch.all(w[:, :, 0] == 0) and torch.isfinite(w).all()
