"""Keys before every query row's window are dropped before any backend runs (`api._unseen_keys`):
a sliding-window decode step reads only its last left + 1 keys. Oracle: the float64 naive
formula of conftest over all the keys; NaN put in the dropped keys must not matter, and their
gradients must be exactly 0."""

from __future__ import annotations

import pytest
import torch

import qkv
from qkv.attention import api

from .conftest import err, make_qkv, oracle

CASES = [  # (Sq, Sk, window, causal)
    (1, 700, (63, 0), True),  # a decode step of a sliding-window layer
    (1, 700, (63, None), False),
    (5, 300, (31, 2), False),
    (64, 300, (0, 0), False),
    (3, 130, (127, 0), True),  # a window wider than δ: nothing to drop (δ − left < 0)
]


@pytest.mark.parametrize(("Sq", "Sk", "window", "causal"), CASES)
@pytest.mark.parametrize("masked", ["none", "bool", "bias"])
def test_dropping_unseen_keys_changes_nothing(Sq, Sk, window, causal, masked):
    q, k, v = make_qkv(2, 4, 2, Sq, Sk, 16, dtype=torch.float64, seed=Sq + Sk, requires_grad=True)
    g = torch.Generator().manual_seed(1)
    mask = None
    if masked == "bool":
        mask = torch.rand(2, 1, Sq, Sk, generator=g) > 0.2
    elif masked == "bias":
        mask = torch.randn(1, 4, 1, Sk, generator=g, dtype=torch.float64)
    kw = {"causal": causal, "window": window, "mask": mask}
    first = max(0, Sk - Sq - window[0])  # keys no row keeps
    with torch.no_grad():  # NaN where no row looks: it must not reach anything
        k[:, :, :first] = float("nan")
        v[:, :, :first] = float("inf")
    out, lse = qkv.attention(q, k, v, return_lse=True, **kw)
    want = oracle(q.detach(), k.detach().nan_to_num(0, 0, 0), v.detach().nan_to_num(0, 0, 0), **kw)
    assert err(out, want.out) <= 1e-12 and err(lse, want.lse) <= 1e-12
    dq, dk, dv = torch.autograd.grad(out.sum() + lse.nan_to_num(0, 0, 0).sum(), (q, k, v))
    assert torch.isfinite(dq).all() and torch.isfinite(dk).all() and torch.isfinite(dv).all()
    assert (dk[:, :, :first] == 0).all() and (dv[:, :, :first] == 0).all()


def test_a_decode_step_reads_only_its_window(monkeypatch):
    """Sq = 1, window (511, 0) over 2048 cached keys: plain SDPA over the last 512 keys (the
    fused CPU loop took 3.7 ms a call on gemma3's local layers, SDPA on 512 keys far less)."""
    seen = []
    real = api.sdpa
    monkeypatch.setattr(api, "sdpa", lambda q, k, v, spec: seen.append((k.shape[2], spec.left,
                                                                        spec.right)) or real(q, k, v, spec))  # fmt: skip
    q, k, v = make_qkv(1, 4, 1, 1, 2048, 64, seed=3)
    out = qkv.attention(q, k, v, causal=True, window=(511, 0))
    assert seen == [(512, None, None)]
    want = oracle(q, k, v, causal=True, window=(511, 0))
    assert err(out, want.out) <= 1e-5
