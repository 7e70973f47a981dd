"""Dense decoder families with interleaved or partial RoPE and parallel blocks, each a
declarative `Family` (see `families_base.py`): GPT-J (one LayerNorm feeding attention and MLP
side by side, interleaved RoPE on the first `rotary_dim` features), StableLM 2 (partial
half-split RoPE, LayerNorm with bias, optional q/k/v biases, per-head LayerNorm QK-norm and
parallel residual) and Cohere / Command-R (bias-free LayerNorm, parallel block, interleaved
RoPE, logits × logit_scale, optional per-head LayerNorm QK-norm).

Defaults are transformers' own (`configuration_<name>.py`) for configs that omit a key.

Letters: h query heads, k kv heads, d head dim, m model dim.
"""

from __future__ import annotations

from .families_base import (
    LAYER_MLP,
    LLAMA_WEIGHTS,
    SELF_ATTN,
    Family,
    W,
    llama_like,
    rope_dim,
)

_A, _M = SELF_ATTN, LAYER_MLP
_NO_QK_NORM = ("blocks.{}.attn.q_norm.weight", "blocks.{}.attn.k_norm.weight")

# GPT-J: q/k/v/out projections without biases, interleaved RoPE (pairs (2p, 2p+1), base 10⁴)
# on the first rotary_dim features of each head, one LayerNorm (ln_1) whose output feeds
# attention and MLP side by side (x + attn(n) + mlp(n)), a gelu_new MLP with biases, a final
# LayerNorm, an untied lm_head with a bias
_J = "h.{}."
_GPTJ = Family(
    "gptj", "decoder",
    {
        "n_layers": ("n_layer",),
        "n_heads": ("n_head",),
        "d_model": ("n_embd",),
        "d_ff": ("n_inner",),
        "vocab_size": ("vocab_size",),
        "max_positions": ("n_positions",),
        "norm_eps": ("layer_norm_epsilon",),
        "act": ("activation_function",),
        "rope_dim": ("rotary_dim",),
        "tie_embeddings": ("tie_word_embeddings",),
        "bos_id": ("bos_token_id",),
        "eos_id": ("eos_token_id",),
    },
    (
        W("embed.weight", "wte.weight"),
        W("norm.weight", "ln_f.weight"),
        W("norm.bias", "ln_f.bias"),
        W("lm_head.weight", "lm_head.weight"),
        W("lm_head.bias", "lm_head.bias"),
        W("blocks.{}.norm1.weight", _J + "ln_1.weight"),
        W("blocks.{}.norm1.bias", _J + "ln_1.bias"),
        W("blocks.{}.attn.W_Q", _J + "attn.q_proj.weight", "q"),
        W("blocks.{}.attn.W_K", _J + "attn.k_proj.weight", "q"),
        W("blocks.{}.attn.W_V", _J + "attn.v_proj.weight", "q"),
        W("blocks.{}.attn.W_O", _J + "attn.out_proj.weight", "o"),
        W("blocks.{}.mlp.up.weight", _J + "mlp.fc_in.weight"),
        W("blocks.{}.mlp.up.bias", _J + "mlp.fc_in.bias"),
        W("blocks.{}.mlp.down.weight", _J + "mlp.fc_out.weight"),
        W("blocks.{}.mlp.down.bias", _J + "mlp.fc_out.bias"),
    ),
    fixed={"norm": "layer", "gated": False, "block": "parallel1", "attn_bias": False,
           "out_bias": False, "mlp_bias": True, "lm_head_bias": True, "rope_interleaved": True,
           "rope_base": 10000.0},
    defaults={"rope_dim": 64, "tie_embeddings": False, "norm_eps": 1e-5, "act": "gelu_new",
              "max_positions": 2048},
    prefix="transformer.", classes=("GPTJ",),
    ignore=("h.*.attn.bias", "h.*.attn.masked_bias"),  # causal-mask buffers of old checkpoints
    unsupported=(
        # transformers then rotates hidden_size features of each head_dim-wide head: no model
        ("rotary_dim=null", lambda cfg: "rotary_dim" in cfg and cfg["rotary_dim"] is None),
        ("tie_word_embeddings=true (its lm_head has a bias of its own)",
         lambda cfg: bool(cfg.get("tie_word_embeddings"))),
    ),
)  # fmt: skip

# StableLM (2): the Llama names with LayerNorm (weight and bias), partial half-split RoPE
# (partial_rotary_factor, 0.25), q/k/v biases (use_qkv_bias, never on o_proj), a per-head
# LayerNorm without bias on q and k before RoPE (qk_layernorm: q_layernorm.norms.<head>),
# and with use_parallel_residual one LayerNorm feeding attention and MLP side by side
_STABLELM = llama_like(
    "stablelm", classes=("StableLm",),
    fields={
        "d_head": (),  # hidden_size / num_attention_heads, whatever head_dim says
        "norm_eps": ("layer_norm_eps",),
        "rope_fraction": ("rope_parameters.partial_rotary_factor", "partial_rotary_factor"),
        "attn_bias": ("use_qkv_bias",),
        "out_bias": (),
        "mlp_bias": (),
        "qk_norm": ("qk_layernorm",),
        "parallel": ("use_parallel_residual",),
    },
    weights=(
        *(w for w in LLAMA_WEIGHTS if w.dst not in ("blocks.{}.norm2.weight", *_NO_QK_NORM)),
        W("norm.bias", "norm.bias"),
        W("blocks.{}.norm1.bias", "layers.{}.input_layernorm.bias"),
        W("blocks.{}.norm2.weight", "layers.{}.post_attention_layernorm.weight", when="norm2"),
        W("blocks.{}.norm2.bias", "layers.{}.post_attention_layernorm.bias", when="norm2"),
        W("blocks.{}.attn.q_norm.weight", _A + "q_layernorm.weight", when="qk_norm"),
        W("blocks.{}.attn.k_norm.weight", _A + "k_layernorm.weight", when="qk_norm"),
    ),
    stacked=((_A + "q_layernorm.norms.*.weight", _A + "q_layernorm.weight"),
             (_A + "k_layernorm.norms.*.weight", _A + "k_layernorm.weight")),
    fixed={"norm": "layer", "out_bias": False, "mlp_bias": False, "qk_norm_scope": "per_head",
           "qk_norm_kind": "layer"},
    defaults={"rope_fraction": 0.25, "parallel": False, "qk_norm": False, "norm_eps": 1e-5,
              "tie_embeddings": False, "act": "silu"},
    derive=lambda f: {**rope_dim(f), "block": "parallel1" if f["parallel"] else "pre"},
)  # fmt: skip

# Cohere (Command-R): the Llama names, but LayerNorm without bias ((x − mean)/σ · w), one of
# them (input_layernorm) feeding attention and a SwiGLU MLP side by side, interleaved RoPE
# (pairs (2p, 2p+1)), q/k/v/o biases with attention_bias, logits × logit_scale (0.0625), and
# with use_qk_norm a LayerNorm without bias on each head's q and k, each head with its own
# gain (q_norm.weight (h, d)), before RoPE
_COHERE = llama_like(
    "cohere", classes=("Cohere",),
    fields={"norm_eps": ("layer_norm_eps",), "qk_norm": ("use_qk_norm",),
            "logit_scale": ("logit_scale",)},
    weights=(
        *(w for w in LLAMA_WEIGHTS if w.dst not in ("blocks.{}.norm2.weight", *_NO_QK_NORM)),
        W("blocks.{}.attn.q_norm.weight", _A + "q_norm.weight", when="qk_norm"),
        W("blocks.{}.attn.k_norm.weight", _A + "k_norm.weight", when="qk_norm"),
    ),
    fixed={"norm": "layer", "norm_bias": False, "block": "parallel1", "rope_interleaved": True,
           "mlp_bias": False, "qk_norm_scope": "per_head", "qk_norm_kind": "layer"},
    defaults={"logit_scale": 0.0625, "qk_norm": False, "norm_eps": 1e-5, "rope_base": 500000.0,
              "tie_embeddings": True, "act": "silu"},
)  # fmt: skip

DENSE_FAMILIES: tuple[Family, ...] = (_GPTJ, _STABLELM, _COHERE)
