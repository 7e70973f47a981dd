"""gpt-oss's sparse MLP in `qkv.nn.SparseMoE` against transformers' own `GptOssMLP`.

A tiny random GptOssMLP (m 20, 6 experts of width 9, top 3) in float64 and float32; its fused
tensors are split into SparseMoE's per-expert gate/up/down by `load_gptoss_` below, the
mapping a loader uses. Each peculiarity of the layer (router bias, expert biases, the clamp,
the +1 on up, alpha, the interleaved gate|up columns) switched off breaks parity far beyond
the tolerance. The routing order (top k of the logits, then their softmax) is invisible in
the outputs (the same weights up to rounding), so it is tested on `route` itself: bitwise
equal to transformers' router, and right on near ties the softmax cannot resolve.

Inputs of size 3 and weights of size ~1.5/√m put many gate and up pre-activations beyond the
clamp (±7, checked); `assert_routing_is_clear` checks that no token's k-th and (k+1)-th logits
lie within 1e-4 of each other, so rounding cannot choose another expert.
"""

import math

import pytest
import torch

from qkv.nn import GLUMLP, ClampedSwiGLU, MoEConfig, SparseMoE, accelerate, route

transformers = pytest.importorskip("transformers", reason="transformers is the parity oracle")
from transformers.models.gpt_oss.modeling_gpt_oss import (  # noqa: E402
    GptOssMLP,
    GptOssTopKRouter,
)

M, F, E, K = 20, 9, 6, 3
# max |ours − transformers| / max |transformers|, same dtype both sides
TOL = {torch.float64: 1e-12, torch.float32: 1e-5}
BROKEN = 1e-3  # a switched-off peculiarity is off by more than this (and by ≥ 100× TOL)
MARGIN = 1e-4  # least gap between a token's k-th and (k+1)-th router logits


def gptoss_config(**kw):
    cfg = transformers.GptOssConfig(
        hidden_size=M, intermediate_size=F, num_local_experts=E, num_experts_per_tok=K,
        num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=10, **kw,
    )  # fmt: skip
    cfg._experts_implementation = "eager"  # the reference loop
    return cfg


def reference(dtype, seed=0, **kw) -> GptOssMLP:
    """A random GptOssMLP: router logits spread over a few units, biases of size ~0.5."""
    g = torch.Generator().manual_seed(seed)
    ref = GptOssMLP(gptoss_config(**kw)).to(dtype).eval()
    ex, r = ref.experts, ref.router
    with torch.no_grad():
        for p, scale in ((r.weight, 1 / math.sqrt(M)), (r.bias, 1.0),
                         (ex.gate_up_proj, 1.5 / math.sqrt(M)), (ex.gate_up_proj_bias, 0.5),
                         (ex.down_proj, 1 / math.sqrt(F)), (ex.down_proj_bias, 0.5)):  # fmt: skip
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * scale)
    return ref


def inputs(dtype, seed=1, shape=(3, 17)) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (3 * torch.randn(*shape, M, generator=g, dtype=torch.float64)).to(dtype)


@torch.no_grad()
def load_gptoss_(moe: SparseMoE, ref: GptOssMLP, *, interleaved: bool = True) -> SparseMoE:
    """ref's fused tensors into moe's experts (what a loader does), x @ W → nn.Linear's W x:

    router.weight ← router.weight (e, m)          router.bias ← router.bias (e,)
    experts[e].gate.weight ← gate_up_proj[e][:, ::2].T (f, m)   .bias ← gate_up_proj_bias[e][::2]
    experts[e].up.weight   ← gate_up_proj[e][:, 1::2].T (f, m)  .bias ← gate_up_proj_bias[e][1::2]
    experts[e].down.weight ← down_proj[e].T (m, f)              .bias ← down_proj_bias[e] (m,)

    `interleaved=False` reads gate|up as two halves instead (the Mixtral/Qwen layout): wrong."""
    ex = ref.experts
    g_cols, u_cols = (slice(0, None, 2), slice(1, None, 2)) if interleaved else (
        slice(0, F), slice(F, 2 * F))  # fmt: skip
    moe.router.weight.copy_(ref.router.weight)
    if moe.router.bias is not None:
        moe.router.bias.copy_(ref.router.bias)
    for e, mlp in enumerate(moe.experts):
        mlp.gate.weight.copy_(ex.gate_up_proj[e][:, g_cols].T)
        mlp.up.weight.copy_(ex.gate_up_proj[e][:, u_cols].T)
        mlp.down.weight.copy_(ex.down_proj[e].T)
        if mlp.gate.bias is not None:
            mlp.gate.bias.copy_(ex.gate_up_proj_bias[e][g_cols])
            mlp.up.bias.copy_(ex.gate_up_proj_bias[e][u_cols])
            mlp.down.bias.copy_(ex.down_proj_bias[e])
    return moe


GPTOSS = dict(order="topk_softmax", router_bias=True, expert_bias=True, glu=ClampedSwiGLU())


def ours(ref: GptOssMLP, dtype, **changes) -> SparseMoE:
    kw = {**GPTOSS, **changes}
    interleaved = kw.pop("interleaved", True)
    moe = SparseMoE(M, F, E, K, dtype=dtype, **kw).eval()
    return load_gptoss_(moe, ref, interleaved=interleaved)


def rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want.double()).abs().max() / want.double().abs().max())


def assert_routing_is_clear(ref: GptOssMLP, x: torch.Tensor) -> None:
    """Every token's k-th best router logit (float64) beats its (k+1)-th by ≥ MARGIN."""
    w, b = ref.router.weight.detach().double(), ref.router.bias.detach().double()
    logits = x.double().reshape(-1, M) @ w.T + b  # (n e)
    top = logits.sort(-1, descending=True).values
    gap = float((top[:, K - 1] - top[:, K]).min())
    assert gap > MARGIN, f"a near tie in the routing (gap {gap:.2e}); pick another seed"


def assert_clamp_bites(ref: GptOssMLP, x: torch.Tensor) -> None:
    """The premise of the clamp's test: some gate > 7 and some |up| > 7."""
    ex = ref.experts
    pre = torch.einsum("nm,emf->enf", x.double().reshape(-1, M), ex.gate_up_proj.double())
    pre = pre + ex.gate_up_proj_bias.double()[:, None]  # (e n 2f)
    assert (pre[..., ::2] > 7).float().mean() > 0.02, "too few gates reach the clamp"
    assert (pre[..., 1::2].abs() > 7).float().mean() > 0.02, "too few ups reach the clamp"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("seed", [0, 1])
def test_sparse_moe_equals_transformers_gptoss_mlp(dtype, seed):
    ref = reference(dtype, seed)
    x = inputs(dtype, seed + 10)
    assert_routing_is_clear(ref, x)
    assert_clamp_bites(ref, x)
    with torch.no_grad():
        want = ref(x)[0]
        got = ours(ref, dtype)(x)
    assert got.shape == x.shape and got.dtype == dtype
    assert rel(got, want) <= TOL[dtype], rel(got, want)


def test_from_config_and_accelerate_keep_parity():
    """The MoEConfig route (what a decoder builds) and `accelerate`'s twins (its Linears; the
    GLUMLP experts stay as they are) give the same float32 output."""
    ref = reference(torch.float32)
    x = inputs(torch.float32)
    assert_routing_is_clear(ref, x)
    spec = MoEConfig(E, K, F, **GPTOSS)
    moe = load_gptoss_(SparseMoE.from_config(M, spec).eval(), ref)
    with torch.no_grad():
        want = ref(x)[0]
        assert rel(moe(x), want) <= TOL[torch.float32]
        fast = accelerate(moe)
        assert all(type(e) is GLUMLP for e in fast.experts)
        assert rel(fast(x), want) <= TOL[torch.float32]
        assert rel(fast(x[:, :1]), want[:, :1]) <= TOL[torch.float32]  # a decode step


def test_experts_are_inspectable_per_expert():
    """The names and shapes a loader fills, one expert at a time."""
    moe = SparseMoE(M, F, E, K, **GPTOSS)
    shapes = {k: tuple(v.shape) for k, v in moe.state_dict().items()}
    want = {"router.weight": (E, M), "router.bias": (E,)}
    for e in range(E):
        want |= {f"experts.{e}.gate.weight": (F, M), f"experts.{e}.gate.bias": (F,),
                 f"experts.{e}.up.weight": (F, M), f"experts.{e}.up.bias": (F,),
                 f"experts.{e}.down.weight": (M, F), f"experts.{e}.down.bias": (M,)}  # fmt: skip
    assert shapes == want
    assert "glu=ClampedSwiGLU(alpha=1.702, limit=7.0, up_offset=1.0)" in repr(moe)


SWITCHED_OFF = {
    "router_bias": {"router_bias": False},  # logits without the router's bias
    "expert_bias": {"expert_bias": False},  # gate, up, down without theirs
    "clamp": {"glu": ClampedSwiGLU(limit=None)},
    "up_plus_one": {"glu": ClampedSwiGLU(up_offset=0.0)},  # (up + 1) → up
    "alpha": {"glu": ClampedSwiGLU(alpha=1.0)},  # sigmoid(1.702·g) → sigmoid(g)
    "plain_swiglu": {"glu": None},  # silu(gate) · up
    "interleaved": {"interleaved": False},  # gate|up read as halves, not even|odd columns
}


@pytest.mark.parametrize("name", list(SWITCHED_OFF))
def test_switching_off_a_peculiarity_breaks_parity(name):
    change, dtype = SWITCHED_OFF[name], torch.float64
    ref = reference(dtype)
    x = inputs(dtype)
    assert_clamp_bites(ref, x)
    with torch.no_grad():
        want = ref(x)[0]
        assert rel(ours(ref, dtype)(x), want) <= TOL[dtype]  # the premise: parity as built
        err = rel(ours(ref, dtype, **change)(x), want)
    assert err > max(BROKEN, 100 * TOL[torch.float32]), (name, err)


def test_the_routing_order_is_invisible_in_the_outputs():
    """softmax→top k→renormalise gives the same experts and, up to rounding, the same weights
    as gpt-oss's top k→softmax (exp(l_e) / Σ_chosen exp(l_j) both): the order cannot be told
    apart by the outputs, hence the router tests below."""
    ref = reference(torch.float64)
    x = inputs(torch.float64)
    assert_routing_is_clear(ref, x)
    with torch.no_grad():
        want = ref(x)[0]
        other = ours(ref, torch.float64, order="softmax_topk")(x)
    assert rel(other, want) <= TOL[torch.float64]


def route64(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, list[list[int]]]:
    """The float64 oracle, row by row: the k largest logits (ties to the lower index), their
    softmax."""
    ws, chosen = [], []
    for row in logits.double().tolist():
        best = sorted(range(len(row)), key=lambda e: (-row[e], e))[:k]
        z = [math.exp(row[e] - row[best[0]]) for e in best]
        ws.append([v / sum(z) for v in z])
        chosen.append(best)
    return torch.tensor(ws, dtype=torch.float64), chosen


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_topk_softmax_route_is_transformers_router_bit_for_bit(dtype):
    """On the same logits, `route(order="topk_softmax")` returns transformers' router scores
    exactly (dtype included); the Mixtral order gives other last bits on some rows."""
    r = GptOssTopKRouter(gptoss_config()).to(dtype)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        r.weight.copy_(torch.randn(E, M, generator=g) / math.sqrt(M))
        r.bias.copy_(torch.randn(E, generator=g))
        h = torch.randn(400, M, generator=g).to(dtype)
        logits, scores, idx = r(h)
    w, experts = route(logits, K, order="topk_softmax")
    assert w.dtype == dtype and torch.equal(experts, idx) and torch.equal(w, scores)
    want_w, want_idx = route64(logits, K)
    # rows whose k+1 best logits are distinct (half-precision logits tie now and then)
    top = logits.double().sort(-1, descending=True).values[:, : K + 1]
    clear = (top.diff(dim=-1) < 0).all(-1)
    assert clear.float().mean() > 0.8, "too many ties to compare with the oracle"
    assert experts[clear].tolist() == torch.tensor(want_idx)[clear].tolist()
    assert rel(w[clear], want_w[clear]) <= {torch.float32: 1e-6}.get(dtype, 1e-2)
    if dtype == torch.float32:
        w_mix, idx_mix = route(logits, K, order="softmax_topk")
        assert torch.equal(idx_mix, idx)
        assert not torch.equal(w_mix, scores)  # the order shows in the rounding
        assert rel(w_mix, want_w) <= 1e-6


def test_topk_softmax_picks_the_larger_logit_where_the_softmax_rounds_a_tie():
    """Two logits one float32 ulp apart: softmax rounds their probabilities to one value (a
    tie for the Mixtral order to break anyhow); top k of the logits picks the larger, as the
    float64 oracle and transformers' router do."""
    a = torch.tensor(0.01, dtype=torch.float32)
    b = torch.nextafter(a, torch.tensor(1.0))
    logits = torch.stack([a, b, torch.tensor(-3.0), torch.tensor(-4.0)])[None]  # (1 4)
    p = torch.softmax(logits, -1)
    assert p[0, 0] == p[0, 1]  # the premise: the softmax cannot tell them apart
    _, want = route64(logits, 1)
    w, idx = route(logits, 1, order="topk_softmax")
    assert idx.tolist() == want == [[1]] and w.tolist() == [[1.0]]
    w_mix, _ = route(logits, 1, order="softmax_topk")
    assert w_mix.tolist() == [[1.0]]  # either expert, by torch.topk's tie rule


@pytest.mark.parametrize(
    ("make", "err", "match"),
    [
        (lambda: MoEConfig(4, 2, 5, order="topk"), ValueError,
         r"order must be one of \('softmax_topk', 'topk_softmax'\), got 'topk'"),
        (lambda: MoEConfig(4, 2, 5, order="topk_softmax", normalise=False), ValueError,
         r"order='topk_softmax' .* normalise must be True, got False"),
        (lambda: MoEConfig(4, 2, 5, router_bias=1), ValueError,
         r"router_bias must be a bool, got 1"),
        (lambda: MoEConfig(4, 2, 5, expert_bias="yes"), ValueError,
         r"expert_bias must be a bool, got 'yes'"),
        (lambda: MoEConfig(4, 2, 5, glu="swiglu_oai"), ValueError,
         r"glu must be a ClampedSwiGLU or None, got str"),
        (lambda: ClampedSwiGLU(alpha=0), ValueError, r"alpha must be a finite number > 0, got 0"),
        (lambda: ClampedSwiGLU(limit=-7.0), ValueError,
         r"limit must be a finite number > 0 or None \(no clamp\), got -7.0"),
        (lambda: ClampedSwiGLU(limit=math.inf), ValueError, r"limit must be .* got inf"),
        (lambda: ClampedSwiGLU(up_offset=math.nan), ValueError,
         r"up_offset must be a finite number, got nan"),
        (lambda: ClampedSwiGLU(alpha=True), ValueError, r"alpha must be .* got True"),
        (lambda: SparseMoE(8, 4, 4, 2, glu=ClampedSwiGLU(), act="gelu"), ValueError,
         r"act must be 'silu' \(the default\) with it, got 'gelu'"),
        (lambda: route(torch.zeros(3, 4), 2, order="top"), ValueError,
         r"route: order must be one of"),
        (lambda: route(torch.zeros(3, 4), 2, False, "topk_softmax"), ValueError,
         r"route: order='topk_softmax'"),
        (lambda: GLUMLP(8, 4, glu=3), TypeError, r"glu must be a callable \(gate, up\)"),
    ],
)  # fmt: skip
def test_bad_values_are_named(make, err, match):
    with pytest.raises(err, match=match):
        make()
