"""RMSNorm, MLP and the residual blocks against their written-out formulas."""

import pytest
import torch
import torch.nn.functional as F

from qkv.nn import MLP, MultiHeadAttention, PostNormBlock, PreNormBlock, RMSNorm


def test_rmsnorm_formula():
    n = RMSNorm(8, eps=1e-5)
    torch.nn.init.normal_(n.weight)
    x = torch.randn(2, 3, 8)
    want = n.weight * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5)
    torch.testing.assert_close(n(x), want)
    xh = x.bfloat16()
    assert n.to(torch.bfloat16)(xh).dtype == torch.bfloat16


def test_mlp_plain_and_gated():
    x = torch.randn(2, 3, 8)
    m = MLP(8, 16, act="gelu")
    torch.testing.assert_close(m(x), m.down(F.gelu(m.up(x))))
    g = MLP(8, 16, act="silu", gated=True, bias=False)
    torch.testing.assert_close(g(x), g.down(F.silu(g.gate(x)) * g.up(x)))
    c = MLP(8, 16, act=torch.tanh)
    torch.testing.assert_close(c(x), c.down(torch.tanh(c.up(x))))
    with pytest.raises(ValueError, match="unknown activation"):
        MLP(8, 16, act="swish2")


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("act", ["gelu", "gelu_tanh", "silu", "relu", "custom"])
def test_mlp_inference_path_equals_float64(act, gated):
    """Without autograd the activation runs in place on the fresh projection: same values as
    the float64 formula, the input untouched; a custom callable is called as given."""
    torch.manual_seed(1)
    fn = {"gelu": F.gelu, "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"), "silu": F.silu,
          "relu": F.relu, "custom": torch.tanh}[act]  # fmt: skip
    m = MLP(8, 16, act=torch.tanh if act == "custom" else act, gated=gated)
    x = torch.randn(2, 3, 8) * 3
    x0 = x.clone()
    d = {k: t.double() for k, t in m.state_dict().items()}
    h = F.linear(x.double(), d["up.weight"], d["up.bias"])
    if gated:
        h = fn(F.linear(x.double(), d["gate.weight"], d["gate.bias"])) * h
    else:
        h = fn(h)
    want = F.linear(h, d["down.weight"], d["down.bias"])
    with torch.no_grad():
        got = m(x)
    assert (got.double() - want).abs().max() <= 1e-5 * want.abs().max()
    assert torch.equal(x, x0)
    torch.testing.assert_close(m(x).detach(), got)  # the autograd path agrees


@pytest.mark.parametrize("Block", [PreNormBlock, PostNormBlock])
@pytest.mark.parametrize("mlp", ["mlp", "identity"])
def test_blocks_formula_with_and_without_grad(Block, mlp):
    torch.manual_seed(0)
    attn = MultiHeadAttention(8, 2)
    f = MLP(8, 16) if mlp == "mlp" else torch.nn.Identity()
    n1, n2 = torch.nn.LayerNorm(8), torch.nn.LayerNorm(8)
    blk = Block(attn, f, n1, n2)
    x = torch.randn(2, 5, 8)
    if Block is PreNormBlock:
        h = x + attn(n1(x))
        want = h + f(n2(h))
    else:
        h = n1(x + attn(x))
        want = n2(h + f(h))
    x0 = x.clone()
    torch.testing.assert_close(blk(x), want)  # autograd path
    with torch.no_grad():
        torch.testing.assert_close(blk(x), want.detach())  # in-place residual path
    torch.testing.assert_close(x, x0)  # the input is never modified
