"""The families of `families_dense2.py` (Ministral, OLMo 3, EXAONE 4) against transformers, as
tests/models/test_families_extra.py does for its own: a tiny random checkpoint per family
(AutoConfig.for_model → from_config → save_pretrained), loaded with `qkv.load(folder)`, logits
in float32 and float64, a right-padded batch, lens rows vs `output_attentions=True`, and 20
greedy tokens with and without the KV cache. Then each family's peculiarity, switched off or
done another way, breaks parity; other config spellings give the same model (checked against
transformers reading the same edited config.json); what a family cannot honour is a named
error.

Sizes as test_families': d_model 60, 6 query heads over 2 kv heads, d_ff 37, vocabulary 97;
four layers, window 5 on the sliding ones (sequences of 24 tokens); head_dim 14 ≠ 60/6 for
Ministral and EXAONE 4. Ministral and EXAONE 4 alternate sliding and global layers, OLMo 3 keeps
its default (three sliding, then one global) with RoPE base 100 on the sliding layers and 1000
on the global one; OLMo 3 with YaRN on the global layer only at the end.
"""

import pytest
import torch

import qkv
from qkv.nn import PreNormBlock
from tests.models.parity import (  # noqa: F401  (collected here, with this file's `pair`)
    test_greedy_tokens_with_and_without_the_cache,
    test_lens_rows_match_output_attentions,
    test_padded_batch_matches_transformers,
)
from tests.models.test_families import _DEC as DECODER
from tests.models.test_families import (
    REL_TOL,
    ids_for,
    output_error,
    rel,
    save_random,
)
from tests.models.test_families_extra import _each_block
from tests.models.test_families_more import _breaks, _edit_config, _error, _PerHead
from tests.models.test_rope_scaling import float64_scaled_oracle_

transformers = pytest.importorskip("transformers", reason="transformers is the parity oracle")

TOL = REL_TOL[torch.float32]
_S, _F = "sliding_attention", "full_attention"
_DEC = dict(DECODER, num_hidden_layers=4, pad_token_id=0, bos_token_id=0, eos_token_id=0)
DENSE2 = {
    # a window on layers 0 and 2 only; attention_bias / mlp_bias set, and ignored (no biases)
    "ministral": dict(_DEC, head_dim=14, sliding_window=5, layer_types=[_S, _F, _S, _F],
                      rope_theta=100.0, attention_bias=True, mlp_bias=True),
    # default layer_types (sliding, sliding, sliding, full); RoPE base per layer type; q/k/v/o
    # biases; QK-norm over whole projections, norms after each sublayer
    "olmo3": dict(_DEC, sliding_window=5, attention_bias=True,
                  rope_parameters={_S: {"rope_type": "default", "rope_theta": 100.0},
                                   _F: {"rope_type": "default", "rope_theta": 1000.0}}),
    # RoPE and a window on layers 0 and 2, NoPE on 1 and 3; QK-norm per head; post-norms
    "exaone4": dict(_DEC, head_dim=14, sliding_window=5, layer_types=[_S, _F, _S, _F],
                    rope_theta=100.0),
}  # fmt: skip


def build(model_type: str, folder, *, changes: dict | None = None):
    """A random `model_type` checkpoint (DENSE2's config updated by `changes`) saved in `folder`
    with a word tokenizer; returns the transformers model (eager attention)."""
    return save_random(model_type, {**DENSE2[model_type], **(changes or {})}, folder)


def reread(folder):
    """transformers' own reading of `folder` (its config.json as edited): the oracle for
    another spelling of the same config."""
    return transformers.AutoModelForCausalLM.from_pretrained(
        folder, attn_implementation="eager"
    ).eval()


@pytest.fixture(scope="module", params=list(DENSE2))
def pair(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    ref = build(request.param, folder)
    return request.param, ref, qkv.load(folder)


# --------------------------------------------------------------------------------------------
# parity


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_logits_match_transformers(pair, dtype, monkeypatch):
    """float64: transformers' float32 RoPE angles and RMSNorms redone in float64
    (`float64_oracle_`: OLMo 3's per-layer-type bases too), softmax kept in float64."""
    name, ref, model = pair
    ids = torch.cat([ids_for(0), ids_for(1)])  # a batch of two
    err = output_error(ref, model, ids, dtype, monkeypatch)
    assert err <= REL_TOL[dtype], f"{name} {dtype}: relative error {err:.2e}"


# --------------------------------------------------------------------------------------------
# each peculiarity matters


def _window_everywhere(m):
    for b in m.blocks:
        b.attn.window = (4, 0)


def _no_window(m):
    for b in m.blocks:
        b.attn.window = None


def test_ministral_windows_on_the_sliding_layers_only_and_no_biases(tmp_path):
    ref = build("ministral", tmp_path)
    model = qkv.load(tmp_path)
    assert model.config.windows == (5, None, 5, None)
    assert [b.attn.window for b in model.blocks] == [(4, 0), None, (4, 0), None]
    attn, mlp = model.blocks[0].attn, model.blocks[0].mlp
    assert attn.b_Q is None and attn.b_O is None and mlp.up.bias is None
    assert model.config.d_head == 14 and attn.rope.base == 100.0
    assert _error(model, ref) <= TOL
    _breaks(tmp_path, ref, {
        "a window on every layer": _window_everywhere,
        "no window": _no_window,
    })  # fmt: skip


def test_ministral_without_layer_types_slides_on_every_layer(tmp_path):
    """transformers' default: layer_types absent → every layer sliding_attention."""
    build("ministral", tmp_path)
    _edit_config(tmp_path, drop=("layer_types",))
    ref = reread(tmp_path)
    assert ref.config.layer_types == [_S] * 4
    model = qkv.load(tmp_path)
    assert model.config.windows == (5,) * 4
    assert _error(model, ref) <= TOL

    def alternating(m):  # the layer_types the file was saved with
        for b in m.blocks[1::2]:
            b.attn.window = None

    _breaks(tmp_path, ref, {"windows on layers 0 and 2 only": alternating})


def test_olmo3_windows_bases_and_norms_matter(tmp_path):
    ref = build("olmo3", tmp_path)
    model = qkv.load(tmp_path)
    c = model.config
    assert c.windows == (5, 5, 5, None) and c.rope_bases == (100.0, 100.0, 100.0, 1000.0)
    attn = model.blocks[0].attn
    assert attn.qk_norm_scope == "all" and attn.q_norm.weight.shape == (60,)
    assert attn.k_norm.weight.shape == (20,) and attn.b_O is not None
    assert _error(model, ref) <= TOL

    def base_1000_everywhere(m):
        for b in m.blocks:
            b.attn.rope = m.blocks[3].attn.rope

    def per_head(b):
        b.attn.q_norm = _PerHead(b.attn.q_norm, 6)
        b.attn.k_norm = _PerHead(b.attn.k_norm, 2)

    _breaks(tmp_path, ref, {
        "no window": _no_window,
        "a window on every layer": _window_everywhere,
        "the global layer's base on every layer": base_1000_everywhere,
        "QK-norm per head": _each_block(per_head),
        "norms before the sublayers": _each_block(lambda b: setattr(b, "__class__", PreNormBlock)),
    })  # fmt: skip


def test_olmo3_old_rope_theta_is_the_global_layers_only(tmp_path):
    """An old config's top-level rope_theta sets the full_attention layers' base; the sliding
    layers keep 500000 (transformers' convert_rope_params_to_dict pops it once)."""
    build("olmo3", tmp_path)
    _edit_config(tmp_path, drop=("rope_parameters",), rope_theta=1000.0)
    ref = reread(tmp_path)
    rp = ref.config.rope_parameters
    assert (rp[_S]["rope_theta"], rp[_F]["rope_theta"]) == (500000.0, 1000.0)
    model = qkv.load(tmp_path)
    assert model.config.rope_bases == (500000.0,) * 3 + (1000.0,)
    assert _error(model, ref) <= TOL


_YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}


@pytest.fixture(scope="module")
def olmo3_yarn(tmp_path_factory):
    """OLMo 3 as released: YaRN on the full_attention layer only, 48 tokens past L = 32."""
    folder = tmp_path_factory.mktemp("olmo3_yarn")
    rp = {_S: {"rope_type": "default", "rope_theta": 100.0},
          _F: {**_YARN, "rope_theta": 1000.0}}  # fmt: skip
    ref = build("olmo3", folder, changes={"rope_parameters": rp, "max_position_embeddings": 128})
    return ref, qkv.load(folder), folder


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_olmo3_yarn_on_the_global_layers_matches(olmo3_yarn, dtype, monkeypatch):
    ref, model, _ = olmo3_yarn
    kinds = [None if s is None else s.rope_type for s in model.config.rope_scalings]
    assert kinds == [None, None, None, "yarn"]
    ids = torch.cat([ids_for(0, 48), ids_for(1, 48)])
    err = output_error(ref, model, ids, dtype, monkeypatch, float64_scaled_oracle_)
    assert err <= REL_TOL[dtype], f"olmo3 yarn {dtype}: relative error {err:.2e}"


def test_olmo3_yarn_placement_matters(olmo3_yarn):
    ref, _, folder = olmo3_yarn
    ids = ids_for(9, 48)

    def error(edit):
        m = qkv.load(folder)
        edit(m)
        with torch.no_grad():
            return rel(m(ids), ref(ids).logits)

    def no_yarn(m):
        b = m.blocks[3].attn.rope
        b.scaling, b._tables, b._pairs = None, {}, None

    def yarn_everywhere(m):
        for b in m.blocks[:3]:
            r = b.attn.rope
            r.scaling, r._tables, r._pairs = m.blocks[3].attn.rope.scaling, {}, None

    assert error(lambda m: None) <= TOL
    assert error(no_yarn) > 100 * TOL
    assert error(yarn_everywhere) > 100 * TOL


def test_olmo3_old_rope_scaling_is_the_global_layers_only(tmp_path):
    """The released configs' form: top-level rope_theta and rope_scaling (YaRN), both the
    full_attention layers' only, read as transformers reads them."""
    build("olmo3", tmp_path, changes={"max_position_embeddings": 128})
    _edit_config(tmp_path, drop=("rope_parameters",), rope_theta=1000.0, rope_scaling=_YARN)
    ref = reread(tmp_path)
    assert ref.config.rope_parameters[_S] == {"rope_type": "default", "rope_theta": 500000.0}
    model = qkv.load(tmp_path)
    kinds = [None if s is None else s.rope_type for s in model.config.rope_scalings]
    assert kinds == [None, None, None, "yarn"]
    assert model.config.rope_bases == (500000.0,) * 3 + (1000.0,)
    ids = ids_for(9, 48)
    with torch.no_grad():
        assert rel(model(ids), ref(ids).logits) <= TOL


def test_exaone4_nope_global_layers_qk_norm_and_post_norms_matter(tmp_path):
    ref = build("exaone4", tmp_path)
    model = qkv.load(tmp_path)
    blocks = model.blocks
    assert [b.attn.rope is None for b in blocks] == [False, True, False, True]
    assert [b.attn.window for b in blocks] == [(4, 0), None, (4, 0), None]
    attn = blocks[0].attn
    assert attn.qk_norm_scope == "head" and attn.q_norm.weight.shape == (14,)
    assert attn.rope.base == 100.0 and attn.b_Q is None and model.lm_head is not None
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
        "no window": _no_window,
        "no QK-norm": _each_block(lambda b: setattr(b.attn, "q_norm", None)
                                  or setattr(b.attn, "k_norm", None)),
        "norms before the sublayers": _each_block(lambda b: setattr(b, "__class__", PreNormBlock)),
    })  # fmt: skip


def test_exaone4_null_window_rotates_every_layer(tmp_path):
    """sliding_window null (every layer full_attention): RoPE on every layer, no window."""
    ref = build("exaone4", tmp_path, changes={"sliding_window": None, "layer_types": [_F] * 4})
    model = qkv.load(tmp_path)
    assert model.config.windows is None and model.config.rope_layers is None
    assert all(b.attn.rope is not None for b in model.blocks)
    assert _error(model, ref) <= TOL
    nope = {"NoPE on layers 1, 3": lambda m: [setattr(b.attn, "rope", None)
                                              for b in m.blocks[1::2]]}  # fmt: skip
    _breaks(tmp_path, ref, nope)


def test_exaone4_window_with_every_layer_global_is_nope_everywhere(tmp_path):
    """A window but no sliding layer: transformers rotates nowhere (`sliding_window is None or
    is_sliding` holds on no layer)."""
    ref = build("exaone4", tmp_path, changes={"layer_types": [_F] * 4})
    model = qkv.load(tmp_path)
    assert model.config.rope_layers == (False,) * 4 and model.config.windows is None
    assert _error(model, ref) <= TOL


@pytest.mark.parametrize(("pattern", "types"), [(2, [_S, _F, _S, _F]), (None, [_S, _S, _S, _F]),
                                                (3, [_S, _S, _F, _S])])  # fmt: skip
def test_exaone4_without_layer_types_reads_the_pattern(tmp_path, pattern, types):
    """No layer_types: every sliding_window_pattern-th layer global (4 when absent)."""
    build("exaone4", tmp_path)
    edit = {} if pattern is None else {"sliding_window_pattern": pattern}
    _edit_config(tmp_path, drop=("layer_types", "sliding_window_pattern"), **edit)
    ref = reread(tmp_path)
    assert ref.config.layer_types == types
    model = qkv.load(tmp_path)
    assert model.config.rope_layers == tuple(t == _S for t in types)
    assert model.config.windows == tuple(5 if t == _S else None for t in types)
    assert _error(model, ref) <= TOL


@pytest.mark.parametrize("mt", list(DENSE2))
def test_architectures_without_model_type_find_the_family(tmp_path, mt):
    """A config without model_type is read by its `architectures` class: MinistralForCausalLM
    is not Mistral's (nor Ministral3's), Olmo3ForCausalLM not OLMo 2's."""
    ref = build(mt, tmp_path)
    _edit_config(tmp_path, drop=("model_type",))
    assert _error(qkv.load(tmp_path), ref) <= TOL


def test_the_float64_check_can_fail(pair, monkeypatch):
    """The float64 comparison sees a 1e-6 change of one final-norm gain: far past its 1e-10."""
    name, ref, model = pair
    saved = model.norm.weight.detach().clone()
    with torch.no_grad():
        model.norm.weight[0] += 1e-6
    try:
        err = output_error(ref, model, ids_for(0), torch.float64, monkeypatch)
    finally:
        with torch.no_grad():
            model.norm.weight.copy_(saved)
    assert err > 100 * REL_TOL[torch.float64], f"{name}: {err:.2e}"


# --------------------------------------------------------------------------------------------
# bad configs: one clear error naming the key


@pytest.mark.parametrize(
    ("mt", "changes", "drop", "match"),
    [
        ("ministral", {"sliding_window": None}, (),
         r"ministral with sliding_window=null is not supported"),
        ("olmo3", {"sliding_window": None}, (), r"olmo3 with sliding_window=null is not supported"),
        ("ministral", {"layer_types": [_S, _F]}, (),
         r"layer_types must list 'sliding_attention' or 'full_attention' for each of the 4"),
        ("olmo3", {"layer_types": [_S, _F, "chunked_attention", _F]}, (),
         r"layer_types must list"),
        ("exaone4", {}, ("sliding_window",),
         r"exaone4 with no sliding_window key \(transformers would take 4096"),
        ("exaone4", {"sliding_window_pattern": "LLLG"}, ("layer_types",),
         r"sliding_window_pattern must be an int ≥ 1 when layer_types is absent, got 'LLLG'"),
        ("exaone4", {"sliding_window": None}, (),
         r"layer_types marks sliding_attention layers but sliding_window is null"),
        ("olmo3", {"rope_parameters": {_S: {"rope_type": "default", "rope_theta": 100.0},
                                       _F: {"rope_type": "ntk_by_parts", "factor": 2.0,
                                            "rope_theta": 1000.0}}}, (),
         r"rope_parameters.full_attention.rope_type='ntk_by_parts' is not supported"),
    ],
)  # fmt: skip
def test_bad_config_is_named(tmp_path, mt, changes, drop, match):
    build(mt, tmp_path)
    _edit_config(tmp_path, drop=drop, **changes)
    with pytest.raises(ValueError, match=match) as info:
        qkv.load(tmp_path)
    assert str(info.value).startswith(str(tmp_path / "config.json"))  # which file, in full
