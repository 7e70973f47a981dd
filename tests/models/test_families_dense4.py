"""The families of `families_dense4.py` (Nemotron, Helium, Hunyuan dense) against transformers,
as tests/models/test_families_dense3.py does for its own: a tiny random checkpoint per family
(AutoConfig.for_model → from_config → save_pretrained), loaded with `qkv.load(folder)`, logits
in float32 and float64, a right-padded batch, lens rows vs `output_attentions=True`, and 20
greedy tokens with and without the KV cache. Then each family's peculiarity, switched off or
done another way, breaks parity; other config spellings (and transformers' defaults for absent
keys) give the same model; what a family cannot honour is a named error. Last, the two model
mechanisms these families brought (a LayerNorm gain offset, QK-norm after RoPE) against plain
formulas written here.

Sizes as test_families': d_model 60, 6 query heads over 2 kv heads, d_ff 37, vocabulary 97;
head_dim 12 (Nemotron: 6 of them rotated), 10 (Helium: 6 · 10 = hidden_size, as it must be)
and 14 (Hunyuan), RoPE base 100.
"""

import json

import pytest
import torch
import torch.nn.functional as F

import qkv
from qkv.models.decoder import DecoderConfig
from qkv.nn import MultiHeadAttention, RMSNorm, RotaryEmbedding
from qkv.nn.blocks import LayerNorm
from tests.models.parity import (  # noqa: F401  (collected here, with this file's `pair`)
    test_greedy_tokens_with_and_without_the_cache,
    test_lens_rows_match_output_attentions,
    test_padded_batch_matches_transformers,
)
from tests.models.test_families import _DEC as DECODER
from tests.models.test_families import (
    REL_TOL,
    float64_oracle_,
    ids_for,
    output_error,
    save_random,
)
from tests.models.test_families_dense import _half_split, _no_qk_norm, _rotate_all
from tests.models.test_families_dense3 import _zero, _zero_mlp_biases
from tests.models.test_families_more import _breaks, _each_block, _edit_config, _error

transformers = pytest.importorskip("transformers", reason="transformers is the parity oracle")

TOL = REL_TOL[torch.float32]
_DEC = dict(DECODER, pad_token_id=0, bos_token_id=0, eos_token_id=0)  # test_families' tiny decoder
DENSE4 = {
    # LayerNorm1P (gain 1 + w, with bias), relu² MLP without gate, RoPE on half of each head,
    # biases everywhere (attention_bias: q, k, v, o; mlp_bias: up, down)
    "nemotron": dict(_DEC, head_dim=12, rope_theta=100.0, attention_bias=True, mlp_bias=True),
    # RoPE on interleaved pairs of the whole head, q/k/v biases (o_proj never has one)
    "helium": dict(_DEC, head_dim=10, rope_theta=100.0, attention_bias=True),
    # QK-norm after RoPE, q/k/v/o biases
    "hunyuan_v1_dense": dict(_DEC, head_dim=14, rope_theta=100.0, attention_bias=True),
}  # fmt: skip


def build(model_type: str, folder, *, changes: dict | None = None, config: dict | None = None):
    """A random `model_type` checkpoint (DENSE4's config, or `config`, updated by `changes`; a
    None value leaves the key to transformers' default) saved in `folder` with a word
    tokenizer; returns the transformers model (eager attention)."""
    base = DENSE4[model_type] if config is None else config
    kw = {**base, **(changes or {})}
    return save_random(model_type, {k: v for k, v in kw.items() if v is not None}, folder)


@pytest.fixture(scope="module", params=list(DENSE4))
def pair(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    ref = build(request.param, folder)
    return request.param, ref, qkv.load(folder)


# --------------------------------------------------------------------------------------------
# parity (float64: test_families' oracle does RoPE's tables and RMSNorm in float64; Nemotron's
# LayerNorm1P and Helium's interleaved rotation have no float32 island of their own)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_logits_match_transformers(pair, dtype, monkeypatch):
    name, ref, model = pair
    ids = torch.cat([ids_for(0), ids_for(1)])  # a batch of two
    err = output_error(ref, model, ids, dtype, monkeypatch, float64_oracle_)
    assert err <= REL_TOL[dtype], f"{name} {dtype}: relative error {err:.2e}"


# --------------------------------------------------------------------------------------------
# each peculiarity matters


def _plain_layernorm_gain(m):
    for mod in m.modules():
        if isinstance(mod, LayerNorm):
            mod.offset = 0.0


def _zero_norm_biases(m):
    for mod in m.modules():
        if isinstance(mod, torch.nn.LayerNorm):
            torch.nn.init.zeros_(mod.bias)


def _interleave(m):
    rope = m.blocks[0].attn.rope  # shared by every layer
    rope.interleaved, rope._pairs = True, None
    rope._tables.clear()


def _zero_up_down_biases(b):  # Nemotron's MLP has no gate
    for lin in (b.mlp.up, b.mlp.down):
        torch.nn.init.zeros_(lin.bias)


def _act(fn):
    return _each_block(lambda b: setattr(b.mlp, "act", fn))


def test_nemotron_layernorm1p_relu2_partial_rotary_and_biases_matter(tmp_path):
    ref = build("nemotron", tmp_path)
    model = qkv.load(tmp_path)
    c, blk = model.config, model.blocks[0]
    assert (c.norm, c.norm_offset, c.gated, c.act, c.rope_dim) == ("layer", 1.0, False, "relu2", 6)
    assert isinstance(model.norm, LayerNorm) and model.norm.bias is not None
    assert blk.mlp.gate is None and blk.attn.b_O is not None and blk.mlp.up.bias is not None
    assert model.lm_head is not None
    assert _error(model, ref) <= TOL
    _breaks(tmp_path, ref, {
        "LayerNorm gain w, not 1 + w": _plain_layernorm_gain,
        "no LayerNorm biases": _zero_norm_biases,
        "relu, not relu²": _act(F.relu),
        "every feature rotated": _rotate_all,
        "interleaved pairs": _interleave,
        "no q/k/v biases": _zero("b_Q", "b_K", "b_V"),
        "no o bias": _zero("b_O"),
        "no MLP biases": _each_block(_zero_up_down_biases),
    })  # fmt: skip


def test_nemotron_minitron_config_spelling_and_without_biases(tmp_path):
    """Minitron's own config.json: rope_theta and partial_rotary_factor at the top level (then
    the latter's default, 0.5); without biases; head_dim absent is hidden_size / heads."""
    ref = build("nemotron", tmp_path)
    _edit_config(tmp_path, drop=("rope_parameters",), rope_theta=100.0,
                 partial_rotary_factor=0.5)  # fmt: skip
    assert _error(qkv.load(tmp_path), ref) <= TOL
    _edit_config(tmp_path, drop=("partial_rotary_factor",))
    model = qkv.load(tmp_path)
    assert model.config.rope_dim == 6 and _error(model, ref) <= TOL
    rope = {"rope_type": "default", "rope_theta": 100.0, "partial_rotary_factor": 0.4}
    ref = build("nemotron", tmp_path, changes={"attention_bias": False, "mlp_bias": False,
                                               "head_dim": None, "rope_parameters": rope})  # fmt: skip
    _edit_config(tmp_path, drop=("head_dim",))
    model = qkv.load(tmp_path)
    assert model.config.d_head == 10 and model.config.rope_dim == 4  # int(10 · 0.4)
    assert model.blocks[0].attn.b_Q is None and model.blocks[0].mlp.up.bias is None
    assert _error(model, ref) <= TOL


def test_helium_interleaved_rope_and_biases_matter(tmp_path):
    ref = build("helium", tmp_path)
    model = qkv.load(tmp_path)
    blk = model.blocks[0]
    assert blk.attn.rope.interleaved and blk.attn.rope.rotary_dim == 10
    assert blk.attn.b_Q is not None and blk.attn.b_O is None and blk.mlp.up.bias is None
    assert _error(model, ref) <= TOL
    _breaks(tmp_path, ref, {
        "half-split pairs": _half_split,
        "no q/k/v biases": _zero("b_Q", "b_K", "b_V"),
    })  # fmt: skip


def test_helium_mlp_bias_and_tied_match(tmp_path):
    ref = build("helium", tmp_path, changes={"attention_bias": False, "mlp_bias": True,
                                             "tie_word_embeddings": True})  # fmt: skip
    model = qkv.load(tmp_path)
    assert model.blocks[0].attn.b_Q is None and model.blocks[0].mlp.down.bias is not None
    assert model.lm_head is None
    assert _error(model, ref) <= TOL
    _breaks(tmp_path, ref, {"no MLP biases": _each_block(_zero_mlp_biases)})


def _norm_before_rope(b):
    b.attn.qk_norm_after_rope = False


def test_hunyuan_qk_norm_after_rope_and_biases_matter(tmp_path):
    ref = build("hunyuan_v1_dense", tmp_path)
    model = qkv.load(tmp_path)
    blk = model.blocks[0]
    assert blk.attn.qk_norm_after_rope and isinstance(blk.attn.q_norm, RMSNorm)
    assert blk.attn.q_norm.weight.shape == (14,) and blk.attn.b_O is not None
    assert blk.mlp.up.bias is None and model.lm_head is not None
    assert _error(model, ref) <= TOL
    _breaks(tmp_path, ref, {
        "QK-norm before RoPE": _each_block(_norm_before_rope),
        "no QK-norm": _each_block(_no_qk_norm),
        "no q/k/v biases": _zero("b_Q", "b_K", "b_V"),
        "no o bias": _zero("b_O"),
        "interleaved pairs": _interleave,
    })  # fmt: skip


def test_hunyuan_without_biases_and_kv_heads_default_to_heads(tmp_path):
    """attention_bias false drops q/k/v/o biases; no num_key_value_heads is one per head."""
    ref = build("hunyuan_v1_dense", tmp_path, changes={"attention_bias": False,
                                                       "num_key_value_heads": None})  # fmt: skip
    _edit_config(tmp_path, drop=("num_key_value_heads",))
    model = qkv.load(tmp_path)
    assert model.config.n_kv_heads == 6 and model.blocks[0].attn.b_Q is None
    assert _error(model, ref) <= TOL


# the keys each family reads that transformers gives a default when config.json lacks them
_DEFAULTED = ("head_dim", "num_key_value_heads", "rope_parameters", "rms_norm_eps", "norm_eps",
              "tie_word_embeddings", "hidden_act", "max_position_embeddings", "attention_bias",
              "mlp_bias")  # fmt: skip
_SIZES = dict(hidden_size=60, num_attention_heads=6, intermediate_size=37, num_hidden_layers=2,
              vocab_size=97, pad_token_id=0, bos_token_id=0, eos_token_id=0)  # fmt: skip
_OWN = {
    # what stays in config.json (transformers could not build the model without it), then
    # head_dim, kv heads, RoPE base, rotated features, eps, tied, act, context
    "nemotron": ({"num_key_value_heads": 2, "head_dim": 12},
                 (12, 2, 10000.0, 6, 1e-5, False, "relu2", 4096)),
    "helium": ({"head_dim": 10, "num_key_value_heads": 2},
               (10, 2, 100000.0, None, 1e-8, False, "silu", 4096)),
    "hunyuan_v1_dense": ({"head_dim": 14}, (14, 6, 10000.0, None, 1e-5, False, "silu", 2048)),
}  # fmt: skip


@pytest.mark.parametrize("mt", list(DENSE4))
def test_absent_keys_take_transformers_defaults(tmp_path, mt):
    """A config.json with the sizes only (and what transformers needs) reads as transformers
    reads it: its RoPE base, eps, tying, activation, context and biases (none)."""
    keep, want = _OWN[mt]
    ref = build(mt, tmp_path, config={**_SIZES, **keep})
    cfg = json.loads((tmp_path / "config.json").read_text(encoding="utf-8"))
    _edit_config(tmp_path, drop=[k for k in _DEFAULTED if k in cfg and k not in keep])
    model = qkv.load(tmp_path)
    c = model.config
    got = (c.d_head, c.n_kv_heads, c.rope_base, c.rope_dim, c.norm_eps, c.tie_embeddings, c.act,
           c.max_positions)  # fmt: skip
    assert got == want
    assert (c.attn_bias, c.out_bias, c.mlp_bias) == (False, False, False)
    assert _error(model, ref) <= TOL


def test_helium_absent_kv_heads_is_twenty(tmp_path):
    """Helium's num_key_value_heads defaults to 20, not the number of query heads."""
    ref = build("helium", tmp_path, config={**_SIZES, "num_attention_heads": 20, "head_dim": 2,
                                            "hidden_size": 40})  # fmt: skip
    _edit_config(tmp_path, drop=("num_key_value_heads",))
    model = qkv.load(tmp_path)
    assert model.config.n_kv_heads == 20 and _error(model, ref) <= TOL


@pytest.mark.parametrize("mt", list(DENSE4))
def test_architectures_without_model_type_find_the_family(tmp_path, mt):
    """A config without model_type is read by its `architectures` class (NemotronForCausalLM,
    HeliumForCausalLM, HunYuanDenseV1ForCausalLM)."""
    ref = build(mt, tmp_path)
    _edit_config(tmp_path, drop=("model_type",))
    assert _error(qkv.load(tmp_path), ref) <= TOL


def _family_of(arch: str) -> str | None:
    from qkv.models.hf import family_of

    try:
        return family_of({"architectures": [arch]}, "config.json").model_type
    except ValueError as e:
        assert "is not supported" in str(e)
        return None


def test_their_relatives_are_not_read_as_them():
    """NemotronHForCausalLM (hybrid Mamba) and HunYuanMoEV1ForCausalLM are other architectures:
    never read as nemotron / hunyuan_v1_dense."""
    assert _family_of("NemotronHForCausalLM") != "nemotron"
    assert _family_of("HunYuanMoEV1ForCausalLM") != "hunyuan_v1_dense"
    assert [_family_of(a) for a in ("NemotronModel", "HeliumModel", "HunYuanDenseV1Model")] == [
        "nemotron", "helium", "hunyuan_v1_dense"]  # fmt: skip


# --------------------------------------------------------------------------------------------
# bad configs: one clear error naming the key


_RP = {"rope_type": "default", "rope_theta": 100.0}


@pytest.mark.parametrize(
    ("mt", "drop", "changes", "match"),
    [
        ("nemotron", (), {"rope_parameters": {**_RP, "partial_rotary_factor": 0.25}},
         r"partial_rotary_factor=0.25 of head_dim=12 must rotate an even number ≥ 2"),
        ("nemotron", ("num_key_value_heads",), {},
         r"nemotron with no num_key_value_heads \(or num_key_value_heads=null: transformers "
         r"cannot build the model; give the number of kv heads\) is not supported"),
        ("nemotron", (), {"num_key_value_heads": None}, r"nemotron with no num_key_value_heads"),
        ("helium", (), {"head_dim": 12},
         r"num_attention_heads · head_dim = 6 · 12 = 72 must equal hidden_size=60"),
        ("helium", (), {"head_dim": None}, r"helium with head_dim=null is not supported"),
        ("helium", (), {"num_key_value_heads": None},
         r"helium with num_key_value_heads=null is not supported"),
        ("hunyuan_v1_dense", ("head_dim",), {}, r"hunyuan_v1_dense with no head_dim"),
        ("hunyuan_v1_dense", (), {"rope_parameters": {"rope_type": "dynamic", "alpha": -2.0,
                                                      "factor": 1.0, "rope_theta": 100.0}},
         r"rope_scaling.alpha must be a number > 0, got -2.0"),
        ("hunyuan_v1_dense", (), {"rope_parameters": {**_RP, "rope_type": "ntk_by_parts",
                                                      "factor": 2.0}},
         r"rope_type='ntk_by_parts' is not supported"),
    ],
)  # fmt: skip
def test_bad_config_is_named(tmp_path, mt, drop, changes, match):
    build(mt, tmp_path)
    _edit_config(tmp_path, drop=drop, **changes)
    with pytest.raises(ValueError, match=match) as info:
        qkv.load(tmp_path)
    assert str(info.value).startswith(str(tmp_path / "config.json"))  # which file, in full


def test_what_transformers_cannot_build_is_what_is_refused():
    """The refusals above mirror transformers: these configs fail there too."""
    sizes = {**_SIZES}
    for mt, kw in (("nemotron", {"num_key_value_heads": None}),
                   ("hunyuan_v1_dense", {"head_dim": None}),
                   ("helium", {"head_dim": 12, "num_key_value_heads": 2})):  # fmt: skip
        cfg = transformers.AutoConfig.for_model(mt, **sizes, **kw)
        with pytest.raises((TypeError, RuntimeError)):
            m = transformers.AutoModelForCausalLM.from_config(cfg)
            m(ids_for(0))


# --------------------------------------------------------------------------------------------
# the mechanisms, against formulas written here


@pytest.mark.parametrize("offset", [0.0, 1.0])
def test_layernorm_offset_gain(offset):
    """qkv's LayerNorm: (x − mean) / √(var + eps) · (offset + w) + b, var the biased one."""
    torch.manual_seed(0)
    n = LayerNorm(7, 1e-5, offset=offset).double()
    with torch.no_grad():
        n.weight.normal_(), n.bias.normal_()
    x = torch.randn(3, 5, 7, dtype=torch.float64)
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    want = (x - mean) / torch.sqrt(var + 1e-5) * (offset + n.weight) + n.bias
    assert torch.allclose(n(x), want, rtol=1e-12, atol=1e-12)
    assert ("offset=1.0" in repr(n)) == bool(offset)
    with pytest.raises(ValueError, match="an offset gain needs a weight"):
        LayerNorm(7, offset=1.0, elementwise_affine=False)


def _rms(x, w, eps):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w


def test_qk_norm_after_rope_is_norm_of_the_rotated_heads():
    """MultiHeadAttention(qk_norm_after_rope=True): q = rms(rope(x W_Q)) per head, then plain
    softmax attention; written out here with RotaryEmbedding's own rotation as the only part
    shared, and the before-RoPE order differing from it."""
    torch.manual_seed(0)
    B, S, M, H, K, D, eps = 2, 5, 12, 4, 2, 6, 1e-6
    rope = RotaryEmbedding(D, base=100.0)
    kw = dict(bias=False, rope=rope, causal=True, dtype=torch.float64)
    after = MultiHeadAttention(M, H, K, D, q_norm=RMSNorm(D, eps), k_norm=RMSNorm(D, eps),
                               qk_norm_after_rope=True, **kw).double()  # fmt: skip
    with torch.no_grad():
        after.q_norm.weight.normal_(1, 0.3), after.k_norm.weight.normal_(1, 0.3)
    x = torch.randn(B, S, M, dtype=torch.float64)
    q = torch.einsum("bim,hmd->bhid", x, after.W_Q)
    k = torch.einsum("bim,kmd->bkid", x, after.W_K)
    v = torch.einsum("bim,kmd->bkid", x, after.W_V)
    q = _rms(rope(q, 0), after.q_norm.weight, eps)
    k = _rms(rope(k, 0), after.k_norm.weight, eps).repeat_interleave(H // K, 1)
    s = q @ k.transpose(-1, -2) / D**0.5
    s = s.masked_fill(torch.ones(S, S, dtype=torch.bool).triu(1), float("-inf"))
    z = s.softmax(-1) @ v.repeat_interleave(H // K, 1)  # (b h i d)
    want = torch.einsum("bhid,hdm->bim", z, after.W_O)
    with torch.no_grad():
        assert torch.allclose(after(x), want, rtol=1e-10, atol=1e-12)
        after.qk_norm_after_rope = False  # the other order is another model
        assert not torch.allclose(after(x), want, rtol=1e-3, atol=1e-3)


def test_the_new_options_are_validated():
    with pytest.raises(ValueError, match="qk_norm_after_rope normalises each head's rotated"):
        MultiHeadAttention(12, 4, qk_norm_after_rope=True)
    with pytest.raises(TypeError, match="qk_norm_after_rope must be a bool"):
        MultiHeadAttention(12, 4, qk_norm_after_rope=1)
    base = dict(name="t", n_layers=1, n_heads=2, n_kv_heads=2, d_model=8, d_head=4, d_ff=8,
                vocab_size=10, max_positions=16)  # fmt: skip
    with pytest.raises(ValueError, match=r"qk_norm_after_rope .* needs qk_norm=True"):
        DecoderConfig(**base, qk_norm_after_rope=True)
    with pytest.raises(ValueError, match=r"qk_norm_scope 'head' or 'per_head', got qk_norm=True"):
        DecoderConfig(**base, qk_norm=True, qk_norm_scope="all", qk_norm_after_rope=True)
    with pytest.raises(ValueError, match=r"norm_offset=1\.0 offsets the norms' gain"):
        DecoderConfig(**base, norm="layer", norm_affine=False, norm_offset=1.0)
    DecoderConfig(**base, qk_norm=True, qk_norm_scope="per_head", qk_norm_after_rope=True)


@pytest.mark.parametrize(
    "rope",
    [
        {"rope_parameters": {"rope_type": "dynamic", "alpha": 1000.0, "factor": 1.0,
                             "rope_theta": 100.0}},
        {"rope_theta": 100.0, "rope_scaling": {"type": "dynamic", "alpha": 1000.0, "factor": 1.0}},
    ],
    ids=["rope_parameters", "legacy rope_scaling"],
)  # fmt: skip
def test_hunyuan_ntk_alpha_rope_is_a_fixed_base(tmp_path, rope):
    """The released Hunyuan checkpoints' RoPE: "dynamic" with an alpha, which transformers reads
    as base θ·alpha^(d/(d−2)) at every length. transformers reads the edited config.json itself
    (the oracle); ours equals it within float32's tolerance, and plain θ for the base breaks it."""
    build("hunyuan_v1_dense", tmp_path)
    _edit_config(tmp_path, drop=("rope_parameters",) if "rope_scaling" in rope else (), **rope)
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager")
    model = qkv.load(tmp_path)
    d = model.config.d_head
    assert model.config.rope_scaling is None
    assert model.config.rope_base == pytest.approx(100.0 * 1000.0 ** (d / (d - 2)), rel=1e-12)
    assert _error(model, ref.eval()) <= TOL
    plain = qkv.load(tmp_path)
    for b in plain.blocks:
        b.attn.rope = RotaryEmbedding(d, base=100.0)
    assert _error(plain, ref) > 100 * TOL
