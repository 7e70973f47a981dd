"""Property test: for random shapes, masks and tile sizes, tiled == float64 reference."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qkv.attention import reference_attention
from qkv.attention.spec import make_spec
from qkv.attention.tiled import tiled

from .conftest import err


@st.composite
def problems(draw):
    Hk = draw(st.sampled_from([1, 2]))
    G = draw(st.sampled_from([1, 3]))
    Sq, Sk = draw(st.integers(0, 40)), draw(st.integers(0, 40))
    D = draw(st.integers(1, 9))
    kw = {}
    if draw(st.booleans()):
        kw["causal"] = True
    if draw(st.booleans()):
        kw["window"] = (draw(st.none() | st.integers(0, 8)), draw(st.none() | st.integers(0, 8)))
    if draw(st.booleans()):
        kw["softcap"] = draw(st.floats(0.5, 5.0))
    if draw(st.booleans()):
        m = draw(st.integers(2, 5))
        kw["mask_mod"] = lambda b, h, q, kv: (q * 7 + kv * 3 + h) % m != 0
    seed = draw(st.integers(0, 2**16))
    return (Hk * G, Hk, Sq, Sk, D), kw, seed, draw(st.integers(1, 17)), draw(st.integers(1, 17))


def check_tiled_against_reference(problem) -> None:
    """tiled (forward, LSE and gradients) equals the float64 reference on one drawn problem."""
    (Hq, Hk, Sq, Sk, D), kw, seed, bq, bk = problem
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, Hq, Sq, D, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, Hk, Sk, D, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, Hk, Sk, D + 1, generator=g, dtype=torch.float64, requires_grad=True)
    ref = reference_attention(q, k, v, **kw)
    out, lse = tiled(q, k, v, make_spec(q, k, v, **kw), block_q=bq, block_k=bk)
    assert err(out, ref.out) < 1e-12 and err(lse, ref.lse) < 1e-12
    do = torch.randn_like(out)
    got = torch.autograd.grad((out * do).sum(), (q, k, v))
    want = torch.autograd.grad((ref.out * do).sum(), (q, k, v))
    for a, b in zip(got, want, strict=True):
        assert torch.isfinite(a).all() and err(a, b) < 1e-10


@settings(max_examples=150, deadline=None)
@given(problems())
def test_tiled_equals_reference(problem):
    check_tiled_against_reference(problem)
