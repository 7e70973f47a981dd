"""Equal to PyTorch's scaled_dot_product_attention wherever the semantics coincide."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

import qkv

from .conftest import FLOOR, err, make_qkv, oracle

# PyTorch SDPA (its own C++ kernel) vs ours, same dtype: both approximate the same float64
# value, so allow each its rounding: a few ulps of the output scale.
TOL = {torch.float32: 2e-5, torch.float64: 1e-12, torch.bfloat16: 3e-2}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", ["tiled", "auto", "reference"])
def test_is_causal_when_square(backend, dtype):
    q, k, v = make_qkv(2, 8, 8, 203, 203, 64, dtype=dtype)
    want = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert err(qkv.attention(q, k, v, causal=True, backend=backend), want) <= TOL[dtype]


@pytest.mark.parametrize("size", [(113, 203), (1, 239), (511, 513)], ids=str)
@pytest.mark.parametrize("backend", ["tiled", "auto", "reference"])
def test_causal_lower_right_when_rectangular(backend, size):
    Sq, Sk = size
    q, k, v = make_qkv(1, 4, 4, Sq, Sk, 40)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(Sq, Sk))
    assert err(qkv.attention(q, k, v, causal=True, backend=backend), want) <= TOL[torch.float32]


@pytest.mark.parametrize("backend", ["tiled", "auto", "reference"])
def test_bool_and_float_masks(backend):
    q, k, v = make_qkv(2, 4, 4, 113, 203, 32)
    g = torch.Generator().manual_seed(3)
    keep = torch.rand(2, 1, 113, 203, generator=g) > 0.3
    keep[..., 0] = True  # SDPA returns NaN-free output only when no row is empty
    bias = torch.randn(1, 4, 113, 203, generator=g)
    for mask in (keep, bias):
        want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        assert err(qkv.attention(q, k, v, mask=mask, backend=backend), want) <= TOL[torch.float32]


@pytest.mark.parametrize("layout", [(8, 2), (8, 1)], ids=["gqa", "mqa"])
@pytest.mark.parametrize("backend", ["tiled", "auto", "reference"])
def test_enable_gqa(backend, layout):
    Hq, Hk = layout
    q, k, v = make_qkv(2, Hq, Hk, 129, 129, 64)
    want = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    assert err(qkv.attention(q, k, v, causal=True, backend=backend), want) <= TOL[torch.float32]


def test_gradients_match_sdpa():
    q, k, v = make_qkv(1, 8, 2, 300, 300, 64, requires_grad=True)
    do = torch.randn(1, 8, 300, 64)
    (F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True) * do).sum().backward()
    want = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    (qkv.attention(q, k, v, causal=True, backend="tiled") * do).sum().backward()
    for name, t, w in zip("qkv", (q, k, v), want, strict=True):
        assert err(t.grad, w) <= 1e-4 + FLOOR[torch.float32], f"d{name}"


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("layout", [(8, 8), (9, 3)], ids=["mha", "gqa"])
def test_sdpa_lse_path_matches_oracle(layout, causal):
    """Without gradients, `auto` takes (out, lse) from PyTorch's CPU flash kernel: check both."""
    Hq, Hk = layout
    q, k, v = make_qkv(1, Hq, Hk, 300, 300, 64)
    truth = oracle(q, k, v, causal=causal)
    with torch.no_grad():
        for backend in ("sdpa", "auto"):
            out, lse = qkv.attention(q, k, v, causal=causal, return_lse=True, backend=backend)
            assert (
                err(out, truth.out) <= TOL[torch.float32]
                and err(lse, truth.lse) <= TOL[torch.float32]
            )
