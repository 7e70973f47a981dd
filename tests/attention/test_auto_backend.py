"""`qkv.attention.auto_backend`: the backend "auto" runs, named. Oracle: running that backend
by name gives bitwise the output (and LSE) that "auto" gives, on every request kind here."""

from __future__ import annotations

import pytest
import torch

from qkv.attention import attention, auto_backend


def _qkv(dtype, sq=24, sk=24, h=4, g=2, d=16):
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, h, sq, d, generator=gen).to(dtype)
    k = torch.randn(1, g, sk, d, generator=gen).to(dtype)
    v = torch.randn(1, g, sk, d, generator=gen).to(dtype)
    return q, k, v


CASES = {
    "plain": {},
    "causal": {"causal": True},
    "window": {"causal": True, "window": (7, 0)},
    "softcap": {"causal": True, "softcap": 5.0},
    "mask": {"mask": torch.rand(1, 1, 24, 24, generator=torch.Generator().manual_seed(1)) > 0.3},
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("return_lse", [False, True])
def test_the_named_backend_is_the_one_auto_runs(dtype, case, return_lse):
    q, k, v = _qkv(dtype)
    kw = CASES[case]
    name = auto_backend(q, k, v, return_lse=return_lse, **kw)
    assert name in ("sdpa", "tiled", "fused", "reference")
    got = attention(q, k, v, **kw, return_lse=return_lse, backend=name)
    want = attention(q, k, v, **kw, return_lse=return_lse)
    for a, b in zip(*(x if return_lse else (x,) for x in (got, want)), strict=True):
        assert torch.equal(a, b), (case, dtype, name)


def test_asking_for_the_lse_changes_the_backend_in_half_precision_on_cpu():
    """What `qkv.nn` checks before it records a call (see `MultiHeadAttention._attend`)."""
    for dtype, changes in ((torch.float32, False), (torch.bfloat16, True), (torch.float16, True)):
        q, k, v = _qkv(dtype)
        pair = auto_backend(q, k, v, causal=True), auto_backend(q, k, v, causal=True,
                                                                return_lse=True)  # fmt: skip
        assert (pair[0] != pair[1]) == changes, (dtype, pair)


def test_bad_requests_are_refused_as_attention_refuses_them():
    q, k, v = _qkv(torch.float32)
    with pytest.raises(ValueError, match="window"):
        auto_backend(q, k, v, window=(-1, 0))
    with pytest.raises(TypeError):
        auto_backend(q, k, v, causel=True)
