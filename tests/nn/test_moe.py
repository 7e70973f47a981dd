"""SparseMoE and `route` against a float64 mixture written out token by token, the routing
rule's ties, its accelerated twin, autograd, and bad arguments."""

import pytest
import torch

from qkv.nn import MoEConfig, SparseMoE, accelerate, route


def naive_moe(moe: SparseMoE, x: torch.Tensor) -> torch.Tensor:
    """The mixture in float64, one token at a time, from the module's weights alone."""
    W = {k: v.double() for k, v in moe.state_dict().items()}
    E, k = len(moe.experts), moe.top_k

    def expert(prefix, h):  # SwiGLU: down(silu(gate h) · up h)
        g, u = W[prefix + "gate.weight"] @ h, W[prefix + "up.weight"] @ h
        return W[prefix + "down.weight"] @ (g * torch.sigmoid(g) * u)

    h = x.double().reshape(-1, x.shape[-1])
    y = torch.zeros_like(h)
    for t in range(h.shape[0]):
        logits = W["router.weight"] @ h[t]  # (e,)
        p = torch.exp(logits - logits.max())
        p = p / p.sum()
        order = sorted(range(E), key=lambda e: -float(p[e]))[:k]
        w = torch.stack([p[e] for e in order])
        if moe.normalise:
            w = w / w.sum()
        y[t] = sum(w[j] * expert(f"experts.{e}.", h[t]) for j, e in enumerate(order))
        if moe.shared is not None:
            gate = torch.sigmoid(W["shared_gate.weight"] @ h[t])
            y[t] = y[t] + gate * expert("shared.", h[t])
    return y.view(x.shape)


def _moe(seed=0, **kw) -> SparseMoE:
    torch.manual_seed(seed)
    moe = SparseMoE(12, 7, n_experts=5, top_k=2, **kw)
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0, 0.5)
    return moe


@pytest.mark.parametrize("normalise", [True, False])
@pytest.mark.parametrize("d_shared", [0, 9])
def test_moe_equals_the_token_by_token_mixture(normalise, d_shared):
    moe = _moe(normalise=normalise, d_shared=d_shared)
    x = torch.randn(3, 11, 12, generator=torch.Generator().manual_seed(1))
    want = naive_moe(moe, x)
    with torch.no_grad():
        got32 = moe(x)
        got64 = moe.double()(x.double())
    assert got32.shape == x.shape and got32.dtype == torch.float32
    assert (got64 - want).abs().max() <= 1e-12 * want.abs().max()
    assert (got32.double() - want).abs().max() <= 1e-5 * want.abs().max()


def test_the_check_can_fail():
    """The oracle sees a changed rule: top-1 instead of top-2, weights not renormalised."""
    moe = _moe()
    x = torch.randn(2, 9, 12, generator=torch.Generator().manual_seed(2))
    want = naive_moe(moe, x)
    for edit in ({"top_k": 1}, {"normalise": False}):
        broken = _moe()
        broken.__dict__.update(edit)
        with torch.no_grad():
            got = broken.double()(x.double())
        assert (got - want).abs().max() > 1e-2 * want.abs().max(), edit


def test_route_takes_the_top_k_of_the_softmax_as_torch_topk():
    logits = torch.tensor([[1.0, 3.0, 3.0, -2.0], [0.0, 0.0, 0.0, 0.0], [5.0, -1.0, 4.0, 4.5]])
    w, idx = route(logits, 2)
    p = torch.softmax(logits, -1)
    want_w, want_idx = torch.topk(p, 2, -1)  # ties resolved as torch.topk resolves them
    assert torch.equal(idx, want_idx)
    torch.testing.assert_close(w, want_w / want_w.sum(-1, keepdim=True))
    torch.testing.assert_close(w.sum(-1), torch.ones(3))
    w_raw, _ = route(logits, 2, normalise=False)
    torch.testing.assert_close(w_raw, want_w)
    assert route(logits.half(), 2)[0].dtype == torch.float32  # half logits: float32 weights
    assert route(logits.double(), 2)[0].dtype == torch.float64


def test_accelerated_experts_give_the_same_output():
    moe = _moe(d_shared=9)
    x = torch.randn(2, 6, 12, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = moe(x)
        fast = accelerate(_moe(d_shared=9))
        assert {type(e).__name__ for e in fast.experts} == {"FastMLP"}
        got = fast(x)
        one = fast(x[:, :1])  # a decode step: one token
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(one, want[:, :1], rtol=1e-6, atol=1e-6)


def test_gradients_reach_the_router_and_the_chosen_experts():
    moe = _moe()
    x = torch.randn(1, 4, 12, generator=torch.Generator().manual_seed(4), requires_grad=True)
    moe(x).square().sum().backward()
    assert x.grad is not None and moe.router.weight.grad.abs().sum() > 0
    _, idx = route(moe.router(x.detach().reshape(-1, 12)), 2)
    for e, expert in enumerate(moe.experts):
        has_grad = expert.down.weight.grad is not None and bool(expert.down.weight.grad.any())
        assert has_grad == bool((idx == e).any()), e  # only the experts some token used


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"n_experts": 0, "top_k": 1, "d_expert": 4}, r"n_experts must be an int ≥ 1, got 0"),
        ({"n_experts": 4, "top_k": 5, "d_expert": 4}, r"top_k=5 exceeds n_experts=4"),
        ({"n_experts": 4, "top_k": 2, "d_expert": 4, "d_shared": -1}, r"d_shared must be"),
        ({"n_experts": 4, "top_k": 2, "d_expert": 4, "normalise": 1}, r"normalise must be a bool"),
    ],
)
def test_bad_moe_config(kw, match):
    with pytest.raises(ValueError, match=match):
        MoEConfig(**kw)
    with pytest.raises(ValueError, match=r"route takes logits \(n, e\) and 1 ≤ top_k ≤ e"):
        route(torch.zeros(3, 4), 5)
