"""The DeepSeek-V3-routed families (`families_moe2.py`: glm4_moe, dots1) against transformers,
as tests/models/test_families_moe.py does for the others: a tiny random checkpoint per
model_type (AutoConfig.for_model → from_config → save_pretrained) loaded with `qkv.load`;
logits in float32 and float64, a right-padded batch, lens rows vs output_attentions, 20 greedy
tokens with and without the KV cache; then each peculiarity switched off breaks parity, the
dense/sparse layer layout, the MTP layer ignored, bad configs named.

Tiny and awkward: d_model 60, 6 query heads over 2 kv heads, head_dim 12 (glm4_moe rotates its
first 6 features), 8 experts of width 23; glm4_moe in 4 groups of 2, the best 2 groups, top 3,
routed_scaling_factor 2.5; dots1 top 2 of 6 without renormalising, 2 shared experts, windows
of 5 on layers 0 and 2. Three layers, the first dense. The score-correction bias is random
(0.3), so it moves the choice; `assert_routing_is_clear` checks on the very inputs compared
that no group and no expert is within rounding of the cut.
"""

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import qkv
from qkv.nn import MLP, SparseMoE
from tests.models.parity import (  # noqa: F401  (collected here, with this file's `pair`)
    test_lens_rows_match_output_attentions,
    test_padded_batch_matches_transformers,
)
from tests.models.test_families import _DEC as DECODER
from tests.models.test_families import (
    N_GREEDY,
    REL_TOL,
    float64_oracle_,
    greedy_three_ways,
    ids_for,
    output_error,
    save_random,
)
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
_DEC = dict(DECODER, num_hidden_layers=3, head_dim=12, moe_intermediate_size=23,
            first_k_dense_replace=1, attention_bias=True, pad_token_id=0, bos_token_id=0,
            eos_token_id=0)  # fmt: skip
_S, _F = "sliding_attention", "full_attention"
MOE2 = {
    # groups, scaling, QK-norm, q/k/v biases, RoPE on half of each head
    "glm4_moe": dict(_DEC, n_routed_experts=8, num_experts_per_tok=3, n_group=4, topk_group=2,
                     n_shared_experts=1, routed_scaling_factor=2.5, norm_topk_prob=True,
                     use_qk_norm=True),
    # q/k/v/o biases, windows by layer_types, two shared experts, weights not renormalised
    "dots1": dict(_DEC, n_routed_experts=6, num_experts_per_tok=2, n_shared_experts=2,
                  routed_scaling_factor=1.5, norm_topk_prob=False, sliding_window=5,
                  layer_types=[_S, _F, _S]),
}  # fmt: skip


def build(model_type: str, folder, **changes):
    """A random `model_type` checkpoint (MOE2's config updated by `changes`) saved in `folder`
    with a word tokenizer; returns the transformers model (eager attention and experts)."""
    return save_random(model_type, {**MOE2[model_type], **changes}, folder, _random_score_bias)


def _random_score_bias(m, scale: float = 0.3) -> None:
    """The score-correction bias, a buffer or parameter `randomise_` leaves at zero: random."""
    gen = torch.Generator().manual_seed(1)
    for name, b in [*m.named_buffers(), *m.named_parameters()]:
        if name.endswith("e_score_correction_bias"):
            b.copy_(torch.randn(b.shape, generator=gen) * scale)


@pytest.fixture(scope="module", params=list(MOE2))
def pair(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    ref = build(request.param, folder)
    return request.param, ref, qkv.load(folder), folder


def assert_routing_is_clear(model, ids, margin: float = 1e-4) -> None:
    """On every sparse layer of `model` for `ids`, in float64: the topk_group-th and next
    group scores differ by more than `margin`, and so do the k-th and (k+1)-th biased scores
    among the kept groups' experts (a near tie would let rounding choose another expert)."""

    def gaps_of(moe, logits):
        gaps = []
        s = torch.sigmoid(logits.double()) + moe.score_bias.double()  # (n e)
        g, tg = moe.n_group, moe.topk_group
        if g > 1:
            grouped = s.view(len(s), g, -1)
            top = grouped.topk(2, -1).values.sum(-1).sort(-1, descending=True).values  # (n g)
            if tg < g:
                gaps.append(float((top[:, tg - 1] - top[:, tg]).min()))
            keep = grouped.topk(2, -1).values.sum(-1).topk(tg, -1).indices
            mask = torch.zeros(len(s), g, dtype=torch.bool).scatter_(1, keep, True)
            s = grouped.masked_fill(~mask[..., None], -torch.inf).view(len(s), -1)
        s = s.sort(-1, descending=True).values
        k = moe.top_k
        if torch.isfinite(s[:, k]).all():
            gaps.append(float((s[:, k - 1] - s[:, k]).min()))
        return gaps

    assert_clear_routing(model, ids, gaps_of, margin)


def _router64(mod):
    """transformers' DeepSeek-V3 gate casts to float32 whatever the model's dtype; the float64
    oracle's gate is the same formula in float64."""

    def forward(h):
        logits = F.linear(h.reshape(-1, mod.hidden_dim), mod.weight)  # (n e)
        scores = logits.sigmoid()
        s = scores + mod.e_score_correction_bias
        g = s.view(len(s), mod.num_group, -1)
        keep = g.topk(2, -1)[0].sum(-1).topk(mod.topk_group, -1)[1]
        mask = torch.zeros(g.shape[:2], dtype=torch.bool).scatter_(1, keep, True)
        s = g.masked_fill(~mask[..., None], -torch.inf).view(len(s), -1)
        idx = s.topk(mod.top_k, -1)[1]
        w = scores.gather(1, idx)
        if mod.norm_topk_prob:
            w = w / (w.sum(-1, keepdim=True) + 1e-20)
        return logits, w * mod.routed_scaling_factor, idx

    return forward


def _oracle_(ref, model):
    float64_oracle_(ref, model)
    for mod in ref.modules():
        if type(mod).__name__.endswith("TopkRouter"):
            mod.forward = _router64(mod)


# --------------------------------------------------------------------------------------------
# parity


def test_the_models_are_read_with_their_peculiarities(pair):
    mt, _, model, _ = pair
    c = model.config
    assert [isinstance(b.mlp, SparseMoE) for b in model.blocks] == [False, True, True]
    assert isinstance(model.blocks[0].mlp, MLP) and model.blocks[0].mlp.up.out_features == 37
    moe = model.blocks[1].mlp
    assert moe.scoring == "sigmoid" and moe.shared_gate is None and moe.score_bias.abs().sum() > 0
    assert c.qk_norm and c.attn_bias
    if mt == "glm4_moe":
        assert (moe.top_k, moe.n_group, moe.topk_group, moe.scale) == (3, 4, 2, 2.5)
        assert moe.normalise and moe.shared.up.out_features == 23
        assert c.rope_dim == 6 and not c.rope_interleaved and not c.out_bias
        assert c.windows is None
    else:
        assert (moe.top_k, moe.n_group, moe.scale, moe.normalise) == (2, 1, 1.5, False)
        assert moe.shared.up.out_features == 46
        assert c.rope_dim is None and c.out_bias and c.windows == (5, None, 5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_logits_match_transformers(pair, dtype, monkeypatch):
    mt, ref, model, _ = pair
    ids = torch.cat([ids_for(0), ids_for(1)])
    assert_routing_is_clear(model, ids)
    err = output_error(ref, model, ids, dtype, monkeypatch, _oracle_)
    assert err <= REL_TOL[dtype], f"{mt} {dtype}: relative error {err:.2e}"


def test_greedy_tokens_with_and_without_the_cache(pair):
    _, ref, model, _ = pair
    prompt = ids_for(5, 7)
    assert_routing_is_clear(model, prompt)
    ref.generation_config.eos_token_id = None
    want, cached, uncached = greedy_three_ways(ref, model, prompt, N_GREEDY)
    assert cached == uncached == want


# --------------------------------------------------------------------------------------------
# each peculiarity matters


_ROUTING_BREAKS = {
    "no score bias": _each_moe(lambda m: torch.nn.init.zeros_(m.score_bias)),
    "softmax scores": _each_moe(lambda m: setattr(m, "scoring", "softmax")),
    "no shared expert": _each_moe(lambda m: setattr(m, "shared", None)),
    "normalise flipped": _each_moe(lambda m: setattr(m, "normalise", not m.normalise)),
    "no routed scaling": _each_moe(lambda m: setattr(m, "scale", 1.0)),
    "no qk-norm": _each_attn(lambda a: setattr(a, "q_norm", None) or setattr(a, "k_norm", None)),
    "no q/k/v biases": _each_attn(lambda a: torch.nn.init.zeros_(a.b_K)),
}


def test_each_glm4_moe_peculiarity_breaks_parity(tmp_path):
    ref = build("glm4_moe", tmp_path)
    assert _error(qkv.load(tmp_path), ref) <= TOL
    _breaks(tmp_path, ref, {
        **_ROUTING_BREAKS,
        "no expert groups": _each_moe(
            lambda m: setattr(m, "n_group", 1) or setattr(m, "topk_group", 1)),
    })  # fmt: skip
    params = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 1.0}
    _edit_config(tmp_path, rope_parameters=params)  # all of each head rotated
    assert qkv.load(tmp_path).config.rope_dim is None
    assert _error(qkv.load(tmp_path), ref) > 100 * TOL


def test_each_dots1_peculiarity_breaks_parity(tmp_path):
    ref = build("dots1", tmp_path)
    assert _error(qkv.load(tmp_path), ref) <= TOL
    _breaks(tmp_path, ref, {
        **_ROUTING_BREAKS,
        "no o bias": _each_attn(lambda a: torch.nn.init.zeros_(a.b_O)),
        "no window": _each_attn(lambda a: setattr(a, "window", None)),
    })  # fmt: skip


@pytest.mark.parametrize(("first", "sparse"), [(0, [True] * 3), (2, [False, False, True]),
                                                (3, [False] * 3)])  # fmt: skip
def test_first_k_dense_replace_layers(tmp_path, first, sparse):
    ref = build("glm4_moe", tmp_path, first_k_dense_replace=first)
    model = qkv.load(tmp_path)
    assert [isinstance(b.mlp, SparseMoE) for b in model.blocks] == sparse
    assert (model.config.moe is None) == (not any(sparse))
    assert _error(model, ref) <= TOL


def test_the_mtp_layer_is_ignored_as_transformers_ignores_it(tmp_path):
    """GLM-4.5-Air's files hold its multi-token-prediction layer as layers.46 (GLM-4.5's as
    layers.92); transformers skips those keys, so do we; any other stray layer is unexpected."""
    ref = build("glm4_moe", tmp_path)
    w = load_file(tmp_path / "model.safetensors")
    w["model.layers.46.eh_proj.weight"] = torch.zeros(60, 120)
    w["model.layers.46.mlp.experts.0.up_proj.weight"] = torch.zeros(23, 60)
    save_file(w, tmp_path / "model.safetensors")
    model = qkv.load(tmp_path)
    assert sorted(model.load_report.ignored) == [
        "layers.46.eh_proj.weight", "layers.46.mlp.experts.0.up_proj.weight"
    ]  # fmt: skip
    assert _error(model, ref) <= TOL
    w["model.layers.45.eh_proj.weight"] = torch.zeros(60, 120)
    save_file(w, tmp_path / "model.safetensors")
    with pytest.raises(
        ValueError, match=r"holds 1 tensor .*: 'model\.layers\.45\.eh_proj\.weight'"
    ):
        qkv.load(tmp_path)


# --------------------------------------------------------------------------------------------
# bad configs: one clear error naming the key


@pytest.mark.parametrize(
    ("mt", "changes", "match"),
    [
        ("glm4_moe", {"n_group": 3}, r"n_group=3 must divide n_experts=8 into equal groups"),
        ("glm4_moe", {"topk_group": 5}, r"topk_group=5 exceeds n_group=4"),
        ("glm4_moe", {"topk_group": 1, "num_experts_per_tok": 3},
         r"top_k=3 exceeds the 2 experts of topk_group=1 groups of 2"),
        ("glm4_moe", {"n_shared_experts": 0}, r"n_shared_experts must be an int ≥ 1, got 0"),
        ("glm4_moe", {"routed_scaling_factor": 0},
         r"routed_scaling_factor must be a number > 0, got 0"),
        ("glm4_moe", {"rope_parameters": {"rope_type": "default", "rope_theta": 1e4,
                                          "partial_rotary_factor": 0.25}},
         r"partial_rotary_factor=0.25 of head_dim=12 must rotate an even number"),
        ("glm4_moe", {"num_key_value_heads": None},
         r"glm4_moe with num_key_value_heads=null is not supported"),
        ("dots1", {"n_routed_experts": None}, r"n_routed_experts must be an int ≥ 1, got None"),
        ("dots1", {"num_experts_per_tok": None},
         r"num_experts_per_tok must be an int ≥ 1, got None"),
        ("dots1", {"layer_types": None, "max_window_layers": 1},
         r"dots1 with sliding layers without layer_types"),
    ],
)  # fmt: skip
def test_bad_config_is_named(tmp_path, mt, changes, match):
    build(mt, tmp_path)
    _edit_config(tmp_path, **changes)
    with pytest.raises(ValueError, match=match) as info:
        qkv.load(tmp_path)
    assert str(info.value).startswith(str(tmp_path / "config.json"))


@pytest.mark.parametrize("mt", list(MOE2))
def test_architectures_without_model_type_find_the_family(tmp_path, mt):
    ref = build(mt, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text(encoding="utf-8"))
    del cfg["model_type"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert qkv.load(tmp_path).config.moe.scoring == "sigmoid"
    assert _error(qkv.load(tmp_path), ref) <= TOL
