"""Shared helpers for the engine tests: inputs, the float64 oracle and the error budget.

Error budget (flash-attn style): a backend's max error against a float64 run of the reference
must be at most FACTOR × the error of the plain same-dtype reference, plus a tiny floor.
"""

from __future__ import annotations

import pytest
import torch

from qkv.attention import reference_attention

DTYPES = (torch.float32, torch.bfloat16, torch.float64)
# absolute floor added to the budget, per dtype (one table, keyed by dtype)
FLOOR = {torch.float64: 1e-12, torch.float32: 1e-6, torch.bfloat16: 1e-3, torch.float16: 1e-4}
FWD_FACTOR = 2.0
GRAD_FACTOR = 3.0


def make_qkv(B, Hq, Hk, Sq, Sk, D, Dv=None, dtype=torch.float32, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    Dv = D if Dv is None else Dv
    q = torch.randn(B, Hq, Sq, D, generator=g, dtype=torch.float64)
    k = torch.randn(B, Hk, Sk, D, generator=g, dtype=torch.float64)
    v = torch.randn(B, Hk, Sk, Dv, generator=g, dtype=torch.float64)
    out = [t.to(dtype).requires_grad_(requires_grad) for t in (q, k, v)]
    return out


def oracle(q, k, v, **kw):
    """The float64 reference on the very same (rounded) inputs."""
    return reference_attention(q.detach().double(), k.detach().double(), v.detach().double(), **kw)


def err(a, b):
    """Max abs difference; equal infinities (an empty row's LSE −inf) count as exact, NaN fails."""
    a, b = a.double(), b.double()
    if not a.numel():
        return 0.0
    return torch.where(a == b, torch.zeros_like(a), (a - b).abs()).max().item()


def assert_within_budget(got, plain, truth, dtype, factor=FWD_FACTOR, what="output"):
    e_got, e_plain = err(got, truth), err(plain, truth)
    budget = factor * e_plain + FLOOR[dtype]
    assert e_got <= budget, (
        f"{what}: error {e_got:.3g} > {factor}× plain {e_plain:.3g} + floor {FLOOR[dtype]:.0e}"
    )


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
