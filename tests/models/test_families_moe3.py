"""The shared-expert MoE families (`families_moe3.py`: ernie4_5_moe, hunyuan_v1_moe,
granitemoeshared) against transformers, as tests/models/test_families_moe2.py does: a tiny
random checkpoint per model_type (AutoConfig.for_model → from_config → save_pretrained) loaded
with `qkv.load`; logits in float32 and float64, a right-padded batch, lens rows vs
output_attentions, 20 greedy tokens with and without the KV cache; then each peculiarity
switched off breaks parity, the sparse-layer layout, the layers without a shared expert, the
MTP tensors ignored, bad configs named.

Tiny and awkward: d_model 60, 6 query heads over 2 kv heads, three layers. ERNIE: head_dim 12
≠ 60/6, RoPE base 100 in interleaved pairs, top 3 of 8 experts of width 23 chosen by softmax +
a random score-correction bias (0.05, the scale of the 1/8 probabilities, so both decide), two
shared experts, the first layer dense, and moe_norm_min 0.9 (the renormalising sum clamped: it
acts on about half the tokens here). Hunyuan: head_dim 14, q/k/v/o biases, top 3 of 8, experts
and shared MLP 37 wide. GraniteMoeShared: Granite's multipliers, top 2 of 6 logits, a shared MLP
19 wide. `assert_routing_is_clear` checks on the very inputs compared that no choice is within
rounding of the cut.
"""

import functools
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
from tests.models.test_families_dense import _half_split, _no_qk_norm
from tests.models.test_families_dense3 import _ernie_rotate64
from tests.models.test_families_dense4 import _interleave, _norm_before_rope
from tests.models.test_families_extra import _granite_router64
from tests.models.test_families_moe2 import _random_score_bias
from tests.models.test_families_more import (
    _breaks,
    _each_block,
    _each_moe,
    _edit_config,
    _error,
    _sparse,
    assert_clear_routing,
)

transformers = pytest.importorskip("transformers", reason="transformers is the parity oracle")

TOL = REL_TOL[torch.float32]
_DEC = dict(DECODER, num_hidden_layers=3, pad_token_id=0, bos_token_id=0, eos_token_id=0)
MOE3 = {
    # interleaved RoPE, softmax + score bias for the choice, norm_min clamp, 2 shared experts,
    # layer 0 dense
    "ernie4_5_moe": dict(_DEC, head_dim=12, rope_theta=100.0, moe_num_experts=8, moe_k=3,
                         moe_intermediate_size=23, moe_num_shared_experts=2,
                         moe_layer_start_index=1, moe_norm_min=0.9),
    # QK-norm after RoPE, q/k/v/o biases, an ungated shared MLP as wide as the experts
    "hunyuan_v1_moe": dict(_DEC, head_dim=14, rope_theta=100.0, attention_bias=True,
                           num_experts=8, moe_topk=3),
    # Granite's multipliers, top-k logits then softmax, a shared MLP of its own width
    "granitemoeshared": dict(_DEC, num_local_experts=6, num_experts_per_tok=2,
                             shared_intermediate_size=19, embedding_multiplier=3.0,
                             residual_multiplier=0.4, attention_multiplier=0.05,
                             logits_scaling=2.5),
}  # fmt: skip


def build(model_type: str, folder, **changes):
    """A random `model_type` checkpoint (MOE3's config updated by `changes`) saved in `folder`
    with a word tokenizer; returns the transformers model (eager attention and experts)."""
    # the score bias on the scale of the softmax scores it is added to
    bias = functools.partial(_random_score_bias, scale=0.05)
    return save_random(model_type, {**MOE3[model_type], **changes}, folder, bias)


@pytest.fixture(scope="module", params=list(MOE3))
def pair(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    ref = build(request.param, folder)
    return request.param, ref, qkv.load(folder), folder


def assert_routing_is_clear(model, ids, margin: float = 1e-4) -> None:
    """On every sparse layer of `model` for `ids`, in float64: the k-th and (k+1)-th choice
    scores differ by more than `margin` (softmax + score bias, or the logits themselves under
    topk_softmax); a near tie would let rounding choose another expert."""

    def gaps_of(moe, logits):
        s = logits.double()  # (n e)
        if moe.order == "softmax_topk":
            s = torch.softmax(s, -1)
            if moe.score_bias is not None:
                s = s + moe.score_bias.double()
        s = s.sort(-1, descending=True).values
        return [float((s[:, moe.top_k - 1] - s[:, moe.top_k]).min())]

    assert_clear_routing(model, ids, gaps_of, margin)


def _ernie_router64(mod):
    """ERNIE's router (float32 logits and softmax whatever the model's dtype) in float64: the
    top k of softmax + bias, the unbiased softmax weights / clamp(Σ, moe_norm_min)."""

    def forward(h):
        logits = F.linear(h, mod.weight)  # (n e)
        p = torch.softmax(logits, -1)
        idx = torch.topk(p + mod.moe_statics.e_score_correction_bias[0], mod.top_k, -1).indices
        w = p.gather(-1, idx)
        return logits, w / w.sum(-1, keepdim=True).clamp(min=mod.norm_min), idx

    return forward


def _oracle_(ref, model, monkeypatch):
    float64_oracle_(ref, model)  # half-split RoPE tables, RMSNorm
    for mod in ref.modules():
        kind = type(mod).__name__
        if kind == "Ernie4_5_MoeTopKRouter":
            mod.forward = _ernie_router64(mod)
        if kind == "GraniteMoeSharedTopKRouter":  # `logits.float()`
            mod.forward = _granite_router64(mod)
    from transformers.models.ernie4_5_moe import modeling_ernie4_5_moe

    monkeypatch.setattr(modeling_ernie4_5_moe, "apply_rotary_pos_emb", _ernie_rotate64)


def _share_below_norm_min(model, ids) -> float:
    """The share of tokens whose chosen experts' softmax weights (first sparse layer) sum to
    less than its norm_min: those the clamp acts on."""
    moe, sums = _sparse(model)[0], []

    def hook(router, args, logits):
        p = torch.softmax(logits.double(), -1)  # (n e)
        idx = torch.topk(p + moe.score_bias.double(), moe.top_k, -1).indices
        sums.append(p.gather(-1, idx).sum(-1))

    handle = moe.router.register_forward_hook(hook)
    try:
        with torch.no_grad():
            model(ids)
    finally:
        handle.remove()
    return float((sums[0] < moe.norm_min).double().mean())


# --------------------------------------------------------------------------------------------
# parity


def test_the_models_are_read_with_their_peculiarities(pair):
    mt, _, model, _ = pair
    c = model.config
    moe = _sparse(model)[0]
    assert moe.shared_gate is None and moe.shared is not None
    if mt == "ernie4_5_moe":
        assert [isinstance(b.mlp, SparseMoE) for b in model.blocks] == [False, True, True]
        assert isinstance(model.blocks[0].mlp, MLP) and model.blocks[0].mlp.up.out_features == 37
        assert (moe.top_k, moe.normalise, moe.norm_min, moe.scoring) == (3, True, 0.9, "softmax")
        assert moe.score_bias.shape == (8,) and moe.score_bias.abs().sum() > 0
        assert moe.experts[0].up.out_features == 23 and moe.shared.up.out_features == 46
        assert c.rope_interleaved and c.d_head == 12 and model.lm_head is None  # tied
        # the clamp acts on some tokens here and not on others: parity checks both
        assert 0.2 < _share_below_norm_min(model, ids_for(0)) < 0.8
        assert not (c.attn_bias or c.out_bias or c.qk_norm)
    elif mt == "hunyuan_v1_moe":
        assert len(_sparse(model)) == 3 and (moe.top_k, moe.normalise) == (3, True)
        assert moe.score_bias is None and moe.norm_min == 0.0
        assert moe.experts[0].up.out_features == moe.shared.up.out_features == 37
        assert c.qk_norm and c.qk_norm_after_rope and c.attn_bias and c.out_bias
        assert not c.rope_interleaved and model.lm_head is not None
    else:
        assert len(_sparse(model)) == 3
        assert (moe.top_k, moe.order, len(moe.experts)) == (2, "topk_softmax", 6)
        assert moe.shared.up.out_features == 19 and moe.experts[0].up.out_features == 37
        assert (c.embed_scale, c.residual_scale, c.attn_scale) == (3.0, 0.4, 0.05)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_logits_match_transformers(pair, dtype, monkeypatch):
    mt, ref, model, _ = pair
    ids = torch.cat([ids_for(0), ids_for(1)])
    assert_routing_is_clear(model, ids)

    def oracle_(ref, model):
        _oracle_(ref, model, monkeypatch)

    err = output_error(ref, model, ids, dtype, monkeypatch, oracle_)
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


def _swap_shared_gate_and_up(moe):
    moe.shared.gate, moe.shared.up = moe.shared.up, moe.shared.gate


_NO_SHARED = _each_moe(lambda m: setattr(m, "shared", None))


def test_each_ernie4_5_moe_peculiarity_breaks_parity(tmp_path):
    ref = build("ernie4_5_moe", tmp_path)
    assert _error(qkv.load(tmp_path), ref) <= TOL
    _breaks(tmp_path, ref, {
        "no score bias": _each_moe(lambda m: torch.nn.init.zeros_(m.score_bias)),
        "no moe_norm_min clamp": _each_moe(lambda m: setattr(m, "norm_min", 0.0)),
        "no shared experts": _NO_SHARED,
        "shared gate and up swapped": _each_moe(_swap_shared_gate_and_up),
        "half-split RoPE pairs": _half_split,
    })  # fmt: skip


def test_each_hunyuan_v1_moe_peculiarity_breaks_parity(tmp_path):
    ref = build("hunyuan_v1_moe", tmp_path)
    assert _error(qkv.load(tmp_path), ref) <= TOL
    _breaks(tmp_path, ref, {
        "no shared MLP": _NO_SHARED,
        "weights not renormalised": _each_moe(lambda m: setattr(m, "normalise", False)),
        "QK-norm before RoPE": _each_block(_norm_before_rope),
        "no QK-norm": _each_block(_no_qk_norm),
        "no k bias": _each_block(lambda b: torch.nn.init.zeros_(b.attn.b_K)),
        "no o bias": _each_block(lambda b: torch.nn.init.zeros_(b.attn.b_O)),
        "interleaved pairs": _interleave,
    })  # fmt: skip


def test_each_granitemoeshared_peculiarity_breaks_parity(tmp_path):
    ref = build("granitemoeshared", tmp_path)
    assert _error(qkv.load(tmp_path), ref) <= TOL
    _breaks(tmp_path, ref, {
        "no shared MLP": _NO_SHARED,
        "shared gate and up swapped": _each_moe(_swap_shared_gate_and_up),
        "softmax over every expert, not renormalised": _each_moe(
            lambda m: setattr(m, "order", "softmax_topk") or setattr(m, "normalise", False)),
        "no residual_multiplier": _each_block(lambda b: setattr(b, "residual_scale", 1.0)),
    })  # fmt: skip


@pytest.mark.parametrize(
    ("start", "end", "every", "sparse"),
    [(0, -1, 1, [True] * 4), (1, 2, 1, [False, True, True, False]),
     (0, -1, 2, [False, True, False, True]), (4, -1, 1, [False] * 4)],
)  # fmt: skip
def test_ernie4_5_moe_sparse_layers(tmp_path, start, end, every, sparse):
    ref = build("ernie4_5_moe", tmp_path, num_hidden_layers=4, moe_layer_start_index=start,
                moe_layer_end_index=end, moe_layer_interval=every)  # fmt: skip
    model = qkv.load(tmp_path)
    assert [isinstance(b.mlp, SparseMoE) for b in model.blocks] == sparse
    assert (model.config.moe is None) == (not any(sparse))
    assert _error(model, ref) <= TOL


@pytest.mark.parametrize(
    ("mt", "changes"),
    [("ernie4_5_moe", {"moe_num_shared_experts": 0}),
     ("granitemoeshared", {"shared_intermediate_size": 0})],
)  # fmt: skip
def test_without_a_shared_expert(tmp_path, mt, changes):
    """No shared expert (transformers builds none): none read, none expected."""
    ref = build(mt, tmp_path, **changes)
    model = qkv.load(tmp_path)
    assert all(m.shared is None for m in _sparse(model))
    assert _error(model, ref) <= TOL


def test_hunyuan_moe_topk_list_naming_one_k(tmp_path):
    """A per-layer moe_topk (Hunyuan-A13B's config.json has one) that names one k is read."""
    ref = build("hunyuan_v1_moe", tmp_path, moe_topk=[3, 3, 3])
    model = qkv.load(tmp_path)
    assert [m.top_k for m in _sparse(model)] == [3, 3, 3]
    assert _error(model, ref) <= TOL


def test_hunyuan_moe_ntk_alpha_rope_is_a_fixed_base(tmp_path):
    """Hunyuan-A13B's RoPE: "dynamic" with an alpha, base θ·alpha^(d/(d−2)) at every length;
    transformers reads the edited config.json itself (the oracle)."""
    build("hunyuan_v1_moe", tmp_path)
    _edit_config(tmp_path, rope_parameters={"rope_type": "dynamic", "alpha": 1000.0,
                                            "factor": 1.0, "rope_theta": 100.0})  # fmt: skip
    ref = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, attn_implementation="eager", experts_implementation="eager"
    ).eval()
    model = qkv.load(tmp_path)
    assert model.config.rope_base == pytest.approx(100.0 * 1000.0 ** (14 / 12), rel=1e-12)
    assert _error(model, ref) <= TOL
    _edit_config(tmp_path, rope_parameters={"rope_type": "default", "rope_theta": 100.0})
    assert _error(qkv.load(tmp_path), ref) > 100 * TOL


def test_the_mtp_tensors_are_ignored_as_transformers_ignores_them(tmp_path):
    """ERNIE 4.5's files hold a multi-token-prediction block; transformers skips keys with
    "mtp", so do we; any other stray tensor is unexpected."""
    ref = build("ernie4_5_moe", tmp_path)
    w = load_file(tmp_path / "model.safetensors")
    w["model.mtp_block.0.mlp.up_proj.weight"] = torch.zeros(37, 60)
    w["model.mtp_linear_proj.0.weight"] = torch.zeros(60, 120)
    save_file(w, tmp_path / "model.safetensors")
    model = qkv.load(tmp_path)
    assert sorted(model.load_report.ignored) == [
        "mtp_block.0.mlp.up_proj.weight", "mtp_linear_proj.0.weight"]  # fmt: skip
    assert _error(model, ref) <= TOL
    w["model.extra_proj.weight"] = torch.zeros(60, 120)
    save_file(w, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"holds 1 tensor .*: 'model\.extra_proj\.weight'"):
        qkv.load(tmp_path)


# --------------------------------------------------------------------------------------------
# bad configs: one clear error naming the key


@pytest.mark.parametrize(
    ("mt", "drop", "changes", "match"),
    [
        ("ernie4_5_moe", (), {"use_bias": True}, r"ernie4_5_moe with use_bias \(biases on every"),
        ("ernie4_5_moe", (), {"num_key_value_heads": None},
         r"ernie4_5_moe with num_key_value_heads=null is not supported"),
        ("ernie4_5_moe", (), {"moe_layer_interval": 0},
         r"moe_layer_interval must be an int ≥ 1, got 0"),
        ("ernie4_5_moe", (), {"moe_k": 9},
         r"moe_num_experts=8, moe_k=9: top_k=9 exceeds n_experts=8"),
        ("ernie4_5_moe", (), {"moe_norm_min": -1.0},
         r"moe_norm_min must be a number ≥ 0, got -1"),
        ("ernie4_5_moe", (), {"moe_num_shared_experts": -1},
         r"moe_num_shared_experts must be an int ≥ 0, got -1"),
        ("hunyuan_v1_moe", (), {"moe_topk": [3, 2, 3]},
         r"moe_topk=\[3, 2, 3\] must give one value for all 3 layers"),
        ("hunyuan_v1_moe", (), {"num_experts": [8, 8, 8]},
         r"hunyuan_v1_moe with a num_experts list is not supported"),
        ("hunyuan_v1_moe", ("head_dim",), {}, r"hunyuan_v1_moe with no head_dim"),
        ("hunyuan_v1_moe", (), {"moe_topk": 0}, r"moe_topk must be an int ≥ 1, got 0"),
        ("granitemoeshared", (), {"shared_intermediate_size": -1},
         r"shared_intermediate_size must be an int ≥ 0, got -1"),
    ],
)  # fmt: skip
def test_bad_config_is_named(tmp_path, mt, drop, changes, match):
    build(mt, tmp_path)
    _edit_config(tmp_path, drop=drop, **changes)
    with pytest.raises(ValueError, match=match) as info:
        qkv.load(tmp_path)
    assert str(info.value).startswith(str(tmp_path / "config.json"))


@pytest.mark.parametrize("mt", list(MOE3))
def test_architectures_without_model_type_find_the_family(tmp_path, mt):
    ref = build(mt, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text(encoding="utf-8"))
    del cfg["model_type"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    model = qkv.load(tmp_path)
    assert all(m.shared is not None for m in _sparse(model))
    assert _error(model, ref) <= TOL
