"""Second derivatives (create_graph=True): gradient penalties, Hessian-vector products, MAML.

The fused backends' backwards compute first derivatives without an autograd graph; when one is
asked for they recompute through the reference. Checked against the float64 `naive` oracle of
conftest, differentiated twice by autograd (it shares no code with qkv.attention).
"""

from __future__ import annotations

import pytest
import torch

import qkv

from .conftest import err, make_qkv, naive

CASES = {
    "plain": {},
    "causal": {"causal": True},
    "window": {"window": (3, 1)},
    "softcap+alibi": {"softcap": 2.0, "score_mod": qkv.alibi(4)},
    "mask_mod": {"mask_mod": qkv.sliding_window_mask(4)},
}


def _hvp(run, xs, us, with_lse):
    """u·∇(‖∇L‖²)-style check: g = ∇L (with graph), then ∇(Σ g·u) for L = Σ out² (+ Σ lse)."""
    out, lse = run(*xs)
    loss = out.pow(2).sum() + (lse.masked_fill(lse.isinf(), 0).sum() if with_lse else 0)
    gs = torch.autograd.grad(loss, xs, create_graph=True)
    inner = sum((g * u).sum() for g, u in zip(gs, us, strict=True))
    return gs, torch.autograd.grad(inner, xs, materialize_grads=True)


@pytest.mark.parametrize("with_lse", [False, True])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("backend", ["tiled", "fused", "reference", "auto"])
def test_second_derivatives_match_float64_oracle(backend, case, with_lse):
    kw = CASES[case]
    q, k, v = make_qkv(2, 4, 2, 7, 9, 8, Dv=5, dtype=torch.float64, requires_grad=True)
    g = torch.Generator().manual_seed(1)
    us = [torch.randn(t.shape, generator=g, dtype=torch.float64) for t in (q, k, v)]

    def ours(q, k, v):
        return qkv.attention(q, k, v, **kw, return_lse=True, backend=backend)

    def oracle(q, k, v):
        r = naive(q, k, v, **kw)
        return r.out, r.lse

    g1, h1 = _hvp(ours, [q, k, v], us, with_lse)
    ref = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    g0, h0 = _hvp(oracle, ref, us, with_lse)
    for name, a, b in zip("qkv", g1, g0, strict=True):
        assert err(a, b) < 1e-10, f"d{name}: {err(a, b):.3g}"
    for name, a, b in zip("qkv", h1, h0, strict=True):
        assert b.abs().max() > 0 and err(a, b) < 1e-10, f"Hv wrt {name}: {err(a, b):.3g}"


@pytest.mark.parametrize("backend", ["tiled", "fused"])
def test_gradgradcheck(backend):
    q, k, v = make_qkv(1, 2, 1, 3, 5, 4, Dv=3, dtype=torch.float64, requires_grad=True)
    fn = lambda q, k, v: qkv.attention(q, k, v, causal=True, softcap=3.0, backend=backend)  # noqa: E731
    assert torch.autograd.gradgradcheck(fn, (q, k, v))


def test_first_derivatives_keep_the_graph_free_backward():
    q, k, v = make_qkv(1, 2, 1, 3, 5, 4, dtype=torch.float64, requires_grad=True)
    gs = torch.autograd.grad(qkv.attention(q, k, v, backend="tiled").sum(), (q, k, v))
    assert all(g.grad_fn is None and not g.requires_grad for g in gs)


def test_second_derivatives_through_tiled_dropout_are_refused_by_name():
    q, k, v = make_qkv(1, 2, 1, 3, 5, 4, dtype=torch.float64, requires_grad=True)
    out = qkv.attention(q, k, v, dropout_p=0.1, generator=torch.Generator(), backend="tiled")
    with pytest.raises(ValueError, match=r"dropout_p=0\.1.*backend='reference'"):
        torch.autograd.grad(out.sum(), q, create_graph=True)


def test_torch_func_transforms_run_auto_on_the_reference_and_refuse_custom_backwards():
    q, k, v = make_qkv(1, 2, 1, 3, 5, 4, dtype=torch.float64)
    kw = {"window": (1, 0), "softcap": 2.0}  # auto would pick tiled/fused outside torch.func

    def loss(q):
        return qkv.attention(q, k, v, **kw).pow(2).sum()

    qq = q.clone().requires_grad_()
    naive(qq, k, v, **kw).out.pow(2).sum().backward()
    assert err(torch.func.grad(loss)(q), qq.grad) < 1e-12
    for backend in ("tiled", "fused"):
        with pytest.raises(ValueError, match=f"backend='{backend}'.*torch.func"):
            torch.func.grad(lambda q: qkv.attention(q, k, v, backend=backend).sum())(q)  # noqa: B023


VMAP_CASES = {
    "plain": {},
    "causal, LSE": {"causal": True, "return_lse": True},
    "mask_mod, sinks": {"mask_mod": qkv.causal_mask, "sinks": torch.tensor([0.5, -1.0, 2.0, 0.0])},
    "NaN in a masked key": {"causal": True, "nan": True},
}


@pytest.mark.parametrize("case", list(VMAP_CASES))
@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_vmap_runs_auto_and_the_reference(case, backend):
    """torch.func.vmap over a leading axis (the README: under torch.func `auto` runs the
    reference). It failed: the reference's NaN/inf checks read values on the host. Oracle:
    the float64 naive attention of each sample."""
    kw = dict(VMAP_CASES[case])
    nan, lse = kw.pop("nan", False), kw.get("return_lse", False)
    q, k, v = (t.double() for t in make_qkv(3 * 1, 4, 2, 6, 7, 8))
    Q, K, V = q.view(3, 1, 4, 6, 8), k.view(3, 1, 2, 7, 8), v.view(3, 1, 2, 7, 8)
    if nan:  # sample 0's last key, which only the last query row sees (causal, Sq < Sk)
        K, V = K.clone(), V.clone()
        K[0, 0, :, 6, 1], V[0, 0, :, 6, 2] = float("nan"), float("inf")
    got = torch.func.vmap(lambda q, k, v: qkv.attention(q, k, v, backend=backend, **kw))(Q, K, V)
    naive_kw = {x: y for x, y in kw.items() if x != "return_lse"}
    for i in range(3):
        want = naive(
            Q[i],
            K[i].nan_to_num(0, 0, 0) if nan else K[i],
            V[i].nan_to_num(0, 0, 0) if nan else V[i],
            **naive_kw,
        )
        out = got[0][i] if lse else got[i]
        if nan and i == 0:  # the row that keeps the bad key is NaN; the others are exact
            assert out[0, :, -1].isnan().all()
            out, want_out = out[0, :, :-1], want.out[0, :, :-1]
        else:
            want_out = want.out
        assert err(out, want_out) < 1e-12, (case, i)
        if lse:
            assert err(got[1][i], want.lse) < 1e-12


# SDPA's fused kernels (CPU flash, CUDA flash/efficient) have no double backward: "auto" and
# "sdpa" serve out-only calls (no LSE) through them, so those calls are checked here.
SDPA_CASES = {
    "plain": lambda: {},
    "causal": lambda: {"causal": True},
    "bool mask": lambda: {
        "mask": torch.rand(9, 9, generator=torch.Generator().manual_seed(2)) > 0.3
    },
    "learned bias": lambda: {"mask": torch.randn(9, 9, dtype=torch.float64, requires_grad=True)},
}


@pytest.mark.parametrize("case", list(SDPA_CASES))
@pytest.mark.parametrize("backend", ["auto", "sdpa"])
def test_second_derivatives_through_sdpa_match_float64_oracle(backend, case):
    """Before: `create_graph=True` through the default backend on a plain, causal or masked call
    raised PyTorch's "derivative for aten::_scaled_dot_product_flash_attention_for_cpu_backward
    is not implemented". A learned bias is differentiated twice too."""
    kw = SDPA_CASES[case]()
    q, k, v = make_qkv(2, 4, 2, 9, 9, 8, dtype=torch.float64, requires_grad=True)
    bias = [kw["mask"]] if case == "learned bias" else []
    g = torch.Generator().manual_seed(1)
    xs = [q, k, v, *bias]
    us = [torch.randn(t.shape, generator=g, dtype=torch.float64) for t in xs]

    def ours(q, k, v, *b):
        out = qkv.attention(q, k, v, **({**kw, "mask": b[0]} if b else kw), backend=backend)
        return out, torch.zeros(())

    def oracle(q, k, v, *b):
        return naive(q, k, v, **({**kw, "mask": b[0]} if b else kw)).out, torch.zeros(())

    from qkv.attention import auto_backend

    assert auto_backend(q, k, v, **kw) == "sdpa"  # the path under test
    g1, h1 = _hvp(ours, xs, us, False)
    ref = [t.detach().clone().requires_grad_() for t in xs]
    g0, h0 = _hvp(oracle, ref, us, False)
    for name, a, b in zip(["q", "k", "v", "bias"], g1, g0, strict=False):
        assert err(a, b) < 1e-10, f"d{name}: {err(a, b):.3g}"
    for name, a, b in zip(["q", "k", "v", "bias"], h1, h0, strict=False):
        assert b.abs().max() > 0 and err(a, b) < 1e-10, f"Hv wrt {name}: {err(a, b):.3g}"


def test_sdpa_gradgradcheck_and_a_second_backward_of_the_same_graph():
    q, k, v = make_qkv(1, 2, 1, 3, 5, 4, Dv=3, dtype=torch.float64, requires_grad=True)
    fn = lambda q, k, v: qkv.attention(q, k, v, backend="sdpa")  # noqa: E731
    assert torch.autograd.gradgradcheck(fn, (q, k, v))
    out = fn(q, k, v)
    a = torch.autograd.grad(out.sum(), q, retain_graph=True)[0]
    assert torch.equal(a, torch.autograd.grad(out.sum(), q)[0])


def test_second_derivatives_through_sdpa_dropout_are_refused_by_name():
    q, k, v = make_qkv(1, 2, 1, 3, 5, 4, dtype=torch.float64, requires_grad=True)
    out = qkv.attention(q, k, v, dropout_p=0.1, backend="sdpa")
    with pytest.raises(ValueError, match=r"dropout_p=0\.1.*backend='reference'"):
        torch.autograd.grad(out.sum(), q, create_graph=True)


def test_torch_func_still_differentiates_an_explicit_sdpa():
    """The double-backward Function stays out of torch.func (it has no setup_context): grad of
    backend="sdpa" equals the float64 oracle's."""
    q, k, v = make_qkv(1, 2, 1, 3, 5, 4, dtype=torch.float64)
    got = torch.func.grad(lambda q: qkv.attention(q, k, v, backend="sdpa").pow(2).sum())(q)
    qq = q.clone().requires_grad_()
    naive(qq, k, v).out.pow(2).sum().backward()
    assert err(got, qq.grad) < 1e-12


def test_sdpa_keeps_nothing_alive_after_a_plain_backward(monkeypatch):
    """The double-backward Function's inner SDPA graph (its saved q, k, v, out, LSE) is freed
    with the node's saved tensors after a backward, not held until the caller drops the outer
    graph (a training loop keeps `loss` alive through the optimiser step and the next forward:
    every layer's attention activations would stay)."""
    import gc
    import weakref

    import torch.nn.functional as F

    from qkv.attention import sdpa as sdpa_mod

    inner, real = [], F.scaled_dot_product_attention

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        if out.requires_grad:
            inner.append(weakref.ref(out))
        return out

    monkeypatch.setattr(sdpa_mod.F, "scaled_dot_product_attention", spy)
    q, k, v = make_qkv(1, 2, 1, 6, 6, 4, requires_grad=True)
    loss = qkv.attention(q, k, v, causal=True, backend="sdpa").sum()
    assert len(inner) == 1 and inner[0]() is not None  # the inner graph exists
    loss.backward()
    gc.collect()
    assert inner[0]() is None, "the inner graph outlived the backward"
    assert loss.grad_fn is not None  # while the outer graph is still referenced


@pytest.mark.parametrize(
    ("kw", "fullgraph"),
    [({}, True), ({"backend": "sdpa", "causal": True}, True), ({"causal": True}, False),
     ({"window": (8, 0)}, False), ({"causal": True, "backend": "tiled"}, False),
     ({"causal": True, "backend": "reference"}, False)],
)  # fmt: skip
def test_torch_compile_traces_what_the_docstring_says(kw, fullgraph):
    """`attention`'s docstring: torch.compile traces every backend (graph breaks where a step
    reads values on the host); fullgraph=True for what SDPA serves without a check. Dynamo's
    tracing with the eager backend (no code generation: the claim is about the graph).
    Oracle: the float64 naive attention."""
    torch._dynamo.reset()
    q, k, v = make_qkv(1, 2, 2, 64, 64, 16)
    f = torch.compile(lambda q, k, v: qkv.attention(q, k, v, **kw), backend="eager",
                      fullgraph=fullgraph)  # fmt: skip
    want = naive(
        *(t.double() for t in (q, k, v)), **{x: y for x, y in kw.items() if x != "backend"}
    )
    assert err(f(q, k, v), want.out) < 1e-5
