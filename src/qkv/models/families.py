"""Hugging Face architectures as declarative descriptions, one `Family` per `model_type`: the
families here (Llama and its relatives, Gemma, Phi-3, GPT-NeoX, OPT, GPT-2, the BERT encoders),
those of `families_more.py` (SmolLM3, OLMo 2, Granite, StarCoder2, Phi-2, BLOOM) and
`families_dense.py` (GPT-J, StableLM, Cohere, Falcon), the language model of multimodal
checkpoints (Gemma 3 4B+, Mistral Small 3.1: `families_multimodal.py`), and `FAMILIES`, every one by
model_type. What a `Family` says and how it is read: `families_base.py`.
Mixture-of-experts decoders (Mixtral, Qwen3-MoE, Qwen2-MoE, OLMoE): `families_moe.py`.
Cohere 2, GraniteMoE, OLMo 1 and Arcee: `families_extra.py`.
Ministral, OLMo 3 and EXAONE 4: `families_dense2.py`. GLM-4-0414, Seed-OSS and ERNIE 4.5 (dense):
`families_dense3.py`. Nemotron, Helium and Hunyuan (dense): `families_dense4.py`. gpt-oss:
`families_gptoss.py`. GLM-4.5 (glm4_moe) and dots.llm1, with DeepSeek-V3's routing:
`families_moe2.py`. DeepSeek-V3 / R1 and Kimi K2 (multi-head latent attention):
`families_deepseek.py`. ERNIE 4.5 MoE, Hunyuan-A13B (hunyuan_v1_moe) and GraniteMoeShared, each
with a shared expert: `families_moe3.py`.

Letters: h query heads, k kv heads, d head dim, m model dim.
"""

from __future__ import annotations

from typing import Any

from .families_base import (
    ACTS,
    CORE_FIELDS,
    DECODER_IGNORE,
    LAYER_MLP,
    LLAMA_DEFAULTS,
    LLAMA_FIELDS,
    LLAMA_WEIGHTS,
    RESHAPES,
    ROPE_BASE,
    SELF_ATTN,
    Family,
    W,
    llama_like,
    read_fields,
    rope_dim,
)
from .families_deepseek import DEEPSEEK_FAMILIES, DEEPSEEK_RESHAPES
from .families_dense import DENSE_FAMILIES
from .families_dense2 import DENSE2_FAMILIES
from .families_dense3 import DENSE3_FAMILIES
from .families_dense4 import DENSE4_FAMILIES
from .families_extra import EXTRA_FAMILIES
from .families_gptoss import GPT_OSS_FAMILIES
from .families_moe import MOE_FAMILIES
from .families_moe2 import MOE2_FAMILIES
from .families_moe3 import MOE3_FAMILIES
from .families_more import MORE_FAMILIES
from .families_multimodal import multimodal_families

__all__ = ["ACTS", "FAMILIES", "RESHAPES", "Family", "W", "read_fields"]

RESHAPES.update(DEEPSEEK_RESHAPES)  # multi-head latent attention's kv_b_proj and o_proj

_A, _M = SELF_ATTN, LAYER_MLP


# Gemma 2: the Llama names, but its post_attention_layernorm follows attention (a post-norm)
_GEMMA2_WEIGHTS = (
    *(w for w in LLAMA_WEIGHTS if w.dst != "blocks.{}.norm2.weight"),
    W("blocks.{}.norm2.weight", "layers.{}.pre_feedforward_layernorm.weight"),
    W("blocks.{}.post1.weight", "layers.{}.post_attention_layernorm.weight"),
    W("blocks.{}.post2.weight", "layers.{}.post_feedforward_layernorm.weight"),
)


def _gemma2_scales(f: dict[str, Any]) -> dict[str, Any]:
    """Embeddings × √d_model; scores × query_pre_attn_scalar^−½ (not d_head^−½)."""
    return {
        "embed_scale": f["d_model"] ** 0.5,
        "attn_scale": f.get("query_pre_attn_scalar", f["d_head"]) ** -0.5,
    }


# Gemma 2: Gemma plus pre- and post-norms around each sublayer, scores scaled by
# query_pre_attn_scalar^−½ and soft-capped, logits soft-capped, windows from layer_types
_GEMMA2_FIELDS = {
    "act": ("hidden_activation", "hidden_act"),
    "window": ("sliding_window",),
    "window_pattern": ("sliding_window_pattern",),
    "attn_softcap": ("attn_logit_softcapping",),
    "logit_softcap": ("final_logit_softcapping",),
    "query_pre_attn_scalar": ("query_pre_attn_scalar",),
}
_BIDIRECTIONAL = (
    "use_bidirectional_attention",
    lambda cfg: bool(cfg.get("use_bidirectional_attention")),
)
_GEMMA2 = llama_like(
    "gemma2", classes=("Gemma2For",), weights=_GEMMA2_WEIGHTS, window="layer_types",
    fixed={"norm_offset": 1.0, "block": "sandwich"}, fields=_GEMMA2_FIELDS,
    unsupported=(_BIDIRECTIONAL,), derive=_gemma2_scales,
    defaults={"window_pattern": 2},  # configs without layer_types: every 2nd layer global
)  # fmt: skip

# Gemma 3: Gemma 2 plus QK-norm (RMSNorm 1 + w on each head's q and k), RoPE base 10⁴ on the
# sliding layers and 10⁶ on the global ones, five sliding layers to one global; rope_parameters
# holds one entry per layer type (older configs: rope_theta and rope_local_base_freq)
_GEMMA3 = llama_like(
    "gemma3_text", classes=("Gemma3ForCausalLM", "Gemma3TextModel"), weights=_GEMMA2_WEIGHTS,
    window="layer_types", fixed={"norm_offset": 1.0, "block": "sandwich", "qk_norm": True},
    fields={
        **_GEMMA2_FIELDS,
        "rope_base": ("rope_parameters.full_attention.rope_theta", *ROPE_BASE),
        "local_rope_base": ("rope_parameters.sliding_attention.rope_theta",
                            "rope_local_base_freq"),
    },
    unsupported=(_BIDIRECTIONAL,), rope_by_layer_type=True,
    derive=_gemma2_scales, defaults={"rope_base": 1e6, "local_rope_base": 1e4, "window_pattern": 6},
)  # fmt: skip


# Phi-3: the Llama layout with fused qkv_proj and gate_up_proj, a window on every layer
_PHI3 = Family(
    "phi3", "decoder",
    {**LLAMA_FIELDS, "window": ("sliding_window",),
     "rope_fraction": ("rope_parameters.partial_rotary_factor", "partial_rotary_factor")},
    (
        *(w for w in LLAMA_WEIGHTS if w.when is None or w.when == "untied"
          if not w.dst.startswith(("blocks.{}.attn.W_", "blocks.{}.mlp."))),
        W("blocks.{}.attn.W_Q", _A + "qkv_proj.weight", "qkv_proj.q"),
        W("blocks.{}.attn.W_K", _A + "qkv_proj.weight", "qkv_proj.k"),
        W("blocks.{}.attn.W_V", _A + "qkv_proj.weight", "qkv_proj.v"),
        W("blocks.{}.attn.W_O", _A + "o_proj.weight", "o"),
        W("blocks.{}.mlp.gate.weight", _M + "gate_up_proj.weight", "gate_up.gate"),
        W("blocks.{}.mlp.up.weight", _M + "gate_up_proj.weight", "gate_up.up"),
        W("blocks.{}.mlp.down.weight", _M + "down_proj.weight"),
    ),
    fixed={"attn_bias": False, "out_bias": False, "mlp_bias": False},
    defaults={**LLAMA_DEFAULTS, "tie_embeddings": False}, prefix="model.",
    ignore=DECODER_IGNORE, window="all", classes=("Phi3",),
    derive=rope_dim,
)  # fmt: skip

# GPT-NeoX (Pythia): fused query_key_value interleaved per head, partial rotary, LayerNorm,
# parallel residual (`use_parallel_residual`), biases everywhere, an untied `embed_out`
_X = "layers.{}."
_GPT_NEOX = Family(
    "gpt_neox", "decoder",
    {
        **CORE_FIELDS,
        "d_ff": ("intermediate_size",),
        "norm_eps": ("layer_norm_eps",),
        "act": ("hidden_act",),
        "rope_base": ("rope_parameters.rope_theta", "rotary_emb_base", "rope_theta"),
        "rope_fraction": ("rope_parameters.partial_rotary_factor", "rotary_pct"),
        "parallel": ("use_parallel_residual",),
        "attn_bias": ("attention_bias",),
        "out_bias": ("attention_bias",),
    },
    (
        W("embed.weight", "embed_in.weight"),
        W("lm_head.weight", "embed_out.weight", when="untied"),
        W("norm.weight", "final_layer_norm.weight"),
        W("norm.bias", "final_layer_norm.bias"),
        W("blocks.{}.norm1.weight", _X + "input_layernorm.weight"),
        W("blocks.{}.norm1.bias", _X + "input_layernorm.bias"),
        W("blocks.{}.norm2.weight", _X + "post_attention_layernorm.weight"),
        W("blocks.{}.norm2.bias", _X + "post_attention_layernorm.bias"),
        W("blocks.{}.attn.W_Q", _X + "attention.query_key_value.weight", "neox.q"),
        W("blocks.{}.attn.W_K", _X + "attention.query_key_value.weight", "neox.k"),
        W("blocks.{}.attn.W_V", _X + "attention.query_key_value.weight", "neox.v"),
        W("blocks.{}.attn.b_Q", _X + "attention.query_key_value.bias", "neox.bq", when="attn_bias"),
        W("blocks.{}.attn.b_K", _X + "attention.query_key_value.bias", "neox.bk", when="attn_bias"),
        W("blocks.{}.attn.b_V", _X + "attention.query_key_value.bias", "neox.bv", when="attn_bias"),
        W("blocks.{}.attn.W_O", _X + "attention.dense.weight", "o"),
        W("blocks.{}.attn.b_O", _X + "attention.dense.bias", when="out_bias"),
        W("blocks.{}.mlp.up.weight", _X + "mlp.dense_h_to_4h.weight"),
        W("blocks.{}.mlp.up.bias", _X + "mlp.dense_h_to_4h.bias"),
        W("blocks.{}.mlp.down.weight", _X + "mlp.dense_4h_to_h.weight"),
        W("blocks.{}.mlp.down.bias", _X + "mlp.dense_4h_to_h.bias"),
    ),
    fixed={"norm": "layer", "gated": False, "mlp_bias": True},
    defaults={"rope_base": 10000.0, "rope_fraction": 0.25, "parallel": True, "norm_eps": 1e-5,
              "tie_embeddings": False, "attn_bias": True, "out_bias": True},
    prefix="gpt_neox.", classes=("GPTNeoX",),
    # causal-mask and rotary buffers of old checkpoints
    ignore=("layers.*.attention.bias", "layers.*.attention.masked_bias",
            "layers.*.attention.rotary_emb.inv_freq"),
    derive=lambda f: {**rope_dim(f), "block": "parallel" if f["parallel"] else "pre"},
)  # fmt: skip

# OPT: learned positions numbered from 2, ReLU, LayerNorm before (or, OPT-350m, after) each
# sublayer; post-norm models have no final norm
_O = "layers.{}."
_OPT = Family(
    "opt", "decoder",
    {
        **CORE_FIELDS,
        "d_ff": ("ffn_dim",),
        "act": ("activation_function",),
        "pre_norm": ("do_layer_norm_before",),
        "remove_final_norm": ("_remove_final_layer_norm",),
        "attn_bias": ("enable_bias",),
        "out_bias": ("enable_bias",),
        "mlp_bias": ("enable_bias",),
    },
    (
        W("embed.weight", "embed_tokens.weight"),
        W("embed_positions.weight", "embed_positions.weight"),
        W("lm_head.weight", "lm_head.weight", when="untied"),
        W("norm.weight", "final_layer_norm.weight", when="final_norm"),
        W("norm.bias", "final_layer_norm.bias", when="final_norm"),
        W("blocks.{}.norm1.weight", _O + "self_attn_layer_norm.weight"),
        W("blocks.{}.norm1.bias", _O + "self_attn_layer_norm.bias"),
        W("blocks.{}.norm2.weight", _O + "final_layer_norm.weight"),
        W("blocks.{}.norm2.bias", _O + "final_layer_norm.bias"),
        W("blocks.{}.attn.W_Q", _O + "self_attn.q_proj.weight", "q"),
        W("blocks.{}.attn.W_K", _O + "self_attn.k_proj.weight", "q"),
        W("blocks.{}.attn.W_V", _O + "self_attn.v_proj.weight", "q"),
        W("blocks.{}.attn.W_O", _O + "self_attn.out_proj.weight", "o"),
        W("blocks.{}.attn.b_Q", _O + "self_attn.q_proj.bias", "bq", when="attn_bias"),
        W("blocks.{}.attn.b_K", _O + "self_attn.k_proj.bias", "bq", when="attn_bias"),
        W("blocks.{}.attn.b_V", _O + "self_attn.v_proj.bias", "bq", when="attn_bias"),
        W("blocks.{}.attn.b_O", _O + "self_attn.out_proj.bias", when="out_bias"),
        W("blocks.{}.mlp.up.weight", _O + "fc1.weight"),
        W("blocks.{}.mlp.up.bias", _O + "fc1.bias", when="mlp_bias"),
        W("blocks.{}.mlp.down.weight", _O + "fc2.weight"),
        W("blocks.{}.mlp.down.bias", _O + "fc2.bias", when="mlp_bias"),
    ),
    fixed={"norm": "layer", "positions": "learned", "gated": False, "position_offset": 2,
           "norm_eps": 1e-5},
    defaults={"pre_norm": True, "remove_final_norm": False, "tie_embeddings": True,
              "attn_bias": True, "out_bias": True, "mlp_bias": True, "act": "relu"},
    prefix="model.decoder.", classes=("OPT",),
    unsupported=(
        ("word_embed_proj_dim ≠ hidden_size (project_in/project_out)",
         lambda cfg: cfg.get("word_embed_proj_dim", cfg.get("hidden_size"))
         != cfg.get("hidden_size")),
        ("layer_norm_elementwise_affine=false",
         lambda cfg: cfg.get("layer_norm_elementwise_affine") is False),
    ),
    # the table has max_positions + 2 rows: positions are numbered from 2
    derive=lambda f: {"block": "pre" if f["pre_norm"] else "post",
                      "final_norm": bool(f["pre_norm"] and not f["remove_final_norm"])},
)  # fmt: skip

# --------------------------------------------------------------------------------------------
# GPT-2: Conv1D weights (in, out), one fused c_attn, learned positions, LayerNorm with biases

_G = "h.{}."
_GPT2 = Family(
    "gpt2",
    "decoder",
    {
        "n_layers": ("n_layer",),
        "n_heads": ("n_head",),
        "d_model": ("n_embd",),
        "d_ff": ("n_inner",),
        "vocab_size": ("vocab_size",),
        "max_positions": ("n_positions",),
        "norm_eps": ("layer_norm_epsilon",),
        "act": ("activation_function",),
        "tie_embeddings": ("tie_word_embeddings",),
        "bos_id": ("bos_token_id",),
        "eos_id": ("eos_token_id",),
    },
    (
        W("embed.weight", "wte.weight"),
        W("embed_positions.weight", "wpe.weight"),
        W("lm_head.weight", "lm_head.weight", when="untied"),
        W("norm.weight", "ln_f.weight"),
        W("norm.bias", "ln_f.bias"),
        W("blocks.{}.norm1.weight", _G + "ln_1.weight"),
        W("blocks.{}.norm1.bias", _G + "ln_1.bias"),
        W("blocks.{}.norm2.weight", _G + "ln_2.weight"),
        W("blocks.{}.norm2.bias", _G + "ln_2.bias"),
        W("blocks.{}.attn.W_Q", _G + "attn.c_attn.weight", "c_attn.q"),
        W("blocks.{}.attn.W_K", _G + "attn.c_attn.weight", "c_attn.k"),
        W("blocks.{}.attn.W_V", _G + "attn.c_attn.weight", "c_attn.v"),
        W("blocks.{}.attn.b_Q", _G + "attn.c_attn.bias", "c_attn.bq"),
        W("blocks.{}.attn.b_K", _G + "attn.c_attn.bias", "c_attn.bk"),
        W("blocks.{}.attn.b_V", _G + "attn.c_attn.bias", "c_attn.bv"),
        W("blocks.{}.attn.W_O", _G + "attn.c_proj.weight", "c_proj.o"),
        W("blocks.{}.attn.b_O", _G + "attn.c_proj.bias"),
        W("blocks.{}.mlp.up.weight", _G + "mlp.c_fc.weight", "t"),
        W("blocks.{}.mlp.up.bias", _G + "mlp.c_fc.bias"),
        W("blocks.{}.mlp.down.weight", _G + "mlp.c_proj.weight", "t"),
        W("blocks.{}.mlp.down.bias", _G + "mlp.c_proj.bias"),
    ),
    fixed={
        "norm": "layer",
        "positions": "learned",
        "gated": False,
        "attn_bias": True,
        "out_bias": True,
        "mlp_bias": True,
    },
    defaults={"tie_embeddings": True, "norm_eps": 1e-5},
    prefix="transformer.",
    classes=("GPT2",),
    ignore=("h.*.attn.bias", "h.*.attn.masked_bias"),  # causal-mask buffers of old checkpoints
    unsupported=(
        (
            "scale_attn_by_inverse_layer_idx",
            lambda cfg: bool(cfg.get("scale_attn_by_inverse_layer_idx")),
        ),
        ("scale_attn_weights=false", lambda cfg: cfg.get("scale_attn_weights") is False),
        ("add_cross_attention (cross-attention)", lambda cfg: bool(cfg.get("add_cross_attention"))),
    ),
)

# --------------------------------------------------------------------------------------------
# encoders

_BERT_FIELDS = {
    "n_layers": ("num_hidden_layers",),
    "n_heads": ("num_attention_heads",),
    "d_model": ("hidden_size",),
    "d_mlp": ("intermediate_size",),
    "vocab_size": ("vocab_size",),
    "max_positions": ("max_position_embeddings",),
    "type_vocab_size": ("type_vocab_size",),
    "layer_norm_eps": ("layer_norm_eps",),
    "act": ("hidden_act",),
    "pad_id": ("pad_token_id",),
}
_E, _BLK = "encoder.layer.{}.", "blocks.{}."
_BERT_WEIGHTS = (
    W("embed_tokens.weight", "embeddings.word_embeddings.weight"),
    W("embed_positions.weight", "embeddings.position_embeddings.weight"),
    W("embed_types.weight", "embeddings.token_type_embeddings.weight", when="type_vocab_size"),
    W("embed_norm.weight", "embeddings.LayerNorm.weight"),
    W("embed_norm.bias", "embeddings.LayerNorm.bias"),
    W(_BLK + "attn.W_Q", _E + "attention.self.query.weight", "q"),
    W(_BLK + "attn.W_K", _E + "attention.self.key.weight", "q"),
    W(_BLK + "attn.W_V", _E + "attention.self.value.weight", "q"),
    W(_BLK + "attn.b_Q", _E + "attention.self.query.bias", "bq"),
    W(_BLK + "attn.b_K", _E + "attention.self.key.bias", "bq"),
    W(_BLK + "attn.b_V", _E + "attention.self.value.bias", "bq"),
    W(_BLK + "attn.W_O", _E + "attention.output.dense.weight", "o"),
    W(_BLK + "attn.b_O", _E + "attention.output.dense.bias"),
    W(_BLK + "norm1.weight", _E + "attention.output.LayerNorm.weight"),
    W(_BLK + "norm1.bias", _E + "attention.output.LayerNorm.bias"),
    W(_BLK + "mlp.up.weight", _E + "intermediate.dense.weight"),
    W(_BLK + "mlp.up.bias", _E + "intermediate.dense.bias"),
    W(_BLK + "mlp.down.weight", _E + "output.dense.weight"),
    W(_BLK + "mlp.down.bias", _E + "output.dense.bias"),
    W(_BLK + "norm2.weight", _E + "output.LayerNorm.weight"),
    W(_BLK + "norm2.bias", _E + "output.LayerNorm.bias"),
)
# a buffer of arange; the unused [CLS] pooler; masked-LM / classification heads
_ENCODER_IGNORE = ("embeddings.position_ids", "embeddings.token_type_ids", "pooler.*", "cls.*",
                   "lm_head.*", "classifier.*", "qa_outputs.*", "vocab_*")  # fmt: skip
_ABSOLUTE = (
    "position_embedding_type other than 'absolute'",
    lambda cfg: cfg.get("position_embedding_type", "absolute") != "absolute",
)
_CROSS = (
    "is_decoder / add_cross_attention",
    lambda cfg: bool(cfg.get("is_decoder") or cfg.get("add_cross_attention")),
)

_T = "transformer.layer.{}."
_DISTILBERT = Family(
    "distilbert",
    "encoder",
    {
        "n_layers": ("n_layers",),
        "n_heads": ("n_heads",),
        "d_model": ("dim",),
        "d_mlp": ("hidden_dim",),
        "vocab_size": ("vocab_size",),
        "max_positions": ("max_position_embeddings",),
        "act": ("activation",),
        "pad_id": ("pad_token_id",),
    },
    (
        W("embed_tokens.weight", "embeddings.word_embeddings.weight"),
        W("embed_positions.weight", "embeddings.position_embeddings.weight"),
        W("embed_norm.weight", "embeddings.LayerNorm.weight"),
        W("embed_norm.bias", "embeddings.LayerNorm.bias"),
        W(_BLK + "attn.W_Q", _T + "attention.q_lin.weight", "q"),
        W(_BLK + "attn.W_K", _T + "attention.k_lin.weight", "q"),
        W(_BLK + "attn.W_V", _T + "attention.v_lin.weight", "q"),
        W(_BLK + "attn.b_Q", _T + "attention.q_lin.bias", "bq"),
        W(_BLK + "attn.b_K", _T + "attention.k_lin.bias", "bq"),
        W(_BLK + "attn.b_V", _T + "attention.v_lin.bias", "bq"),
        W(_BLK + "attn.W_O", _T + "attention.out_lin.weight", "o"),
        W(_BLK + "attn.b_O", _T + "attention.out_lin.bias"),
        W(_BLK + "norm1.weight", _T + "sa_layer_norm.weight"),
        W(_BLK + "norm1.bias", _T + "sa_layer_norm.bias"),
        W(_BLK + "mlp.up.weight", _T + "ffn.lin1.weight"),
        W(_BLK + "mlp.up.bias", _T + "ffn.lin1.bias"),
        W(_BLK + "mlp.down.weight", _T + "ffn.lin2.weight"),
        W(_BLK + "mlp.down.bias", _T + "ffn.lin2.bias"),
        W(_BLK + "norm2.weight", _T + "output_layer_norm.weight"),
        W(_BLK + "norm2.bias", _T + "output_layer_norm.bias"),
    ),
    fixed={"type_vocab_size": 0, "layer_norm_eps": 1e-12},  # DistilBERT's eps is hard-coded
    defaults={"pad_id": 0},
    prefix="distilbert.",
    ignore=_ENCODER_IGNORE,
    classes=("DistilBert",),
)

# "MistralFor"/"MistralModel", not "Mistral": Mistral3ForConditionalGeneration is `mistral3`
_MISTRAL = llama_like("mistral", window="all", fields={"window": ("sliding_window",)},
                      classes=("MistralFor", "MistralModel"))  # fmt: skip

FAMILIES: dict[str, Family] = {
    f.model_type: f
    for f in (
        # first: a config without model_type is matched by the first family whose `classes`
        # prefix its architecture, and Cohere2For… starts with "Cohere" too
        *EXTRA_FAMILIES,
        *GPT_OSS_FAMILIES,
        llama_like("llama", classes=("Llama",)),
        _MISTRAL,
        llama_like("qwen2", classes=("Qwen2",), fixed={"attn_bias": True, "out_bias": False}, window="layer_types",
                    fields={"window": ("sliding_window",)}),
        llama_like("qwen3", classes=("Qwen3",), fixed={"qk_norm": True}, window="layer_types",
                    fields={"window": ("sliding_window",)}),
        # Gemma: RMSNorm scaling by 1 + w, embeddings × √d_model, GeGLU (tanh GELU gate)
        llama_like("gemma", classes=("GemmaFor",), fixed={"norm_offset": 1.0},
                    derive=lambda f: {"embed_scale": f["d_model"] ** 0.5}),
        _GEMMA2,
        _GEMMA3,
        _PHI3,
        _GPT_NEOX,
        _OPT,
        _GPT2,
        Family("bert", "encoder", _BERT_FIELDS, _BERT_WEIGHTS, prefix="bert.", classes=("Bert",),
               defaults={"type_vocab_size": 2, "layer_norm_eps": 1e-12, "pad_id": 0},
               ignore=_ENCODER_IGNORE, unsupported=(_ABSOLUTE, _CROSS)),
        # RoBERTa numbers positions from pad_id + 1 (its position table has pad_id + 1 more rows)
        Family("roberta", "encoder", _BERT_FIELDS, _BERT_WEIGHTS, prefix="roberta.",
               defaults={"type_vocab_size": 1, "layer_norm_eps": 1e-5, "pad_id": 1},
               ignore=_ENCODER_IGNORE, unsupported=(_ABSOLUTE, _CROSS), classes=("Roberta",),
               derive=lambda f: {"position_offset": f["pad_id"] + 1,
                                 "max_positions": f["max_positions"] - f["pad_id"] - 1}),
        _DISTILBERT,
        *MORE_FAMILIES,
        *MOE_FAMILIES,
        *MOE2_FAMILIES,
        *DEEPSEEK_FAMILIES,
        *MOE3_FAMILIES,
        *DENSE_FAMILIES,
        *DENSE2_FAMILIES,
        *DENSE3_FAMILIES,
        *DENSE4_FAMILIES,
        *multimodal_families(_GEMMA3, _MISTRAL),  # gemma3, mistral3: their language model
    )
}  # fmt: skip
