"""The language model of multimodal checkpoints: Gemma 3 4B/12B/27B (`gemma3`,
Gemma3ForConditionalGeneration: SigLIP vision tower + projector + the Gemma 3 text model) and
Mistral Small 3.1 (`mistral3`, Mistral3ForConditionalGeneration: Pixtral vision tower +
projector + a Mistral text model). Each is its text family (`gemma3_text`, `mistral`) read
through a `Wrapper` (families_base): settings from `text_config`, tensors under the language
model's prefix, the vision tower's and projector's tensors ignored (listed in
`load_report.ignored`). qkv runs the text model only: its models take token ids, no image.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from .families_base import Family, Wrapper

# Gemma3TextConfig's defaults (transformers 5.24), which a sparse text_config relies on: the
# Hub's gemma-3-4b/12b/27b config.json give only what differs (hidden_size, layers, ...)
_GEMMA3_TEXT_DEFAULTS: dict[str, Any] = {
    "vocab_size": 262208, "hidden_size": 2304, "intermediate_size": 9216,
    "num_hidden_layers": 26, "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256,
    "hidden_activation": "gelu_pytorch_tanh", "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-6, "pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 2,
    "attention_bias": False, "query_pre_attn_scalar": 256, "sliding_window": 4096,
    "sliding_window_pattern": 6, "rope_theta": 1e6, "rope_local_base_freq": 1e4,
}  # fmt: skip
# MistralConfig's defaults (head_dim absent: hidden_size / num_attention_heads)
_MISTRAL_DEFAULTS: dict[str, Any] = {
    "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 14336,
    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
    "hidden_act": "silu", "max_position_embeddings": 131072, "rms_norm_eps": 1e-6,
    "bos_token_id": 1, "eos_token_id": 2, "rope_theta": 1e4, "sliding_window": 4096,
}  # fmt: skip
# what transformers reads from the wrapper's top level: tie_word_embeddings (the class default
# True; `lm_head.weight` in the file unties, as transformers does not tie differing tensors);
# the token ids through generate's GenerationConfig (the top level first, then text_config)
_TOP_LEVEL = {"tie_word_embeddings": True, "bos_token_id": None, "eos_token_id": None,
              "pad_token_id": None}  # fmt: skip


def text_model_of(
    base: Family, model_type: str, classes: tuple[str, ...], wrapper: Wrapper, **changes: Any
) -> Family:
    """`base` (the text family) as the language model of `model_type`'s multimodal checkpoints."""
    return dataclasses.replace(
        base, model_type=model_type, classes=classes, wrapper=wrapper,
        ignore=(*base.ignore, *wrapper.ignore), **changes,
    )  # fmt: skip


def multimodal_families(gemma3_text: Family, mistral: Family) -> tuple[Family, ...]:
    """`gemma3` and `mistral3` from the text families they wrap."""
    return (
        # Gemma3ForConditionalGeneration applies no final_logit_softcapping (its text config may
        # hold one; Gemma3ForCausalLM applies it, the wrapper's own lm_head does not)
        text_model_of(
            gemma3_text, "gemma3", ("Gemma3ForConditionalGeneration",),
            Wrapper("gemma3_text", _GEMMA3_TEXT_DEFAULTS, _TOP_LEVEL),
            fixed={**gemma3_text.fixed, "logit_softcap": None},
        ),
        text_model_of(
            mistral, "mistral3", ("Mistral3ForConditionalGeneration",),
            Wrapper("mistral", _MISTRAL_DEFAULTS, _TOP_LEVEL),
        ),
    )  # fmt: skip
