"""The deepseek_v3 family (`families_deepseek.py`: multi-head latent attention and DeepSeek-V3's
routing) against transformers, as tests/models/test_families_moe2.py does for glm4_moe: a tiny
random checkpoint (AutoConfig.for_model → from_config → save_pretrained) loaded with
`qkv.load`; logits in float32 and float64, a right-padded batch, lens rows vs
output_attentions, 20 greedy tokens with and without the KV cache; then each peculiarity
switched off breaks parity, the MTP layer is ignored, a Hub-style config (legacy rope_scaling)
reads as transformers reads it, bad configs are named.

Two variants. "latent": q through a 19-wide latent, YaRN (factor 4 over 16 positions, mscale
0.8, mscale_all_dim 0.6: the scores' scale × 1.07², cos/sin × 1.026) on interleaved pairs,
attention biases, 8 experts in 4 groups (best 2), top 3, scaling 2.5. "direct": q_proj from x,
plain RoPE on halves (rope_interleave false), no biases, top 2 of 6 without renormalising, two
shared experts. Both: d_model 60, 6 heads, kv latent 13, nope 7 + rope 6 (q/k head dim 13),
values 11 wide, rms_norm_eps 1e-5 (the latents' norms keep 1e-6), three layers, the first dense.
The score-correction bias is random (0.3); `assert_routing_is_clear` checks the compared inputs
are no near tie. The float64 oracle's RoPE (YaRN included) is written here in float64.

Then the deepseek_v2 family the same way (V2_VARIANTS: "v2", group-limited routing with YaRN
and a q latent; "v2_lite", greedy routing with q_proj), its float64 oracle replacing
transformers' float32 router and complex-pair RoPE, and its refusals.
"""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import qkv
from qkv.nn import MLP, LatentAttention, RotaryEmbedding, SparseMoE
from tests.models.parity import (  # noqa: F401  (collected here, with this file's `pair`)
    test_lens_rows_match_output_attentions,
    test_padded_batch_matches_transformers,
)
from tests.models.test_families import (
    N_GREEDY,
    REL_TOL,
    assert_lens_rows_match,
    float64_oracle_,
    greedy_three_ways,
    ids_for,
    output_error,
    padded_error,
    save_random,
)
from tests.models.test_families_moe2 import _oracle_ as moe_oracle_
from tests.models.test_families_moe2 import _random_score_bias, assert_routing_is_clear
from tests.models.test_families_more import (
    _breaks,
    _each_attn,
    _each_moe,
    _edit_config,
    _error,
    assert_clear_routing,
)

transformers = pytest.importorskip("transformers", reason="transformers is the parity oracle")

TOL = REL_TOL[torch.float32]
_YARN = {"rope_type": "yarn", "rope_theta": 500.0, "factor": 4.0, "mscale": 0.8,
         "mscale_all_dim": 0.6, "original_max_position_embeddings": 16, "beta_fast": 8,
         "beta_slow": 1}  # fmt: skip
_BASE = dict(hidden_size=60, num_attention_heads=6, num_key_value_heads=6, intermediate_size=37,
             num_hidden_layers=3, vocab_size=97, max_position_embeddings=64, kv_lora_rank=13,
             qk_nope_head_dim=7, qk_rope_head_dim=6, v_head_dim=11, moe_intermediate_size=23,
             first_k_dense_replace=1, rms_norm_eps=1e-5, pad_token_id=0, bos_token_id=0,
             eos_token_id=0)  # fmt: skip
VARIANTS = {
    "latent": dict(_BASE, q_lora_rank=19, rope_parameters=_YARN, rope_interleave=True,
                   attention_bias=True, n_routed_experts=8, num_experts_per_tok=3, n_group=4,
                   topk_group=2, n_shared_experts=1, routed_scaling_factor=2.5,
                   norm_topk_prob=True),
    "direct": dict(_BASE, q_lora_rank=None, rope_interleave=False, attention_bias=False,
                   rope_parameters={"rope_type": "default", "rope_theta": 500.0},
                   n_routed_experts=6, num_experts_per_tok=2, n_group=1, topk_group=1,
                   n_shared_experts=2, routed_scaling_factor=1.5, norm_topk_prob=False),
}  # fmt: skip


# deepseek_v2: the same MLA (pairs always), DeepSeek-V2's softmax router. "v2": q latent, YaRN,
# biases, 8 experts in 4 groups of 2 ranked by their best (group_limited_greedy), top 3 of the
# 2 best groups, scaling 2.5; "v2_lite": V2-Lite's shape, q_proj, plain RoPE, greedy top 2 of 6,
# scaling 1.5, two shared experts. Both: kv latent 14, nope 8 + rope 6 (q/k head dim 14):
# transformers' DeepseekV2 views q's and the kv projection's rope features as complex pairs,
# which needs even strides (13 + 6 or 7 + 6 features a row fail in torch.view_as_complex).
_V2_BASE = dict(_BASE, kv_lora_rank=14, qk_nope_head_dim=8)
V2_VARIANTS = {
    "v2": dict(_V2_BASE, q_lora_rank=19, rope_parameters=_YARN, attention_bias=True,
               n_routed_experts=8, num_experts_per_tok=3, n_group=4, topk_group=2,
               topk_method="group_limited_greedy", n_shared_experts=1,
               routed_scaling_factor=2.5),
    "v2_lite": dict(_V2_BASE, q_lora_rank=None, attention_bias=False,
                    rope_parameters={"rope_type": "default", "rope_theta": 500.0},
                    n_routed_experts=6, num_experts_per_tok=2, n_group=1, topk_group=1,
                    topk_method="greedy", n_shared_experts=2, routed_scaling_factor=1.5),
}  # fmt: skip


def build(variant: str, folder, **changes):
    """A random deepseek_v3 (VARIANTS) or deepseek_v2 (V2_VARIANTS) checkpoint, its config
    updated by `changes`, saved in `folder` with a word tokenizer; returns the transformers
    model (eager)."""
    mt = "deepseek_v2" if variant in V2_VARIANTS else "deepseek_v3"
    kw = {**VARIANTS, **V2_VARIANTS}[variant]
    return save_random(mt, {**kw, **changes}, folder, _random_score_bias)


@pytest.fixture(scope="module", params=list(VARIANTS))
def pair(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    ref = build(request.param, folder)
    return request.param, ref, qkv.load(folder), folder


def _inv_freq64(rp: dict, r: int) -> tuple[torch.Tensor, float]:
    """transformers' default / YaRN inverse frequencies and cos-sin factor, in float64."""
    base = rp["rope_theta"]
    inv = 1.0 / base ** (torch.arange(0, r, 2, dtype=torch.float64) / r)
    if rp.get("rope_type", "default") == "default":
        return inv, 1.0
    factor, n = rp["factor"], rp["original_max_position_embeddings"]

    def m(s, a):
        return 1.0 if s <= 1 else 0.1 * a * math.log(s) + 1.0

    def dim(turns):
        return r * math.log(n / (turns * 2 * math.pi)) / (2 * math.log(base))

    lo, hi = max(math.floor(dim(rp["beta_fast"])), 0), min(math.ceil(dim(rp["beta_slow"])), r - 1)
    hi = hi + 0.001 if lo == hi else hi
    ramp = ((torch.arange(r // 2, dtype=torch.float64) - lo) / (hi - lo)).clamp(0, 1)
    inv = inv / factor * ramp + inv * (1 - ramp)
    return inv, m(factor, rp["mscale"]) / m(factor, rp["mscale_all_dim"])


def _oracle_(ref, model):
    """moe2's float64 oracle (RMSNorm, router), then RoPE's angles in float64 over the
    qk_rope_head_dim features, YaRN's too."""
    moe_oracle_(ref, model)
    inv, att = _inv_freq64(ref.config.rope_parameters, ref.config.qk_rope_head_dim)

    def rotary(x, position_ids):
        ang = position_ids[..., None].double() * inv
        emb = torch.cat((ang, ang), -1)
        return (emb.cos() * att).to(x.dtype), (emb.sin() * att).to(x.dtype)

    ref.model.rotary_emb.forward = rotary


# --------------------------------------------------------------------------------------------
# parity


def test_the_models_are_read_with_their_peculiarities(pair):
    variant, _, model, _ = pair
    c = model.config
    assert [isinstance(b.mlp, SparseMoE) for b in model.blocks] == [False, True, True]
    assert isinstance(model.blocks[0].mlp, MLP) and model.blocks[0].mlp.up.out_features == 37
    attn = model.blocks[0].attn
    assert isinstance(attn, LatentAttention) and c.d_head == 13 and c.n_kv_heads == 6
    assert (c.mla.kv_lora_rank, c.mla.qk_rope_head_dim, c.mla.v_head_dim) == (13, 6, 11)
    assert attn.kv_latent_norm.eps == 1e-6 and c.norm_eps == 1e-5
    moe = model.blocks[1].mlp
    assert moe.scoring == "sigmoid" and moe.shared_gate is None and moe.score_bias.abs().sum() > 0
    if variant == "latent":
        m = 0.1 * 0.6 * math.log(4.0) + 1
        assert c.mla.q_lora_rank == 19 and c.rope_interleaved and c.attn_bias and c.out_bias
        assert attn.scale == pytest.approx(m * m / math.sqrt(13), rel=1e-15)
        assert c.rope_scaling.rope_type == "yarn"
        assert (moe.top_k, moe.n_group, moe.topk_group, moe.scale) == (3, 4, 2, 2.5)
    else:
        assert c.mla.q_lora_rank is None and attn.q_down is None and not c.rope_interleaved
        assert attn.scale == 1 / math.sqrt(13) and c.rope_scaling is None
        assert attn.kv_down.bias is None and attn.b_O is None
        assert (moe.top_k, moe.n_group, moe.scale, moe.normalise) == (2, 1, 1.5, False)
        assert moe.shared.up.out_features == 46


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_logits_match_transformers(pair, dtype, monkeypatch):
    variant, ref, model, _ = pair
    ids = torch.cat([ids_for(0), ids_for(1)])
    assert_routing_is_clear(model, ids)
    err = output_error(ref, model, ids, dtype, monkeypatch, _oracle_)
    assert err <= REL_TOL[dtype], f"{variant} {dtype}: relative error {err:.2e}"


def test_lens_experts_say_when_weights_do_not_sum_to_one(pair):
    """The lens' experts of a token: each sparse layer's weights are what transformers'
    DeepSeek-V3 MoE block uses, so with routed_scaling_factor 2.5 and renormalised top-k
    ("latent") they sum to 2.5, and the terminal view says so; the dense first layer has none."""
    from qkv.lens.terminal import render_text

    variant, _, model, _ = pair
    r = qkv.explain("the dog chased the ball because it was excited", 6, model=model, top=3,
                    rollout=False, progress=False)  # fmt: skip
    sums = [float(x.weights.sum()) for x in r.experts.layers]
    assert [x.layer for x in r.experts.layers] == [1, 2]  # first_k_dense_replace = 1
    if variant == "latent":
        assert all(abs(v - 2.5) < 1e-5 for v in sums)
        assert "sum to 2.5, not 1" in render_text(r)


def test_greedy_tokens_with_and_without_the_cache(pair):
    _, ref, model, _ = pair
    prompt = ids_for(5, 7)
    assert_routing_is_clear(model, prompt)
    ref.generation_config.eos_token_id = None
    want, cached, uncached = greedy_three_ways(ref, model, prompt, N_GREEDY)
    assert cached == uncached == want


# --------------------------------------------------------------------------------------------
# each peculiarity matters


def _rope(interleaved=None, scaling=True):
    """Each layer's RoPE rebuilt with its pair layout flipped, or without its scaling."""

    def fn(a):
        r = a.rope
        a.rope = RotaryEmbedding(r.d_head, r.base, r.interleaved if interleaved is None
                                 else interleaved, scaling=r.scaling if scaling else None)  # fmt: skip

    return _each_attn(fn)


_ROUTING_BREAKS = {
    "no score bias": _each_moe(lambda m: torch.nn.init.zeros_(m.score_bias)),
    "softmax scores": _each_moe(lambda m: setattr(m, "scoring", "softmax")),
    "no shared expert": _each_moe(lambda m: setattr(m, "shared", None)),
    "normalise flipped": _each_moe(lambda m: setattr(m, "normalise", not m.normalise)),
    "no routed scaling": _each_moe(lambda m: setattr(m, "scale", 1.0)),
}
_MLA_BREAKS = {
    "no q-latent norm": _each_attn(lambda a: setattr(a, "q_latent_norm", torch.nn.Identity())),
    "no kv-latent norm": _each_attn(lambda a: setattr(a, "kv_latent_norm", torch.nn.Identity())),
    "rope on every feature of k (no shared k_pe)": _each_attn(lambda a: setattr(a, "rope", None)),
}


def test_each_latent_peculiarity_breaks_parity(tmp_path):
    ref = build("latent", tmp_path)
    assert _error(qkv.load(tmp_path), ref) <= TOL
    _breaks(tmp_path, ref, {
        **_ROUTING_BREAKS, **_MLA_BREAKS,
        "halves, not pairs": _rope(interleaved=False),
        "no YaRN": _rope(scaling=False),
        "no mscale_all_dim² on the scale": _each_attn(lambda a: setattr(a, "scale", 13**-0.5)),
        "no kv_a bias": _each_attn(lambda a: torch.nn.init.zeros_(a.kv_down.bias)),
        "no q_a bias": _each_attn(lambda a: torch.nn.init.zeros_(a.q_down.bias)),
        "no o bias": _each_attn(lambda a: torch.nn.init.zeros_(a.b_O)),
        "no expert groups": _each_moe(
            lambda m: setattr(m, "n_group", 1) or setattr(m, "topk_group", 1)),
    })  # fmt: skip


def test_each_direct_peculiarity_breaks_parity(tmp_path):
    ref = build("direct", tmp_path)
    assert _error(qkv.load(tmp_path), ref) <= TOL
    _breaks(tmp_path, ref, {
        **_ROUTING_BREAKS,
        "no kv-latent norm": _MLA_BREAKS["no kv-latent norm"],
        "pairs, not halves": _rope(interleaved=True),
    })  # fmt: skip


def test_the_latent_norms_keep_their_own_epsilon(tmp_path, monkeypatch):
    """The latents' RMSNorms at the config's rms_norm_eps (1e-5) instead of 1e-6: a float64
    difference far past float64's tolerance (too small to see in float32)."""
    ref = build("latent", tmp_path)
    model = qkv.load(tmp_path)
    ids = torch.cat([ids_for(0), ids_for(1)])
    assert output_error(ref, model, ids, torch.float64, monkeypatch, _oracle_) <= 1e-10
    for b in model.blocks:
        b.attn.q_latent_norm.eps = b.attn.kv_latent_norm.eps = 1e-5
    assert output_error(ref, model, ids, torch.float64, monkeypatch, _oracle_) > 1e-8


@pytest.mark.parametrize(("first", "sparse"), [(0, [True] * 3), (3, [False] * 3)])
def test_first_k_dense_replace_layers(tmp_path, first, sparse):
    ref = build("direct", tmp_path, first_k_dense_replace=first)
    model = qkv.load(tmp_path)
    assert [isinstance(b.mlp, SparseMoE) for b in model.blocks] == sparse
    assert _error(model, ref) <= TOL


def test_the_mtp_layer_is_ignored_as_transformers_ignores_it(tmp_path):
    """DeepSeek-V3's files hold its multi-token-prediction layer as layers.61; transformers
    skips those keys, so do we; any other stray layer is unexpected."""
    ref = build("direct", tmp_path)
    w = load_file(tmp_path / "model.safetensors")
    w["model.layers.61.eh_proj.weight"] = torch.zeros(60, 120)
    save_file(w, tmp_path / "model.safetensors")
    model = qkv.load(tmp_path)
    assert model.load_report.ignored == ["layers.61.eh_proj.weight"]
    assert _error(model, ref) <= TOL
    w["model.layers.3.eh_proj.weight"] = torch.zeros(60, 120)
    save_file(w, tmp_path / "model.safetensors")
    with pytest.raises(
        ValueError, match=r"holds 1 tensor .* does not have: 'model\.layers\.3\.eh_proj\.weight'"
    ):
        qkv.load(tmp_path)


def test_a_hub_style_config_reads_as_transformers_reads_it(tmp_path):
    """DeepSeek-V3's config.json on the Hub: rope_theta at the top, `rope_scaling` with the
    old key `type`. transformers' own reading of the edited file is the oracle."""
    build("latent", tmp_path)
    legacy = {k: v for k, v in _YARN.items() if k not in ("rope_type", "rope_theta")}
    _edit_config(tmp_path, drop=("rope_parameters",), rope_theta=500.0,
                 rope_scaling={**legacy, "type": "yarn", "mscale_all_dim": 0.9})  # fmt: skip
    ref = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, attn_implementation="eager", experts_implementation="eager"
    ).eval()
    assert ref.model.layers[0].self_attn.scaling != 13**-0.5
    model = qkv.load(tmp_path)
    m = 0.1 * 0.9 * math.log(4.0) + 1
    assert model.blocks[0].attn.scale == pytest.approx(m * m / math.sqrt(13), rel=1e-15)
    assert _error(model, ref) <= TOL


def test_architectures_without_model_type_find_the_family(tmp_path):
    ref = build("direct", tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text(encoding="utf-8"))
    del cfg["model_type"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    model = qkv.load(tmp_path)
    assert model.config.mla is not None and _error(model, ref) <= TOL


# --------------------------------------------------------------------------------------------
# bad configs: one clear error naming the key


@pytest.mark.parametrize(
    ("changes", "drop", "match"),
    [
        ({"num_key_value_heads": 2}, (), r"deepseek_v3 with num_key_value_heads ≠ num_attention"),
        ({}, ("q_lora_rank",), r"deepseek_v3 with no q_lora_rank key"),
        ({"rope_interleave": None}, (), r"deepseek_v3 with rope_interleave=null"),
        ({"quantization_config": {"quant_method": "fp8"}}, (),
         r"deepseek_v3 with quantization_config"),
        ({"qk_rope_head_dim": 5}, (), r"qk_rope_head_dim must be even"),
        ({"kv_lora_rank": 0}, (), r"kv_lora_rank must be a positive int, got 0"),
        ({"rope_parameters": {**_YARN, "rope_type": "ntk_by_parts"}}, (),
         r"rope_type='ntk_by_parts' is not supported"),
        ({"n_group": 3}, (), r"n_group=3 must divide n_experts=8 into equal groups"),
    ],
)  # fmt: skip
def test_bad_config_is_named(tmp_path, changes, drop, match):
    build("latent", tmp_path)
    _edit_config(tmp_path, drop=drop, **changes)
    with pytest.raises(ValueError, match=match) as info:
        qkv.load(tmp_path)
    assert str(info.value).startswith(str(tmp_path / "config.json"))


# --------------------------------------------------------------------------------------------
# deepseek_v2


@pytest.fixture(scope="module", params=list(V2_VARIANTS))
def pair_v2(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    ref = build(request.param, folder)
    return request.param, ref, qkv.load(folder), folder


def _v2_choice64(s, moe):
    """DeepSeek-V2's choice on float64 (log-)softmax scores s (n e): the kept groups' experts
    (others -inf) by their group's best score, written here apart from `qkv.nn.route`."""
    g, tg = moe.n_group, moe.topk_group
    if g == 1:
        return s, None
    grouped = s.view(len(s), g, -1)  # (n g e/g)
    best = grouped.max(-1).values  # (n g)
    mask = torch.zeros_like(best, dtype=torch.bool).scatter_(1, best.topk(tg, -1).indices, True)
    return grouped.masked_fill(~mask[..., None], -torch.inf).view(len(s), -1), best


def assert_v2_routing_is_clear(model, ids, margin: float = 1e-4) -> None:
    """moe2's `assert_routing_is_clear` for DeepSeek-V2's rule: in float64, the topk_group-th
    and next group maxima, and the k-th and (k+1)-th kept scores, differ by more than margin
    in log-probability (the softmax keeps the order; a relative gap of 1e-4 in the
    probabilities is far past float32's rounding of them)."""

    def gaps_of(moe, logits):
        gaps = []
        s, best = _v2_choice64(torch.log_softmax(logits.double(), -1), moe)
        if best is not None and moe.topk_group < moe.n_group:
            top = best.sort(-1, descending=True).values
            gaps.append(float((top[:, moe.topk_group - 1] - top[:, moe.topk_group]).min()))
        s = s.sort(-1, descending=True).values
        if torch.isfinite(s[:, moe.top_k]).all():
            gaps.append(float((s[:, moe.top_k - 1] - s[:, moe.top_k]).min()))
        return gaps

    assert_clear_routing(model, ids, gaps_of, margin)


def _v2_router64(mod):
    """transformers' DeepseekV2TopkRouter in float32 whatever the dtype; the same formula in
    float64 (masked groups -inf rather than 0: the same choice)."""

    def forward(h):
        logits = F.linear(h.reshape(-1, mod.hidden_dim), mod.weight)  # (n e)
        scores = logits.softmax(-1)
        s = scores
        if mod.topk_method == "group_limited_greedy":
            g = scores.view(len(s), mod.num_group, -1)
            keep = g.max(-1).values.topk(mod.topk_group, -1).indices
            mask = torch.zeros(g.shape[:2], dtype=torch.bool).scatter_(1, keep, True)
            s = g.masked_fill(~mask[..., None], -torch.inf).view(len(s), -1)
        idx = s.topk(mod.top_k, -1).indices
        return logits, scores.gather(1, idx) * mod.routed_scaling_factor, idx

    return forward


def _rotary64(xq, xk, freqs_cis):
    """transformers' DeepseekV2 `apply_rotary_emb` (pairs as complex numbers) without its
    float32 cast."""

    def one(x):
        c = torch.view_as_complex(x.reshape(*x.shape[:-1], -1, 2).contiguous())  # (b h i r/2)
        return torch.view_as_real(c * freqs_cis.unsqueeze(1)).flatten(3).type_as(x)

    return one(xq), one(xk)


def _v2_oracle(monkeypatch):
    """The float64 oracle for deepseek_v2: RMSNorm in float64 (`float64_oracle_`), the router
    (`_v2_router64`), RoPE's angles (YaRN's too) and their complex product in float64."""
    from transformers.models.deepseek_v2 import modeling_deepseek_v2 as mdl

    def oracle_(ref, model):
        float64_oracle_(ref, model)
        for mod in ref.modules():
            if isinstance(mod, mdl.DeepseekV2TopkRouter):
                mod.forward = _v2_router64(mod)
        inv, att = _inv_freq64(ref.config.rope_parameters, ref.config.qk_rope_head_dim)

        def rotary(x, position_ids):
            ang = position_ids[..., None].double() * inv  # (b i r/2)
            return torch.polar(torch.full_like(ang, att), ang)

        ref.model.rotary_emb.forward = rotary
        monkeypatch.setattr(mdl, "apply_rotary_emb", _rotary64)

    return oracle_


def test_v2_models_are_read_with_their_peculiarities(pair_v2):
    variant, _, model, _ = pair_v2
    c = model.config
    assert [isinstance(b.mlp, SparseMoE) for b in model.blocks] == [False, True, True]
    attn, moe = model.blocks[0].attn, model.blocks[1].mlp
    assert isinstance(attn, LatentAttention) and c.d_head == 14 and c.rope_interleaved
    assert attn.kv_latent_norm.eps == 1e-6 and c.norm_eps == 1e-5
    assert moe.scoring == "softmax" and moe.score_bias is None and not moe.normalise
    assert moe.shared_gate is None
    if variant == "v2":
        m = 0.1 * 0.6 * math.log(4.0) + 1
        assert c.mla.q_lora_rank == 19 and c.attn_bias and c.out_bias
        assert attn.scale == pytest.approx(m * m / math.sqrt(14), rel=1e-15)
        assert (moe.top_k, moe.n_group, moe.topk_group, moe.scale) == (3, 4, 2, 2.5)
        assert moe.group_score == "max" and moe.shared.up.out_features == 23
    else:
        assert c.mla.q_lora_rank is None and attn.q_down is None and c.rope_scaling is None
        assert (moe.top_k, moe.n_group, moe.scale) == (2, 1, 1.5)
        assert moe.shared.up.out_features == 46


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_v2_logits_match_transformers(pair_v2, dtype, monkeypatch):
    variant, ref, model, _ = pair_v2
    ids = torch.cat([ids_for(0), ids_for(1)])
    assert_v2_routing_is_clear(model, ids)
    err = output_error(ref, model, ids, dtype, monkeypatch, _v2_oracle(monkeypatch))
    assert err <= REL_TOL[dtype], f"{variant} {dtype}: relative error {err:.2e}"


def test_v2_the_float64_oracle_is_needed(pair_v2, monkeypatch):
    """Without the oracle's float64 router and RoPE, transformers' float32 casts leave it far
    from float64's tolerance: the oracle does the work the float64 comparison relies on."""
    _, ref, model, _ = pair_v2
    ids = torch.cat([ids_for(0), ids_for(1)])

    def norms_only(ref, model):  # float64 RMSNorm; transformers' own float32 router and RoPE
        float64_oracle_(ref, model)
        del ref.model.rotary_emb.forward

    err = output_error(ref, model, ids, torch.float64, monkeypatch, norms_only)
    assert err > 100 * REL_TOL[torch.float64]


def test_v2_padded_batch_matches_transformers(pair_v2):
    _, ref, model, _ = pair_v2
    assert padded_error(ref, model) <= TOL


def test_v2_lens_rows_match_output_attentions(pair_v2):
    variant, ref, model, _ = pair_v2
    assert_lens_rows_match(ref, model, variant)


def test_v2_greedy_tokens_with_and_without_the_cache(pair_v2):
    _, ref, model, _ = pair_v2
    prompt = ids_for(5, 7)
    assert_v2_routing_is_clear(model, prompt)
    ref.generation_config.eos_token_id = None
    want, cached, uncached = greedy_three_ways(ref, model, prompt, N_GREEDY)
    assert cached == uncached == want


_V2_ROUTING_BREAKS = {
    "sigmoid scores": _each_moe(lambda m: setattr(m, "scoring", "sigmoid")),
    "no shared expert": _each_moe(lambda m: setattr(m, "shared", None)),
    "renormalised": _each_moe(lambda m: setattr(m, "normalise", True)),
    "no routed scaling": _each_moe(lambda m: setattr(m, "scale", 1.0)),
}


def test_each_v2_peculiarity_breaks_parity(tmp_path):
    ref = build("v2", tmp_path)
    assert _error(qkv.load(tmp_path), ref) <= TOL
    _breaks(tmp_path, ref, {
        **_V2_ROUTING_BREAKS, **_MLA_BREAKS,
        "groups ranked by their 2 best (DeepSeek-V3's rule)": _each_moe(
            lambda m: setattr(m, "group_score", "top2")),
        "no expert groups": _each_moe(lambda m: setattr(m, "n_group", 1)
                                      or setattr(m, "topk_group", 1)
                                      or setattr(m, "group_score", "top2")),
        "halves, not pairs": _rope(interleaved=False),
        "no YaRN": _rope(scaling=False),
        "no mscale_all_dim² on the scale": _each_attn(lambda a: setattr(a, "scale", 14**-0.5)),
        "no kv_a bias": _each_attn(lambda a: torch.nn.init.zeros_(a.kv_down.bias)),
        "no q_a bias": _each_attn(lambda a: torch.nn.init.zeros_(a.q_down.bias)),
        "no o bias": _each_attn(lambda a: torch.nn.init.zeros_(a.b_O)),
    })  # fmt: skip


def test_each_v2_lite_peculiarity_breaks_parity(tmp_path):
    ref = build("v2_lite", tmp_path)
    assert _error(qkv.load(tmp_path), ref) <= TOL
    _breaks(tmp_path, ref, {
        **_V2_ROUTING_BREAKS,
        "no kv-latent norm": _MLA_BREAKS["no kv-latent norm"],
        "halves, not pairs": _rope(interleaved=False),
    })  # fmt: skip


@pytest.mark.parametrize(("first", "sparse"), [(0, [True] * 3), (3, [False] * 3)])
def test_v2_first_k_dense_replace_layers(tmp_path, first, sparse):
    ref = build("v2_lite", tmp_path, first_k_dense_replace=first)
    model = qkv.load(tmp_path)
    assert [isinstance(b.mlp, SparseMoE) for b in model.blocks] == sparse
    assert _error(model, ref) <= TOL


def test_a_v2_hub_style_config_reads_as_transformers_reads_it(tmp_path):
    """DeepSeek-V2's config.json on the Hub: rope_theta at the top, `rope_scaling` with the old
    key `type`, and keys transformers ignores that say what it does anyway (moe_layer_freq 1,
    scoring_func softmax, norm_topk_prob false). transformers' reading is the oracle."""
    build("v2", tmp_path)
    legacy = {k: v for k, v in _YARN.items() if k not in ("rope_type", "rope_theta")}
    _edit_config(tmp_path, drop=("rope_parameters",), rope_theta=500.0,
                 rope_scaling={**legacy, "type": "yarn", "mscale_all_dim": 0.9},
                 moe_layer_freq=1, scoring_func="softmax", norm_topk_prob=False,
                 aux_loss_alpha=0.001, seq_aux=True, ep_size=1)  # fmt: skip
    ref = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, attn_implementation="eager", experts_implementation="eager"
    ).eval()
    assert ref.model.layers[0].self_attn.scaling != 14**-0.5
    model = qkv.load(tmp_path)
    m = 0.1 * 0.9 * math.log(4.0) + 1
    assert model.blocks[0].attn.scale == pytest.approx(m * m / math.sqrt(14), rel=1e-15)
    assert _error(model, ref) <= TOL


@pytest.mark.parametrize(
    ("variant", "changes", "drop", "match"),
    [
        ("v2", {"num_key_value_heads": 2}, (), r"deepseek_v2 with num_key_value_heads ≠"),
        ("v2", {}, ("q_lora_rank",), r"deepseek_v2 with no q_lora_rank key"),
        ("v2", {"quantization_config": {"quant_method": "fp8"}}, (),
         r"deepseek_v2 with quantization_config"),
        ("v2", {"norm_topk_prob": True}, (), r"deepseek_v2 with norm_topk_prob=true"),
        ("v2", {"moe_layer_freq": 2}, (), r"deepseek_v2 with moe_layer_freq ≠ 1"),
        ("v2", {"scoring_func": "sigmoid"}, (), r"deepseek_v2 with scoring_func ≠ 'softmax'"),
        ("v2", {"mlp_bias": True}, (), r"deepseek_v2 with mlp_bias=true"),
        ("v2", {"topk_method": "noaux_tc"}, (),
         r"topk_method must be one of \('greedy', 'group_limited_greedy'\).*got 'noaux_tc'"),
        ("v2", {"n_group": None}, (), r"n_group must be an int ≥ 1, got None"),
        ("v2", {"n_group": 3}, (), r"n_group=3 must divide n_experts=8 into equal groups"),
        ("v2", {"topk_group": 5}, (), r"topk_group=5 exceeds n_group=4"),
        ("v2_lite", {}, ("num_experts_per_tok",),
         r"num_experts_per_tok must be an int ≥ 1, got None"),
    ],
)  # fmt: skip
def test_bad_v2_config_is_named(tmp_path, variant, changes, drop, match):
    build(variant, tmp_path)
    _edit_config(tmp_path, drop=drop, **changes)
    with pytest.raises(ValueError, match=match) as info:
        qkv.load(tmp_path)
    assert str(info.value).startswith(str(tmp_path / "config.json"))
