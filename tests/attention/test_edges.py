"""Empty rows, non-finite masked entries, empty sequences, layouts, huge scores, dropout."""

from __future__ import annotations

import pytest
import torch

import qkv
from qkv.attention.spec import make_spec
from qkv.attention.tiled import tiled

from .conftest import assert_within_budget, err, make_qkv, naive, oracle, same_dtype

BACKENDS = ["reference", "tiled", "auto"]


def _all_finite(*ts):
    return all(bool(torch.isfinite(t).all()) for t in ts)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fully_masked_rows_are_zero_with_lse_minus_inf_and_zero_grads(backend):
    q, k, v = make_qkv(1, 4, 2, 40, 50, 16, requires_grad=True)
    keep = torch.ones(1, 1, 40, 50, dtype=torch.bool)
    keep[..., 7, :] = False  # row 7 keeps nothing
    out, lse = qkv.attention(q, k, v, mask=keep, return_lse=True, backend=backend)
    assert torch.all(out[:, :, 7] == 0) and torch.all(lse[:, :, 7] == float("-inf"))
    out.sum().backward()
    assert _all_finite(out, q.grad, k.grad, v.grad)
    assert torch.all(q.grad[:, :, 7] == 0)


@pytest.mark.parametrize(
    ("backend", "learned"),  # tiled refuses a learned float mask by name (test_errors.py)
    [
        (b, learned)
        for b in BACKENDS
        for learned in (False, True)
        if (b, learned) != ("tiled", True)
    ],
)
def test_an_empty_row_of_a_float_mask_gives_zero_gradients_through_the_lse(backend, learned):
    """A float bias whose row 7 is all −inf, and a loss on the output and the other rows' LSE:
    the gradients are finite and row 7's are 0. The reference gave NaN for q, k and the bias
    (log(0)'s gradient times 0), and `auto` takes the reference for a learned bias with the
    LSE. Oracle: the float64 naive attention (conftest), written safe for an empty row."""
    q, k, v = make_qkv(1, 2, 2, 10, 4, 8, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(10, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    bias[7] = float("-inf")
    bias.requires_grad_(learned)
    out, lse = qkv.attention(q, k, v, mask=bias, return_lse=True, backend=backend)
    rows = torch.arange(10) != 7
    (out.sum() + lse[:, :, rows].sum()).backward()
    grads = (q.grad, k.grad, v.grad) + ((bias.grad,) if learned else ())
    assert _all_finite(*grads) and torch.all(q.grad[:, :, 7] == 0)
    qq, kk, vv = (t.detach().clone().requires_grad_() for t in (q, k, v))
    ref = naive(qq, kk, vv, mask=bias.detach())
    (ref.out.sum() + ref.lse[:, :, rows].sum()).backward()
    for got, want in zip((q.grad, k.grad, v.grad), (qq.grad, kk.grad, vv.grad), strict=True):
        assert err(got, want) < 1e-10


@pytest.mark.parametrize("backend", BACKENDS)
def test_causal_with_more_queries_than_keys_has_empty_top_rows(backend):
    q, k, v = make_qkv(1, 2, 2, 9, 4, 8, requires_grad=True)  # δ = −5: rows 0..4 see nothing
    out, lse = qkv.attention(q, k, v, causal=True, return_lse=True, backend=backend)
    assert torch.all(out[:, :, :5] == 0) and torch.all(lse[:, :, :5] == float("-inf"))
    assert torch.all(out[:, :, 5:] != 0)
    out.sum().backward()
    assert _all_finite(q.grad, k.grad, v.grad)


@pytest.mark.parametrize("what", ["key", "value", "both"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_and_inf_in_masked_keys_and_values_do_not_leak(backend, what):
    q, k, v = make_qkv(2, 4, 2, 30, 30, 16)
    k, v = k.clone(), v.clone()
    if what in ("key", "both"):
        k[:, :, 20] = float("nan")
        k[:, :, 25, 3] = float("inf")
    if what in ("value", "both"):
        v[:, :, 20] = float("nan")
        v[:, :, 25, 3] = float("-inf")
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out = qkv.attention(q, k, v, causal=True, backend=backend)
    assert _all_finite(out[:, :, :20]), "rows that cannot see keys 20/25 must stay finite"
    assert not _all_finite(out[:, :, 25:]), "rows that do attend a NaN/inf must show it"
    clean = oracle(q[:, :, :20], k[:, :, :20], v[:, :, :20], causal=True).out
    assert err(out[:, :, :20], clean) < 1e-5
    # masked for every query: no NaN anywhere, forward or backward, and zero grads there
    keep = torch.ones(1, 1, 1, 30, dtype=torch.bool)
    keep[..., [20, 25]] = False
    out = qkv.attention(q, k, v, causal=True, mask=keep, backend=backend)
    out.sum().backward()
    assert _all_finite(out, q.grad, k.grad, v.grad)
    assert torch.all(k.grad[:, :, [20, 25]] == 0) and torch.all(v.grad[:, :, [20, 25]] == 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_in_padded_keys_does_not_leak(backend):
    q, k, v = make_qkv(2, 4, 4, 10, 12, 8)
    k[1, :, 8:] = float("nan")
    v[1, :, 8:] = float("nan")
    keep = (torch.arange(12) < torch.tensor([12, 8]).view(2, 1)).view(2, 1, 1, 12)
    out = qkv.attention(q, k, v, mask=keep, backend=backend)
    assert _all_finite(out)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("size", [(0, 5), (5, 0), (0, 0)])
def test_empty_sequences(backend, size):
    Sq, Sk = size
    q, k, v = make_qkv(2, 4, 2, Sq, Sk, 8, Dv=6, requires_grad=True)
    out, lse = qkv.attention(q, k, v, causal=True, return_lse=True, backend=backend)
    assert out.shape == (2, 4, Sq, 6) and lse.shape == (2, 4, Sq)
    assert torch.all(out == 0) and torch.all(lse == float("-inf"))
    out.sum().backward()
    assert torch.all(q.grad == 0) and torch.all(k.grad == 0) and torch.all(v.grad == 0)


@pytest.mark.parametrize("backend", [*BACKENDS, "fused", "sdpa"])
@pytest.mark.parametrize("dims", ["B=0", "Hq=0", "D=0", "Dv=0"])
def test_zero_sized_batch_heads_and_head_dims(backend, dims):
    # tiled raised "cannot reshape tensor of 0 elements" (B, Hq), a bmm size error (D=0's
    # backward) or a broadcast error (Dv); with D=0 every score is 0: uniform weights
    size = {"B": 2, "Hq": 4, "Hk": 2, "D": 8, "Dv": 6}
    name, _ = dims.split("=")
    size[name] = 0
    if name == "Hq":
        size["Hk"] = 1
    q, k, v = make_qkv(size["B"], size["Hq"], size["Hk"], 5, 7, size["D"], Dv=size["Dv"],
                       dtype=torch.float64, requires_grad=True)  # fmt: skip
    kw = {"causal": True, "scale": 0.5}  # the oracle's default 1/√D fails at D=0
    out = qkv.attention(q, k, v, **kw, backend=backend)
    truth = oracle(q, k, v, **kw)
    assert out.shape == truth.out.shape and err(out, truth.out) < 1e-12
    if backend != "sdpa":  # its LSE: Sq == Sk only
        with torch.no_grad():
            _, lse = qkv.attention(q, k, v, **kw, return_lse=True, backend=backend)
        assert err(lse, truth.lse) < 1e-12
    out.sum().backward()
    ref = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    naive(*ref, **kw).out.sum().backward()
    for t, r in zip((q, k, v), ref, strict=True):
        assert err(t.grad, r.grad) < 1e-12


@pytest.mark.parametrize("backend", ["sdpa", "auto"])
def test_lse_with_a_value_dim_unlike_the_key_dim(backend):
    # PyTorch's CPU flash kernel needs D == Dv: sdpa raised its RuntimeError ("Q/K/V should
    # have the same head size"), auto tried it and fell back
    q, k, v = make_qkv(1, 4, 2, 6, 6, 16, Dv=8, dtype=torch.float64)
    truth = oracle(q, k, v, causal=True)
    if backend == "sdpa":
        with pytest.raises(ValueError, match=r"D=16, Dv=8"):
            qkv.attention(q, k, v, causal=True, return_lse=True, backend=backend)
        return
    out, lse = qkv.attention(q, k, v, causal=True, return_lse=True, backend=backend)
    assert err(out, truth.out) < 1e-12 and err(lse, truth.lse) < 1e-12


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend):
    base = make_qkv(2, 8, 8, 37, 37, 32)
    q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in base)  # (B, S, H, D) storage
    assert not q.is_contiguous()
    want = oracle(q.contiguous(), k.contiguous(), v.contiguous(), causal=True).out
    assert err(qkv.attention(q, k, v, causal=True, backend=backend), want) < 1e-5
    sliced = qkv.attention(q[..., ::2], k[..., ::2], v, causal=True, backend=backend)
    want = oracle(q[..., ::2].contiguous(), k[..., ::2].contiguous(), v, causal=True).out
    assert err(sliced, want) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_huge_scores_do_not_overflow(backend, dtype):
    q, k, v = make_qkv(1, 2, 2, 64, 64, 16, dtype=torch.float64)
    q = q * 2000  # scores of magnitude ~1e4
    assert (q @ k.transpose(-1, -2) / 4).abs().max() > 5e3
    q, k, v = (t.to(dtype) for t in (q, k, v))
    out, lse = qkv.attention(q, k, v, causal=True, return_lse=True, backend=backend)
    assert _all_finite(out, lse)
    truth = oracle(q, k, v, causal=True)
    plain = same_dtype(q, k, v, causal=True)
    assert_within_budget(out, plain.out, truth.out, dtype)
    assert_within_budget(lse, plain.lse, truth.lse, dtype, what="lse")


def test_dropout_is_reproducible_with_a_generator_and_changes_with_the_seed():
    q, k, v = make_qkv(1, 2, 2, 64, 64, 16)
    for backend in ("tiled", "reference", "auto"):
        a = qkv.attention(
            q, k, v, dropout_p=0.3, generator=torch.Generator().manual_seed(7), backend=backend
        )
        b = qkv.attention(
            q, k, v, dropout_p=0.3, generator=torch.Generator().manual_seed(7), backend=backend
        )
        c = qkv.attention(
            q, k, v, dropout_p=0.3, generator=torch.Generator().manual_seed(8), backend=backend
        )
        assert torch.equal(a, b) and not torch.equal(a, c)


def test_dropout_forward_and_backward_use_the_same_mask():
    """gradcheck on a fixed generator: the backward differentiates exactly the forward's mask."""
    q, k, v = make_qkv(1, 2, 1, 7, 11, 4, dtype=torch.float64, requires_grad=True)
    spec_kw = dict(causal=True, dropout_p=0.4)

    def f(q, k, v):
        return qkv.attention(
            q, k, v, generator=torch.Generator().manual_seed(3), backend="tiled", **spec_kw
        )

    assert torch.autograd.gradcheck(f, (q, k, v))

    # and across many tiles
    def g(q, k, v):
        spec = make_spec(q, k, v, generator=torch.Generator().manual_seed(3), **spec_kw)
        return tiled(q, k, v, spec, block_q=3, block_k=4)[0]

    assert torch.autograd.gradcheck(g, (q, k, v), fast_mode=True)


@pytest.mark.parametrize("backend", ["tiled", "reference"])
def test_dropout_mean_matches_no_dropout(backend):
    """E[dropout(w)/(1−p)] = w: the mean over many seeds approaches the plain output."""
    q, k, v = make_qkv(1, 1, 1, 8, 16, 8, dtype=torch.float64)
    plain = qkv.attention(q, k, v, backend="reference")
    n = 400
    runs = torch.stack(
        [
            qkv.attention(
                q, k, v, dropout_p=0.5, generator=torch.Generator().manual_seed(s), backend=backend
            )
            for s in range(n)
        ]
    )
    mean, sem = runs.mean(0), runs.std(0) / n**0.5
    z = ((mean - plain).abs() / sem.clamp_min(1e-12)).max()
    assert z < 5.0, f"mean of dropout runs is {z:.1f} standard errors from the plain output"


def test_gradcheck_tiled_float64_full_jacobian():
    q, k, v = make_qkv(1, 2, 1, 5, 6, 3, dtype=torch.float64, requires_grad=True)

    def f(q, k, v):
        return tiled(q, k, v, make_spec(q, k, v, causal=True, softcap=2.0), block_q=2, block_k=4)[0]

    assert torch.autograd.gradcheck(f, (q, k, v))


def test_gradcheck_tiled_float64_small_shapes():
    cases = [
        dict(causal=True),
        dict(window=(3, 2)),
        dict(softcap=1.5, score_mod=qkv.alibi(4)),
        dict(mask_mod=lambda b, h, q, kv: (q + kv) % 3 != 1),
        dict(mask=torch.randn(1, 4, 9, 11, dtype=torch.float64)),
        dict(causal=True, dropout_p=0.3, generator=torch.Generator().manual_seed(0)),
    ]
    for kw in cases:
        q, k, v = make_qkv(1, 4, 2, 9, 11, 4, Dv=3, dtype=torch.float64, requires_grad=True)

        def f(q, k, v, kw=kw):
            if "generator" in kw:
                kw = {**kw, "generator": torch.Generator().manual_seed(0)}
            spec = make_spec(q, k, v, **kw)
            return tiled(q, k, v, spec, block_q=4, block_k=3)[0]

        assert torch.autograd.gradcheck(f, (q, k, v), fast_mode=True), kw


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_all_finite_checks_every_tensor_and_survives_overflowing_sums(dtype):
    """The auto backend's K/V guard: one total for all tensors, exact when the total overflows."""
    from qkv.attention.scoring import all_finite

    big = torch.full((64, 64), torch.finfo(dtype).max / 2, dtype=dtype)  # finite, sum overflows
    ok = torch.randn(3, 5).to(dtype)
    assert all_finite(ok, big) and all_finite(big) and all_finite()
    assert all_finite(torch.empty(0, dtype=dtype), ok)
    for bad in (float("nan"), float("inf"), float("-inf")):
        b = ok.clone()
        b[2, 4] = bad
        assert not all_finite(ok, b) and not all_finite(b, big) and not all_finite(b)


def test_auto_falls_back_to_tiled_when_the_fused_lse_kernel_is_missing(monkeypatch):
    """`auto` picks PyTorch's fused (out, lse) kernel where it exists; a device that lacks it
    (RuntimeError from the op, e.g. flash attention on a pre-sm80 GPU) gets the tiled kernel."""
    from qkv.attention import api

    def missing(*args):
        raise RuntimeError("No available kernel. Aborting execution.")

    monkeypatch.setattr(api, "sdpa_lse", missing)
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(1, 4, 33, 16, generator=g) for _ in range(3))
    with torch.no_grad():
        assert api.choose_backend(q, k, v, api.make_spec(q, k, v, causal=True), True) == "sdpa"
        out, lse = qkv.attention(q, k, v, causal=True, return_lse=True)
    want = qkv.reference_attention(q.double(), k.double(), v.double(), causal=True)
    assert (out.double() - want.out).abs().max() < 1e-5
    assert (lse.double() - want.lse).abs().max() < 1e-5
    with pytest.raises(RuntimeError, match="No available kernel"):  # an explicit choice is kept
        qkv.attention(q, k, v, causal=True, return_lse=True, backend="sdpa")


@pytest.mark.parametrize("return_lse", [False, True])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("backend", ["auto", "tiled", "reference"])
def test_nan_in_a_query_makes_its_row_nan_as_plain_math_does(backend, dtype, causal, return_lse):
    # PyTorch's CPU SDPA kernels return 0 for such a row (torch 2.13): `auto` must not hide it
    q, k, v = make_qkv(2, 4, 2, 6, 6, 16, dtype=dtype)
    q[1, 2, 3, 5] = float("nan")
    got = qkv.attention(q, k, v, causal=causal, return_lse=return_lse, backend=backend)
    out, lse = got if return_lse else (got, None)
    truth = oracle(q, k, v, causal=causal)
    assert torch.isnan(truth.out[1, 2, 3]).all()  # the oracle: plain float64 math
    assert torch.isnan(out[1, 2, 3]).all()
    bad = torch.zeros(out.shape[:3], dtype=torch.bool)
    bad[1, 2, 3] = True
    assert not torch.isnan(out[~bad]).any()
    assert_within_budget(
        out[~bad], same_dtype(q, k, v, causal=causal).out[~bad], truth.out[~bad], dtype
    )
    if lse is not None:
        assert torch.isnan(lse[1, 2, 3]) and err(lse[~bad], truth.lse[~bad]) < 1e-5


@pytest.mark.parametrize(
    "kw",
    [{"return_lse": True}, {"softcap": 2.0}, {"window": (2, 0)}, {"causal": True}, {}],
    ids=lambda kw: "-".join(kw) or "plain",
)
def test_auto_learns_a_float_bias_whatever_else_is_asked(kw):
    # auto sent these to tiled, which refuses a bias that requires grad
    q, k, v = make_qkv(2, 4, 2, 6, 9, 8, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(1, 4, 6, 9, dtype=torch.float64, requires_grad=True)
    got = qkv.attention(q, k, v, mask=bias, **kw)
    out = got[0] if kw.get("return_lse") else got
    out.pow(2).sum().backward()
    opts = {n: x for n, x in kw.items() if n != "return_lse"}
    ref = [t.detach().clone().requires_grad_() for t in (q, k, v, bias)]
    want = naive(*ref[:3], mask=ref[3], **opts).out
    want.pow(2).sum().backward()
    assert err(out, want) < 1e-12
    for t, r in zip((q, k, v, bias), ref, strict=True):
        assert err(t.grad, r.grad) < 1e-12


@pytest.mark.parametrize(
    "kw",
    [{}, {"causal": True}, {"window": (2, 0)}, {"softcap": 2.0}, {"return_lse": True}],
    ids=lambda kw: "-".join(kw) or "plain",
)
def test_meta_tensors_give_shapes_on_auto(kw):
    # every backend but sdpa raised "Tensor.item() cannot be called on meta tensors"
    q, k, v = (t.to("meta") for t in make_qkv(2, 4, 2, 6, 9, 8, Dv=5))
    got = qkv.attention(q, k, v, **kw)
    out, lse = got if kw.get("return_lse") else (got, None)
    assert out.is_meta and out.shape == (2, 4, 6, 5) and out.dtype == torch.float32
    assert lse is None or (lse.is_meta and lse.shape == (2, 4, 6))
    with pytest.raises(ValueError, match=r"backend='tiled' .*meta"):
        qkv.attention(q, k, v, **kw, backend="tiled")
