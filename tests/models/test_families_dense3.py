"""The families of `families_dense3.py` (GLM-4-0414, Seed-OSS, ERNIE 4.5) against transformers,
as tests/models/test_families.py does for the others: a tiny random checkpoint per family
(AutoConfig.for_model → from_config → save_pretrained), loaded with `qkv.load(folder)`, logits
in float32 and float64, a right-padded batch, lens rows vs `output_attentions=True`, and 20
greedy tokens with and without the KV cache. Then each family's peculiarity, switched off or
done another way, breaks parity; other config spellings (and transformers' defaults for absent
keys) give the same model; what a family cannot honour is a named error.

Sizes as test_families': d_model 60, 6 query heads over 2 kv heads, d_ff 37, vocabulary 97;
head_dim 12 (GLM-4: 6 of them rotated), 14 (Seed-OSS) and 10 (ERNIE), RoPE base 100.
"""

import functools
import json

import pytest
import torch

import qkv
from qkv.nn import PreNormBlock, SandwichBlock
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
from tests.models.test_families_dense import _cohere_rotate64, _half_split, _rotate_all
from tests.models.test_families_more import _breaks, _each_block, _edit_config, _error

transformers = pytest.importorskip("transformers", reason="transformers is the parity oracle")

TOL = REL_TOL[torch.float32]
_DEC = dict(DECODER, pad_token_id=0, bos_token_id=0, eos_token_id=0)  # test_families' tiny decoder
DENSE3 = {
    # pre- and post-norms around each sublayer, RoPE on interleaved pairs of the first half
    # (6 of 12 features), q/k/v biases (transformers' default), fused gate_up_proj
    "glm4": dict(_DEC, head_dim=12, rope_theta=100.0),
    # q/k/v biases (default), the o_proj bias by its own switch, MLP biases
    "seed_oss": dict(_DEC, head_dim=14, rope_theta=100.0, attention_out_bias=True,
                     mlp_bias=True),
    # RoPE on interleaved pairs of the whole head, every projection biased, tied embeddings
    "ernie4_5": dict(_DEC, head_dim=10, rope_theta=100.0, use_bias=True),
}  # fmt: skip


def build(model_type: str, folder, *, changes: dict | None = None, config: dict | None = None):
    """A random `model_type` checkpoint (DENSE3's config, or `config`, updated by `changes`; a
    None value leaves the key to transformers' default) saved in `folder` with a word
    tokenizer; returns the transformers model (eager attention)."""
    base = DENSE3[model_type] if config is None else config
    kw = {**base, **(changes or {})}
    return save_random(model_type, {k: v for k, v in kw.items() if v is not None}, folder)


@pytest.fixture(scope="module", params=list(DENSE3))
def pair(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    ref = build(request.param, folder)
    return request.param, ref, qkv.load(folder)


# --------------------------------------------------------------------------------------------
# a float64 oracle: transformers' float32 islands done in float64, by formulas written here


def _ernie_rotate64(q, k, cos, sin, unsqueeze_dim=1):
    """ERNIE's rotation without its float32 casts (`q.float()`): pair p is (2p, 2p+1), turned by
    the angle in cos/sin's first half (transformers' tables hold each angle twice, half-split)."""
    r = cos.shape[-1] // 2
    cos, sin = cos[..., :r].repeat_interleave(2, -1), sin[..., :r].repeat_interleave(2, -1)
    return _cohere_rotate64(q, k, cos, sin, unsqueeze_dim)


def dense3_float64_oracle_(name: str, ref, model, monkeypatch) -> None:
    float64_oracle_(ref, model)  # the RoPE tables (half-split, as all three hold them), RMSNorm
    if name == "ernie4_5":
        from transformers.models.ernie4_5 import modeling_ernie4_5

        monkeypatch.setattr(modeling_ernie4_5, "apply_rotary_pos_emb", _ernie_rotate64)


# --------------------------------------------------------------------------------------------
# parity


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_logits_match_transformers(pair, dtype, monkeypatch):
    name, ref, model = pair
    ids = torch.cat([ids_for(0), ids_for(1)])  # a batch of two
    oracle_ = functools.partial(dense3_float64_oracle_, name, monkeypatch=monkeypatch)
    err = output_error(ref, model, ids, dtype, monkeypatch, oracle_)
    assert err <= REL_TOL[dtype], f"{name} {dtype}: relative error {err:.2e}"


# --------------------------------------------------------------------------------------------
# each peculiarity matters


def _zero(*names):
    """Zero the attention biases `names` (b_Q, b_K, b_V, b_O) of every block."""

    def edit(b):
        for n in names:
            torch.nn.init.zeros_(getattr(b.attn, n))

    return _each_block(edit)


def _zero_mlp_biases(b):
    for lin in (b.mlp.gate, b.mlp.up, b.mlp.down):
        torch.nn.init.zeros_(lin.bias)


def _swap_gate_and_up(b):
    b.mlp.gate, b.mlp.up = b.mlp.up, b.mlp.gate


def _interleave(m):
    rope = m.blocks[0].attn.rope  # shared by every layer
    rope.interleaved, rope._pairs = True, None
    rope._tables.clear()


def test_glm4_post_norms_partial_interleaved_rope_and_fused_mlp_matter(tmp_path):
    ref = build("glm4", tmp_path)
    model = qkv.load(tmp_path)
    blk = model.blocks[0]
    assert all(isinstance(b, SandwichBlock) for b in model.blocks)
    rope = blk.attn.rope
    assert rope.interleaved and (rope.rotary_dim, rope.d_head, rope.base) == (6, 12, 100.0)
    assert blk.attn.b_Q is not None and blk.attn.b_O is None and blk.mlp.up.bias is None
    assert blk.norm1.eps == 1.5625e-07 and model.lm_head is not None
    assert _error(model, ref) <= TOL
    _breaks(tmp_path, ref, {
        "no post-norms": _each_block(lambda b: setattr(b, "__class__", PreNormBlock)),
        "half-split pairs": _half_split,
        "every feature rotated": _rotate_all,
        "gate and up rows swapped": _each_block(_swap_gate_and_up),
        "no q/k/v biases": _zero("b_Q", "b_K", "b_V"),
    })  # fmt: skip


def test_glm4_older_config_fields_and_without_biases(tmp_path):
    """GLM-4-0414's own config.json: rope_theta and partial_rotary_factor at the top level
    (then the latter's default, 0.5); attention_bias false drops the q/k/v biases."""
    ref = build("glm4", tmp_path)
    _edit_config(tmp_path, drop=("rope_parameters",), rope_theta=100.0,
                 partial_rotary_factor=0.5)  # fmt: skip
    assert _error(qkv.load(tmp_path), ref) <= TOL
    _edit_config(tmp_path, drop=("partial_rotary_factor",))
    model = qkv.load(tmp_path)
    assert model.config.rope_dim == 6 and _error(model, ref) <= TOL
    ref = build("glm4", tmp_path, changes={"attention_bias": False})
    model = qkv.load(tmp_path)
    assert model.blocks[0].attn.b_Q is None and _error(model, ref) <= TOL


def test_seed_oss_each_bias_matters(tmp_path):
    ref = build("seed_oss", tmp_path)
    model = qkv.load(tmp_path)
    blk = model.blocks[0]
    assert blk.attn.b_Q is not None and blk.attn.b_O is not None and blk.mlp.up.bias is not None
    assert not model.config.rope_interleaved and model.config.d_head == 14
    assert _error(model, ref) <= TOL
    _breaks(tmp_path, ref, {
        "no q bias": _zero("b_Q"),
        "no k/v biases": _zero("b_K", "b_V"),
        "no o bias": _zero("b_O"),
        "no MLP biases": _each_block(_zero_mlp_biases),
        "interleaved pairs": _interleave,
    })  # fmt: skip


def test_seed_oss_out_bias_is_its_own_switch(tmp_path):
    """attention_bias (q, k, v) and attention_out_bias (o) apart, as transformers reads them."""
    ref = build("seed_oss", tmp_path, changes={"attention_out_bias": False, "mlp_bias": False})
    model = qkv.load(tmp_path)
    blk = model.blocks[0]
    assert blk.attn.b_Q is not None and blk.attn.b_O is None and blk.mlp.up.bias is None
    assert _error(model, ref) <= TOL
    ref = build("seed_oss", tmp_path, changes={"attention_bias": False})
    model = qkv.load(tmp_path)
    assert model.blocks[0].attn.b_Q is None and model.blocks[0].attn.b_O is not None
    assert _error(model, ref) <= TOL


def test_ernie4_5_interleaved_rope_and_every_bias_matter(tmp_path):
    ref = build("ernie4_5", tmp_path)
    model = qkv.load(tmp_path)
    blk = model.blocks[0]
    assert blk.attn.rope.interleaved and blk.attn.rope.rotary_dim == 10
    assert blk.attn.b_Q is not None and blk.attn.b_O is not None and blk.mlp.down.bias is not None
    assert model.lm_head is None  # tied
    assert _error(model, ref) <= TOL
    _breaks(tmp_path, ref, {
        "half-split pairs": _half_split,
        "no q/k/v biases": _zero("b_Q", "b_K", "b_V"),
        "no o bias": _zero("b_O"),
        "no MLP biases": _each_block(_zero_mlp_biases),
    })  # fmt: skip


def test_ernie4_5_untied_and_bias_free_match(tmp_path):
    ref = build("ernie4_5", tmp_path, changes={"tie_word_embeddings": False, "use_bias": False})
    model = qkv.load(tmp_path)
    assert model.lm_head is not None and model.blocks[0].attn.b_Q is None
    assert model.blocks[0].mlp.up.bias is None
    assert _error(model, ref) <= TOL
    # the embedding as the unembedding, as a tied model would read it
    _breaks(tmp_path, ref, {"tied": lambda m: setattr(m, "lm_head", None)})


# the keys each family reads that transformers gives a default when config.json lacks them
_DEFAULTED = ("head_dim", "num_key_value_heads", "rope_parameters", "rms_norm_eps",
              "tie_word_embeddings", "hidden_act", "max_position_embeddings")  # fmt: skip
_SIZES = dict(hidden_size=60, num_attention_heads=8, intermediate_size=37, num_hidden_layers=2,
              vocab_size=97, pad_token_id=0, bos_token_id=0, eos_token_id=0)  # fmt: skip
_OWN_DEFAULTS = {
    # head_dim, kv heads, RoPE base, rotated features, eps, tied, biases (q/k/v, o, MLP)
    "glm4": (128, 2, 10000.0, 64, 1.5625e-07, False, (True, False, False)),
    "seed_oss": (128, 8, 10000.0, None, 1e-6, False, (True, False, False)),
    "ernie4_5": (128, 2, 500000.0, None, 1e-5, True, (False, False, False)),
}
_BIAS_KEYS = ("attention_bias", "attention_out_bias", "mlp_bias", "use_bias")


@pytest.mark.parametrize("mt", list(DENSE3))
def test_absent_keys_take_transformers_defaults(tmp_path, mt):
    """A config.json with the sizes only reads as transformers reads it: head_dim 128 (not
    hidden_size / heads), its kv heads, RoPE base, eps, tying and biases."""
    ref = build(mt, tmp_path, config=_SIZES)
    cfg = json.loads((tmp_path / "config.json").read_text(encoding="utf-8"))
    _edit_config(tmp_path, drop=[k for k in (*_DEFAULTED, *_BIAS_KEYS) if k in cfg])
    model = qkv.load(tmp_path)
    c = model.config
    got = (c.d_head, c.n_kv_heads, c.rope_base, c.rope_dim, c.norm_eps, c.tie_embeddings,
           (c.attn_bias, c.out_bias, c.mlp_bias))  # fmt: skip
    assert got == _OWN_DEFAULTS[mt]
    assert (c.act, c.max_positions) == ("silu", 524288 if mt == "seed_oss" else 131072)
    assert _error(model, ref) <= TOL


@pytest.mark.parametrize("mt", list(DENSE3))
def test_architectures_without_model_type_find_the_family(tmp_path, mt):
    """A config without model_type is read by its `architectures` class (Glm4ForCausalLM,
    SeedOssForCausalLM, Ernie4_5ForCausalLM)."""
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


def test_their_moe_and_multimodal_relatives_are_not_read_as_them():
    """Glm4MoeForCausalLM, Glm4vForConditionalGeneration, Ernie4_5_MoeForCausalLM are other
    architectures: never read as glm4 / ernie4_5 (a clear "not supported", no wrong model)."""
    assert _family_of("Glm4MoeForCausalLM") != "glm4"
    assert _family_of("Glm4vForConditionalGeneration") != "glm4"
    assert _family_of("Ernie4_5_MoeForCausalLM") != "ernie4_5"
    assert [_family_of(a) for a in ("Glm4Model", "SeedOssModel", "Ernie4_5Model")] == [
        "glm4", "seed_oss", "ernie4_5"]  # fmt: skip


# --------------------------------------------------------------------------------------------
# bad configs: one clear error naming the key


@pytest.mark.parametrize(
    ("mt", "changes", "match"),
    [
        ("glm4", {"rope_parameters": {"rope_type": "default", "rope_theta": 100.0,
                                      "partial_rotary_factor": 0.25}},
         r"partial_rotary_factor=0.25 of head_dim=12 must rotate an even number ≥ 2 of "
         r"features \(int\(head_dim · partial_rotary_factor\) = 3\)"),
        ("glm4", {"rope_parameters": {"rope_type": "default", "rope_theta": 100.0,
                                      "partial_rotary_factor": 0}},
         r"partial_rotary_factor=0 of head_dim=12 must rotate"),
        ("glm4", {"head_dim": None}, r"glm4 with head_dim=null is not supported"),
        ("seed_oss", {"head_dim": None}, r"seed_oss with head_dim=null is not supported"),
        ("ernie4_5", {"num_key_value_heads": None},
         r"ernie4_5 with num_key_value_heads=null is not supported"),
        ("ernie4_5", {"rope_parameters": {"rope_type": "ntk_by_parts", "rope_theta": 100.0,
                                          "factor": 2.0}},
         r"rope_type='ntk_by_parts' is not supported"),
        ("seed_oss", {"num_key_value_heads": 4},
         r"num_attention_heads=6 must be a multiple of num_key_value_heads=4 \(GQA\)"),
    ],
)  # fmt: skip
def test_bad_config_is_named(tmp_path, mt, changes, match):
    build(mt, tmp_path)
    _edit_config(tmp_path, **changes)
    with pytest.raises(ValueError, match=match) as info:
        qkv.load(tmp_path)
    assert str(info.value).startswith(str(tmp_path / "config.json"))  # which file, in full
