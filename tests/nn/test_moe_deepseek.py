"""DeepSeek-V3's routing in `qkv.nn.route` / `SparseMoE` (scoring="sigmoid", score_bias,
n_group / topk_group, scale, an ungated shared expert): against transformers' own router
modules in float32 (Glm4MoeTopkRouter, the gate of GLM-4.5 and, verbatim, dots.llm1; ERNIE 4.5's
softmax router with a score bias) with exactly the same experts chosen, against a float64
oracle written here one token at a time, and the whole SparseMoE against transformers'
Glm4MoeMoE. Then the checks can fail (the data exercise the bias and the groups), and bad
settings are named. DeepSeek-V2's routing (softmax scores, groups ranked by their best
expert: group_score="max") the same way, against transformers' DeepseekV2TopkRouter and
DeepseekV2Moe.

Awkward sizes: 16 experts in 4 groups of 4, the 2 best groups, top 5 (more than one group's
worth); 203 tokens; d_model 60, experts 23 wide.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from qkv.nn import MoEConfig, SparseMoE, route

transformers = pytest.importorskip("transformers", reason="transformers is the parity oracle")

E, G, TG, K, N, M = 16, 4, 2, 5, 203, 60


def _glm_router(**changes):
    from transformers.models.glm4_moe.modeling_glm4_moe import Glm4MoeTopkRouter

    kw = dict(n_routed_experts=E, n_group=G, topk_group=TG, num_experts_per_tok=K,
              routed_scaling_factor=2.5, norm_topk_prob=True, hidden_size=M)  # fmt: skip
    cfg = transformers.Glm4MoeConfig(**{**kw, **changes})
    router = Glm4MoeTopkRouter(cfg)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        router.weight.copy_(torch.randn(router.weight.shape, generator=gen) * 0.3)
        router.e_score_correction_bias.copy_(torch.randn(E, generator=gen) * 0.3)
    return router


def _h(dtype=torch.float32):
    return torch.randn(N, M, generator=torch.Generator().manual_seed(1), dtype=dtype)


def _by_expert(w, idx):
    """(weights, experts) with each token's k entries in expert order (transformers' top k
    is unsorted)."""
    order = idx.argsort(-1)
    return w.gather(-1, order), idx.gather(-1, order)


def oracle64(logits, top_k, *, bias, n_group, topk_group, normalise, scale, sigmoid=True):
    """DeepSeek-V3's choice in float64, one token at a time, in plain Python."""
    ws, ids = [], []
    for row in logits.double().tolist():
        if sigmoid:
            p = [1 / (1 + math.exp(-x)) for x in row]
        else:
            z = sum(math.exp(x - max(row)) for x in row)
            p = [math.exp(x - max(row)) / z for x in row]
        s = [pe + be for pe, be in zip(p, bias.double().tolist(), strict=True)]
        size = len(s) // n_group
        group = [sum(sorted(s[g * size : (g + 1) * size])[-2:]) for g in range(n_group)]
        kept = sorted(range(n_group), key=lambda g: -group[g])[:topk_group]
        allowed = [e for e in range(len(s)) if e // size in kept]
        chosen = sorted(allowed, key=lambda e: -s[e])[:top_k]
        w = [p[e] for e in chosen]
        if normalise:
            total = sum(w) + (1e-20 if sigmoid else 0.0)
            w = [x / total for x in w]
        ws.append([x * scale for x in w])
        ids.append(chosen)
    return torch.tensor(ws, dtype=torch.float64), torch.tensor(ids)


def _ours(router, h, **kw):
    logits = F.linear(h, router.weight.to(h.dtype))
    args = dict(scoring="sigmoid", score_bias=router.e_score_correction_bias.to(h.dtype),
                n_group=router.num_group, topk_group=router.topk_group,
                scale=router.routed_scaling_factor)  # fmt: skip
    return route(logits, router.top_k, router.norm_topk_prob, **{**args, **kw})


@pytest.mark.parametrize(
    "changes",
    [{}, {"norm_topk_prob": False}, {"n_group": 1, "topk_group": 1},
     {"routed_scaling_factor": 1.0, "topk_group": 3}, {"num_experts_per_tok": 1}],
)  # fmt: skip
def test_float32_routing_equals_transformers_router(changes):
    router = _glm_router(**changes)
    h = _h()
    with torch.no_grad():
        _, want_w, want_idx = router(h)
        w, idx = _ours(router, h)
    assert w.dtype == torch.float32 and idx.dtype == torch.int64
    want_w, want_idx = _by_expert(want_w, want_idx)
    w, idx = _by_expert(w, idx)
    assert torch.equal(idx, want_idx)
    assert float((w - want_w).abs().max() / want_w.abs().max()) <= 1e-6


@pytest.mark.parametrize("normalise", [True, False])
def test_float64_routing_equals_a_plain_oracle(normalise):
    router = _glm_router()
    bias = router.e_score_correction_bias
    logits = F.linear(_h(torch.float64), router.weight.double())  # (n e)
    with torch.no_grad():
        w, idx = route(logits, K, normalise, scoring="sigmoid", score_bias=bias.double(),
                       n_group=G, topk_group=TG, scale=2.5)  # fmt: skip
    want_w, want_idx = oracle64(logits, K, bias=bias, n_group=G, topk_group=TG,
                                normalise=normalise, scale=2.5)  # fmt: skip
    assert w.dtype == torch.float64
    assert torch.equal(idx, want_idx)  # both best first by the biased score
    assert float((w - want_w).abs().max() / want_w.abs().max()) <= 1e-12


def test_ernie_softmax_router_with_a_score_bias():
    """softmax scores, the bias for the choice only, always renormalised (ERNIE 4.5's router;
    its clamp of the sum at moe_norm_min 1e-12 never acts on a sum of top-k softmax weights)."""
    from transformers.models.ernie4_5_moe.modeling_ernie4_5_moe import Ernie4_5_MoeTopKRouter

    cfg = transformers.Ernie4_5_MoeConfig(moe_num_experts=E, moe_k=K, hidden_size=M)
    router = Ernie4_5_MoeTopKRouter(cfg)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        router.weight.copy_(torch.randn(router.weight.shape, generator=gen))
        router.moe_statics.e_score_correction_bias.copy_(torch.randn(1, E, generator=gen) * 0.1)
        _, want_w, want_idx = router(_h())
        bias = router.moe_statics.e_score_correction_bias[0].detach()
        w, idx = route(F.linear(_h(), router.weight), K, True, score_bias=bias)
    assert torch.equal(idx, want_idx)
    assert float((w - want_w).abs().max() / want_w.abs().max()) <= 1e-6
    logits64 = F.linear(_h(torch.float64), router.weight.detach().double())  # (n e)
    want64 = oracle64(logits64, K, bias=bias, n_group=1, topk_group=1, normalise=True,
                      scale=1.0, sigmoid=False)  # fmt: skip
    w64, idx64 = route(logits64, K, True, score_bias=bias.double())
    assert torch.equal(idx64, want64[1])
    assert float((w64 - want64[0]).abs().max()) <= 1e-12


def test_the_data_exercise_the_bias_and_the_groups():
    """Routing without the bias, or without the group limit, chooses other experts here, so
    the comparisons above would see either dropped."""
    router = _glm_router()
    h = _h()
    with torch.no_grad():
        full = _by_expert(*_ours(router, h))[1]
        no_bias = _by_expert(*_ours(router, h, score_bias=None))[1]
        no_groups = _by_expert(*_ours(router, h, n_group=1, topk_group=1))[1]
        softmax = _by_expert(*_ours(router, h, scoring="softmax"))
    assert (full != no_bias).any(-1).float().mean() > 0.3
    assert (full != no_groups).any(-1).float().mean() > 0.3
    assert not torch.allclose(softmax[0], _ours(router, h)[0].sort(-1).values)


def test_sparse_moe_equals_transformers_glm4_moe_block():
    """The whole layer: routed experts, their float32 weights, the ungated shared expert of
    width n_shared_experts · moe_intermediate_size."""
    from transformers.models.glm4_moe.modeling_glm4_moe import Glm4MoeMoE

    cfg = transformers.Glm4MoeConfig(
        n_routed_experts=E, n_group=G, topk_group=TG, num_experts_per_tok=K, hidden_size=M,
        moe_intermediate_size=23, n_shared_experts=2, routed_scaling_factor=2.5,
    )  # fmt: skip
    cfg._experts_implementation = "eager"
    ref = Glm4MoeMoE(cfg)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in [*ref.parameters(), ref.gate.e_score_correction_bias]:
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    moe = SparseMoE(M, 23, E, K, scoring="sigmoid", score_bias=True, n_group=G, topk_group=TG,
                    scale=2.5, d_shared=46, shared_gated=False)  # fmt: skip
    with torch.no_grad():
        moe.router.weight.copy_(ref.gate.weight)
        moe.score_bias.copy_(ref.gate.e_score_correction_bias)
        for e, x in enumerate(moe.experts):
            gate, up = ref.experts.gate_up_proj[e].chunk(2, 0)
            x.gate.weight.copy_(gate), x.up.weight.copy_(up)
            x.down.weight.copy_(ref.experts.down_proj[e])
        for n in ("gate", "up", "down"):
            getattr(moe.shared, n).weight.copy_(getattr(ref.shared_experts, f"{n}_proj").weight)
        x = _h().view(7, 29, M)
        want, got = ref(x), moe(x)
    assert float((got - want).abs().max() / want.abs().max()) <= 1e-5
    assert "scoring=sigmoid, n_group=4, topk_group=2, scale=2.5" in repr(moe)
    assert moe.shared_gate is None and moe.score_bias.shape == (E,)
    assert "score_bias" in moe.state_dict()
    with torch.no_grad():
        moe.shared = None  # the shared expert matters
        assert float((moe(x) - want).abs().max() / want.abs().max()) > 1e-2


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"n_group": 3}, r"n_group=3 must divide n_experts=16 into equal groups"),
        ({"n_group": 4, "topk_group": 5}, r"topk_group=5 exceeds n_group=4"),
        ({"n_group": 16}, r"n_group=16 leaves 1 expert per group"),
        ({"n_group": 4, "topk_group": 1, "top_k": 5}, r"top_k=5 exceeds the 4 experts of"),
        ({"n_group": 0}, r"n_group must be an int ≥ 1, got 0"),
        ({"scale": 0.0}, r"scale must be a finite number > 0, got 0\.0"),
        ({"scale": math.inf}, r"scale must be a finite number > 0, got inf"),
        ({"scoring": "tanh"}, r"scoring must be one of \('softmax', 'sigmoid'\), got 'tanh'"),
        ({"order": "topk_softmax", "scoring": "sigmoid"}, r"order='topk_softmax' chooses by"),
        ({"order": "topk_softmax", "score_bias": True}, r"score_bias and n_group > 1 need"),
        ({"shared_gated": False}, r"shared_gated=False says how a shared expert joins"),
        ({"score_bias": 1}, r"score_bias must be a bool, got 1"),
    ],
)  # fmt: skip
def test_bad_settings_are_named(kw, match):
    base = dict(n_experts=16, top_k=2, d_expert=8)
    with pytest.raises(ValueError, match=match):
        MoEConfig(**{**base, **kw})


def test_route_checks_its_new_arguments():
    logits = torch.randn(3, 8)
    with pytest.raises(ValueError, match=r"score_bias must be a tensor of shape \(8,\)"):
        route(logits, 2, score_bias=torch.zeros(7))
    with pytest.raises(ValueError, match=r"route: topk_group=3 exceeds n_group=2"):
        route(logits, 2, n_group=2, topk_group=3)
    w, idx = route(logits, 2)  # the defaults: Mixtral's routing, unchanged
    p = torch.softmax(logits, -1).topk(2)
    assert torch.equal(idx, p.indices)
    assert torch.allclose(w, p.values / p.values.sum(-1, keepdim=True))


# --------------------------------------------------------------------------------------------
# DeepSeek-V2's routing: softmax scores, groups ranked by their best expert (group_score="max")


def _v2_router(method="group_limited_greedy", **changes):
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2TopkRouter

    kw = dict(n_routed_experts=E, n_group=G, topk_group=TG, num_experts_per_tok=K,
              routed_scaling_factor=16.0, topk_method=method, hidden_size=M,
              num_attention_heads=6)  # fmt: skip
    router = DeepseekV2TopkRouter(transformers.DeepseekV2Config(**{**kw, **changes}))
    with torch.no_grad():
        router.weight.copy_(torch.randn(router.weight.shape, generator=torch.Generator()
                                        .manual_seed(0)))  # fmt: skip
    return router


def oracle64_v2(logits, top_k, *, n_group, topk_group, scale):
    """DeepSeek-V2's choice in float64, one token at a time, in plain Python: softmax scores,
    a group's score its best expert's, the top k of the kept groups' experts, weights × scale
    (never renormalised)."""
    ws, ids = [], []
    for row in logits.double().tolist():
        z = [math.exp(x - max(row)) for x in row]
        p = [x / sum(z) for x in z]
        size = len(p) // n_group
        group = [max(p[g * size : (g + 1) * size]) for g in range(n_group)]
        kept = sorted(range(n_group), key=lambda g: -group[g])[:topk_group]
        chosen = sorted((e for e in range(len(p)) if e // size in kept), key=lambda e: -p[e])
        ws.append([p[e] * scale for e in chosen[:top_k]])
        ids.append(chosen[:top_k])
    return torch.tensor(ws, dtype=torch.float64), torch.tensor(ids)


def _ours_v2(router, h, **kw):
    grouped = router.topk_method == "group_limited_greedy"
    args = dict(n_group=router.num_group if grouped else 1,
                topk_group=router.topk_group if grouped else 1,
                group_score="max" if grouped else "top2", scale=router.routed_scaling_factor)  # fmt: skip
    return route(F.linear(h, router.weight.to(h.dtype)), router.top_k, False, **{**args, **kw})


@pytest.mark.parametrize(
    ("method", "changes"),
    [("group_limited_greedy", {}), ("group_limited_greedy", {"topk_group": 3}),
     ("group_limited_greedy", {"num_experts_per_tok": 1, "routed_scaling_factor": 1.0}),
     ("group_limited_greedy", {"n_group": 8, "topk_group": 3}), ("greedy", {})],
)  # fmt: skip
def test_float32_v2_routing_equals_transformers_router(method, changes):
    router = _v2_router(method, **changes)
    h = _h()
    with torch.no_grad():
        _, want_w, want_idx = router(h)
        w, idx = _ours_v2(router, h)
    want_w, want_idx = _by_expert(want_w, want_idx)
    w, idx = _by_expert(w, idx)
    assert torch.equal(idx, want_idx)
    assert float((w - want_w).abs().max() / want_w.abs().max()) <= 1e-6


@pytest.mark.parametrize(("n_group", "topk_group"), [(G, TG), (8, 3), (1, 1)])
def test_float64_v2_routing_equals_a_plain_oracle(n_group, topk_group):
    router = _v2_router()
    logits = F.linear(_h(torch.float64), router.weight.detach().double())  # (n e)
    w, idx = route(logits, K, False, n_group=n_group, topk_group=topk_group, scale=16.0,
                   group_score="max" if n_group > 1 else "top2")  # fmt: skip
    want_w, want_idx = oracle64_v2(logits, K, n_group=n_group, topk_group=topk_group, scale=16.0)
    assert w.dtype == torch.float64
    assert torch.equal(idx, want_idx)
    assert float((w - want_w).abs().max() / want_w.abs().max()) <= 1e-12


def test_the_data_tell_max_from_top2_group_scores():
    """Ranking the groups by the sum of their 2 best (DeepSeek-V3's rule) or not limiting the
    groups chooses other experts here, so the comparisons above (exact expert ids) would see
    either."""
    router = _v2_router()
    h = _h()
    with torch.no_grad():
        full = _by_expert(*_ours_v2(router, h))[1]
        top2 = _by_expert(*_ours_v2(router, h, group_score="top2"))[1]
        greedy = _by_expert(*_ours_v2(router, h, n_group=1, topk_group=1, group_score="top2"))[1]
    assert (full != top2).any(-1).sum() >= 3  # 5 of 203 tokens: torch.equal sees them
    assert (full != greedy).any(-1).float().mean() > 0.3


def test_sparse_moe_equals_transformers_deepseek_v2_block():
    """The whole layer: softmax routing by group maxima, weights × routed_scaling_factor, not
    renormalised, plus the ungated shared experts."""
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2Moe

    cfg = transformers.DeepseekV2Config(
        n_routed_experts=E, n_group=G, topk_group=TG, num_experts_per_tok=K, hidden_size=M,
        moe_intermediate_size=23, n_shared_experts=2, routed_scaling_factor=16.0,
        topk_method="group_limited_greedy", num_attention_heads=6,
    )  # fmt: skip
    cfg._experts_implementation = "eager"
    ref = DeepseekV2Moe(cfg)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    moe = SparseMoE(M, 23, E, K, normalise=False, n_group=G, topk_group=TG, group_score="max",
                    scale=16.0, d_shared=46, shared_gated=False)  # fmt: skip
    with torch.no_grad():
        moe.router.weight.copy_(ref.gate.weight)
        for e, x in enumerate(moe.experts):
            gate, up = ref.experts.gate_up_proj[e].chunk(2, 0)
            x.gate.weight.copy_(gate), x.up.weight.copy_(up)
            x.down.weight.copy_(ref.experts.down_proj[e])
        for n in ("gate", "up", "down"):
            getattr(moe.shared, n).weight.copy_(getattr(ref.shared_experts, f"{n}_proj").weight)
        x = _h().view(7, 29, M)
        want, got = ref(x), moe(x)
        assert float((got - want).abs().max() / want.abs().max()) <= 1e-5
        assert "n_group=4, topk_group=2, group_score=max, scale=16.0" in repr(moe)
        moe.group_score = "top2"  # the group rule matters
        assert float((moe(x) - want).abs().max() / want.abs().max()) > 1e-2


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"group_score": "sum"}, r"group_score must be one of \('top2', 'max'\), got 'sum'"),
        ({"group_score": "max"}, r"group_score='max' ranks expert groups, but n_group=1"),
        ({"group_score": "top2", "n_group": 16}, r"n_group=16 leaves 1 expert per group"),
    ],
)  # fmt: skip
def test_bad_group_scores_are_named(kw, match):
    with pytest.raises(ValueError, match=match):
        MoEConfig(n_experts=16, top_k=1, d_expert=8, **kw)
    with pytest.raises(ValueError, match="route: " + match):
        route(torch.randn(3, 16), 1, **kw)


def test_max_group_score_allows_groups_of_one():
    """With the best expert alone ranking a group, 16 groups of 1 are groups of experts: the
    choice is the top k among the topk_group best experts."""
    logits = torch.randn(N, E, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    w, idx = route(logits, 2, False, n_group=E, topk_group=3, group_score="max")
    p = torch.softmax(logits, -1).topk(2)
    assert torch.equal(idx, p.indices) and torch.allclose(w, p.values, rtol=0, atol=1e-15)
