"""`auto`'s SDPA with a gradient, checked on the device (`sdpa_checked`) instead of a host-side
K/V check: SDPA's gradients are kept when finite, redone by the Triton backward when not.

Runs the Triton kernels compiled on CUDA, or in Triton's CPU interpreter without a GPU (set up
by test_triton, whose helpers and fixtures this module uses).
"""

from __future__ import annotations

import pytest
import torch

import qkv
from qkv.attention import api, auto_backend, scoring
from qkv.attention.spec import make_spec

from .conftest import GRAD_FACTOR, assert_within_budget, err, naive
from .test_triton import DEVICE, _interpreter_env, _leaky_sdpa, as_on_cuda, qkv_on, tk  # noqa: F401

if tk.INTERPRETED:  # its kernels must be built for the interpreter too, as test_triton's
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "1")
        from qkv.attention import sdpa_checked as sc
else:
    from qkv.attention import sdpa_checked as sc

pytestmark = pytest.mark.usefixtures("as_on_cuda")  # `auto` as it decides on CUDA


def _grads(q, k, v, do, **kw):
    """(out, (dq, dk, dv)) of `qkv.attention` for the inputs that need a gradient."""
    out = qkv.attention(q, k, v, **kw)
    wrt = [t for t in (q, k, v) if t.requires_grad]
    got = iter(torch.autograd.grad(out, wrt, do))
    return out, tuple(next(got) if t.requires_grad else None for t in (q, k, v))


def _truth(q, k, v, do, zero_k=(), zero_v=(), **kw):
    """float64 naive gradients, and the plain same-dtype ones, on K/V with the listed key
    positions zeroed (where the poison was)."""
    res = []
    for dt in (None, torch.float64):
        xs = [t.detach().cpu() for t in (q, k, v)]
        xs = [t.to(dt) if dt else t.clone() for t in xs]
        for j in zero_k:
            xs[1][:, :, j] = 0
        for j in zero_v:
            xs[2][:, :, j] = 0
        xs = [t.requires_grad_() for t in xs]
        out = naive(*xs, **kw).out
        res.append(torch.autograd.grad(out, xs, do.cpu().to(out.dtype)))
    return res


def _no_host_check(monkeypatch):
    def no_check(*xs):
        raise AssertionError("auto checked K/V on the host")

    monkeypatch.setattr(scoring, "all_finite", no_check)


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # the interpreter's numpy
@pytest.mark.parametrize("poison", ["value", "key"])
@pytest.mark.parametrize(
    "dtype, shape",  # bf16 with a gradient takes tiled on CPU: the redo's own test covers it
    [(torch.float32, (70, 70)), (torch.float32, (30, 70))],
    ids=["square", "sq<sk"],
)
def test_auto_sdpa_gradients_keep_masked_nan_out_without_checking_kv(
    monkeypatch, dtype, shape, poison
):
    """Issue 15: with a gradient, "auto" checked K/V for NaN/inf before SDPA (a host sync,
    ~60 µs on an H200). Now SDPA runs unchecked (here as its math backend computes, which leaks
    a masked NaN/inf into the gradients through 0·NaN), and its gradients are redone on the
    device where they came back non-finite. Rows that mask every bad entry get the float64
    oracle's dq; with bad values only, dv is every key's oracle dv (it does not read v). K/V
    are never checked on the host."""
    Sq, Sk = shape
    q, k, v = qkv_on(1, 4, 2, Sq, Sk, 16, dtype=dtype, requires_grad=True)
    do = torch.randn(1, 4, Sq, 16, generator=torch.Generator().manual_seed(3)).to(dtype)
    do = do.to(DEVICE)
    first = Sk - Sq + Sq // 2  # kept by rows ≥ Sq // 2 only (causal, bottom-right)
    bad_k, bad_v = [], []
    with torch.no_grad():
        if poison == "key":
            k[0, 0, first, 2] = float("nan")
            bad_k.append(first)
        else:
            v[0, 0, first, 5] = float("nan")
            v[0, 1, first + 3, 3] = float("inf")
            bad_v += [first, first + 3]
    kw = {"causal": True}
    assert auto_backend(q, k, v, **kw) == "sdpa"
    monkeypatch.setattr(api, "sdpa", _leaky_sdpa)
    (leaky,) = torch.autograd.grad(_leaky_sdpa(q, k, v, make_spec(q, k, v, **kw)), q, do)
    rows = slice(0, Sq // 2)  # the rows that mask every bad entry
    assert not torch.isfinite(leaky[:, :, rows]).all(), "SDPA did not leak: the test is void"
    _no_host_check(monkeypatch)
    launched = []
    real = sc.redo_if_nonfinite
    monkeypatch.setattr(sc, "redo_if_nonfinite", lambda *a: launched.append(1) or real(*a))
    _, got = _grads(q, k, v, do, **kw)
    assert launched == [1]
    plain, truth = _truth(q, k, v, do, bad_k, bad_v, **kw)
    dq = got[0].cpu()
    assert torch.isfinite(dq[:, :, rows]).all()
    assert_within_budget(
        dq[:, :, rows], plain[0][:, :, rows], truth[0][:, :, rows], dtype, GRAD_FACTOR, "dq"
    )
    if poison == "value":
        assert_within_budget(got[2].cpu(), plain[2], truth[2], dtype, GRAD_FACTOR, "dv")


def test_finite_gradients_are_sdpas_bit_for_bit(monkeypatch):
    """Finite inputs: the check runs (it replaces the host's), raises no flag, and every
    gradient is SDPA's own, bit for bit; the output too."""
    launched = []
    real = sc.redo_if_nonfinite
    monkeypatch.setattr(sc, "redo_if_nonfinite", lambda *a: launched.append(1) or real(*a))
    q, k, v = qkv_on(1, 4, 2, 70, 70, 16, requires_grad=True)
    do = torch.randn(1, 4, 70, 16, device=DEVICE)
    out, got = _grads(q, k, v, do, causal=True)
    assert launched == [1]
    want_out, want = _grads(q, k, v, do, causal=True, backend="sdpa")
    assert torch.equal(out, want_out)
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)


def _tiled_grads(q, k, v, do, **kw):
    xs = [t.detach().requires_grad_() for t in (q, k, v)]
    return torch.autograd.grad(qkv.attention(*xs, **kw, backend="tiled"), xs, do)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_redo_leaves_finite_gradients_alone_and_redoes_nonfinite_ones(dtype):
    """`redo_if_nonfinite` directly: finite gradients (here arbitrary numbers) are left as they
    are; a NaN in dq has all three recomputed, within the error budget of the float64 oracle;
    with no dq asked for, a NaN in dv has dk and dv recomputed."""
    q, k, v = (t.detach() for t in qkv_on(1, 4, 2, 50, 50, 16, dtype=dtype))
    do = torch.randn(1, 4, 50, 16, device=DEVICE).to(dtype)
    spec = make_spec(q, k, v, causal=True)
    junk = [torch.randn_like(t) for t in (q, k, v)]
    grads = tuple(t.clone() for t in junk)
    sc.redo_if_nonfinite(q, k, v, spec, do, grads)
    for a, b in zip(grads, junk, strict=True):
        assert torch.equal(a, b)
    plain, truth = _truth(q, k, v, do, causal=True)
    grads[0][0, 1, 7, 3] = float("nan")
    sc.redo_if_nonfinite(q, k, v, spec, do, grads)
    for name, a, p, t in zip("qkv", grads, plain, truth, strict=True):
        assert_within_budget(a.cpu(), p, t, dtype, GRAD_FACTOR, f"d{name}")
    dk, dv = (t.clone() for t in junk[1:])
    dv[0, 1, 9, 0] = float("inf")
    sc.redo_if_nonfinite(q, k, v, spec, do, (None, dk, dv))
    for name, a, p, t in zip("kv", (dk, dv), plain[1:], truth[1:], strict=True):
        assert_within_budget(a.cpu(), p, t, dtype, GRAD_FACTOR, f"d{name}")


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # the interpreter's numpy
def test_only_q_or_only_kv_needing_a_gradient(monkeypatch):
    """Gradients asked for some inputs only: SDPA computes those, the check reads those, and
    the redo writes those (a NaN value masked for the first rows; their dq is the oracle's)."""
    q, k, v = qkv_on(1, 2, 2, 40, 40, 16, requires_grad=True)
    do = torch.randn(1, 2, 40, 16, device=DEVICE)
    with torch.no_grad():
        v[0, 0, 30, 1] = float("nan")
    monkeypatch.setattr(api, "sdpa", _leaky_sdpa)
    _no_host_check(monkeypatch)
    plain, truth = _truth(q, k, v, do, zero_v=[30], causal=True)
    q1 = q.detach().requires_grad_()
    _, (dq, dk, dv) = _grads(q1, k.detach(), v.detach(), do, causal=True)
    assert dk is None and dv is None
    assert_within_budget(dq[:, :, :30].cpu(), plain[0][:, :, :30], truth[0][:, :, :30],
                         torch.float32, GRAD_FACTOR, "dq")  # fmt: skip
    v1 = v.detach().requires_grad_()
    _, (dq, dk, dv) = _grads(q.detach(), k.detach(), v1, do, causal=True)
    assert dq is None and dk is None
    assert_within_budget(dv.cpu(), plain[2], truth[2], torch.float32, GRAD_FACTOR, "dv")


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # the interpreter's numpy
def test_create_graph_checks_on_the_host_and_differentiates_again(monkeypatch):
    """A backward that is itself differentiated (create_graph=True): K/V are checked on the
    host; with a masked NaN value the gradients come from the reference, dq of the rows that
    mask it is the oracle's, and the gradient penalty differentiates again."""
    q, k, v = qkv_on(1, 2, 2, 40, 40, 16, requires_grad=True)
    do = torch.randn(1, 2, 40, 16, device=DEVICE)
    with torch.no_grad():
        v[0, 1, 25, 4] = float("nan")
    monkeypatch.setattr(api, "sdpa", _leaky_sdpa)
    out = qkv.attention(q, k, v, causal=True)
    (dq,) = torch.autograd.grad(out, q, do, create_graph=True)
    _, truth = _truth(q, k, v, do, zero_v=[25], causal=True)
    assert err(dq[:, :, :25].detach().cpu(), truth[0][:, :, :25]) < 1e-5
    (ddq,) = torch.autograd.grad(dq[:, :, :25].square().sum(), q)
    assert torch.isfinite(ddq[:, :, :25]).all()


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # the interpreter's numpy
def test_a_redo_triton_cannot_build_falls_back_to_the_host_check(monkeypatch):
    """A GPU where Triton cannot build the redo's kernels: one warning naming the error, then
    K/V are checked on the host and bad ones get tiled's gradients; the step is not lost."""
    from triton.runtime.errors import OutOfResources

    def cannot_build(*args, **kwargs):
        raise OutOfResources(232448, 101376, "shared memory")

    monkeypatch.setattr(sc, "redo_if_nonfinite", cannot_build)
    monkeypatch.setattr(sc._REDO_BROKEN, "seen", {})
    monkeypatch.setattr(api, "sdpa", _leaky_sdpa)
    q, k, v = qkv_on(1, 2, 2, 40, 40, 16, requires_grad=True)
    do = torch.randn(1, 2, 40, 16, device=DEVICE)
    with torch.no_grad():
        v[0, 1, 25, 4] = float("nan")
    with pytest.warns(RuntimeWarning, match=r"could not be built.*OutOfResources.*on the host"):
        _, got = _grads(q, k, v, do, causal=True)
    want = _tiled_grads(q, k, v, do, causal=True)
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a.isnan(), b.isnan())
        assert err(torch.nan_to_num(a), torch.nan_to_num(b)) < 1e-5
    monkeypatch.setattr(sc, "redo_if_nonfinite", lambda *a, **kw: 1 / 0)
    monkeypatch.setattr(sc._REDO_BROKEN, "seen", {})
    with pytest.raises(ZeroDivisionError):  # any other error is raised
        _grads(q, k, v, do, causal=True)


def test_a_head_dim_past_128_with_a_gradient_still_checks_kv(monkeypatch):
    """The Triton backward serves D ≤ 128 under "auto"; past it the host check stays."""
    checked = []
    real = scoring.all_finite
    monkeypatch.setattr(scoring, "all_finite", lambda *xs: checked.append(1) or real(*xs))
    small = qkv_on(1, 2, 2, 40, 40, 16, requires_grad=True)
    assert auto_backend(*small, causal=True) == "sdpa"
    assert not checked
    big = qkv_on(1, 2, 2, 40, 40, 160, requires_grad=True)
    assert auto_backend(*big, causal=True) == "sdpa"
    assert checked


def test_auto_causal_forward_and_backward_never_sync(monkeypatch):
    """Forward (SDPA, the repair) and backward (SDPA's, the check, the gated redo) under a
    dispatch mode that fails on every op reading device data back to the host. (`auto`'s
    CPU-only guard for PyTorch's CPU kernels, a sum of q read on the host, is not what runs
    on CUDA: it is replaced here.)"""
    from .test_sync_free import _Ops

    monkeypatch.setattr(api, "_sum_finite", lambda q: True)
    q, k, v = qkv_on(1, 4, 2, 70, 70, 16, requires_grad=True)
    with _Ops(forbid_sync=True) as mode:
        out = qkv.attention(q, k, v, causal=True)
        out.sum().backward()
    assert mode.ops["aten.bmm"] or mode.ops["aten._scaled_dot_product_flash_attention_for_cpu"]
    assert torch.isfinite(q.grad).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cuda_auto_causal_with_a_gradient_never_syncs(dtype):
    """On a real GPU, CUDA's own sync detector watches `auto`'s causal forward and backward."""
    q, k, v = (t.cuda().requires_grad_() for t in qkv_on(2, 4, 2, 300, 300, 64, dtype=dtype))
    qkv.attention(q, k, v, causal=True).sum().backward()  # build the kernels first
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        qkv.attention(q, k, v, causal=True).sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
