"""The language model of multimodal checkpoints (`gemma3`: Gemma3ForConditionalGeneration,
`mistral3`: Mistral3ForConditionalGeneration) against transformers on text-only ids: a tiny
random checkpoint of each (a one-layer SigLIP / Pixtral vision tower + projector + the text
model) is built offline and saved, loaded with `qkv.load(folder)`, and compared in float32 and
float64 (logits), through the lens, and on 20 greedy tokens with and without the KV cache; the
vision tensors are reported as ignored. Then the layouts and configs real files have (new
tensor names, an untied lm_head, a sparse text_config), and the checks that can fail.
"""

import dataclasses
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import qkv
from qkv.models import hf as qhf
from tests.models.parity import (  # noqa: F401  (collected here, with this file's `pair`)
    test_lens_rows_match_output_attentions,
)

from .test_families import (
    N_GREEDY,
    REL_TOL,
    V,
    greedy_three_ways,
    ids_for,
    output_error,
    randomise_,
    rel,
    word_tokenizer,
)

transformers = pytest.importorskip("transformers", reason="transformers is the parity oracle")

_TEXT = dict(hidden_size=60, num_attention_heads=6, num_key_value_heads=2, intermediate_size=37,
             num_hidden_layers=2, vocab_size=V, max_position_embeddings=64)  # fmt: skip
_VISION = dict(hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2,
               image_size=28, patch_size=14)  # fmt: skip
CONFIGS = {
    # the gemma3_text model of test_families (five sliding layers, window 5, RoPE base 10, to
    # one global, base 1000; scores × 12^−½) plus a final_logit_softcapping of 5, which
    # Gemma3ForConditionalGeneration never applies (Gemma3ForCausalLM does)
    "gemma3": dict(
        text_config=dict(_TEXT, num_hidden_layers=6, head_dim=14, query_pre_attn_scalar=12,
                         sliding_window=5, rope_theta=1000.0, rope_local_base_freq=10.0,
                         final_logit_softcapping=5.0, pad_token_id=0, bos_token_id=0,
                         eos_token_id=0),
        vision_config=_VISION, mm_tokens_per_image=4,
    ),
    # a Mistral text model with a window of 5 on every layer; tie_word_embeddings false in
    # text_config, true (the class default) at the top level: transformers ties
    "mistral3": dict(
        text_config=dict(_TEXT, model_type="mistral", sliding_window=5),
        vision_config=dict(_VISION, head_dim=8),
    ),
}  # fmt: skip
TEXT_CONFIG = {"gemma3": "Gemma3TextConfig", "mistral3": "MistralConfig"}
VISION = ("vision_tower.", "multi_modal_projector.")


def build(model_type: str, folder):
    """A random `model_type` checkpoint (CONFIGS) with tokenizer.json saved in `folder`;
    returns the transformers model."""
    cfg = transformers.AutoConfig.for_model(model_type, **CONFIGS[model_type])
    torch.manual_seed(0)
    m = transformers.AutoModelForImageTextToText.from_config(cfg, attn_implementation="eager")
    randomise_(m.eval())
    m.save_pretrained(folder)
    word_tokenizer().save(str(folder / "tokenizer.json"))
    return m


def reload(folder):
    """transformers' model from `folder` (after an edit of its files)."""
    return transformers.AutoModelForImageTextToText.from_pretrained(
        folder, attn_implementation="eager"
    ).eval()


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request, tmp_path_factory):
    """(model_type, transformers model, qkv model, folder)."""
    folder = tmp_path_factory.mktemp(request.param)
    ref = build(request.param, folder)
    return request.param, ref, qkv.load(folder), folder


@pytest.fixture
def copy(pair, tmp_path):
    """A copy of the pair's folder to edit."""
    shutil.copytree(pair[3], tmp_path, dirs_exist_ok=True)
    return tmp_path


def _parity_error(model, ref) -> float:
    ids = ids_for(9)
    with torch.no_grad():
        return rel(model(ids), ref(ids).logits)


# --------------------------------------------------------------------------------------------
# parity on text


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_logits_match_transformers(pair, dtype, monkeypatch):
    mt, ref, model, _ = pair
    assert type(model).__name__ == "Decoder"
    ids = torch.cat([ids_for(0), ids_for(1)])  # a batch of two, longer than the window
    err = output_error(ref, model, ids, dtype, monkeypatch)
    assert err <= REL_TOL[dtype], f"{mt} {dtype}: relative error {err:.2e}"


def test_greedy_tokens_and_cache(pair):
    _, ref, model, _ = pair
    ref.generation_config.eos_token_id = None  # no end token: every pick unsuppressed
    want, cached, uncached = greedy_three_ways(ref, model, ids_for(5, 7), N_GREEDY)
    assert cached == uncached == want


def test_the_vision_tensors_are_ignored_and_the_name_says_text_model(pair):
    _, _, model, folder = pair
    keys = load_file(folder / "model.safetensors")
    vision = sorted(k for k in keys if k.startswith(VISION))
    assert len(vision) > 5 and model.load_report.unexpected == []
    assert sorted(model.load_report.ignored) == vision
    assert not any(k.startswith(VISION) for k in model.load_report.loaded)
    assert model.config.name == f"{folder.name} (text model)"


# --------------------------------------------------------------------------------------------
# the layouts and configs real files have


def test_the_in_memory_tensor_names_load_too(pair, copy):
    """transformers ≥ 4.52's names (model.language_model.*, model.vision_tower.*, lm_head.*)."""
    _, ref, _, _ = pair
    state = load_file(copy / "model.safetensors")
    renamed = {
        ("model.language_model." + k.removeprefix("language_model.model."))
        if k.startswith("language_model.model.")
        else "model." + k: t
        for k, t in state.items()
    }
    save_file(renamed, copy / "model.safetensors", metadata={"format": "pt"})
    model = qkv.load(copy)
    assert _parity_error(model, ref) <= REL_TOL[torch.float32]
    assert sorted(model.load_report.ignored) == sorted(
        k for k in renamed if k.startswith(tuple("model." + v for v in VISION))
    )


@pytest.mark.parametrize("name", ["language_model.lm_head.weight", "lm_head.weight"])
def test_an_lm_head_in_the_file_is_used(copy, name):
    """Mistral Small 3.1's files hold language_model.lm_head.weight and config.json sets no
    tie_word_embeddings (the class default: true): transformers then does not tie."""
    state = load_file(copy / "model.safetensors")
    if name == "lm_head.weight":  # the in-memory names throughout: one layout per file
        state = {k.replace("language_model.model.", "model.language_model."): t
                 for k, t in state.items()}  # fmt: skip
    state[name] = torch.randn(V, 60, generator=torch.Generator().manual_seed(3))
    save_file(state, copy / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((copy / "config.json").read_text(encoding="utf-8"))
    del cfg["tie_word_embeddings"]
    (copy / "config.json").write_text(json.dumps(cfg))
    ref = reload(copy)
    assert not torch.equal(ref.lm_head.weight, ref.get_input_embeddings().weight)
    model = qkv.load(copy)
    assert not model.config.tie_embeddings
    assert _parity_error(model, ref) <= REL_TOL[torch.float32]


def test_a_sparse_text_config_reads_the_text_config_class_defaults(pair, copy):
    """The Hub's config.json give in text_config only what differs from the text config
    class's defaults: every key equal to transformers' default is removed here, and both
    read the same model."""
    mt, _, _, _ = pair
    cfg = json.loads((copy / "config.json").read_text(encoding="utf-8"))
    defaults = getattr(transformers, TEXT_CONFIG[mt])().to_dict()
    text = cfg["text_config"]
    same = [k for k in list(text) if k != "model_type" and defaults.get(k) == text[k]]
    for k in same:
        del text[k]
    assert {"rms_norm_eps", "bos_token_id", "eos_token_id"} & set(same), same
    (copy / "config.json").write_text(json.dumps(cfg))
    assert _parity_error(qkv.load(copy), reload(copy)) <= REL_TOL[torch.float32]


def test_the_architectures_name_the_family():
    pairs = [("Gemma3ForConditionalGeneration", "gemma3"),
             ("Mistral3ForConditionalGeneration", "mistral3"),
             ("MistralForCausalLM", "mistral"), ("Gemma3ForCausalLM", "gemma3_text")]  # fmt: skip
    for arch, mt in pairs:
        assert qhf.family_of({"architectures": [arch]}, "config.json").model_type == mt


# --------------------------------------------------------------------------------------------
# the checks can fail; bad input


def test_text_config_values_not_defaults_make_parity(pair, copy):
    """The window comes from text_config (5): with it removed, qkv reads the default (4096)
    and no longer matches the checkpoint's model on 24 tokens."""
    _, ref, model, _ = pair
    assert model.blocks[0].attn.window == (4, 0)
    cfg = json.loads((copy / "config.json").read_text(encoding="utf-8"))
    del cfg["text_config"]["sliding_window"]
    (copy / "config.json").write_text(json.dumps(cfg))
    broken = qkv.load(copy)
    assert broken.blocks[0].attn.window is None or broken.blocks[0].attn.window[0] > 24
    assert _parity_error(broken, ref) > 100 * REL_TOL[torch.float32]


def test_the_text_logit_softcap_would_break_gemma3_parity(tmp_path):
    ref = build("gemma3", tmp_path)
    model = qkv.load(tmp_path)
    assert model.config.logit_softcap is None
    model.config = dataclasses.replace(model.config, logit_softcap=5.0)  # Gemma3ForCausalLM's
    assert _parity_error(model, ref) > 100 * REL_TOL[torch.float32]


def test_a_wrong_prefix_loads_nothing(pair, monkeypatch):
    mt, _, _, folder = pair
    family = qhf.FAMILIES[mt]
    wrong = dataclasses.replace(family.wrapper, prefixes=("model.",))
    monkeypatch.setitem(qhf.FAMILIES, mt, dataclasses.replace(family, wrapper=wrong))
    with pytest.raises(ValueError, match=r"lacks \d+ tensors .*embed_tokens\.weight"):
        qkv.load(folder)


def test_a_missing_language_model_tensor_is_named(pair, copy):
    state = load_file(copy / "model.safetensors")
    del state["language_model.model.layers.1.self_attn.q_proj.weight"]
    save_file(state, copy / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(
        ValueError,
        match=r"lacks tensor 'language_model\.model\.layers\.1\.self_attn\.q_proj\.weight' that "
        rf"a {pair[0]} checkpoint of this config\.json has \(1 missing;",
    ):
        qkv.load(copy)


def test_mixed_layouts_and_other_text_models_are_refused(pair, copy):
    mt, _, _, _ = pair
    state = load_file(copy / "model.safetensors")
    state["model.language_model.norm.weight"] = state["language_model.model.norm.weight"].clone()
    save_file(state, copy / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"two tensors are both 'norm\.weight'"):
        qkv.load(copy)
    cfg = json.loads((copy / "config.json").read_text(encoding="utf-8"))
    cfg["text_config"]["model_type"] = "ministral3"
    (copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=rf"text_config.model_type='ministral3' is not supported "
                                          rf"inside model_type='{mt}'"):  # fmt: skip
        qkv.load(copy)
    del cfg["text_config"]
    (copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"text_config is None; expected a dict"):
        qkv.load(copy)


def test_config_errors_name_where_config_json_holds_the_key(pair, copy):
    """The text model's settings sit in text_config; the token ids at the top level."""
    cfg = json.loads((copy / "config.json").read_text(encoding="utf-8"))
    cfg["text_config"]["num_key_value_heads"] = 4
    (copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(
        ValueError,
        match=r"config\.json: text_config\.num_attention_heads=6 must be a multiple of "
        r"text_config\.num_key_value_heads=4 \(GQA\)$",
    ):
        qkv.load(copy)
    cfg["text_config"]["num_key_value_heads"] = 2
    cfg["eos_token_id"] = V
    (copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(
        ValueError, match=rf"config\.json: eos_token_id={V} is outside the vocabulary \[0, {V}\)$"
    ):
        qkv.load(copy)
