"""The families of `families_extra.py` (Cohere 2, GraniteMoE, OLMo 1, Arcee) against
transformers, as tests/models/test_families.py does for the others: a tiny random checkpoint
per family (AutoConfig.for_model → from_config → save_pretrained), loaded with
`qkv.load(folder)`, logits in float32 and float64, a right-padded batch, lens rows vs
`output_attentions=True`, and 20 greedy tokens with and without the KV cache. Then each
family's peculiarity, switched off or done another way, breaks parity; other config spellings
give the same model; what a family cannot honour is a named error.

Sizes as test_families': d_model 60, 6 query heads over 2 kv heads, d_head 10, d_ff 37,
vocabulary 97; Cohere 2 with four layers, sliding (window 5, RoPE base 100) and global (NoPE)
alternating; GraniteMoE with 4 experts, top 2; OLMo with clip_qkv 0.8 (a fifth or more of the
q, k, v features clamped here).
"""

import dataclasses
import functools
import json

import pytest
import torch
import torch.nn.functional as F

import qkv
from qkv.models.decoder import DecoderConfig
from qkv.nn import ParallelBlock
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
    rel,
    save_random,
)
from tests.models.test_families_dense import _angles, _cohere_rotate64, _half_split
from tests.models.test_families_moe import assert_routing_is_clear
from tests.models.test_families_more import (
    _breaks,
    _each_block,
    _each_moe,
    _edit_config,
    _error,
    _sparse,
)

transformers = pytest.importorskip("transformers", reason="transformers is the parity oracle")

TOL = REL_TOL[torch.float32]
_DEC = dict(DECODER, pad_token_id=0, bos_token_id=0, eos_token_id=0)  # test_families' tiny decoder
_SLIDING, _FULL = "sliding_attention", "full_attention"
EXTRA = {
    # bias-free LayerNorm, parallel block, interleaved RoPE (base 100) on the sliding layers
    # (0, 2; window 5) and none on the global ones (1, 3), q/k/v/o biases, logits × 0.5
    "cohere2": dict(_DEC, num_hidden_layers=4, sliding_window=5, rope_theta=100.0,
                    attention_bias=True, logit_scale=0.5,
                    layer_types=[_SLIDING, _FULL, _SLIDING, _FULL]),
    # embeddings × 3, sublayer outputs × 0.4, scores × 0.05, logits ÷ 2.5; 4 experts, top 2
    "granitemoe": dict(_DEC, num_local_experts=4, num_experts_per_tok=2,
                       embedding_multiplier=3.0, residual_multiplier=0.4,
                       attention_multiplier=0.05, logits_scaling=2.5),
    # LayerNorm without parameters, q/k/v clamped to ±0.8, q/k/v/o biases
    "olmo": dict(_DEC, clip_qkv=0.8, attention_bias=True),
    # plain relu² MLP with biases
    "arcee": dict(_DEC, mlp_bias=True),
}  # fmt: skip


def build(model_type: str, folder, *, changes: dict | None = None):
    """A random `model_type` checkpoint (EXTRA's config updated by `changes`) saved in `folder`
    with a word tokenizer; returns the transformers model (eager attention and experts)."""
    return save_random(model_type, {**EXTRA[model_type], **(changes or {})}, folder)


@pytest.fixture(scope="module", params=list(EXTRA))
def pair(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    ref = build(request.param, folder)
    return request.param, ref, qkv.load(folder)


# --------------------------------------------------------------------------------------------
# a float64 oracle: transformers' float32 islands done in float64, by formulas written here


def _granite_router64(mod):
    """GraniteMoE's router (`logits.float()`), in float64: the top k logits, their softmax."""

    def forward(h):
        logits = F.linear(h, mod.weight)  # (n e)
        top, idx = torch.topk(logits, mod.top_k, -1)
        return logits, torch.softmax(top, -1), idx

    return forward


def _layer_norm64(h, eps):
    """(h − mean) / √(var + eps) over the last dim, written out (qkv uses nn.LayerNorm)."""
    c = h - h.mean(-1, keepdim=True)
    return c * torch.rsqrt(c.pow(2).mean(-1, keepdim=True) + eps)


def extra_float64_oracle_(name: str, ref, model, monkeypatch) -> None:
    c = model.config
    if name != "cohere2":
        float64_oracle_(ref, model)  # half-split RoPE tables, RMSNorm
    for mod in ref.modules():
        kind = type(mod).__name__
        if kind == "GraniteMoeTopKRouter":
            mod.forward = _granite_router64(mod)
        if kind == "OlmoLayerNorm":  # (h − mean) / √(var + 1e-5), nothing learned
            mod.forward = lambda h: _layer_norm64(h, 1e-5)
        if kind == "Cohere2RotaryEmbedding":  # each angle on both features of its pair
            mod.forward = lambda x, position_ids: (
                _angles(position_ids, c.d_head, c.rope_base).repeat_interleave(2, -1).cos(),
                _angles(position_ids, c.d_head, c.rope_base).repeat_interleave(2, -1).sin(),
            )
        if kind == "Cohere2LayerNorm":  # (h − mean) / √(var + eps) · w
            mod.forward = lambda h, m=mod: m.weight * _layer_norm64(h, m.variance_epsilon)
    if name == "cohere2":
        from transformers.models.cohere2 import modeling_cohere2

        monkeypatch.setattr(modeling_cohere2, "apply_rotary_pos_emb", _cohere_rotate64)


# --------------------------------------------------------------------------------------------
# parity


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_logits_match_transformers(pair, dtype, monkeypatch):
    name, ref, model = pair
    ids = torch.cat([ids_for(0), ids_for(1)])  # a batch of two
    if name == "granitemoe":
        assert_routing_is_clear(model, ids)
    oracle_ = functools.partial(extra_float64_oracle_, name, monkeypatch=monkeypatch)
    err = output_error(ref, model, ids, dtype, monkeypatch, oracle_)
    assert err <= REL_TOL[dtype], f"{name} {dtype}: relative error {err:.2e}"


def test_greedy_tokens_with_and_without_the_cache(pair):
    name, ref, model = pair
    prompt = ids_for(5, 7)
    if name == "granitemoe":
        assert_routing_is_clear(model, prompt)
    ref.generation_config.eos_token_id = None  # no end token: 20 picks, none suppressed
    want, cached, uncached = greedy_three_ways(ref, model, prompt, N_GREEDY)
    assert cached == uncached == want


# --------------------------------------------------------------------------------------------
# each peculiarity matters


def _set_config(**changes):
    return lambda m: setattr(m, "config", dataclasses.replace(m.config, **changes))


def test_cohere2_rope_only_on_sliding_layers_and_what_breaks_parity(tmp_path):
    ref = build("cohere2", tmp_path)
    model = qkv.load(tmp_path)
    blocks = model.blocks
    assert [b.attn.rope is None for b in blocks] == [False, True, False, True]
    assert [b.attn.window for b in blocks] == [(4, 0), None, (4, 0), None]
    rope = blocks[0].attn.rope
    assert rope.interleaved and rope.rotary_dim == 10 and rope.base == 100.0
    assert all(isinstance(b, ParallelBlock) and b.norm2 is None for b in blocks)
    assert blocks[0].norm1.bias is None and model.config.logit_scale == 0.5
    assert _error(model, ref) <= TOL

    def rope_everywhere(m):
        for b in m.blocks:
            b.attn.rope = m.blocks[0].attn.rope

    def rope_nowhere(m):
        for b in m.blocks:
            b.attn.rope = None

    _breaks(tmp_path, ref, {
        "RoPE on the global layers": rope_everywhere,
        "no RoPE on the sliding layers": rope_nowhere,
        "no window": _each_block(lambda b: setattr(b.attn, "window", None)),
        "half-split pairs": _half_split,
        "no logit_scale": _set_config(logit_scale=1.0),
    })  # fmt: skip


def test_cohere2_without_layer_types_reads_the_pattern(tmp_path):
    """Older configs: sliding_window_pattern p, every p-th layer global (transformers' BC)."""
    ref = build("cohere2", tmp_path)  # layers 1 and 3 global: the pattern 2
    _edit_config(tmp_path, drop=("layer_types",), sliding_window_pattern=2)
    model = qkv.load(tmp_path)
    assert model.config.rope_layers == (True, False, True, False)
    assert _error(model, ref) <= TOL
    _edit_config(tmp_path, drop=("sliding_window_pattern",))  # transformers' default: 4
    c = qkv.load(tmp_path).config
    assert c.rope_layers == (True, True, True, False) and c.windows == (5, 5, 5, None)


def _swap_gate_and_up(moe):
    for e in moe.experts:
        e.gate, e.up = e.up, e.gate


def test_granitemoe_routing_experts_and_multipliers_matter(tmp_path):
    ref = build("granitemoe", tmp_path)
    model = qkv.load(tmp_path)
    c = model.config
    assert (c.embed_scale, c.residual_scale, c.attn_scale, c.logit_scale) == (3.0, 0.4, 0.05, 0.4)
    assert [(m.top_k, m.normalise, m.order, len(m.experts)) for m in _sparse(model)] == [
        (2, True, "topk_softmax", 4)
    ] * 2
    assert model.blocks[0].mlp.experts[0].up.weight.shape == (37, 60)
    assert_routing_is_clear(model, ids_for(9))
    assert _error(model, ref) <= TOL
    _breaks(tmp_path, ref, {
        "top-(k-1)": _each_moe(lambda m: setattr(m, "top_k", 1)),
        "softmax over every expert, not renormalised": _each_moe(
            lambda m: setattr(m, "order", "softmax_topk") or setattr(m, "normalise", False)),
        "experts in reverse order": _each_moe(
            lambda m: setattr(m, "experts", type(m.experts)(m.experts[::-1]))),
        "gate and up rows swapped": _each_moe(_swap_gate_and_up),
        "no residual_multiplier": _each_block(lambda b: setattr(b, "residual_scale", 1.0)),
        "no embedding_multiplier": _set_config(embed_scale=1.0),
        "no logits_scaling": _set_config(logit_scale=1.0),
        "1/√d for attention_multiplier": _each_block(
            lambda b: setattr(b.attn, "scale", 10**-0.5)),
    })  # fmt: skip


def test_granitemoe_fused_expert_names_are_reported(tmp_path):
    """transformers 5's in-memory names (experts.gate_up_proj) are not what save_pretrained
    writes; a file holding them is a strict missing / unexpected report."""
    from safetensors.torch import load_file, save_file

    build("granitemoe", tmp_path)
    w = load_file(tmp_path / "model.safetensors")
    p = "model.layers.0.block_sparse_moe."
    w[p + "experts.gate_up_proj"] = w.pop(p + "input_linear.weight")
    save_file(w, tmp_path / "model.safetensors")
    with pytest.raises(  # the file's one input_linear, not qkv's 8 per-expert halves
        ValueError,
        match=rf"lacks tensor '{p}input_linear\.weight' .*\(1 missing; it also holds 1 tensor "
        rf".*: '{p}experts\.gate_up_proj'",
    ):
        qkv.load(tmp_path)


def test_olmo_clamp_and_parameter_free_norm_matter(tmp_path):
    ref = build("olmo", tmp_path)
    model = qkv.load(tmp_path)
    blk = model.blocks[0]
    assert blk.attn.clip == 0.8 and blk.attn.b_O is not None
    assert isinstance(blk.norm1, torch.nn.LayerNorm) and blk.norm1.weight is None
    assert blk.norm1.bias is None and model.norm.weight is None and blk.norm1.eps == 1e-5
    assert _error(model, ref) <= TOL

    def rms_norms(m):  # no mean subtracted
        for b in m.blocks:
            b.norm1, b.norm2 = qkv.nn.RMSNorm(60, 1e-5), qkv.nn.RMSNorm(60, 1e-5)
            torch.nn.init.ones_(b.norm1.weight), torch.nn.init.ones_(b.norm2.weight)

    _breaks(tmp_path, ref, {
        "no clamp": _each_block(lambda b: setattr(b.attn, "clip", None)),
        "clamped at 1.6": _each_block(lambda b: setattr(b.attn, "clip", 1.6)),
        "RMSNorm for LayerNorm": rms_norms,
    })  # fmt: skip


def test_olmo_without_clip_matches(tmp_path):
    ref = build("olmo", tmp_path, changes={"clip_qkv": None, "attention_bias": False})
    model = qkv.load(tmp_path)
    assert model.blocks[0].attn.clip is None and model.blocks[0].attn.b_Q is None
    assert _error(model, ref) <= TOL


def test_arcee_relu_squared_plain_mlp_matters(tmp_path):
    ref = build("arcee", tmp_path)
    model = qkv.load(tmp_path)
    mlp = model.blocks[0].mlp
    assert model.config.act == "relu2" and not model.config.gated and mlp.up.bias is not None
    assert _error(model, ref) <= TOL
    _breaks(tmp_path, ref, {
        "relu, not squared": _each_block(lambda b: setattr(b.mlp, "act", F.relu)),
        "no MLP biases": _each_block(lambda b: torch.nn.init.zeros_(b.mlp.up.bias)),
    })  # fmt: skip


@pytest.mark.parametrize("mt", list(EXTRA))
def test_architectures_without_model_type_find_the_family(tmp_path, mt):
    """A config without model_type is read by its `architectures` class: Cohere2ForCausalLM
    is not Cohere's, GraniteMoeForCausalLM not Granite's, OlmoForCausalLM not OLMo 2's."""
    ref = build(mt, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text(encoding="utf-8"))
    del cfg["model_type"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert _error(qkv.load(tmp_path), ref) <= TOL


# --------------------------------------------------------------------------------------------
# bad configs: one clear error naming the key


@pytest.mark.parametrize(
    ("mt", "changes", "match"),
    [
        ("cohere2", {"sliding_window": None}, r"cohere2 with sliding_window=null is not"),
        ("cohere2", {"layer_types": [_SLIDING, _FULL]},
         r"layer_types must list 'sliding_attention' or 'full_attention' for each of the 4"),
        ("cohere2", {"layer_types": [_SLIDING, _FULL, "chunked_attention", _FULL]},
         r"layer_types must list"),
        ("granitemoe", {"num_experts_per_tok": 5},
         r"num_experts_per_tok=5 exceeds num_local_experts=4"),
        ("granitemoe", {"num_local_experts": 0}, r"num_local_experts must be an int ≥ 1, got 0"),
        ("granitemoe", {"logits_scaling": 0}, r"logits_scaling must be a number > 0, got 0"),
        ("olmo", {"clip_qkv": -1.0}, r"clip_qkv must be None or a finite number > 0, got -1.0"),
        ("arcee", {"hidden_act": "relu3"}, r"activation 'relu3' is not supported"),
    ],
)  # fmt: skip
def test_bad_config_is_named(tmp_path, mt, changes, match):
    build(mt, tmp_path)
    _edit_config(tmp_path, **changes)
    with pytest.raises(ValueError, match=match) as info:
        qkv.load(tmp_path)
    assert str(info.value).startswith(str(tmp_path / "config.json"))  # which file, in full


def test_decoder_config_and_attention_check_the_new_options():
    base = dict(name="t", n_layers=1, n_heads=2, n_kv_heads=2, d_model=8, d_head=4, d_ff=8,
                vocab_size=10, max_positions=8)  # fmt: skip
    with pytest.raises(
        ValueError, match=r"norm_affine=False .* needs norm='layer', got norm='rms'"
    ):
        DecoderConfig(**base, norm_affine=False)
    with pytest.raises(ValueError, match=r"norm_affine must be a bool, got 0"):
        DecoderConfig(**base, norm="layer", norm_affine=0)
    for bad in (0, float("inf"), True, "1"):
        with pytest.raises(ValueError, match=r"clip_qkv must be None or a finite number > 0"):
            DecoderConfig(**base, clip_qkv=bad)
        with pytest.raises(ValueError, match=r"clip must be None or a finite number > 0"):
            qkv.nn.MultiHeadAttention(8, 2, clip=bad)


def test_attention_clip_is_the_clamp_of_its_docstring():
    """clip c: q, k, v clamped after their projections and biases, before RoPE, against the
    formula written out in float64 (per-head einsums, the clamp, plain softmax)."""
    torch.manual_seed(0)
    attn = qkv.nn.MultiHeadAttention(12, 3, 1, 4, causal=True, clip=0.5, dtype=torch.float64)
    with torch.no_grad():
        for p in attn.parameters():
            p.normal_(0, 0.7)
    x = torch.randn(2, 7, 12, dtype=torch.float64)
    attn.requires_grad_(False)
    q = (torch.einsum("bim,hmd->bhid", x, attn.W_Q) + attn.b_Q[:, None]).clamp(-0.5, 0.5)
    k = (torch.einsum("bim,hmd->bhid", x, attn.W_K) + attn.b_K[:, None]).clamp(-0.5, 0.5)
    v = (torch.einsum("bim,hmd->bhid", x, attn.W_V) + attn.b_V[:, None]).clamp(-0.5, 0.5)
    s = torch.einsum("bhid,bhjd->bhij", q, k.expand_as(q)) / 2.0  # 1/√4
    s = s.masked_fill(torch.ones(7, 7, dtype=torch.bool).triu(1), float("-inf"))
    z = torch.einsum("bhij,bhjd->bhid", s.softmax(-1), v.expand(-1, 3, -1, -1))
    want = torch.einsum("bhid,hdm->bim", z, attn.W_O) + attn.b_O
    with torch.no_grad():
        got = attn(x)
        unclipped = qkv.nn.MultiHeadAttention(12, 3, 1, 4, causal=True, dtype=torch.float64)
        unclipped.load_state_dict(attn.state_dict())
        assert rel(unclipped(x), want) > 1e-2  # the clamp bites on these inputs
    assert rel(got, want) <= 1e-12
