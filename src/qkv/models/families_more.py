"""More Hugging Face decoder families, each a declarative `Family` (see `families_base.py`):
SmolLM3 (Llama with NoPE layers), OLMo 2 (QK-norm over whole projections, norms after each
sublayer), Granite (Llama with multipliers), StarCoder2 (LayerNorm, plain GELU MLP, biases,
sliding window), Phi-2 (one LayerNorm feeding attention and MLP in parallel, partial rotary)
and BLOOM (ALiBi, fused per-head query_key_value, a LayerNorm on the embeddings).

Defaults are transformers' own (`configuration_<name>.py`) for configs that omit a key.

Letters: h query heads, k kv heads, d head dim, m model dim.
"""

from __future__ import annotations

from typing import Any

from .families_base import (
    CORE_FIELDS,
    DECODER_IGNORE,
    LAYER_MLP,
    LLAMA_WEIGHTS,
    ROPE_BASE,
    SELF_ATTN,
    Family,
    W,
    llama_like,
    rope_dim,
)

_A, _M = SELF_ATTN, LAYER_MLP


# SmolLM3: Llama, but a layer whose `no_rope_layers` entry is 0 has no positions at all (NoPE);
# without the list, every `no_rope_layer_interval`-th layer (4th, 8th, ...) is one
def _rope_layers(f: dict[str, Any]) -> dict[str, Any]:
    n, flags = f["n_layers"], f.get("no_rope_layers")
    if flags is None:
        every = f["no_rope_interval"]
        if not (isinstance(every, int) and every > 0):
            raise ValueError(
                f"config.json: no_rope_layer_interval must be an int > 0, got {every!r}"
            )
        flags = [int((i + 1) % every != 0) for i in range(n)]
    if not isinstance(flags, list) or len(flags) < n or any(x not in (0, 1) for x in flags[:n]):
        raise ValueError(
            f"config.json: no_rope_layers must list 0 or 1 for each of the {n} layers, got {flags!r}"
        )
    return {"rope_layers": tuple(bool(x) for x in flags[:n])}


_SMOLLM3 = llama_like(
    "smollm3", classes=("SmolLM3",), window="layer_types",
    fields={"window": ("sliding_window",), "no_rope_layers": ("no_rope_layers",),
            "no_rope_interval": ("no_rope_layer_interval",)},
    defaults={"no_rope_interval": 4, "rope_base": 2e6, "norm_eps": 1e-6, "act": "silu"},
    unsupported=(
        # transformers then makes the NoPE layers the sliding ones; configs it writes list them
        ("use_sliding_window without layer_types",
         lambda cfg: bool(cfg.get("use_sliding_window")) and cfg.get("layer_types") is None),
    ),
    derive=_rope_layers,
)  # fmt: skip

# OLMo 2: QK-norm (RMSNorm) over the whole q and k projections, not per head; no norm before a
# sublayer, one on its output (post_attention_layernorm, post_feedforward_layernorm)
_OLMO2 = llama_like(
    "olmo2", classes=("Olmo2",),
    weights=(
        *(w for w in LLAMA_WEIGHTS if w.dst not in ("blocks.{}.norm1.weight", "blocks.{}.norm2.weight")),
        W("blocks.{}.norm1.weight", "layers.{}.post_attention_layernorm.weight"),
        W("blocks.{}.norm2.weight", "layers.{}.post_feedforward_layernorm.weight"),
    ),
    fixed={"qk_norm": True, "qk_norm_scope": "all", "block": "output_norm", "mlp_bias": False},
    defaults={"tie_embeddings": False, "norm_eps": 1e-5, "act": "silu"},
)  # fmt: skip


def _granite_scales(f: dict[str, Any]) -> dict[str, Any]:
    """Logits ÷ logits_scaling (our logit_scale multiplies)."""
    s = f["logits_scaling"]
    if not (isinstance(s, int | float) and s > 0):
        raise ValueError(f"config.json: logits_scaling must be a number > 0, got {s!r}")
    return {"logit_scale": 1.0 / s}


# Granite: Llama with embeddings × embedding_multiplier, each sublayer's output ×
# residual_multiplier, scores × attention_multiplier (in place of 1/√d), logits ÷ logits_scaling
_GRANITE = llama_like(
    "granite", classes=("Granite",),
    fields={"embed_scale": ("embedding_multiplier",), "residual_scale": ("residual_multiplier",),
            "attn_scale": ("attention_multiplier",), "logits_scaling": ("logits_scaling",)},
    defaults={"tie_embeddings": False, "norm_eps": 1e-6, "act": "silu", "embed_scale": 1.0,
              "residual_scale": 1.0, "attn_scale": 1.0, "logits_scaling": 1.0},
    derive=_granite_scales,
)  # fmt: skip

# StarCoder2: the Llama attention names with q/k/v/o biases (`use_bias`), LayerNorm with bias,
# a plain MLP c_fc → act → c_proj, a sliding window on every layer
_STARCODER2 = Family(
    "starcoder2", "decoder",
    {
        **CORE_FIELDS,
        "n_kv_heads": ("num_key_value_heads", "num_attention_heads"),
        "d_ff": ("intermediate_size",),
        "norm_eps": ("norm_epsilon",),
        "act": ("hidden_act",),
        "rope_base": ROPE_BASE,
        "window": ("sliding_window",),
        "attn_bias": ("use_bias",),
        "out_bias": ("use_bias",),
        "mlp_bias": ("use_bias",),
    },
    (
        *(w for w in LLAMA_WEIGHTS if not w.dst.startswith("blocks.{}.mlp.")),
        W("norm.bias", "norm.bias"),
        W("blocks.{}.norm1.bias", "layers.{}.input_layernorm.bias"),
        W("blocks.{}.norm2.bias", "layers.{}.post_attention_layernorm.bias"),
        W("blocks.{}.mlp.up.weight", _M + "c_fc.weight"),
        W("blocks.{}.mlp.up.bias", _M + "c_fc.bias", when="mlp_bias"),
        W("blocks.{}.mlp.down.weight", _M + "c_proj.weight"),
        W("blocks.{}.mlp.down.bias", _M + "c_proj.bias", when="mlp_bias"),
    ),
    fixed={"norm": "layer", "gated": False},
    defaults={"rope_base": 10000.0, "tie_embeddings": True, "norm_eps": 1e-5,
              "act": "gelu_pytorch_tanh", "attn_bias": True, "out_bias": True, "mlp_bias": True},
    prefix="model.", ignore=DECODER_IGNORE, window="all",
    classes=("Starcoder2",),
)  # fmt: skip

# Phi-2: one LayerNorm whose output feeds attention and MLP side by side (x + attn(n) +
# mlp(n)), partial rotary (partial_rotary_factor, 0.5), biases everywhere, gelu_new, a final
# LayerNorm, an untied lm_head with a bias
_PHI = Family(
    "phi", "decoder",
    {
        **CORE_FIELDS,
        "n_kv_heads": ("num_key_value_heads", "num_attention_heads"),
        "d_ff": ("intermediate_size",),
        "norm_eps": ("layer_norm_eps",),
        "act": ("hidden_act",),
        "rope_base": ROPE_BASE,
        "rope_fraction": ("rope_parameters.partial_rotary_factor", "partial_rotary_factor"),
    },
    (
        W("embed.weight", "embed_tokens.weight"),
        W("norm.weight", "final_layernorm.weight"),
        W("norm.bias", "final_layernorm.bias"),
        W("lm_head.weight", "lm_head.weight"),
        W("lm_head.bias", "lm_head.bias"),
        W("blocks.{}.norm1.weight", "layers.{}.input_layernorm.weight"),
        W("blocks.{}.norm1.bias", "layers.{}.input_layernorm.bias"),
        W("blocks.{}.attn.W_Q", _A + "q_proj.weight", "q"),
        W("blocks.{}.attn.W_K", _A + "k_proj.weight", "kv"),
        W("blocks.{}.attn.W_V", _A + "v_proj.weight", "kv"),
        W("blocks.{}.attn.b_Q", _A + "q_proj.bias", "bq"),
        W("blocks.{}.attn.b_K", _A + "k_proj.bias", "bkv"),
        W("blocks.{}.attn.b_V", _A + "v_proj.bias", "bkv"),
        W("blocks.{}.attn.W_O", _A + "dense.weight", "o"),
        W("blocks.{}.attn.b_O", _A + "dense.bias"),
        W("blocks.{}.mlp.up.weight", _M + "fc1.weight"),
        W("blocks.{}.mlp.up.bias", _M + "fc1.bias"),
        W("blocks.{}.mlp.down.weight", _M + "fc2.weight"),
        W("blocks.{}.mlp.down.bias", _M + "fc2.bias"),
    ),
    fixed={"norm": "layer", "gated": False, "block": "parallel1", "attn_bias": True,
           "out_bias": True, "mlp_bias": True, "lm_head_bias": True},
    defaults={"rope_base": 10000.0, "rope_fraction": 0.5, "tie_embeddings": False,
              "norm_eps": 1e-5, "act": "gelu_new"},
    prefix="model.", ignore=DECODER_IGNORE, classes=("Phi",),
    unsupported=(
        ("qk_layernorm", lambda cfg: bool(cfg.get("qk_layernorm"))),
        ("tie_word_embeddings=true (its lm_head has a bias of its own)",
         lambda cfg: bool(cfg.get("tie_word_embeddings"))),
    ),
    derive=rope_dim,
)  # fmt: skip

# BLOOM: ALiBi (no position embeddings; slopes per head as the paper's), a LayerNorm on the
# embeddings, fused query_key_value interleaved per head (as GPT-NeoX), biases everywhere, a
# 4·m tanh-GELU MLP. No position table: `seq_length` (2048, BLOOM's training length) bounds
# the context
_H = "h.{}."
_BLOOM = Family(
    "bloom", "decoder",
    {
        "n_layers": ("n_layer", "num_hidden_layers"),
        "n_heads": ("n_head", "num_attention_heads"),
        "d_model": ("hidden_size", "n_embed"),
        "vocab_size": ("vocab_size",),
        "max_positions": ("seq_length",),
        "norm_eps": ("layer_norm_epsilon",),
        "tie_embeddings": ("tie_word_embeddings",),
        "bos_id": ("bos_token_id",),
        "eos_id": ("eos_token_id",),
    },
    (
        W("embed.weight", "word_embeddings.weight"),
        W("embed_norm.weight", "word_embeddings_layernorm.weight"),
        W("embed_norm.bias", "word_embeddings_layernorm.bias"),
        W("lm_head.weight", "lm_head.weight", when="untied"),
        W("norm.weight", "ln_f.weight"),
        W("norm.bias", "ln_f.bias"),
        W("blocks.{}.norm1.weight", _H + "input_layernorm.weight"),
        W("blocks.{}.norm1.bias", _H + "input_layernorm.bias"),
        W("blocks.{}.norm2.weight", _H + "post_attention_layernorm.weight"),
        W("blocks.{}.norm2.bias", _H + "post_attention_layernorm.bias"),
        W("blocks.{}.attn.W_Q", _H + "self_attention.query_key_value.weight", "neox.q"),
        W("blocks.{}.attn.W_K", _H + "self_attention.query_key_value.weight", "neox.k"),
        W("blocks.{}.attn.W_V", _H + "self_attention.query_key_value.weight", "neox.v"),
        W("blocks.{}.attn.b_Q", _H + "self_attention.query_key_value.bias", "neox.bq"),
        W("blocks.{}.attn.b_K", _H + "self_attention.query_key_value.bias", "neox.bk"),
        W("blocks.{}.attn.b_V", _H + "self_attention.query_key_value.bias", "neox.bv"),
        W("blocks.{}.attn.W_O", _H + "self_attention.dense.weight", "o"),
        W("blocks.{}.attn.b_O", _H + "self_attention.dense.bias"),
        W("blocks.{}.mlp.up.weight", _H + "mlp.dense_h_to_4h.weight"),
        W("blocks.{}.mlp.up.bias", _H + "mlp.dense_h_to_4h.bias"),
        W("blocks.{}.mlp.down.weight", _H + "mlp.dense_4h_to_h.weight"),
        W("blocks.{}.mlp.down.bias", _H + "mlp.dense_4h_to_h.bias"),
    ),
    fixed={"norm": "layer", "positions": "alibi", "embed_norm": True, "gated": False,
           "act": "bloom_gelu", "attn_bias": True, "out_bias": True, "mlp_bias": True},
    defaults={"tie_embeddings": True, "norm_eps": 1e-5, "max_positions": 2048},
    prefix="transformer.", classes=("Bloom",),
    unsupported=(
        ("apply_residual_connection_post_layernorm",
         lambda cfg: bool(cfg.get("apply_residual_connection_post_layernorm"))),
    ),
    derive=lambda f: {"d_ff": 4 * f["d_model"]},  # BloomMLP's width is fixed
)  # fmt: skip

MORE_FAMILIES: tuple[Family, ...] = (_SMOLLM3, _OLMO2, _GRANITE, _STARCODER2, _PHI, _BLOOM)
