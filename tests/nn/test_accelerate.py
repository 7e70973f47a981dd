"""qkv.nn.accelerate: the twins hold the same parameters and compute what the formula modules
compute (float64 oracle: the un-accelerated modules in float64), train the same, record the
same captures, and multiply by checkpoint blocks only where given."""

import pytest
import torch
from torch import nn

from qkv.nn import (
    MLP,
    Embedding,
    MultiHeadAttention,
    PreNormBlock,
    RMSNorm,
    RotaryEmbedding,
    accelerate,
    capture,
)
from qkv.nn.accelerate import (
    FastEmbedding,
    FastLinear,
    FastMLP,
    FastMultiHeadAttention,
    FastRMSNorm,
    mirrors,
)
from qkv.nn.quant import BlockWeight

F32 = 1e-5  # relative to the largest magnitude: float32 rounding in another order of sums
gguf = pytest.importorskip("gguf", reason="the gguf library quantises the test's weights")


class Tiny(nn.Module):
    """ids → embed → 2 pre-norm blocks (RoPE, GQA, gated MLP, biases) → norm → tied logits."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = Embedding(50, 64)
        rope = RotaryEmbedding(16)
        self.blocks = nn.ModuleList(
            PreNormBlock(
                MultiHeadAttention(64, 4, 2, rope=rope, causal=True),
                MLP(64, 96, act="silu", gated=True),
                RMSNorm(64),
                RMSNorm(64),
            )
            for _ in range(2)
        )
        self.norm = RMSNorm(64)
        self.head = nn.Linear(64, 7)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        for b in self.blocks:
            x = b(x)
        h = self.norm(x)
        return torch.cat((self.embed.attend(h), self.head(h)), -1)  # (b i 50+7)


def pair(seed: int = 0) -> tuple[Tiny, Tiny]:
    torch.manual_seed(seed)
    a = Tiny()
    for p in a.parameters():  # biases and norm gains away from their zero/one init
        nn.init.normal_(p, std=0.3)
    ref = Tiny().double()
    ref.load_state_dict(a.state_dict())
    return a, ref


def close(got: torch.Tensor, want: torch.Tensor) -> bool:
    got, want = got.detach().double(), want.detach()
    return float((got - want).abs().max()) <= F32 * float(want.abs().max())


def test_every_module_gets_its_twin_and_keeps_its_parameters():
    a, _ = pair()
    before = {n: (id(p), p.detach().clone()) for n, p in a.named_parameters()}
    keys = list(a.state_dict())
    ids_of_modules = [id(m) for m in a.modules()]
    assert accelerate(a) is a
    kinds = {type(m) for m in a.modules()}
    assert {FastMultiHeadAttention, FastMLP, FastRMSNorm, FastLinear, FastEmbedding} <= kinds
    assert not kinds & {MultiHeadAttention, MLP, RMSNorm, nn.Linear, Embedding}
    assert [id(m) for m in a.modules()] == ids_of_modules  # swapped in place
    assert list(a.state_dict()) == keys
    for n, p in a.named_parameters():
        assert id(p) == before[n][0] and torch.equal(p, before[n][1]), n
    assert accelerate(a) is a  # again: a no-op on the layout


def test_accelerated_equals_float64_formula_and_trains_the_same():
    a, ref = pair(1)
    plain = Tiny()
    plain.load_state_dict(a.state_dict())
    accelerate(a)
    ids = torch.randint(0, 50, (2, 11), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = ref(ids)
        assert close(a(ids), want)
        with torch.inference_mode():
            assert close(a(ids), want)
    a(ids).square().mean().backward()  # autograd: the formula path
    plain(ids).square().mean().backward()
    for (n, p), q in zip(a.named_parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=n)


def test_capture_records_the_same():
    a, ref = pair(3)
    accelerate(a)
    ids = torch.randint(0, 50, (1, 9), generator=torch.Generator().manual_seed(4))
    with torch.no_grad(), capture(a) as got, capture(ref) as want:
        a(ids)
        ref(ids)
    assert [r.layer for r in got.layers] == [r.layer for r in want.layers] == [0, 1]
    for g, w in zip(got.layers, want.layers, strict=True):
        for name in ("q", "k", "v", "z", "lse"):
            assert close(getattr(g, name), getattr(w, name)), name


def test_subclasses_and_other_devices_dtypes_keep_the_formula():
    class Mine(MLP):
        pass

    m = accelerate(nn.Sequential(Mine(8, 16)))
    assert type(m[0]) is Mine
    a, ref = pair(5)
    accelerate(a).double()  # float64: the twins fall back to the formula
    ids = torch.randint(0, 50, (1, 6), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        torch.testing.assert_close(a(ids), ref(ids), rtol=1e-12, atol=1e-12)


def quantised(kind: str, n: int, k: int, seed: int) -> tuple[BlockWeight, torch.Tensor]:
    """Random (n, k) weights quantised by the gguf library → (blocks, their exact values)."""
    import numpy as np

    w = np.random.default_rng(seed).standard_normal((n, k)).astype(np.float32)
    qtype = gguf.GGMLQuantizationType[kind.upper()]
    raw = gguf.quants.quantize(w, qtype)
    return BlockWeight.from_ggml(kind, raw, (n, k)), torch.from_numpy(
        gguf.quants.dequantize(raw, qtype).astype(np.float32)
    )


def test_blocks_back_the_one_token_step(monkeypatch):
    """Given blocks for W_Q, W_K, W_V, W_O, gate, up, down and the tied embedding, a one-row
    step multiplies by them (each fused matrix once), and equals the float64 formula."""
    a, _ = pair(7)
    blocks = {}
    for i, blk in enumerate(a.blocks):
        attn, p = blk.attn, f"blocks.{i}."
        for name, (n, k) in {"W_Q": (64, 64), "W_K": (32, 64), "W_V": (32, 64)}.items():
            b, w = quantised("q8_0", n, k, seed=len(blocks))
            blocks[p + "attn." + name] = b
            h = getattr(attn, name).shape[0]
            getattr(attn, name).data = w.view(h, 16, 64).transpose(1, 2).contiguous()
        b, w = quantised("q4_1", 64, 64, seed=len(blocks))
        blocks[p + "attn.W_O"] = b
        attn.W_O.data = w.t().reshape(4, 16, 64).contiguous()
        for name, (n, k) in {"gate": (96, 64), "up": (96, 64), "down": (64, 96)}.items():
            b, w = quantised("q4_1", n, k, seed=len(blocks))
            blocks[f"{p}mlp.{name}.weight"] = b
            getattr(blk.mlp, name).weight.data = w
    b, w = quantised("q8_0", 50, 64, seed=99)
    blocks["embed.weight"], a.embed.weight.data = b, w
    ref = Tiny().double()
    ref.load_state_dict(a.state_dict())
    accelerate(a, blocks)
    found = mirrors(a)
    for name, (mir, weight) in found.items():
        assert torch.equal(mir.blocks.dequantize(), weight), name
    calls = []
    real = BlockWeight.matmul
    monkeypatch.setattr(BlockWeight, "matmul", lambda b, x: calls.append(b.shape) or real(b, x))
    ids = torch.tensor([[3]])
    with torch.no_grad():
        got = a(ids)
    assert len(calls) == 2 * 4 + 1  # per layer Q|K|V, W_O, gate|up, down; the embedding
    assert close(got, ref(ids))


def test_bad_blocks_are_named():
    a, _ = pair()
    b, _ = quantised("q8_0", 64, 64, seed=0)
    with pytest.raises(ValueError, match=r"\['blocks.0.attn.W_X'\] name no parameter of Tiny"):
        accelerate(a, {"blocks.0.attn.W_X": b})
    with pytest.raises(ValueError, match=r"'blocks.0.attn.W_K' have shape \(64, 64\).*\(32, 64\)"):
        accelerate(a, {"blocks.0.attn.W_K": b})
    with pytest.raises(TypeError, match=r"torch\.nn\.Module, got str"):
        accelerate("model")


def _attention_oracle(m: MultiHeadAttention, x: torch.Tensor) -> torch.Tensor:
    """float64 attention with ALiBi and QK-norm over whole projections, written out plainly:
    q, k normalised over all their heads' features, half-split RoPE, scores/√d − slope·(i − j)
    over keys j ≤ i, softmax, W_O."""
    p = {n: t.detach().double() for n, t in m.named_parameters()}
    x = x.double()
    B, S, _ = x.shape
    H, K, D = m.n_heads, m.n_kv_heads, m.d_head

    def rms(t, w):  # t (b i f)
        return t / torch.sqrt(t.pow(2).mean(-1, keepdim=True) + 1e-6) * w

    q = torch.einsum("bim,hmd->bihd", x, p["W_Q"]) + p["b_Q"]
    k = torch.einsum("bim,kmd->bikd", x, p["W_K"]) + p["b_K"]
    v = torch.einsum("bim,kmd->bkid", x, p["W_V"]) + p["b_V"][:, None]
    q = rms(q.flatten(2), p["q_norm.weight"]).view(B, S, H, D).transpose(1, 2)  # (b h i d)
    k = rms(k.flatten(2), p["k_norm.weight"]).view(B, S, K, D).transpose(1, 2)
    ang = torch.arange(S, dtype=torch.float64)[:, None] * 1e4 ** (
        -torch.arange(0, D, 2, dtype=torch.float64) / D
    )  # (i d/2)
    cos, sin = ang.cos(), ang.sin()

    def rot(t):
        a, b = t[..., : D // 2], t[..., D // 2 :]
        return torch.cat((a * cos - b * sin, b * cos + a * sin), -1)

    q, k = rot(q), rot(k).repeat_interleave(H // K, 1)
    v = v.repeat_interleave(H // K, 1)
    slopes = torch.tensor([2.0 ** (-8 * (h + 1) / H) for h in range(H)], dtype=torch.float64)
    i = torch.arange(S)
    dist = (i[:, None] - i[None, :]).double()  # (i j)
    s = q @ k.transpose(-1, -2) / D**0.5 - slopes[:, None, None] * dist
    s = s.masked_fill(dist < 0, float("-inf"))
    z = torch.softmax(s, -1) @ v  # (b h i d)
    return torch.einsum("bhid,hdm->bim", z, p["W_O"]) + p["b_O"]


def test_twin_honours_alibi_and_whole_projection_qk_norm():
    """`score_mod` (ALiBi) and `qk_norm_scope="all"` (OLMo 2) reach the twin's attention: the
    accelerated module, the formula module and a plain float64 oracle agree, and per-head
    QK-norm in place of the whole-projection one does not."""
    from qkv.attention.mods import alibi

    torch.manual_seed(11)
    H, K, D, M = 4, 2, 16, 64

    def make(scope: str) -> MultiHeadAttention:
        n = (H * D, K * D) if scope == "all" else (D, D)
        return MultiHeadAttention(M, H, K, D, causal=True, rope=RotaryEmbedding(D),
                                  score_mod=alibi(H), q_norm=RMSNorm(n[0]), k_norm=RMSNorm(n[1]),
                                  qk_norm_scope=scope)  # fmt: skip

    a = make("all")
    for t in a.parameters():
        nn.init.normal_(t, std=0.3)
    formula = make("all").double()
    formula.load_state_dict(a.state_dict())
    accelerate(a)
    assert type(a) is FastMultiHeadAttention
    x = torch.randn(2, 13, M)
    want = _attention_oracle(formula, x)
    with torch.no_grad():
        assert close(a(x), want)
        assert close(formula(x.double()), want)
        # gains 1: the two scopes differ by what the RMS is taken over, nothing else
        whole, per_head = make("all").double(), make("head").double()
        state = {k: v for k, v in formula.state_dict().items() if "norm" not in k}
        whole.load_state_dict(state, strict=False), per_head.load_state_dict(state, strict=False)
        assert not close(per_head(x.double()), whole(x.double()))
