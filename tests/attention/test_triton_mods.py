"""The Triton kernels with softcap and ALiBi (`softcap=`, `qkv.softcap(c)`, `qkv.alibi(slopes)`)
against the float64 oracle: out, LSE, dq, dk, dv, masked NaN/inf, and `auto` taking them on
CUDA instead of tiled. Runs where test_triton.py runs (the interpreter without a GPU)."""

from __future__ import annotations

import pytest
import torch

import qkv
from qkv.attention import auto_backend
from qkv.attention.spec import make_spec

from .conftest import GRAD_FACTOR, assert_within_budget, naive
from .test_triton import (  # noqa: F401 (fixtures: the interpreter's env, auto as on CUDA)
    DEVICE,
    SMALL,
    _interpreter_env,
    as_on_cuda,
    grads,
    qkv_on,
    spy_forward,
    tk,
)

B, HQ, HK = 2, 4, 2
SLOPES_H = qkv.alibi_slopes(HQ) * 8  # steep: a distance of 8 costs up to 32 in the score
SLOPES_BH = torch.tensor([[0.5, 0.25, 1.0, 2.0], [1.5, 0.125, 0.75, 0.0]])

# name → the call's score arguments; scale 1 so that scores reach the caps (tanh bends)
MODS = {
    "softcap-arg": {"softcap": 2.5},
    "softcap-mod": {"score_mod": qkv.softcap(1.5)},
    "alibi-H": {"score_mod": qkv.alibi(SLOPES_H)},
    "alibi-BH": {"score_mod": qkv.alibi(SLOPES_BH)},
    "softcap-arg+alibi": {"softcap": 3.0, "score_mod": qkv.alibi(SLOPES_H)},
    "both-caps": {"softcap": 4.0, "score_mod": qkv.softcap(2.0)},
}
BANDS = {
    "causal-sq<sk": (29, 45, {"causal": True}),
    "window-sq>sk": (45, 29, {"window": (6, 2)}),
    "dense": (33, 33, {}),
}


# every (mods, band) pair once, each mod and each band in both dtypes (alternating): all pairs
# of the three factors at half the full product's interpreter time
PAIRS = [
    (m, b, (torch.float32, torch.bfloat16)[(i + j) % 2])
    for i, m in enumerate(MODS)
    for j, b in enumerate(BANDS)
]


def _kw(mods: str, band: str) -> tuple[int, int, dict]:
    Sq, Sk, kw = BANDS[band]
    return Sq, Sk, {**kw, **MODS[mods], "scale": 1.0}


def _ref(**kw):
    def fn(*x):
        r = naive(*x, **kw)
        return r.out, r.lse

    return fn


def _ours(**kw):
    def fn(q, k, v):
        return tk.triton_attention(q, k, v, make_spec(q, k, v, **kw), SMALL)

    return fn


@pytest.mark.parametrize(("mods", "band", "dtype"), PAIRS, ids=str)
def test_forward_and_lse_vs_oracle(mods, band, dtype):
    """out and LSE within 2× the same-dtype PyTorch error (+ floor) of the float64 oracle;
    GQA, Sq ≠ Sk both ways (ALiBi's distance is from the absolute position i + δ)."""
    Sq, Sk, kw = _kw(mods, band)
    q, k, v = qkv_on(B, HQ, HK, Sq, Sk, 16, dtype=dtype)
    out, lse = _ours(**kw)(q, k, v)
    x = [t.cpu() for t in (q, k, v)]
    plain, truth = naive(*x, **kw), naive(*(t.double() for t in x), **kw)
    assert out.dtype == dtype
    assert_within_budget(out.cpu(), plain.out, truth.out, dtype, what="out")
    keep = torch.isfinite(truth.lse)
    assert torch.equal(torch.isfinite(lse.cpu()), keep)  # rows that keep no key: −inf
    assert_within_budget(lse.cpu()[keep], plain.lse[keep], truth.lse[keep], dtype, what="lse")


@pytest.mark.parametrize(("mods", "band", "dtype"), PAIRS, ids=str)
def test_gradients_vs_oracle(mods, band, dtype):
    """dq, dk, dv of a loss on out and on the LSE through the Triton backward (dS through
    1 − tanh² of each cap), within 3× the same-dtype PyTorch error (+ floor) of float64's."""
    Sq, Sk, kw = _kw(mods, band)
    q, k, v = qkv_on(B, HQ, HK, Sq, Sk, 16, dtype=dtype, requires_grad=True)
    g = torch.Generator().manual_seed(5)
    do = torch.randn(B, HQ, Sq, 16, generator=g, dtype=torch.float64)
    dl = torch.randn(B, HQ, Sq, generator=g, dtype=torch.float64)
    x = [t.detach().cpu() for t in (q, k, v)]
    truth = grads(_ref(**kw), *(t.double() for t in x), do, dl)
    plain = grads(_ref(**kw), *x, do, dl)
    got = grads(_ours(**kw), q, k, v, do, dl)
    for name, a, p, t in zip("qkv", got, plain, truth, strict=True):
        assert a.dtype == dtype
        assert_within_budget(a, p, t, dtype, factor=GRAD_FACTOR, what=f"d{name}")


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # the interpreter's numpy
def test_tanh_matches_torch_across_its_range():
    """The kernels' own tanh (Taylor series below 1/4, exponentials above) against torch's in
    float64, at 4001 points from −40 to 40, around the switch at ±1/4, and at ±inf and NaN."""
    near = torch.tensor([0.25, -0.25, 0.2499999, 0.2500001, 1e-30, -1e-7])
    x = torch.cat([torch.linspace(-40, 40, 4001), near])
    x = torch.cat([x, torch.tensor([float("inf"), float("-inf"), float("nan")])])
    kw = {"softcap": 1.0, "scale": 1.0}
    # scores = x exactly: q = x, k = 1 (one key, D = 1); out = v = 1 for every finite row, so
    # read the capped score back from the LSE (one key: lse = its score)
    n = x.numel()
    q = x.view(1, 1, n, 1).to(DEVICE)
    k = torch.ones(1, 1, 1, 1, device=DEVICE)
    _, lse = tk.triton_attention(q, k, k, make_spec(q, k, k, **kw), tk.Config(128, 16))
    want = torch.tanh(x.double())
    got = lse.cpu().double().view(-1)
    finite = torch.isfinite(x)
    assert (got[finite] - want[finite]).abs().max() <= 3e-7  # fp32: a few ulps of |tanh| ≤ 1
    assert got[-3:-1].tolist() == [1.0, -1.0] and got[-1].isnan()


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # the interpreter's numpy
@pytest.mark.parametrize("mods", ["softcap-arg", "alibi-H"])
def test_masked_nan_and_inf_stay_out(mods):
    """NaN/inf in keys and values every row of a causal square masks but the last: out and
    dq, dk, dv of the other rows equal the oracle's on clean inputs (the repair launch and
    the backward's masked tiles apply the mods too); the last row, which keeps them, is NaN."""
    Sq, Sk, kw = 40, 40, {"causal": True, **MODS[mods], "scale": 1.0}
    q, k, v = (t.detach() for t in qkv_on(1, HQ, HK, Sq, Sk, 16))
    clean = [t.clone() for t in (q, k, v)]
    k[0, :, -1, 3] = float("nan")
    v[0, :, -1, 5] = float("inf")
    do = torch.randn(1, HQ, Sq, 16, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    xs = [t.clone().requires_grad_() for t in (q, k, v)]
    out, _ = _ours(**kw)(*xs)
    (out * do.to(out)).sum().backward()
    rows = slice(0, Sq - 1)
    do_rows = do.clone()
    do_rows[:, :, -1] = 0  # the clean oracle's gradients of the rows that mask the bad key
    x64 = [t.cpu().double().requires_grad_() for t in clean]
    truth = naive(*x64, **kw).out
    (truth * do_rows).sum().backward()
    assert out.detach().cpu()[:, :, -1].isnan().any()
    err = (out.detach().cpu()[:, :, rows].double() - truth.detach()[:, :, rows]).abs().max()
    assert err <= 1e-5
    dq = xs[0].grad.cpu()
    assert torch.isfinite(dq[:, :, rows]).all()
    assert (dq[:, :, rows].double() - x64[0].grad[:, :, rows]).abs().max() <= 1e-5


@pytest.mark.usefixtures("as_on_cuda")
@pytest.mark.parametrize("mods", ["softcap-arg", "softcap-mod", "alibi-BH"])
def test_auto_takes_triton_for_softcap_and_alibi(monkeypatch, mods):
    """On CUDA `auto` runs these on the Triton kernels (before: tiled, 0.03× SDPA there), with
    a gradient too, and the answer is within the float64 oracle's budget."""
    calls = spy_forward(monkeypatch)
    Sq, Sk, kw = _kw(mods, "causal-sq<sk")
    q, k, v = qkv_on(B, HQ, HK, Sq, Sk, 16, requires_grad=True)
    assert auto_backend(q, k, v, **kw) == "triton"
    out = qkv.attention(q, k, v, **kw)
    assert calls, "auto did not run the Triton kernels"
    do = torch.randn(out.shape, generator=torch.Generator().manual_seed(4))
    got = torch.autograd.grad(out, (q, k, v), do.to(DEVICE))
    x64 = [t.detach().cpu().double().requires_grad_() for t in (q, k, v)]
    truth = naive(*x64, **kw).out
    want = torch.autograd.grad(truth, x64, do.double())
    assert (out.detach().cpu().double() - truth.detach()).abs().max() <= 1e-5
    for a, t in zip(got, want, strict=True):
        assert (a.cpu().double() - t).abs().max() <= 2e-5


def test_other_score_mods_are_refused_with_the_fix():
    """A score_mod the kernels cannot evaluate names the ones they can and the backend that
    runs any; auto keeps such a call on tiled."""
    q, k, v = qkv_on(1, 2, 2, 8, 8, 16)

    def double(score, b, h, q_idx, kv_idx):
        return score * 2

    with pytest.raises(ValueError, match=r"softcap\(c\) and qkv\.alibi\(slopes\).*'tiled'"):
        qkv.attention(q, k, v, score_mod=double, backend="triton")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_sinks_with_softcap_and_alibi(dtype):
    """Learned sinks beside both mods (the sink logit is not capped, as in `scoring`): out, LSE
    and dq, dk, dv, dsinks within the float64 oracle's budget; Sq > Sk leaves empty rows."""
    Sq, Sk, kw = 40, 33, {"causal": True, **MODS["softcap-arg+alibi"], "scale": 1.0}
    q, k, v = qkv_on(1, HQ, HK, Sq, Sk, 16, dtype=dtype, requires_grad=True)
    g = torch.Generator().manual_seed(6)
    sinks = (1.0 + torch.randn(HQ, generator=g, dtype=torch.float64)).float()
    do = torch.randn(1, HQ, Sq, 16, generator=g, dtype=torch.float64)

    def run(fn, *xs):
        xs = [x.detach().clone().requires_grad_() for x in xs]
        out, lse = fn(*xs)
        (out * do.to(out)).sum().backward()
        return [out.detach().cpu(), lse.detach().cpu()] + [x.grad.cpu() for x in xs]

    def oracle_fn(q, k, v, s):
        r = naive(q, k, v, sinks=s, **kw)
        return r.out, r.lse

    def ours(q, k, v, s):
        return tk.triton_attention(q, k, v, make_spec(q, k, v, sinks=s, **kw), SMALL)

    x = [t.detach().cpu() for t in (q, k, v)] + [sinks]
    truth = run(oracle_fn, *(t.double() for t in x))
    plain = run(oracle_fn, *x)
    got = run(ours, q, k, v, sinks.to(DEVICE))
    names = ["out", "lse", "dq", "dk", "dv", "dsinks"]
    for name, a, p, t in zip(names, got, plain, truth, strict=True):
        factor = 2.0 if name in ("out", "lse") else GRAD_FACTOR
        assert_within_budget(a, p, t, dtype, factor=factor, what=name)
