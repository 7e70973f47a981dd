"""Learned attention sinks (`sinks=`, gpt-oss): one extra softmax logit per head, no value.

Oracles: `conftest.naive` with its `sinks` term (float64 truth, and the plain same-dtype
implementation for the error budget), and transformers' own gpt-oss eager attention, which
concatenates the sink as a column, softmaxes and drops it. Neither shares code with the engine.
"""

from __future__ import annotations

import math

import pytest
import torch

import qkv

from .conftest import (
    FWD_FACTOR,
    GRAD_FACTOR,
    assert_within_budget,
    check_masked_nonfinite_grads,
    err,
    make_qkv,
    naive,
    oracle,
    same_dtype,
)

BACKENDS = ("reference", "tiled", "fused", "auto")
# (B, Hq, Hk, Sq, Sk, D, kwargs): plain, causal, GQA, Sq > Sk (empty rows), a window, softcap
CASES = [
    (2, 4, 4, 33, 33, 16, {}),
    (1, 4, 2, 40, 40, 32, {"causal": True}),
    (2, 6, 2, 7, 50, 16, {"causal": True}),
    (1, 2, 1, 30, 12, 16, {"causal": True}),  # the first 18 rows keep no key
    (1, 4, 2, 70, 70, 16, {"window": (9, 0)}),
    (1, 2, 2, 25, 25, 24, {"softcap": 5.0, "causal": True}),
]


def sinks_for(Hq: int, dtype=torch.float64, seed: int = 1) -> torch.Tensor:
    """Sink logits around the rows' LSE (≈ log Sk), so the sink holds a real share."""
    g = torch.Generator().manual_seed(seed)
    return (2.0 + 1.5 * torch.randn(Hq, generator=g, dtype=torch.float64)).to(dtype)


def run(backend, q, k, v, sinks, kw):
    return qkv.attention(q, k, v, sinks=sinks, return_lse=True, backend=backend, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: str(c[-1]) + f"-Sq{c[3]}Sk{c[4]}")
def test_forward_and_grads_match_float64(backend, case):
    """fp32 inputs (fused computes in fp32): out, LSE and dq, dk, dv, dsinks against the
    float64 truth within 2e-5 (outputs) and 5e-5 (gradients), absolute."""
    B, Hq, Hk, Sq, Sk, D, kw = case
    q, k, v = make_qkv(B, Hq, Hk, Sq, Sk, D, requires_grad=True)
    sk = sinks_for(Hq, torch.float32).requires_grad_()
    out, lse = run(backend, q, k, v, sk, kw)
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v, sk)]
    truth = naive(*leaves[:3], sinks=leaves[3], **kw)
    assert err(out, truth.out) < 2e-5 and err(lse, truth.lse) < 2e-5
    g = torch.Generator().manual_seed(3)
    do, dl = torch.randn(out.shape, generator=g), torch.randn(lse.shape, generator=g)
    want = torch.autograd.grad(
        (truth.out * do.double()).sum() + (truth.lse * dl.double()).sum(), leaves
    )
    got = torch.autograd.grad((out * do).sum() + (lse * dl).sum(), (q, k, v, sk))
    for name, a, b in zip(("dq", "dk", "dv", "dsinks"), got, want, strict=True):
        assert err(a, b) < 5e-5, f"{name}: {err(a, b):.3g}"


@pytest.mark.parametrize("case", CASES[:4], ids=lambda c: str(c[-1]) + f"-Sq{c[3]}Sk{c[4]}")
def test_float64_is_exact(case):
    """float64 through tiled: within 1e-12 of the float64 truth, the sink's gradient too."""
    B, Hq, Hk, Sq, Sk, D, kw = case
    q, k, v = make_qkv(B, Hq, Hk, Sq, Sk, D, dtype=torch.float64, requires_grad=True)
    sk = sinks_for(Hq).requires_grad_()
    out, lse = run("tiled", q, k, v, sk, kw)
    truth = oracle(q, k, v, sinks=sk, **kw)
    assert err(out, truth.out) < 1e-12 and err(lse, truth.lse) < 1e-12
    (g_tiled,) = torch.autograd.grad(out.sum() + lse.sum(), sk)
    (g_true,) = torch.autograd.grad(truth.out.sum() + truth.lse.sum(), sk)
    assert err(g_tiled, g_true) < 1e-12


@pytest.mark.parametrize("backend", ("tiled", "auto", "reference"))
@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16))
def test_half_precision_within_flash_budget(backend, dtype):
    """bf16/fp16: error against float64 ≤ 2× (forward) / 3× (gradients) that of the plain
    same-dtype implementation + the dtype's floor (conftest), as flash-attn judges itself."""
    q, k, v = make_qkv(2, 4, 2, 48, 48, 32, dtype=dtype, requires_grad=True)
    sk = sinks_for(4, torch.float32).requires_grad_()
    kw = {"causal": True}
    out, lse = run(backend, q, k, v, sk, kw)
    plain = same_dtype(q, k, v, sinks=sk.detach(), **kw)
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v, sk)]
    truth = naive(*leaves[:3], sinks=leaves[3], **kw)
    assert_within_budget(out, plain.out, truth.out, dtype, FWD_FACTOR)
    assert err(lse, truth.lse) < 1e-5 * (1 + truth.lse.abs().max().item())
    do = torch.randn(out.shape, generator=torch.Generator().manual_seed(4)).to(dtype)
    got = torch.autograd.grad((out * do).sum(), (q, k, v))
    p_leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    plain_out = naive(*p_leaves, sinks=sk.detach(), **kw).out
    plain_g = torch.autograd.grad((plain_out * do).sum(), p_leaves)
    want = torch.autograd.grad((truth.out * do.double()).sum(), leaves[:3])
    for name, a, p, t in zip(("dq", "dk", "dv"), got, plain_g, want, strict=True):
        assert_within_budget(a, p, t, dtype, GRAD_FACTOR, what=name)


def _transformers_eager(q, k, v, sinks, causal):
    """transformers' gpt-oss eager attention on (b h i d) inputs, its mask as it builds one."""
    from transformers.models.gpt_oss import modeling_gpt_oss as m

    class Module(torch.nn.Module):
        num_key_value_groups = q.shape[1] // k.shape[1]

        def __init__(self):
            super().__init__()
            self.sinks = torch.nn.Parameter(sinks.clone())
            self.training = False

    Sq, Sk = q.shape[2], k.shape[2]
    mask = None
    if causal:
        keep = torch.ones(Sq, Sk, dtype=torch.bool).tril(Sk - Sq)
        mask = torch.zeros(Sq, Sk, dtype=q.dtype).masked_fill(~keep, torch.finfo(q.dtype).min)
        mask = mask.view(1, 1, Sq, Sk)
    out, _ = m.eager_attention_forward(Module(), q, k, v, mask, scaling=q.shape[-1] ** -0.5)
    return out.transpose(1, 2)  # transformers returns (b i h e)


@pytest.mark.parametrize("causal", (False, True))
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_transformers_gpt_oss(backend, causal):
    """transformers' gpt-oss eager attention (float64) is a second, independent oracle."""
    dtype = torch.float32 if backend == "fused" else torch.float64
    q, k, v = make_qkv(1, 8, 2, 21, 21, 16, dtype=dtype)
    sk = sinks_for(8, dtype)
    want = _transformers_eager(*(t.double() for t in (q, k, v, sk)), causal)
    got = qkv.attention(q, k, v, sinks=sk, causal=causal, backend=backend)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    assert err(got, want) < tol


def test_weights_sum_to_one_minus_the_sinks_share():
    """attention_weights with sinks: the float64 truth's rows, which sum to 1 − exp(σ − lse),
    with the LSE given or computed for the rows alone."""
    q, k, v = make_qkv(1, 4, 2, 16, 16, 8, dtype=torch.float64)
    sk = sinks_for(4)
    _, lse = qkv.attention(q, k, v, sinks=sk, causal=True, return_lse=True)
    ref = qkv.reference_attention(q, k, v, sinks=sk, causal=True)
    i = torch.arange(16).view(-1, 1)
    keep = torch.arange(16).view(1, -1) <= i
    s = (q @ k.repeat_interleave(2, 1).transpose(-1, -2) / math.sqrt(8)).masked_fill(
        ~keep, float("-inf")
    )
    col = sk.view(1, 4, 1, 1).expand(1, 4, 16, 1)
    truth = torch.softmax(torch.cat([s, col], -1), -1)  # the sink as a column, then dropped
    for w in (
        qkv.attention_weights(q, k, lse, causal=True, sinks=sk),
        qkv.attention_weights(q, k, causal=True, sinks=sk),
        ref.weights,
    ):
        assert err(w, truth[..., :-1]) < 1e-12
        assert err(1 - w.sum(-1), truth[..., -1]) < 1e-12


def test_minus_inf_sinks_change_nothing_and_empty_rows_stay_clean():
    """σ = −inf is no sink: bitwise the call without one (tiled). With Sq > Sk causal the first
    rows keep no key: output 0, LSE σ (or −inf), finite gradients."""
    q, k, v = make_qkv(1, 2, 2, 9, 5, 8, requires_grad=True)
    none = torch.full((2,), float("-inf"))
    a, la = qkv.attention(q, k, v, causal=True, return_lse=True, backend="tiled")
    b, lb = qkv.attention(q, k, v, causal=True, sinks=none, return_lse=True, backend="tiled")
    assert torch.equal(a, b) and torch.equal(la, lb)
    sk = torch.tensor([0.5, -1.0], requires_grad=True)
    for backend in BACKENDS:
        out, lse = qkv.attention(q, k, v, causal=True, sinks=sk, return_lse=True, backend=backend)
        assert torch.equal(out[:, :, :4], torch.zeros_like(out[:, :, :4]))
        assert torch.equal(lse[:, :, :4], sk.detach().view(1, 2, 1).expand(1, 2, 4))
        grads = torch.autograd.grad(out.sum() + lse.sum(), (q, k, v, sk))
        assert all(torch.isfinite(g).all() for g in grads)


def test_an_infinite_sink_takes_every_row_on_every_backend():
    """σ_h = +inf takes all of head h's weight: its rows are 0 with LSE +inf (the limit of
    σ → ∞), the other heads unchanged. The reference gave NaN (exp(inf − inf)) where the
    others gave the limit. Oracle: the limit for head 0, and for the other heads the float64
    naive attention (conftest) with their finite sinks."""
    q, k, v = make_qkv(1, 4, 2, 5, 7, 8)
    sk = torch.tensor([float("inf"), 0.0, 1.0, float("-inf")])
    want = oracle(q, k, v, sinks=torch.where(sk == float("inf"), 0.0, sk).double())
    for backend in BACKENDS:
        out, lse = qkv.attention(q, k, v, sinks=sk, return_lse=True, backend=backend)
        assert torch.equal(out[:, 0], torch.zeros_like(out[:, 0])), backend
        assert torch.all(lse[:, 0] == float("inf")), backend
        assert err(out[:, 1:], want.out[:, 1:]) < 1e-6 and err(lse[:, 1:], want.lse[:, 1:]) < 1e-6


def test_masked_nonfinite_kv_never_leak_with_sinks():
    """NaN in key 5 and inf in value 12, which a window of 2 keeps from every row (rows sit at
    positions 14 and 15, keeping 13..15): every gradient finite and equal to the truth's."""
    q, k, v = make_qkv(1, 2, 2, 2, 16, 8)
    kw = {"window": (1, 0), "sinks": sinks_for(2, torch.float32)}
    check_masked_nonfinite_grads(q, k, v, kw, lambda *x: qkv.attention(*x, **kw))


def test_second_derivatives_through_tiled():
    """create_graph=True: gradients of the gradient (sinks included) equal the reference's."""
    q, k, v = make_qkv(1, 2, 1, 6, 6, 4, dtype=torch.float64, requires_grad=True)
    sk = sinks_for(2).requires_grad_()
    res = []
    for backend in ("tiled", "reference"):
        out = qkv.attention(q, k, v, sinks=sk, causal=True, backend=backend)
        g = torch.autograd.grad(out.square().sum(), (q, sk), create_graph=True)
        res.append(torch.autograd.grad(g[0].sum() + g[1].sum(), (k, sk)))
    for a, b in zip(*res, strict=True):
        assert err(a, b) < 1e-12


@pytest.mark.parametrize(
    ("sinks", "match"),
    [
        (torch.zeros(3), r"sinks must have shape \(Hq,\) = \(4,\).*got \(3\)"),
        (torch.zeros(1, 4), r"sinks must have shape \(Hq,\) = \(4,\).*got \(1, 4\)"),
        (torch.zeros(4, dtype=torch.long), "sinks must be a floating tensor, got torch.int64"),
        ([0.0] * 4, "sinks must be a float tensor of shape"),
        (torch.zeros(4, device="meta"), "sinks is on meta but q is on cpu"),
    ],
)
def test_bad_sinks_are_named(sinks, match):
    q, k, v = make_qkv(1, 4, 2, 3, 3, 8)
    with pytest.raises((ValueError, TypeError), match=match):
        qkv.attention(q, k, v, sinks=sinks)


def test_sdpa_without_a_sink_term_says_so():
    """backend='sdpa' refuses sinks by name (the triton refusal: test_triton.py)."""
    q, k, v = make_qkv(1, 4, 2, 3, 3, 8)
    with pytest.raises(ValueError, match=r"backend='sdpa' cannot compute sinks"):
        qkv.attention(q, k, v, sinks=torch.zeros(4), backend="sdpa")


@pytest.mark.parametrize("sq", [1, 40])
def test_inference_takes_sdpa_and_folds_the_sinks_in(sq):
    """No gradient, fp32, plain/causal: `auto` runs SDPA (its LSE) and adds the sinks after;
    within 2e-5 of the float64 truth, a decode step (Sq = 1) and a causal prefill alike."""
    from qkv.attention import choose_backend
    from qkv.attention.spec import make_spec

    q, k, v = make_qkv(1, 4, 2, sq, 40, 16)
    sk = sinks_for(4, torch.float32)
    assert choose_backend(q, k, v, make_spec(q, k, v, causal=True, sinks=sk), True) == "sdpa"
    with torch.no_grad():
        out, lse = qkv.attention(q, k, v, causal=True, sinks=sk, return_lse=True)
    truth = oracle(q, k, v, causal=True, sinks=sk)
    assert err(out, truth.out) < 2e-5 and err(lse, truth.lse) < 2e-5
    q.requires_grad_()
    assert choose_backend(q, k, v, make_spec(q, k, v, causal=True, sinks=sk), False) != "sdpa"


def test_inference_with_nonfinite_keys_stays_off_sdpa():
    """NaN in the last key: only the last causal row keeps it (NaN there, as the engine's
    rule says); the others equal the truth with that key dropped — SDPA would leak it."""
    q, k, v = make_qkv(1, 2, 2, 16, 16, 8)
    k[0, :, 15, 3] = float("nan")
    sk = sinks_for(2, torch.float32)
    with torch.no_grad():
        out = qkv.attention(q, k, v, causal=True, sinks=sk)
    truth = oracle(q[:, :, :15], k[:, :, :15], v[:, :, :15], causal=True, sinks=sk)
    assert torch.isnan(out[:, :, 15]).all()
    assert err(out[:, :, :15], truth.out) < 2e-5


def test_unmasked_inference_takes_sdpa_with_no_kv_check(monkeypatch):
    """A decode step (Sq = 1: its causal row keeps every key) masks nothing, so no masked
    NaN/inf can leak and `auto` reads no K/V on the host before SDPA (it did, once per layer
    per step). A NaN key is then kept by every row: NaN, as the engine's rule says."""
    from qkv.attention import choose_backend, scoring
    from qkv.attention.spec import make_spec

    def no_check(*xs):
        raise AssertionError("auto checked K/V on the host")

    monkeypatch.setattr(scoring, "all_finite", no_check)
    q, k, v = make_qkv(1, 4, 2, 1, 40, 16)
    sk = sinks_for(4, torch.float32)
    assert choose_backend(q, k, v, make_spec(q, k, v, causal=True, sinks=sk), False) == "sdpa"
    with torch.no_grad():
        out, lse = qkv.attention(q, k, v, causal=True, sinks=sk, return_lse=True)
    truth = oracle(q, k, v, causal=True, sinks=sk)
    assert err(out, truth.out) < 2e-5 and err(lse, truth.lse) < 2e-5
    k[0, 1, 7, 2] = float("nan")  # kv head 1: query heads 2, 3
    with torch.no_grad():
        out = qkv.attention(q, k, v, causal=True, sinks=sk)
    assert out[:, 2:].isnan().all() and torch.isfinite(out[:, :2]).all()
