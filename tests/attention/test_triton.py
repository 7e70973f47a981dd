"""The triton backend against the float64 oracle: forward, LSE, gradients, block skipping, errors.

Without a GPU the kernel runs in Triton's CPU interpreter: TRITON_INTERPRET=1 must be set
before `qkv.attention.triton_kernel` is imported (Triton decides interpreted vs compiled when
a kernel is decorated, and again at launch), so it is set here around that import and by a
fixture around each test, never for other test modules. With CUDA present the same tests run the compiled kernel on the GPU.
"""

from __future__ import annotations

import importlib.util
import os
import sys

import pytest
import torch

import qkv
from qkv.attention import (
    BACKENDS,
    api,
    auto_backend,
    choose_backend,
    fused_cpu,
    reference_attention,
    scoring,
)
from qkv.attention.spec import make_spec

from .conftest import (
    GRAD_FACTOR,
    assert_within_budget,
    check_masked_nonfinite_grads,
    err,
    make_qkv,
    naive,
    oracle,
    same_dtype,
)
from .test_peers import LSE_RTOL

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed (pip install triton; Linux only)", allow_module_level=True)

# the sm_90 smoke build of test_triton_build.py runs beside these single-threaded tests
pytestmark = pytest.mark.usefixtures("sm90_build")

_saved = os.environ.get("TRITON_INTERPRET")
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
try:
    from qkv.attention import triton_kernel as tk
finally:
    if _saved is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = _saved

if not tk.INTERPRETED and not torch.cuda.is_available():
    pytest.skip(
        "triton kernels were built compiled (imported before TRITON_INTERPRET=1) and there is "
        "no CUDA device to run them on",
        allow_module_level=True,
    )
DEVICE = "cpu" if tk.INTERPRETED else "cuda"
if tk.INTERPRETED:
    from . import interpreter

    interpreter.quicker()  # the int32 checks run in test_int32_index_math_does_not_overflow


@pytest.fixture(autouse=True)
def _interpreter_env(monkeypatch):
    """Triton also reads TRITON_INTERPRET when it launches: set it per test, never for others."""
    if tk.INTERPRETED:
        monkeypatch.setenv("TRITON_INTERPRET", "1")


SMALL = tk.Config(block_m=16, block_n=16)  # many blocks on small sizes: edges and skipping


def qkv_on(*args, **kw):
    return [t.to(DEVICE).detach().requires_grad_(t.requires_grad) for t in make_qkv(*args, **kw)]


def run(q, k, v, config=SMALL, **kw):
    return tk.triton_attention(q, k, v, make_spec(q, k, v, **kw), config)


# (B, Hq, Hk, Sq, Sk, D, kwargs)
CASES = {
    "dense-1x1": (1, 2, 2, 1, 1, 16, {}),
    "dense-17x100-gqa": (1, 8, 2, 17, 100, 16, {}),
    "dense-257x33-mqa": (1, 4, 1, 257, 33, 64, {}),
    "causal-100": (2, 2, 2, 100, 100, 64, {"causal": True}),
    "causal-decode-1x257": (1, 4, 1, 1, 257, 16, {"causal": True}),
    "causal-7x100-gqa": (1, 8, 2, 7, 100, 16, {"causal": True}),
    "causal-100x17-empty-top": (1, 2, 1, 100, 17, 16, {"causal": True}),
    "window-left-only": (1, 2, 2, 100, 100, 16, {"window": (20, None)}),
    "window-right-only": (1, 2, 2, 100, 257, 16, {"window": (None, 5)}),
    "window-small-both": (1, 2, 1, 257, 257, 16, {"window": (3, 2)}),
    "window-large-both-gqa": (1, 8, 2, 100, 100, 64, {"window": (60, 30)}),
    "window-causal-sq>sk": (1, 2, 2, 100, 60, 16, {"window": (9, None), "causal": True}),
    "window-empty-rows": (1, 2, 2, 40, 17, 16, {"window": (0, 0)}),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", list(CASES))
def test_forward_and_lse_vs_oracle(case, dtype):
    B, Hq, Hk, Sq, Sk, D, kw = CASES[case]
    q, k, v = qkv_on(B, Hq, Hk, Sq, Sk, D, dtype=dtype)
    truth = oracle(q.cpu(), k.cpu(), v.cpu(), **kw)
    plain = same_dtype(q.cpu(), k.cpu(), v.cpu(), **kw)
    out, lse = run(q, k, v, **kw)
    assert out.dtype == dtype and out.shape == (B, Hq, Sq, D)
    assert lse.dtype == torch.float32 and lse.shape == (B, Hq, Sq)
    assert_within_budget(out.cpu(), plain.out, truth.out, dtype, what="out")
    assert_within_budget(lse.cpu(), plain.lse, truth.lse, dtype, what="lse")
    empty = truth.lse == float("-inf")  # rows no key is left for: exactly 0 and −inf
    assert torch.equal(lse.cpu() == float("-inf"), empty)
    assert (out.cpu()[empty] == 0).all()


def test_empty_top_rows_exact():
    """causal with Sq > Sk: the first Sq − Sk rows see no key (bottom-right alignment)."""
    q, k, v = qkv_on(1, 2, 2, 40, 17, 16)
    out, lse = run(q, k, v, causal=True)
    assert (out[:, :, :23] == 0).all() and (lse[:, :, :23] == float("-inf")).all()
    assert torch.isfinite(lse[:, :, 23:]).all()


@pytest.mark.parametrize("D", [16, 32, 40])
def test_float16_and_head_dims(D):
    q, k, v = qkv_on(1, 4, 2, 33, 70, D, dtype=torch.float16)
    kw = {"window": (None, 2)}
    truth, plain = (
        oracle(q.cpu(), k.cpu(), v.cpu(), **kw),
        same_dtype(q.cpu(), k.cpu(), v.cpu(), **kw),
    )
    out, lse = run(q, k, v, **kw)
    assert_within_budget(out.cpu(), plain.out.cpu(), truth.out, torch.float16, what="out")
    assert_within_budget(lse.cpu(), plain.lse.cpu(), truth.lse, torch.float16, what="lse")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", ["dense-17x100-gqa", "causal-100", "window-large-both-gqa"])
def test_half_precision_lse_is_fp32_exact(case, dtype):
    """q·k is accumulated in fp32 and never rounded to the input dtype (issue 15): the LSE is
    within fp32 rounding of float64, where bf16-rounded scores put it 3e-4 to 1.6e-2 off."""
    B, Hq, Hk, Sq, Sk, D, kw = CASES[case]
    q, k, v = qkv_on(B, Hq, Hk, Sq, Sk, D, dtype=dtype)
    truth = oracle(q.cpu(), k.cpu(), v.cpu(), **kw).lse
    _, lse = run(q, k, v, **kw)
    assert err(lse.cpu(), truth) <= LSE_RTOL * (1 + truth.abs().max().item())
    assert err(same_dtype(q.cpu(), k.cpu(), v.cpu(), **kw).lse, truth) > 1e-4  # the check bites


def test_public_api_default_blocks():
    q, k, v = qkv_on(1, 8, 2, 100, 257, 64, dtype=torch.bfloat16)
    truth = oracle(q.cpu(), k.cpu(), v.cpu(), causal=True)
    plain = same_dtype(q.cpu(), k.cpu(), v.cpu(), causal=True)
    out, lse = qkv.attention(q, k, v, causal=True, return_lse=True, backend="triton")
    assert_within_budget(out.cpu(), plain.out, truth.out, torch.bfloat16)
    assert_within_budget(lse.cpu(), plain.lse, truth.lse, torch.bfloat16, what="lse")
    assert isinstance(qkv.attention(q, k, v, backend="triton"), torch.Tensor)


GRAD_CASES = {  # (Hq, Hk, Sq, Sk, D, kwargs): awkward sizes, block edges ±1, empty rows
    "dense-gqa": (4, 2, 17, 33, 16, {}),
    "causal-gqa": (4, 2, 17, 40, 16, {"causal": True}),
    "causal-square-edge": (2, 2, 33, 33, 16, {"causal": True}),
    "causal-empty-top": (4, 2, 40, 17, 16, {"causal": True}),
    "causal-decode-1x47": (4, 1, 1, 47, 16, {"causal": True}),
    "window-mqa": (4, 1, 40, 40, 16, {"window": (5, 3)}),
    "window-left-d40": (2, 1, 31, 49, 40, {"window": (7, None)}),
    "window-right-d59": (2, 2, 49, 31, 59, {"window": (None, 2)}),
    "window-empty-rows": (2, 2, 40, 17, 16, {"window": (0, 0)}),
}


def grads(fn, q, k, v, do, dl):
    """dq, dk, dv of Σ out·do + Σ lse·dl (an empty row's −inf LSE has no gradient)."""
    xs = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    out, lse = fn(*xs)
    lse = torch.where(torch.isfinite(lse), lse, 0.0)
    loss = 0.0
    if do is not None:
        loss = loss + (out * do.to(out)).sum()
    if dl is not None:
        loss = loss + (lse * dl.to(lse)).sum()
    loss.backward()
    return [torch.zeros_like(x).cpu() if x.grad is None else x.grad.cpu() for x in xs]


def _ref(**kw):
    def fn(*x):
        r = naive(*x, **kw)
        return r.out, r.lse

    return fn


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", list(GRAD_CASES))
def test_gradients_vs_oracle(case, dtype):
    """The Triton backward (dK/dV and dQ passes): loss on out and on the LSE, dq, dk, dv
    against the float64 oracle's autograd, within 2× the same-dtype PyTorch error (+ tol)."""
    Hq, Hk, Sq, Sk, D, kw = GRAD_CASES[case]
    q, k, v = qkv_on(2, Hq, Hk, Sq, Sk, D, dtype=dtype, requires_grad=True)
    g = torch.Generator().manual_seed(1)
    do = torch.randn(2, Hq, Sq, D, generator=g, dtype=torch.float64)
    dl = torch.randn(2, Hq, Sq, generator=g, dtype=torch.float64)
    truth = grads(_ref(**kw), q.cpu().double(), k.cpu().double(), v.cpu().double(), do, dl)
    plain = grads(_ref(**kw), q.cpu(), k.cpu(), v.cpu(), do, dl)
    got = grads(lambda *x: run(*x, **kw), q, k, v, do, dl)
    for name, a, p, t in zip("qkv", got, plain, truth, strict=True):
        assert a.dtype == dtype
        assert_within_budget(a, p, t, dtype, factor=GRAD_FACTOR, what=f"d{name}")


ALIBI4 = qkv.alibi(torch.tensor([1, 0.5, 2, 4]))
OVERFLOW_CASES = {  # (Hq, Hk, Sq, Sk, kwargs): every masking path of the three kernels
    "causal-empty-top": (4, 2, 40, 17, {"causal": True}),
    "window-empty-rows": (2, 2, 40, 17, {"window": (0, 0)}),
    "softcap-alibi-gqa": (4, 2, 33, 33, {"softcap": 3.0, "score_mod": ALIBI4}),
}


@pytest.mark.skipif(not tk.INTERPRETED, reason="the int32 overflow checks are the interpreter's")
@pytest.mark.parametrize("case", list(OVERFLOW_CASES))
def test_int32_index_math_does_not_overflow(case):
    """The interpreter's int32 checks on (the rest of the suite drops them for speed,
    `interpreter.quicker`): every int32 add, sub and mul of offsets, band bounds and the
    empty-row sentinel in the forward, dK/dV and dQ passes is checked, and out, dq, dk, dv stay
    within the float64 oracle's budget."""
    Hq, Hk, Sq, Sk, kw = OVERFLOW_CASES[case]
    q, k, v = qkv_on(1, Hq, Hk, Sq, Sk, 16, requires_grad=True)
    g = torch.Generator().manual_seed(7)
    do = torch.randn(1, Hq, Sq, 16, generator=g, dtype=torch.float64)
    with interpreter.overflow_checked() as checked:
        got = grads(lambda *x: run(*x, **kw), q, k, v, do, None)
    assert checked, "this Triton's interpreter has no int32 checks: see interpreter.py here"
    x = [t.detach().cpu() for t in (q, k, v)]
    truth = grads(_ref(**kw), *(t.double() for t in x), do, None)
    plain = grads(_ref(**kw), *x, do, None)
    for name, a, p, t in zip("qkv", got, plain, truth, strict=True):
        assert_within_budget(a, p, t, torch.float32, factor=GRAD_FACTOR, what=f"d{name}")


@pytest.mark.skipif(not tk.INTERPRETED, reason="the int32 overflow checks are the interpreter's")
@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # the interpreter's numpy
def test_int32_index_math_does_not_overflow_in_the_repairs():
    """The same checks through the forward's and the dQ pass's repair launches: NaN/inf in
    keys and values no row keeps (queries at 16..48 keep keys 9..51 of 0..48)."""
    kw = {"window": (7, 3)}
    q, k, v = qkv_on(1, 4, 1, 33, 49, 16)
    with interpreter.overflow_checked():
        check_masked_nonfinite_grads(q, k, v, kw, lambda *x: run(*x, **kw)[0], 5, 8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize(
    "kw", [{"causal": True}, {"window": (4, 0)}, {}], ids=["causal", "window", "dense"]
)
def test_sinks_forward_and_gradients_vs_oracle(kw, dtype):
    """Learned sinks (the online softmax starts from the sink): out and LSE, then dq, dk, dv
    and dsinks, against the float64 oracle (`naive`'s sink term) within 2× / 3× the same-dtype
    PyTorch error (+ the floor); Sq > Sk leaves rows that keep no key (out 0, LSE σ)."""
    q, k, v = qkv_on(1, 4, 2, 40, 33, 16, dtype=dtype, requires_grad=True)
    g = torch.Generator().manual_seed(3)
    sinks = (1.5 + torch.randn(4, generator=g, dtype=torch.float64)).float()
    do = torch.randn(1, 4, 40, 16, generator=g, dtype=torch.float64)

    def with_grads(fn, q, k, v, sk):
        xs = [x.detach().clone().requires_grad_() for x in (q, k, v, sk)]
        out, lse = fn(*xs)
        (out * do.to(out)).sum().backward()
        return out.detach().cpu(), lse.detach().cpu(), [x.grad.cpu() for x in xs]

    def oracle_fn(q, k, v, sk):
        r = naive(q, k, v, sinks=sk, **kw)
        return r.out, r.lse

    def ours(q, k, v, sk):
        return tk.triton_attention(q, k, v, make_spec(q, k, v, sinks=sk, **kw), SMALL)

    args64 = (q.cpu().double(), k.cpu().double(), v.cpu().double(), sinks.double())
    t_out, t_lse, t_grads = with_grads(oracle_fn, *args64)
    p_out, _, p_grads = with_grads(oracle_fn, q.cpu(), k.cpu(), v.cpu(), sinks)
    out, lse, got = with_grads(ours, q, k, v, sinks.to(DEVICE))
    assert_within_budget(out, p_out, t_out, dtype)
    assert err(lse, t_lse) < 1e-5 * (1 + t_lse.abs().max().item())
    for name, a, p, t in zip(("dq", "dk", "dv", "dsinks"), got, p_grads, t_grads, strict=True):
        assert_within_budget(a, p, t, dtype, factor=GRAD_FACTOR, what=name)


@pytest.mark.parametrize("Sq", [5, 0])
def test_sinks_with_no_keys_give_out_0_and_lse_sigma(Sq):
    """Sk = 0: a row's only logit is its sink, so out is 0 and lse is σ_h (the docstring's
    rule; the reference/tiled/fused backends gave it, triton gave −inf). dsinks_h is then
    Σ_{b,i} dlse (exp(σ_h − lse) = 1, rowsum(dO∘O) = 0); dq is 0."""
    q = torch.randn(2, 2, Sq, 16, device=DEVICE, requires_grad=True)
    k = torch.randn(2, 1, 0, 16, device=DEVICE)
    sinks = torch.tensor([0.5, -1.0], device=DEVICE, requires_grad=True)
    out, lse = qkv.attention(q, k, k, sinks=sinks, return_lse=True, backend="triton")
    assert out.shape == (2, 2, Sq, 16) and (out == 0).all()
    assert torch.equal(lse.cpu(), torch.tensor([0.5, -1.0]).view(1, 2, 1).expand(2, 2, Sq))
    dlse = torch.randn(2, 2, Sq, device=DEVICE)
    (out.sum() + (lse * dlse).sum()).backward()
    assert torch.allclose(sinks.grad.cpu(), dlse.sum((0, 2)).cpu(), rtol=1e-6, atol=1e-6)
    assert (q.grad == 0).all()


@pytest.mark.parametrize("which", ["out", "lse"])
def test_gradients_of_out_alone_and_of_lse_alone(which):
    """dLSE enters dS as −dLSE·P (Δ − dLSE): each term alone against the oracle."""
    q, k, v = qkv_on(1, 4, 2, 33, 40, 16, requires_grad=True)
    g = torch.Generator().manual_seed(2)
    do = torch.randn(1, 4, 33, 16, generator=g, dtype=torch.float64) if which == "out" else None
    dl = torch.randn(1, 4, 33, generator=g, dtype=torch.float64) if which == "lse" else None
    kw = {"causal": True}
    truth = grads(_ref(**kw), q.cpu().double(), k.cpu().double(), v.cpu().double(), do, dl)
    plain = grads(_ref(**kw), q.cpu(), k.cpu(), v.cpu(), do, dl)
    got = grads(lambda *x: run(*x, **kw), q, k, v, do, dl)
    for name, a, p, t in zip("qkv", got, plain, truth, strict=True):
        assert_within_budget(a, p, t, torch.float32, factor=GRAD_FACTOR, what=f"d{name}")
    if which == "lse":  # ∂LSE/∂v = 0
        assert (got[2] == 0).all()


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # the interpreter's numpy
def test_the_triton_backward_keeps_masked_nan_out_on_its_own(monkeypatch):
    """No host check and no tiled fallback: NaN/inf in keys and values that no row keeps,
    in skipped blocks and inside a visited block's masked part, leave every gradient finite
    and equal to the float64 reference's on K/V with those entries zeroed."""
    from qkv.attention import scoring, tiled

    monkeypatch.setattr(tiled, "backward", lambda *a, **k: 1 / 0)
    monkeypatch.setattr(scoring, "all_finite", lambda *a, **k: 1 / 0)
    kw = {"window": (3, 0)}  # 10 queries at positions 30..39 keep keys 27..39 only
    q, k, v = qkv_on(1, 2, 1, 10, 40, 16, requires_grad=True)
    for key, value in ((5, 12), (24, 26)):  # skipped block; block 16..31's masked part
        check_masked_nonfinite_grads(q, k, v, kw, lambda *x: run(*x, **kw)[0], key, value)


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # the interpreter's numpy
def test_a_kept_nan_key_leaves_the_rows_that_mask_it_alone_in_dq():
    """Key 28 (NaN) is kept by the rows at positions 30, 31 only; rows 32..39 share its tile
    but mask it. Their dq must be finite and the float64 reference's (key 28 zeroed): ds is 0
    there, and 0·NaN in ds·k must not make it NaN. The two rows that keep it: NaN."""
    kw = {"window": (3, 0)}
    q, k, v = qkv_on(1, 2, 1, 10, 40, 16, requires_grad=True)
    k2 = k.detach().clone()
    k2[:, :, 28, 2] = float("nan")
    xs = [t.detach().clone().requires_grad_() for t in (q, k2, v)]
    run(*xs, **kw)[0].sum().backward()
    ref = [t.detach().cpu().double().requires_grad_() for t in (q, k, v)]
    with torch.no_grad():
        ref[1][:, :, 28] = 0.0
    naive(*ref, **kw).out.sum().backward()
    dq = xs[0].grad.cpu()
    assert dq[:, :, :2].isnan().all()
    assert torch.isfinite(dq[:, :, 2:]).all()
    assert err(dq[:, :, 2:], ref[0].grad[:, :, 2:]) < 1e-5


def _brute_blocks(spec, qs, qe, n):
    """Per key block: 'skip' (no kept key), 'full' (every (i, j) kept, inside Sk) or 'edge'."""
    i = torch.arange(qs, qe).view(-1, 1) + spec.delta
    kinds = []
    for b in range(-(-spec.Sk // n)):
        j = torch.arange(b * n, b * n + n).view(1, -1)
        keep = j < spec.Sk
        if spec.left is not None:
            keep = keep & (j >= i - spec.left)
        if spec.right is not None:
            keep = keep & (j <= i + spec.right)
        kinds.append("skip" if not keep.any() else "full" if keep.all() else "edge")
    return kinds


def test_key_block_range_matches_band_range():
    """Every block outside [lo, hi) keeps no key, [lo, hi) is tight around `band_range`, and
    the unmasked interior [mid_lo, mid_hi) is exactly the set of fully kept blocks."""
    g = torch.Generator().manual_seed(0)
    sides = [None, 0, 1, 2, 5, 16, 40]
    n_checked = 0
    for _ in range(400):
        Sq, Sk = (int(x) for x in torch.randint(1, 90, (2,), generator=g))
        left, right = (sides[int(x)] for x in torch.randint(0, len(sides), (2,), generator=g))
        bm, n = (16, 32, 64)[n_checked % 3], (16, 32)[n_checked % 2]
        x = torch.empty(1, 1, Sq, 1)
        spec = make_spec(
            x, torch.empty(1, 1, Sk, 1), torch.empty(1, 1, Sk, 1), window=(left, right)
        )
        for qs in range(0, Sq, bm):
            qe = min(qs + bm, Sq)
            lo, mid_lo, mid_hi, hi = tk.key_block_range(
                qs, qe, Sk, spec.delta, spec.left, spec.right, n
            )
            assert lo <= mid_lo <= mid_hi <= hi
            start, stop = scoring.band_range(spec, qs, qe - 1)
            if stop > start:
                assert (lo, hi) == (start // n, -(-stop // n))
            else:
                assert lo == hi
            kinds = _brute_blocks(spec, qs, qe, n)
            assert all(kd == "skip" for kd in kinds[:lo] + kinds[hi:])
            assert [b for b, kd in enumerate(kinds) if kd == "full"] == list(range(mid_lo, mid_hi))
            n_checked += 1
    assert n_checked > 500


def test_query_block_range_matches_the_band():
    """The backward's dK/dV pass per key block: every query block outside [lo, hi) keeps no
    key of it, [lo, hi) is tight, and the unmasked interior [mid_lo, mid_hi) holds only
    blocks whose every row (of the full block, below Sq) keeps every key of the block (below
    Sk) — and every full block that does, but the last, partial one, is counted interior;
    a partial key block (keys past Sk) has no interior."""
    from qkv.attention.triton_backward import query_block_range

    g = torch.Generator().manual_seed(1)
    sides = [None, 0, 1, 2, 5, 16, 40]
    for n_checked in range(400):
        Sq, Sk = (int(x) for x in torch.randint(1, 90, (2,), generator=g))
        left, right = (sides[int(x)] for x in torch.randint(0, len(sides), (2,), generator=g))
        m, n = (16, 32, 64)[n_checked % 3], (16, 32)[n_checked % 2]
        delta = Sk - Sq
        for ks in range(0, Sk, n):
            ke = min(ks + n, Sk)
            full = ks + n <= Sk
            lo, mid_lo, mid_hi, hi = query_block_range(ks, ke, Sq, delta, left, right, m, full)
            assert lo <= mid_lo <= mid_hi <= hi
            assert full or mid_lo == mid_hi
            j = torch.arange(ks, ke).view(1, -1)
            kinds = []
            for blk in range(-(-Sq // m)):
                i = torch.arange(blk * m, min(blk * m + m, Sq)).view(-1, 1) + delta
                keep = torch.ones(i.shape[0], j.shape[1], dtype=torch.bool)
                if left is not None:
                    keep = keep & (j >= i - left)
                if right is not None:
                    keep = keep & (j <= i + right)
                kinds.append("skip" if not keep.any() else "full" if keep.all() else "edge")
            kept = [b for b, kind in enumerate(kinds) if kind != "skip"]
            if kept:
                assert (lo, hi) == (kept[0], kept[-1] + 1), (Sq, Sk, left, right, ks, m)
            else:
                assert lo == hi
            for b in range(mid_lo, mid_hi):
                assert kinds[b] == "full", (Sq, Sk, left, right, ks, m, b)
            last_full_block = Sq // m  # blocks below it have m rows
            for b, kind in enumerate(kinds):
                if kind == "full" and b < last_full_block and full:
                    assert mid_lo <= b < mid_hi, ("an interior block left masked", b)


@pytest.mark.parametrize(
    "kw", [{"window": (8, 0)}, {"causal": True}, {"window": (None, 3)}], ids=str
)
def test_kernel_visits_only_the_band(kw):
    """The kernel's own loop counters equal `key_block_range`: it skips what the band drops."""
    Sq = Sk = 257
    q, k, v = qkv_on(1, 2, 1, Sq, Sk, 16)
    spec = make_spec(q, k, v, **kw)
    _, _, visits = tk.forward(q, k, v, spec, SMALL, count=True)
    want = []
    for qs in range(0, Sq, 16):
        lo, mid_lo, mid_hi, hi = tk.key_block_range(
            qs, min(qs + 16, Sq), Sk, spec.delta, spec.left, spec.right, 16
        )
        want.append([mid_lo - lo + hi - mid_hi, mid_hi - mid_lo])
    assert visits.cpu().tolist() == [want, want]  # both query heads
    n_key_blocks = -(-Sk // 16)
    total = visits.sum().item()
    assert total < 2 * len(want) * n_key_blocks * (
        0.2 if "window" in kw and kw["window"][0] else 0.6
    )


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # the interpreter's numpy
@pytest.mark.parametrize("grad", [False, True], ids=["no-grad", "grad"])
@pytest.mark.parametrize("where", ["k", "v"])
def test_nan_in_masked_keys_and_values_does_not_leak(where, grad):
    """With or without a gradient, no host check: NaN/inf that no row keeps never reach the
    output, and a kept one gives the engine's NaN (the reference's), not plain arithmetic's
    ±inf."""
    q, k, v = (t.detach() for t in qkv_on(1, 2, 1, 40, 40, 16))
    kw = {"window": (3, 0)}
    t = k if where == "k" else v
    t[:, :, 5, 2] = float("nan")  # key 5: kept by rows 5..8 only
    t[:, :, 30, 0] = float("inf")  # key 30: kept by rows 30..33 only
    q[:, :, 30:34, 0] = q[:, :, 30:34, 0].abs() + 0.5  # their score with key 30: +inf
    # the engine's NaN/inf contract (a kept bad key makes its row NaN), not plain math's
    truth = reference_attention(q.cpu().double(), k.cpu().double(), v.cpu().double(), **kw).out
    out, _ = run(*(x.requires_grad_(grad) for x in (q, k, v)), **kw)
    out = out.detach().cpu()
    assert torch.equal(out.isnan(), truth.isnan())
    ok = torch.isfinite(truth)
    assert ok[:, :, :5].all() and ok[:, :, 9:30].all() and ok[:, :, 34:].all()
    assert err(out[ok], truth[ok]) < 1e-5


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # the interpreter's numpy
def test_a_kept_infinite_key_scored_minus_inf_weighs_0():
    """The one place the sync-free check differs from the engine's contract: a kept key with
    an infinite component whose score is −inf leaves no trace in the answer (its weight is
    exactly 0, as in plain arithmetic and SDPA), so its rows are the answer without that key,
    with or without a gradient; tiled (K/V checked) makes them NaN."""
    q, k, v = (t.detach() for t in qkv_on(1, 2, 1, 40, 40, 16))
    kw = {"window": (3, 0)}
    k[:, :, 30, 0] = float("inf")
    q[:, :, 30:34, 0] = -(q[:, :, 30:34, 0].abs() + 0.5)  # rows 30..33: score −inf with key 30
    out, _ = run(q, k, v, **kw)
    drop = torch.ones(40, 40, dtype=torch.bool)
    drop[:, 30] = False  # the same rows without key 30
    x = [t.cpu().double() for t in (q, k, v)]
    want = reference_attention(*x, mask=drop, **kw).out
    assert not out.isnan().any()
    assert err(out.cpu(), want) < 1e-5
    with_grad, _ = run(*(t.requires_grad_() for t in (q, k, v)), **kw)
    assert err(with_grad.detach().cpu(), want) < 1e-5
    checked = qkv.attention(q, k, v, backend="tiled", **kw)
    assert checked[:, :, 30:34].isnan().all() and not checked[:, :, :30].isnan().any()


@pytest.mark.parametrize(
    "kw, needle",
    [
        ({"mask": torch.ones(7, 9, dtype=torch.bool)}, "mask"),
        ({"mask_mod": lambda b, h, i, j: i >= j}, "mask"),
        ({"score_mod": lambda s, b, h, i, j: s}, "score_mod"),
        ({"dropout_p": 0.1}, "dropout"),
    ],
    ids=["mask", "mask_mod", "score_mod", "dropout"],
)
def test_unsupported_requests_raise(kw, needle):
    q, k, v = qkv_on(1, 2, 2, 7, 9, 16)
    if "mask" in kw:
        kw = {**kw, "mask": kw["mask"].to(DEVICE)}
    with pytest.raises(ValueError, match=needle) as e:
        qkv.attention(q, k, v, backend="triton", **kw)
    assert "backend='tiled'" in str(e.value)


def test_unsupported_shapes_dtypes_devices_raise():
    q, k, v = make_qkv(1, 2, 2, 7, 9, 16, Dv=32)
    with pytest.raises(ValueError, match="D == Dv"):
        qkv.attention(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), backend="triton")
    q, k, v = make_qkv(1, 2, 2, 7, 9, 16, dtype=torch.float64)
    with pytest.raises(ValueError, match="float64"):
        qkv.attention(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), backend="triton")
    q, k, v = (t.to("meta") for t in make_qkv(1, 2, 2, 7, 9, 16))
    with pytest.raises(ValueError, match="CUDA"):
        qkv.attention(q, k, v, backend="triton")


# ---- `auto` takes the Triton forward on CUDA where it would run tiled, without a gradient ----


@pytest.fixture
def as_on_cuda(monkeypatch):
    """`auto` as it decides on a CUDA machine, for this module's DEVICE: Triton allowed there,
    and the CPU-only `fused` backend out of the way (on CUDA it never runs)."""
    monkeypatch.setattr(api, "TRITON_AUTO_DEVICES", (DEVICE,))
    monkeypatch.setattr(api._TRITON_BROKEN, "seen", {})
    monkeypatch.setattr(fused_cpu, "supported", lambda q, spec: "runs on CPU only")


def spy_forward(monkeypatch) -> list[int]:
    calls = []
    real = tk.forward

    def forward(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(tk, "forward", forward)
    return calls


# requests that `auto` gives tiled on CUDA too: a window, and learned sinks in bf16
AUTO_CASES = {
    "window-left-only": (1, 2, 2, 100, 100, 16, torch.float32, {"window": (20, None)}),
    "window-both-gqa-bf16": (1, 8, 2, 100, 100, 64, torch.bfloat16, {"window": (60, 30)}),
    "window-causal-sq>sk": (
        1,
        2,
        2,
        100,
        60,
        16,
        torch.float32,
        {"window": (9, None), "causal": True},
    ),
    "sinks-causal-bf16": (1, 4, 2, 33, 33, 16, torch.bfloat16, {"causal": True, "sinks": True}),
}


@pytest.mark.parametrize("return_lse", [False, True])
@pytest.mark.parametrize("case", list(AUTO_CASES))
def test_auto_runs_the_triton_forward_without_a_gradient(as_on_cuda, monkeypatch, case, return_lse):
    """Issue 15: on CUDA, "auto" ran the pure-PyTorch tiled kernel for windows (0.05× compiled
    flex on an H200 where the Triton forward was 0.70×). Now it runs the Triton forward there,
    and the answer is within the error budget of the float64 oracle."""
    B, Hq, Hk, Sq, Sk, D, dtype, kw = AUTO_CASES[case]
    kw = dict(kw)
    q, k, v = qkv_on(B, Hq, Hk, Sq, Sk, D, dtype=dtype)
    if kw.pop("sinks", False):
        kw["sinks"] = torch.linspace(-1.0, 2.0, Hq, device=DEVICE)
    assert auto_backend(q, k, v, return_lse=return_lse, **kw) == "triton"
    calls = spy_forward(monkeypatch)
    got = qkv.attention(q, k, v, return_lse=return_lse, **kw)
    assert calls, "auto did not run the Triton forward"
    out, lse = got if return_lse else (got, None)
    cpu = {n: (t.cpu() if isinstance(t, torch.Tensor) else t) for n, t in kw.items()}
    truth = oracle(q.cpu(), k.cpu(), v.cpu(), **cpu)
    plain = same_dtype(q.cpu(), k.cpu(), v.cpu(), **cpu)
    assert_within_budget(out.cpu(), plain.out, truth.out, dtype, what="out")
    if lse is not None:
        assert_within_budget(lse.cpu(), plain.lse, truth.lse, dtype, what="lse")


def test_auto_takes_the_triton_backward_up_to_d128(as_on_cuda):
    """With a gradient to take, "auto" runs Triton forward and backward where tiled would run
    (on an H200 its backward took 0.58–0.66× SDPA's time, tiled's fwd+bwd 0.07–0.09×), for head dims up to 128, whose builds
    were timed there; larger head dims keep tiled when a gradient is needed."""
    q, k, v = qkv_on(1, 2, 2, 40, 40, 16, requires_grad=True)
    assert auto_backend(q, k, v, window=(8, 0)) == "triton"
    sinks = torch.zeros(2, device=DEVICE, requires_grad=True)  # a sink's gradient counts too
    qd, kd, vd = (t.detach().to(torch.bfloat16) for t in (q, k, v))
    assert auto_backend(qd, kd, vd, causal=True, sinks=sinks) == "triton"
    big = [t.detach().to(DEVICE).requires_grad_() for t in make_qkv(1, 2, 2, 40, 40, 160)]
    assert auto_backend(*big, window=(8, 0)) == "tiled"
    with torch.no_grad():
        assert auto_backend(*big, window=(8, 0)) == "triton"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_auto_gradients_through_triton_vs_oracle(as_on_cuda, monkeypatch, dtype):
    """A window with a gradient under "auto": the Triton kernels run, and out and dq/dk/dv are
    within the error budget of the float64 oracle."""
    calls = spy_forward(monkeypatch)
    kw = {"window": (9, 0)}
    q, k, v = qkv_on(1, 4, 2, 70, 70, 32, dtype=dtype, requires_grad=True)
    do = torch.randn(1, 4, 70, 32, generator=torch.Generator().manual_seed(7)).to(dtype)
    out = qkv.attention(q, k, v, **kw)
    got = torch.autograd.grad(out, (q, k, v), do.to(DEVICE))
    assert calls, "auto did not run the Triton kernels"
    xs = [t.detach().cpu().requires_grad_() for t in (q, k, v)]
    x64 = [t.detach().double().requires_grad_() for t in xs]
    plain, truth = naive(*xs, **kw).out, naive(*x64, **kw).out
    g_plain = torch.autograd.grad(plain, xs, do)
    g_truth = torch.autograd.grad(truth, x64, do.double())
    assert_within_budget(out.detach().cpu(), plain.detach(), truth.detach(), dtype, what="out")
    for name, a, p, t in zip("qkv", got, g_plain, g_truth, strict=True):
        assert_within_budget(a.cpu(), p, t, dtype, factor=GRAD_FACTOR, what=f"d{name}")


# ---- `auto` on SDPA for masked requests: no K/V check, the Triton repair instead ----


def _poisoned(dtype, Sq=70, Sk=70):
    """q, k, v with NaN/inf in keys and values most rows mask (causal) and one kept NaN."""
    q, k, v = (t.detach() for t in qkv_on(1, 4, 2, Sq, Sk, 16, dtype=dtype))
    delta, r = Sk - Sq, (Sq * 4 // 7, Sq * 5 // 7, Sq - 4)  # square: rows 40, 50, 66
    k[0, 0, delta + r[0], 2] = float("nan")  # kept by rows ≥ r0 (of heads 0, 1)
    v[0, 1, delta + r[1], 3] = float("inf")  # kept by rows ≥ r1 (of heads 2, 3)
    v[0, 0, delta + r[2], 5] = float("nan")  # kept by rows ≥ r2
    return q, k, v


def _leaky_sdpa(q, k, v, spec, lse=False):
    """Causal SDPA as PyTorch's math backend computes it, the mask added as a −inf bias
    (NaN + −inf = NaN, 0·NaN = NaN): a masked NaN/inf leaks, on every device. (Which fused
    kernel leaks what depends on the device and its block sizes; CPU flash at 70 × 70 does
    not.) fp32 scores, out in q's dtype, as the fused kernels."""
    i = torch.arange(spec.Sq, device=q.device)[:, None] + spec.delta
    bias = torch.zeros(spec.Sq, spec.Sk, device=q.device)
    bias = bias.masked_fill(torch.arange(spec.Sk, device=q.device) > i, float("-inf"))
    kk, vv = (t.float().repeat_interleave(spec.G, dim=1) for t in (k, v))
    s = q.float() @ kk.transpose(-1, -2) * spec.scale + bias
    out = (torch.softmax(s, -1) @ vv).to(q.dtype)
    return (out, torch.logsumexp(s, -1)) if lse else out


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # the interpreter's numpy
@pytest.mark.parametrize(
    "dtype, shape, return_lse",  # SDPA's LSE kernels: causal with Sq == Sk, and on CPU fp32
    [
        (torch.float32, (70, 70), False),
        (torch.bfloat16, (70, 70), False),
        (torch.float32, (70, 70), True),
        (torch.float32, (30, 70), False),
        (torch.bfloat16, (30, 70), False),
    ],
    ids=["fp32", "bf16", "fp32-lse", "fp32-sq<sk", "bf16-sq<sk"],
)
def test_auto_sdpa_keeps_masked_nan_out_without_checking_kv(
    as_on_cuda, monkeypatch, dtype, shape, return_lse
):
    """Issue 15: "auto" checked K/V for NaN/inf before SDPA, a host sync (~60 µs on an H200,
    more than SDPA's 52 µs at B4 H16 N1024 D128). Now it runs SDPA and lets the Triton repair
    recompute the rows that came back non-finite. SDPA (as its math backend computes, which
    leaks the masked NaN/inf here) under "auto" gives the float64 oracle's NaN pattern and
    values, and K/V are never checked."""
    q, k, v = _poisoned(dtype, *shape)
    kw = {"causal": True}
    assert auto_backend(q, k, v, return_lse=return_lse, **kw) == "sdpa"
    monkeypatch.setattr(api, "sdpa", _leaky_sdpa)
    monkeypatch.setattr(api, "sdpa_lse", lambda *a: _leaky_sdpa(*a, lse=True))
    raw = _leaky_sdpa(q, k, v, make_spec(q, k, v, **kw)).cpu()
    # the engine's contract (a kept bad key or value: NaN) for where NaN must be; elsewhere
    # the answer does not depend on the bad entries, so the oracles run with them zeroed
    ref = reference_attention(*(t.cpu().double() for t in (q, k, v)), **kw)
    bad = ref.out.isnan()
    clean = [scoring.finite(t).cpu() for t in (q, k, v)]
    truth, plain = oracle(*clean, **kw), same_dtype(*clean, **kw)
    assert not torch.equal(raw.isnan(), bad), "SDPA did not leak: the test is void"

    def no_check(*xs):
        raise AssertionError("auto checked K/V on the host")

    monkeypatch.setattr(scoring, "all_finite", no_check)
    got = qkv.attention(q, k, v, return_lse=return_lse, **kw)
    out, lse = got if return_lse else (got, None)
    out = out.cpu()
    assert torch.equal(out.isnan(), bad)
    assert_within_budget(out[~bad], plain.out[~bad], truth.out[~bad], dtype, what="out")
    if lse is not None:  # a kept NaN key's rows: NaN LSE; the others as the oracle's
        fine = ~ref.lse.isnan()
        assert torch.equal(lse.cpu().isnan(), ~fine)
        assert_within_budget(lse.cpu()[fine], plain.lse[fine], truth.lse[fine], dtype, what="lse")


def test_auto_sdpa_leaves_a_finite_answer_as_it_is(as_on_cuda, monkeypatch):
    """Finite inputs: the repair visits no key and stores nothing, so "auto" returns SDPA's
    answer bit for bit, and the repair kernel did run (it is what replaces the check)."""
    launched = []
    real = tk.repair
    monkeypatch.setattr(tk, "repair", lambda *a, **kw: launched.append(1) or real(*a, **kw))
    q, k, v = (t.detach() for t in qkv_on(1, 4, 2, 70, 70, 16))
    got = qkv.attention(q, k, v, causal=True)
    assert launched == [1]
    assert torch.equal(got, qkv.attention(q, k, v, causal=True, backend="sdpa"))


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # the interpreter's numpy
def test_auto_sinks_on_sdpa_repair_instead_of_checking_kv(as_on_cuda, monkeypatch):
    """Inference with sinks (fp32, causal, no gradient) runs SDPA's out and LSE and folds the
    sinks in; on CUDA the repair now keeps masked NaN/inf out of them, with no K/V check:
    NaN exactly where the float64 reference has it, the rest within 2e-5 of the truth."""
    q, k, v = _poisoned(torch.float32)
    sk = torch.linspace(-1.0, 2.0, 4)
    kw = {"causal": True, "sinks": sk.to(DEVICE)}
    cpu = [t.cpu() for t in (q, k, v)]
    ref = reference_attention(*(t.double() for t in cpu), causal=True, sinks=sk.double())
    bad = ref.out.isnan()
    truth = oracle(*(scoring.finite(t) for t in cpu), causal=True, sinks=sk)
    monkeypatch.setattr(api, "sdpa_lse", lambda *a: _leaky_sdpa(*a, lse=True))

    def no_check(*xs):
        raise AssertionError("auto checked K/V on the host")

    monkeypatch.setattr(scoring, "all_finite", no_check)
    assert auto_backend(q, k, v, return_lse=True, **kw) == "sdpa"
    out, lse = qkv.attention(q, k, v, return_lse=True, **kw)
    assert torch.equal(out.cpu().isnan(), bad)
    assert err(out.cpu()[~bad], truth.out[~bad]) < 2e-5
    fine = ~ref.lse.isnan()
    assert torch.equal(lse.cpu().isnan(), ~fine)
    assert err(lse.cpu()[fine], truth.lse[fine]) < 2e-5


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"causal": True},
        {"window": (3, 0), "score_mod": lambda s, b, h, i, j: s * 2},
        {"window": (3, 0), "dropout_p": 0.1},
    ],
    ids=["plain", "causal", "window-score_mod", "window-dropout"],
)
def test_auto_never_takes_triton_for_what_sdpa_runs_or_triton_lacks(as_on_cuda, kw):
    """Plain and causal (Sq = Sk) stay on SDPA; a score_mod other than softcap(c) and
    alibi(slopes), and dropout, stay on tiled."""
    q, k, v = qkv_on(1, 2, 2, 9, 9, 16)
    assert "triton" in BACKENDS
    for return_lse in (False, True):
        spec = make_spec(q, k, v, **kw)
        assert choose_backend(q, k, v, spec, return_lse) != "triton"


def test_auto_takes_triton_for_an_lse_sdpa_cannot_return(as_on_cuda):
    """Causal with Sq ≠ Sk (a chunk after a cache): SDPA's causal is top-left, so its LSE
    kernels cannot serve it; without the LSE the out still comes from SDPA with a mask."""
    q, k, v = qkv_on(1, 2, 2, 7, 9, 16)
    spec = make_spec(q, k, v, causal=True)
    assert choose_backend(q, k, v, spec, True) == "triton"
    assert choose_backend(q, k, v, spec, False) == "sdpa"


@pytest.mark.parametrize("return_lse", [False, True])
def test_auto_never_takes_triton_on_cpu_tensors(return_lse):
    """Without a GPU the Triton kernels could only run interpreted, thousands of times slower
    than `fused`: CPU tensors never go to Triton under "auto", even with TRITON_INTERPRET."""
    q, k, v = make_qkv(1, 2, 2, 40, 40, 16, dtype=torch.bfloat16)
    for kw in ({"window": (8, 0)}, {"causal": True, "sinks": torch.zeros(2)}, {"causal": True}):
        assert auto_backend(q, k, v, return_lse=return_lse, **kw) != "triton"


def test_auto_falls_back_to_tiled_once_triton_cannot_build(as_on_cuda, monkeypatch):
    """A GPU where Triton cannot compile or fit the kernel: "auto" warns once, names the error,
    returns tiled's answer and stops trying for that dtype and head dim only (an fp32 D = 256
    that does not fit must not take bf16 D = 128 off Triton); backend="triton" still raises
    the error itself."""
    from triton.runtime.errors import OutOfResources

    def cannot_build(*args, **kwargs):
        raise OutOfResources(232448, 101376, "shared memory")

    real = tk.forward
    monkeypatch.setattr(tk, "forward", cannot_build)
    q, k, v = qkv_on(1, 2, 2, 40, 40, 16)
    want = qkv.attention(q, k, v, window=(8, 0), backend="tiled")
    with pytest.warns(RuntimeWarning, match=r"could not be built.*float32 with head dim 16.*"
                      r"OutOfResources.*runs 'tiled'"):  # fmt: skip
        got = qkv.attention(q, k, v, window=(8, 0))
    assert torch.equal(got, want)
    assert auto_backend(q, k, v, window=(8, 0)) == "tiled"
    assert auto_backend(*qkv_on(1, 2, 2, 40, 40, 12), window=(8, 0)) == "tiled"  # padded: 16
    monkeypatch.setattr(tk, "forward", real)
    for other in (qkv_on(1, 2, 2, 40, 40, 16, dtype=torch.bfloat16), qkv_on(1, 2, 2, 40, 40, 32)):
        assert auto_backend(*other, window=(8, 0)) == "triton"
    monkeypatch.setattr(tk, "forward", cannot_build)
    with pytest.raises(OutOfResources):
        qkv.attention(q, k, v, window=(8, 0), backend="triton")
    monkeypatch.setattr(tk, "forward", lambda *a, **kw: 1 / 0)  # any other error: raised
    monkeypatch.setattr(api._TRITON_BROKEN, "seen", {})
    with pytest.raises(ZeroDivisionError):
        qkv.attention(q, k, v, window=(8, 0))


def test_a_backward_triton_cannot_build_falls_back_to_tiled(monkeypatch):
    """A GPU where the Triton backward cannot be built: the step is not lost. The gradients
    come from tiled's backward (the same saved out and LSE), with one warning naming the
    error, and tiled's from then on."""
    from triton.runtime.errors import OutOfResources

    from qkv.attention import triton_backward

    def cannot_build(*args, **kwargs):
        raise OutOfResources(232448, 101376, "shared memory")

    monkeypatch.setattr(triton_backward, "backward", cannot_build)
    monkeypatch.setattr(tk._BACKWARD_BROKEN, "seen", {})
    q, k, v = qkv_on(1, 2, 2, 40, 40, 16, requires_grad=True)
    want = torch.autograd.grad(
        qkv.attention(q, k, v, window=(8, 0), backend="tiled").sum(), (q, k, v)
    )
    with pytest.warns(RuntimeWarning, match=r"backward could not be built.*OutOfResources"):
        got = torch.autograd.grad(run(q, k, v, window=(8, 0))[0].sum(), (q, k, v))
    for a, b in zip(got, want, strict=True):
        assert err(a, b) < 1e-5
    assert tk._BACKWARD_BROKEN.seen
    again = torch.autograd.grad(run(q, k, v, window=(8, 0))[0].sum(), (q, k, v))  # no warning
    assert err(again[0], want[0]) < 1e-5
    monkeypatch.setattr(tk._BACKWARD_BROKEN, "seen", {})
    monkeypatch.setattr(triton_backward, "backward", lambda *a, **kw: 1 / 0)
    with pytest.raises(ZeroDivisionError):  # any other error is raised
        torch.autograd.grad(run(q, k, v, window=(8, 0))[0].sum(), (q, k, v))


def test_missing_triton_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton", None)  # import triton → ModuleNotFoundError
    monkeypatch.delitem(sys.modules, "qkv.attention.triton_kernel")
    q, k, v = make_qkv(1, 2, 2, 7, 9, 16)
    with pytest.raises(ImportError, match="pip install triton"):
        qkv.attention(q, k, v, backend="triton")


# ---- the peers' cases (tests/attention/test_peers.py, re-typed from flash-attn) on triton ----


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("d", [16, 64])
@pytest.mark.parametrize("seqlen", [1, 2, 17])
def test_peer_flash_bwd_overflow(seqlen, d, causal):
    from . import test_peers

    test_peers.test_flash_bwd_overflow(seqlen, d, causal, "triton")


@pytest.mark.parametrize("case", ["sk1", "sk1-causal", "causal-sq>sk", "window-0-mqa"])
def test_peer_single_key_rows_bf16(case):
    from . import test_peers

    test_peers.test_single_key_rows_bf16(case, "triton")


@pytest.mark.parametrize("d", [40, 59, 111])
def test_peer_awkward_head_dims_bf16(d):
    from . import test_peers

    test_peers.test_awkward_head_dims_bf16(d, True, "triton")


def test_round_to_bf16_is_nearest_even_like_torch():
    """`_round` (the forward's P and out, the backward's P and dS under the interpreter) gives
    PyTorch's fp32 → bf16 conversion bit for bit on 8k random normal floats: ties to even,
    ±inf, NaN, values that round up to the next binade or past the largest bf16 to inf. (The interpreter's own cast truncates:
    before `_round`, the bf16 forward's error against float64 was 2–3× the same kernel's on a
    GPU, and the backward never rounded P or dS at all.)"""
    import triton
    import triton.language as tl

    @triton.jit
    def kernel(X, Y, N: tl.constexpr):
        i = tl.arange(0, N)
        tl.store(Y + i, tk._round(tl.load(X + i), tl.bfloat16, tk.INTERPRETED))

    g = torch.Generator().manual_seed(0)
    bits = torch.randint(0, 2**16, (4096,), generator=g, dtype=torch.int32)
    ties = (bits << 16) | 0x8000  # exactly halfway between two bf16 values
    near = (bits << 16) | torch.randint(0, 2**16, (4096,), generator=g, dtype=torch.int32)
    x = torch.cat((ties, near)).view(torch.float32)
    # no NaN payloads (one NaN below) and no subnormals: the interpreter's cast turns those
    # into other subnormals (its own bug; a P or out below 1.2e-38 is 0 for every purpose)
    x = x[~x.isnan() & ((x == 0) | (x.abs() >= torch.finfo(torch.float32).tiny))]
    specials = torch.tensor([0.0, -0.0, 1.0, float("inf"), -float("inf"), 3.3961514e38,
                             -3.3961514e38, 1.0039062, 1.0117188])  # fmt: skip
    x = torch.cat((x, specials, torch.tensor([float("nan")])))
    n = triton.next_power_of_2(x.numel())
    xs = torch.cat((x, torch.zeros(n - x.numel()))).to(DEVICE)
    y = torch.empty(n, dtype=torch.bfloat16, device=DEVICE)
    kernel[(1,)](xs, y, N=n)
    got, want = y.cpu()[: x.numel()], x.to(torch.bfloat16)
    nan = want.isnan()
    assert torch.equal(got.isnan(), nan)
    assert torch.equal(got[~nan].view(torch.int16), want[~nan].view(torch.int16))
