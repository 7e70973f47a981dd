"""`norm_min` in `qkv.nn.route` / `SparseMoE` (ERNIE 4.5's moe_norm_min: the renormalising sum
clamped from below): against transformers' Ernie4_5_MoeTopKRouter in float32 with the clamp
acting on some tokens and not on others, against a float64 oracle written here one token at a
time; the clamp can fail the check; bad settings are named.

Awkward sizes: 16 experts, top 5, 203 tokens, d_model 60; norm_min 0.75.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from qkv.nn import MoEConfig, SparseMoE, route

transformers = pytest.importorskip("transformers", reason="transformers is the parity oracle")

E, K, N, M, FLOOR = 16, 5, 203, 60, 0.75


def _ernie_router():
    from transformers.models.ernie4_5_moe.modeling_ernie4_5_moe import Ernie4_5_MoeTopKRouter

    cfg = transformers.Ernie4_5_MoeConfig(moe_num_experts=E, moe_k=K, hidden_size=M,
                                          moe_norm_min=FLOOR)  # fmt: skip
    router = Ernie4_5_MoeTopKRouter(cfg)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        router.weight.copy_(torch.randn(router.weight.shape, generator=gen) * 0.3)
        router.moe_statics.e_score_correction_bias.copy_(torch.randn(1, E, generator=gen) * 0.05)
    return router


def _h(dtype=torch.float32):
    return torch.randn(N, M, generator=torch.Generator().manual_seed(1), dtype=dtype)


def oracle64(logits, bias, top_k, floor):
    """ERNIE's routing in float64, one token at a time, in plain Python: softmax, the top k by
    softmax + bias, their softmax weights / max(their sum, floor)."""
    ws, ids = [], []
    for row in logits.double().tolist():
        z = sum(math.exp(x - max(row)) for x in row)
        p = [math.exp(x - max(row)) / z for x in row]
        s = [pe + be for pe, be in zip(p, bias.double().tolist(), strict=True)]
        chosen = sorted(range(len(s)), key=lambda e: -s[e])[:top_k]
        total = max(sum(p[e] for e in chosen), floor)
        ws.append([p[e] / total for e in chosen])
        ids.append(chosen)
    return torch.tensor(ws, dtype=torch.float64), torch.tensor(ids)


def test_route_with_norm_min_equals_ernie_router():
    router = _ernie_router()
    bias = router.moe_statics.e_score_correction_bias[0].detach()
    with torch.no_grad():
        _, want_w, want_idx = router(_h())
        logits = F.linear(_h(), router.weight)
    w, idx = route(logits, K, True, score_bias=bias, norm_min=FLOOR)
    assert torch.equal(idx, want_idx)
    assert float((w - want_w).abs().max() / want_w.abs().max()) <= 1e-6
    logits64 = F.linear(_h(torch.float64), router.weight.detach().double())  # (n e)
    want64 = oracle64(logits64, bias, K, FLOOR)
    w64, idx64 = route(logits64, K, True, score_bias=bias.double(), norm_min=FLOOR)
    assert torch.equal(idx64, want64[1])
    assert float((w64 - want64[0]).abs().max()) <= 1e-12


def test_the_clamp_acts_on_some_tokens_and_can_fail_the_check():
    """Here the floor binds on some tokens and not on others; routing without it differs from
    ERNIE's on exactly those."""
    router = _ernie_router()
    bias = router.moe_statics.e_score_correction_bias[0].detach()
    with torch.no_grad():
        _, want_w, _ = router(_h())
        logits = F.linear(_h(), router.weight)
    plain, _ = route(logits, K, True, score_bias=bias)
    clamped = (want_w.sum(-1) < 1 - 1e-6).float().mean()
    assert 0.1 < clamped < 0.9
    assert float((plain - want_w).abs().max()) > 1e-2


def test_sparse_moe_carries_norm_min():
    moe = SparseMoE(M, 23, E, K, score_bias=True, norm_min=FLOOR)
    assert moe.norm_min == FLOOR and "norm_min=0.75" in repr(moe)
    assert SparseMoE.from_config(M, MoEConfig(E, K, 23, norm_min=FLOOR)).norm_min == FLOOR
    x = torch.randn(2, 7, M, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        w, idx = route(moe.router(x.view(-1, M)), K, True, score_bias=moe.score_bias,
                       norm_min=FLOOR)  # fmt: skip
        want = torch.stack([sum(w[t, j] * moe.experts[idx[t, j]](x.view(-1, M)[t])
                                for j in range(K)) for t in range(14)])  # fmt: skip
        assert torch.allclose(moe(x).view(-1, M), want, atol=1e-6)


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"norm_min": -1.0}, r"norm_min must be a finite number ≥ 0, got -1\.0"),
        ({"norm_min": math.nan}, r"norm_min must be a finite number ≥ 0, got nan"),
        ({"norm_min": True}, r"norm_min must be a finite number ≥ 0, got True"),
        ({"norm_min": 0.5, "normalise": False},
         r"norm_min=0\.5 bounds the renormalising sum from below; it needs normalise=True"),
        ({"norm_min": 0.5, "order": "topk_softmax"}, r"norm_min=0\.5 .* order='topk_softmax'"),
    ],
)  # fmt: skip
def test_bad_norm_min_is_named(kw, match):
    with pytest.raises(ValueError, match="MoEConfig: " + match):
        MoEConfig(E, K, 23, **kw)
    with pytest.raises(ValueError, match="route: " + match):
        route(torch.zeros(3, E), K, **{"normalise": True, **kw})
