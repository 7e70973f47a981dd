"""Ready-made mods equal masks built independently, element by element."""

from __future__ import annotations

import math

import pytest
import torch

import qkv

from .conftest import err, make_qkv

B, H, SQ, SK = 2, 4, 6, 9


def dense(fn):
    """Evaluate a predicate of (b, h, i_abs, j) with Python loops: the independent oracle."""
    out = torch.zeros(B, H, SQ, SK, dtype=torch.bool)
    for b in range(B):
        for h in range(H):
            for i in range(SQ):
                for j in range(SK):
                    out[b, h, i, j] = bool(fn(b, h, i + SK - SQ, j))
    return out


def test_causal_table_from_the_design_doc():
    q, k, v = make_qkv(1, 1, 1, 2, 5, 4, dtype=torch.float64)
    w = qkv.reference_attention(q, k, v, causal=True).weights[0, 0]
    assert (w > 0).int().tolist() == [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]


def test_window_W_minus_one_attends_exactly_W_keys():
    q, k, v = make_qkv(1, 1, 1, 10, 10, 4, dtype=torch.float64)
    w = qkv.reference_attention(q, k, v, window=(3, 0)).weights[0, 0]
    assert (w > 0).sum(-1).tolist() == [1, 2, 3] + [4] * 7


MODS = {
    "causal": (qkv.causal_mask, lambda b, h, i, j: j <= i),
    "window": (qkv.sliding_window_mask(2, 1), lambda b, h, i, j: i - 2 <= j <= i + 1),
    "lengths": (qkv.key_padding_mask(torch.tensor([9, 4])), lambda b, h, i, j: j < [9, 4][b]),
    "keep": (
        qkv.key_padding_mask(torch.arange(SK).expand(B, SK) % 3 != 1),
        lambda b, h, i, j: j % 3 != 1,
    ),
    "document": (
        qkv.document_mask(torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2])),
        lambda b, h, i, j: [0, 0, 0, 1, 1, 2, 2, 2, 2][i] == [0, 0, 0, 1, 1, 2, 2, 2, 2][j],
    ),
    "prefix": (qkv.prefix_lm_mask(4), lambda b, h, i, j: j < 4 or j <= i),
    "and": (
        qkv.and_masks(qkv.causal_mask, qkv.sliding_window_mask(1)),
        lambda b, h, i, j: i - 1 <= j <= i,
    ),
    "or": (
        qkv.or_masks(lambda b, h, q, kv: kv < 2, qkv.sliding_window_mask(0)),
        lambda b, h, i, j: j < 2 or j == i,
    ),
}


@pytest.mark.parametrize("name", list(MODS))
def test_mask_mods_equal_dense_predicates(name):
    mod, pred = MODS[name]
    q, k, v = make_qkv(B, H, H, SQ, SK, 8, dtype=torch.float64)
    want = qkv.reference_attention(q, k, v, mask=dense(pred)).out
    for backend in ("reference", "tiled", "auto"):
        assert err(qkv.attention(q, k, v, mask_mod=mod, backend=backend), want) < 1e-12, backend


def test_flags_equal_their_mods():
    q, k, v = make_qkv(B, H, 2, SQ, SK, 8, dtype=torch.float64)
    assert (
        err(qkv.attention(q, k, v, causal=True), qkv.attention(q, k, v, mask_mod=qkv.causal_mask))
        < 1e-12
    )
    a = qkv.attention(q, k, v, window=(2, 1))
    assert err(a, qkv.attention(q, k, v, mask_mod=qkv.sliding_window_mask(2, 1))) < 1e-12
    a = qkv.attention(q, k, v, softcap=1.5)
    assert err(a, qkv.attention(q, k, v, score_mod=qkv.softcap(1.5))) < 1e-12


def test_alibi_equals_explicit_bias():
    q, k, v = make_qkv(B, 8, 8, SQ, SK, 8, dtype=torch.float64)
    slopes = [2 ** (-(h + 1)) for h in range(8)]  # 2^(−8(h+1)/8)
    bias = torch.tensor(
        [
            [[-slopes[h] * abs(i + SK - SQ - j) for j in range(SK)] for i in range(SQ)]
            for h in range(8)
        ],
        dtype=torch.float64,
    )
    want = qkv.reference_attention(q, k, v, mask=bias).out
    for backend in ("reference", "tiled"):
        assert err(qkv.attention(q, k, v, score_mod=qkv.alibi(8), backend=backend), want) < 1e-12


def test_alibi_per_batch_slopes_equal_explicit_bias():
    """(B, H) slopes, as flash-attn's `alibi_slopes` takes them: row b uses slopes[b]."""
    q, k, v = make_qkv(B, 4, 4, SQ, SK, 8, dtype=torch.float64)
    slopes = torch.tensor([[0.5, 0.25, 0.125, 0.0625], [0.3, 0.2, 0.1, 0.0]], dtype=torch.float64)
    bias = torch.tensor(
        [
            [[[-slopes[b, h].item() * abs(i + SK - SQ - j) for j in range(SK)] for i in range(SQ)]
             for h in range(4)]
            for b in range(B)
        ],
        dtype=torch.float64,
    )  # fmt: skip
    want = qkv.reference_attention(q, k, v, mask=bias).out
    for backend in ("reference", "tiled"):
        got = qkv.attention(q, k, v, score_mod=qkv.alibi(slopes), backend=backend)
        assert err(got, want) < 1e-12, backend


def test_alibi_slopes_non_power_of_two():
    s = qkv.alibi_slopes(12)  # Press et al.: 8 slopes of n=8, then every other slope of n=16
    want = [2 ** (-(i + 1)) for i in range(8)] + [2 ** (-0.5 * (2 * i + 1)) for i in range(4)]
    assert err(s, torch.tensor(want)) < 1e-12 and math.isclose(s[0].item(), 0.5)


def test_mods_use_absolute_positions_when_decoding():
    """A decode step (Sq=1) with a mod must equal the last row of the full prefill."""
    q, k, v = make_qkv(1, 4, 2, 12, 12, 8, dtype=torch.float64)
    mod = qkv.and_masks(qkv.sliding_window_mask(4), qkv.document_mask(torch.arange(12) // 5))
    full = qkv.attention(q, k, v, mask_mod=mod, score_mod=qkv.alibi(4))
    step = qkv.attention(q[:, :, -1:], k, v, mask_mod=mod, score_mod=qkv.alibi(4))
    assert err(step, full[:, :, -1:]) < 1e-12
