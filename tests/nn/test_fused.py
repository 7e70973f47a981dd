"""The one-pass CPU kernels (nn.fused) and the accelerated modules that take them
(`qkv.nn.accelerate`), against float64 oracles written independently here, and against the
PyTorch paths they replace."""

import pytest
import torch
import torch.nn.functional as F

from qkv.nn import MLP, MultiHeadAttention, RMSNorm, RotaryEmbedding, accelerate, fused

from .test_rope import complex_rope

F32_TOL = 2e-6  # float32 rounding, relative to the largest magnitude (kernels vs float64)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def fused_rope(rope: RotaryEmbedding, qkv: torch.Tensor, start: int, H: int, K: int):
    cos, sin = rope.pair_tables(start + qkv.shape[1])
    return fused.rope_qkv(qkv, cos, sin, start, H, K, rope.interleaved)


@pytest.mark.parametrize("path", ["pytorch", "fused"])
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("B,S,H,K,start", [(1, 37, 9, 3, 0), (2, 5, 4, 4, 11), (1, 1, 2, 1, 300)])
def test_rotate_qkv_matches_complex_formula(path, interleaved, B, S, H, K, start):
    D = 16
    qkv = torch.randn(B, S, H + 2 * K, D, generator=gen(S))
    rope = RotaryEmbedding(D, base=500.0, interleaved=interleaved)
    with torch.no_grad():
        rotate = rope.rotate_qkv if path == "pytorch" else lambda *a: fused_rope(rope, *a)
        q, k, v = rotate(qkv, start, H, K)
    assert q.shape == (B, H, S, D) and k.shape == v.shape == (B, K, S, D)
    if path == "fused":
        assert q.is_contiguous() and k.is_contiguous() and v.is_contiguous()
    heads = qkv.transpose(1, 2).double()  # (b t i d)
    pos = torch.arange(start, start + S)
    want = complex_rope(heads[:, : H + K], pos, 500.0, interleaved)
    got = torch.cat((q, k), 1).double()
    assert (got - want).abs().max() <= F32_TOL * want.abs().max()
    assert torch.equal(v, qkv.transpose(1, 2)[:, H + K :])  # v is copied, not rotated


def test_rotate_qkv_keeps_autograd_path():
    """The fused kernel and rotate_qkv (the PyTorch code, gradients flow) agree."""
    qkv = torch.randn(1, 6, 5, 8, generator=gen(1))
    rope = RotaryEmbedding(8)
    fast = fused_rope(rope, qkv, 3, 3, 1)
    leaf = qkv.clone().requires_grad_()
    slow = rope.rotate_qkv(leaf, 3, 3, 1)
    for a, b in zip(fast, slow, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    sum(t.square().sum() for t in slow).backward()
    # a rotation keeps norms: d/dx Σ rot(x)² = 2x for q and k, and 2v for v
    torch.testing.assert_close(leaf.grad, 2 * qkv, rtol=0, atol=1e-5)


def test_rotate_qkv_rejects_bad_shapes():
    rope = RotaryEmbedding(8)
    with pytest.raises(ValueError, match=r"3\+2·1, d_head=8"):
        rope.rotate_qkv(torch.zeros(1, 2, 6, 8), 0, 3, 1)
    with pytest.raises(ValueError, match="d_head=8"):
        rope.rotate_qkv(torch.zeros(1, 2, 5, 6), 0, 3, 1)


def test_attention_module_fast_path_equals_autograd_path():
    """Accelerated MultiHeadAttention with RoPE: the no-grad forward (packed weights, fused
    split) agrees with the grad forward (PyTorch rope) and with the module in float64."""
    torch.manual_seed(0)
    attn = MultiHeadAttention(32, 4, n_kv_heads=2, rope=RotaryEmbedding(8), causal=True)
    ref = MultiHeadAttention(32, 4, n_kv_heads=2, rope=RotaryEmbedding(8), causal=True).double()
    ref.load_state_dict(attn.state_dict())
    accelerate(attn)
    x = torch.randn(2, 9, 32)
    with torch.no_grad():
        fast = attn(x)
    slow = attn(x)  # parameters require grad: the PyTorch rope
    assert slow.requires_grad
    torch.testing.assert_close(fast, slow.detach(), rtol=0, atol=1e-5)
    with torch.no_grad():  # float64: the PyTorch rope (tested against the complex formula)
        want = ref(x.double())
    assert (fast.double() - want).abs().max() <= 1e-5 * want.abs().max()


def rms_oracle(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    x, w = x.double(), w.double()
    return x / torch.sqrt(x.square().mean(-1, keepdim=True) + eps) * w


@pytest.mark.parametrize("shape", [(7, 576), (2, 3, 33), (1, 1, 1)])
def test_rms_norm_matches_float64(shape):
    x = torch.randn(*shape, generator=gen(2)) * 3
    w = torch.randn(shape[-1], generator=gen(3))
    got = fused.rms_norm(x, w, 1e-5)
    assert got.shape == x.shape and got.dtype == torch.float32
    want = rms_oracle(x, w, 1e-5)
    assert (got.double() - want).abs().max() <= F32_TOL * want.abs().max()


def test_rms_norm_special_values_as_pytorch():
    """NaN/inf rows give what F.rms_norm gives (NaN), a zero row with eps=0 too (0/0)."""
    x = torch.randn(4, 8, generator=gen(4))
    x[0, 1], x[1, 2], x[3] = float("nan"), float("inf"), 0.0
    w = torch.ones(8)
    for eps in (1e-6, 0.0):
        got, want = fused.rms_norm(x, w, eps), F.rms_norm(x, (8,), w, eps)
        assert torch.equal(got.isnan(), want.isnan())
        torch.testing.assert_close(got[2], want[2])
    with pytest.raises(ValueError, match=r"weight must have shape \(8,\)"):
        fused.rms_norm(x, torch.ones(7), 1e-6)


def test_rms_norm_module_paths_agree_and_train():
    norm = accelerate(RMSNorm(16, eps=1e-5))
    with torch.no_grad():
        norm.weight.copy_(torch.randn(16, generator=gen(5)))
    x = torch.randn(3, 4, 16, generator=gen(6))
    xt = x.transpose(0, 1)  # non-contiguous input
    with torch.no_grad():
        fast = norm(xt)
    slow = norm(xt)  # weight requires grad: PyTorch's fused op, with a graph
    torch.testing.assert_close(fast, slow.detach(), rtol=0, atol=1e-6)
    slow.sum().backward()
    assert norm.weight.grad is not None


@pytest.mark.parametrize("bias", [False, True])
def test_packed_gated_mlp_equals_float64(bias):
    torch.manual_seed(7)
    mlp = MLP(24, 40, act="silu", gated=True, bias=bias)
    x = torch.randn(2, 5, 24)
    sd = {k: t.double() for k, t in mlp.state_dict().items()}

    def oracle(x):
        def lin(name, h):
            return F.linear(h, sd[f"{name}.weight"], sd.get(f"{name}.bias"))

        return lin("down", F.silu(lin("gate", x.double())) * lin("up", x.double()))

    before = mlp.gate.weight.clone()
    accelerate(mlp)
    assert torch.equal(mlp.gate.weight, before) and mlp.gate.weight.requires_grad
    w, b = mlp.fused_gate_up()
    assert w.shape == (80, 24) and (b is None) == (not bias)
    with torch.no_grad():
        got = mlp(x)
    want = oracle(x)
    assert (got.double() - want).abs().max() <= 1e-5 * want.abs().max()
    # an in-place edit shows through the fused view; a replaced weight retires it
    with torch.no_grad():
        mlp.up.weight.mul_(2)
    sd["up.weight"] = sd["up.weight"] * 2
    with torch.no_grad():
        got = mlp(x)
    want = oracle(x)
    assert (got.double() - want).abs().max() <= 1e-5 * want.abs().max()
    mlp.gate.weight.data = mlp.gate.weight.detach().clone()
    assert mlp.fused_gate_up() is None
    with torch.no_grad():
        assert (mlp(x).double() - want).abs().max() <= 1e-5 * want.abs().max()


def test_packed_mlp_trains_like_unpacked():
    torch.manual_seed(8)
    a = MLP(12, 20, act="silu", gated=True)
    b = MLP(12, 20, act="silu", gated=True)
    b.load_state_dict(a.state_dict())
    accelerate(b)
    x = torch.randn(4, 12)
    a(x).square().sum().backward()
    b(x).square().sum().backward()
    for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, msg=name)


def test_plain_mlp_pack_is_a_no_op():
    mlp = accelerate(MLP(8, 16, act="gelu"))
    assert mlp.pack_() is mlp and mlp.fused_gate_up() is None


def test_eligible():
    x = torch.zeros(2)
    assert fused.eligible(x)
    assert not fused.eligible(x.double())
    leaf = torch.zeros(2, requires_grad=True)
    assert not fused.eligible(x, leaf)
    with torch.no_grad():
        assert fused.eligible(x, leaf)


def test_large_dense_linear_fills_populated_pages(monkeypatch):
    """A ≥ 64 MiB float32 output (SmolLM2's prefill logits) is written into pre-mapped pages:
    the same values as F.linear, bit for bit; with autograd it is F.linear itself."""
    from qkv.nn import quant

    calls = []
    real = fused.empty_populated
    monkeypatch.setattr(fused, "empty_populated", lambda *s: calls.append(s) or real(*s))
    x = torch.randn(1, 256, 32, generator=gen(9))
    w = torch.randn(65536, 32, generator=gen(10))  # (1, 256, 65536) float32 = 64 MiB
    with torch.no_grad():
        got = quant.linear(x, w)
    assert calls == [(1, 256, 65536)]
    assert torch.equal(got, F.linear(x, w))
    leaf = w.clone().requires_grad_()
    assert quant.linear(x, leaf).requires_grad and len(calls) == 1
    with torch.no_grad():
        quant.linear(x[:, :255], w)  # just under the threshold: plain F.linear
    assert len(calls) == 1
    t = fused.empty_populated(3, 5)
    assert t.shape == (3, 5) and t.dtype == torch.float32


def test_torch_compile_traces_the_pytorch_code():
    """Under torch.compile (fullgraph) the kernels step aside: the traced graph holds the
    PyTorch ops, and its result equals eager's fused path."""
    torch.manual_seed(11)
    norm, mlp = accelerate(RMSNorm(16)), accelerate(MLP(16, 24, act="silu", gated=True, bias=False))
    attn = accelerate(MultiHeadAttention(16, 4, 2, d_head=4, rope=RotaryEmbedding(4)))
    x = torch.randn(2, 5, 16)

    def step(x):
        return mlp(norm(x)), attn(x)

    with torch.no_grad():
        compiled = torch.compile(step, backend="eager", fullgraph=True)
        for a, b in zip(compiled(x), step(x), strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_fused_gate_up_follows_the_layout():
    """fused_gate_up's answer is reused while the weights keep their layout, and recomputed
    when it changes (packed, replaced, moved back to separate storages)."""
    mlp = accelerate(MLP(8, 12, act="silu", gated=True, bias=False))  # packs
    first = mlp.fused_gate_up()
    assert first is not None and mlp.fused_gate_up()[0] is first[0]  # reused
    torch.testing.assert_close(first[0], torch.cat((mlp.gate.weight, mlp.up.weight)))
    mlp.up.weight.data = mlp.up.weight.detach().clone()  # no longer the second half
    assert mlp.fused_gate_up() is None
    mlp.pack_()  # laid out afresh: one matrix again
    torch.testing.assert_close(mlp.fused_gate_up()[0], torch.cat((mlp.gate.weight, mlp.up.weight)))
