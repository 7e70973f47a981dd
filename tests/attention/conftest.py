"""Shared helpers for the engine tests: inputs, the float64 oracle and the error budget.

Error budget (flash-attn style): a backend's max error against the float64 oracle must be at
most FACTOR × the error of the plain same-dtype implementation, plus a tiny floor.

Both the oracle and the plain implementation are `naive`, written out here and sharing no code
with `qkv.attention` (the reference backend included, which computes fp16/bf16 in fp32 and so
is no longer "plain"): run on float64 inputs it is the oracle; run on the inputs as given it is
what plain PyTorch does in that dtype.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import pytest
import torch

from . import sm90

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


class Naive(NamedTuple):
    out: torch.Tensor  # (b h i e) in the inputs' dtype
    lse: torch.Tensor  # (b h i) fp32 (fp64 for fp64 inputs), −inf for an empty row


def naive(q, k, v, *, causal=False, window=None, mask=None, mask_mod=None, score_mod=None,
          scale=None, softcap=None, sinks=None):  # fmt: skip
    """Attention as plain PyTorch code in the inputs' dtype: `q @ kᵀ` is a matmul in that dtype
    (so fp16/bf16 scores are rounded to it), then fp32 for softcap, score_mod, masks and the
    softmax (as FlexAttention's eager path), weights rounded to the dtype before `@ v`.
    Bottom-right aligned (query i at position i + Sk − Sq); an empty row gives 0 and LSE −inf.
    `sinks` (Hq,): one more logit per row of head h, exp(σ_h) added to the row's total.
    Differentiable by autograd, so its gradients are the plain same-dtype ones as well."""
    B, Hq, Sq, D = q.shape
    Hk, Sk = k.shape[1], k.shape[2]
    g = Hq // Hk
    wide = torch.float64 if q.dtype == torch.float64 else torch.float32
    k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
    s = (q @ k.transpose(-1, -2)).to(wide) * (1 / math.sqrt(D) if scale is None else scale)
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    i = torch.arange(Sq).view(-1, 1) + (Sk - Sq)  # absolute query positions
    j = torch.arange(Sk).view(1, -1)
    b4, h4 = torch.arange(B).view(-1, 1, 1, 1), torch.arange(Hq).view(1, -1, 1, 1)
    if score_mod is not None:
        s = score_mod(s, b4, h4, i.view(1, 1, Sq, 1), j.view(1, 1, 1, Sk)).to(wide).expand_as(s)
    keep = torch.ones(B, Hq, Sq, Sk, dtype=torch.bool)
    left, right = window if window is not None else (None, None)
    if causal:
        right = 0 if right is None else min(right, 0)
    if left is not None:
        keep &= j >= i - left
    if right is not None:
        keep &= j <= i + right
    if mask is not None and mask.dtype == torch.bool:
        keep &= mask
    elif mask is not None:
        s = s + mask.to(wide)
    if mask_mod is not None:
        keep &= mask_mod(b4, h4, i.view(1, 1, Sq, 1), j.view(1, 1, 1, Sk))
    s = s.masked_fill(~keep, float("-inf"))
    m = s.detach().amax(-1, keepdim=True)
    if sinks is not None:
        sig = sinks.to(wide).view(1, -1, 1, 1)
        m = torch.maximum(m, sig.detach())
    e = torch.exp(s - torch.where(torch.isfinite(m), m, 0.0))  # (b h i j), all 0 in an empty row
    total = e.sum(-1, keepdim=True)
    if sinks is not None:
        total = total + torch.exp(sig - torch.where(torch.isfinite(m), m, 0.0))
    empty = total == 0
    w = e / torch.where(empty, 1.0, total)
    lse = torch.where(empty, float("-inf"), m + torch.log(torch.where(empty, 1.0, total)))
    return Naive(out=w.to(v.dtype) @ v, lse=lse.squeeze(-1))


def same_dtype(q, k, v, **kw) -> Naive:
    """The plain same-dtype implementation the error budget is measured against."""
    return naive(*(t.detach() for t in (q, k, v)), **kw)


def oracle(q, k, v, **kw) -> Naive:
    """The float64 truth on the very same (rounded) inputs."""
    return naive(*(t.detach().double() for t in (q, k, v)), **kw)


def err(a, b):
    """Max abs difference; equal infinities (an empty row's LSE −inf) count as exact, NaN fails."""
    a, b = a.double(), b.double()
    if not a.numel():
        return 0.0
    return torch.where(a == b, torch.zeros_like(a), (a - b).abs()).max().item()


def check_masked_nonfinite_grads(q, k, v, kw, run, key=5, value=12) -> None:
    """Key `key` gets a NaN and value `value` an inf (entries no row keeps under `kw`);
    `run(q, k, v)` returns the output. Every gradient must be finite and equal, within 1e-5,
    the float64 `naive` reference's on K/V with those entries zeroed: non-finite masked K/V
    never leak."""
    k2, v2 = k.detach().clone(), v.detach().clone()
    k2[:, :, key, 2] = float("nan")
    v2[:, :, value, 0] = float("inf")
    xs = [t.detach().clone().requires_grad_() for t in (q, k2, v2)]
    run(*xs).sum().backward()
    ref = [t.detach().cpu().double().requires_grad_() for t in (q, k, v)]
    with torch.no_grad():
        ref[1][:, :, key] = 0.0
        ref[2][:, :, value] = 0.0
    naive(*ref, **kw).out.sum().backward()
    for x, r in zip(xs, ref, strict=True):
        assert torch.isfinite(x.grad).all()
        assert err(x.grad.cpu(), r.grad) < 1e-5


def assert_within_budget(got, plain, truth, dtype, factor=FWD_FACTOR, what="output"):
    e_got, e_plain = err(got, truth), err(plain, truth)
    budget = factor * e_plain + FLOOR[dtype]
    assert e_got <= budget, (
        f"{what}: error {e_got:.3g} > {factor}× plain {e_plain:.3g} + floor {FLOOR[dtype]:.0e}"
    )


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def sm90_build(request):
    """test_triton_build's sm_90 build (`sm90.start`), started by the first test that asks for
    it: test_triton.py's first (they run Triton's interpreter, on one core; the build, niced,
    takes the other), else the build's own test. None when that test is not selected or cannot
    build here."""
    selected = any(item.nodeid == sm90.TEST for item in request.session.items)
    if not selected or sm90.cannot_build() is not None:
        yield None
        return
    proc = sm90.start(nice=10)
    yield proc
    sm90.stop(proc)  # still running only if the session ended before the test read it
