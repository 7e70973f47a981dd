"""Dense decoder families with interleaved or partial RoPE and parallel blocks, each a
declarative `Family` (see `families_base.py`): GPT-J (one LayerNorm feeding attention and MLP
side by side, interleaved RoPE on the first `rotary_dim` features), StableLM 2 (partial
half-split RoPE, LayerNorm with bias, optional q/k/v biases, per-head LayerNorm QK-norm and
parallel residual), Cohere / Command-R (bias-free LayerNorm, parallel block, interleaved
RoPE, logits × logit_scale, optional per-head LayerNorm QK-norm) and Falcon with RoPE (fused
query_key_value grouped per kv head: multi-query, GQA or one kv head per query head; parallel
or sequential blocks).

Defaults are transformers' own (`configuration_<name>.py`) for configs that omit a key.

Letters: h query heads, k kv heads, d head dim, m model dim.
"""

from __future__ import annotations

from typing import Any

from .families_base import (
    CORE_FIELDS,
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
_NO_QK_NORM = ("blocks.{}.attn.q_norm.weight", "blocks.{}.attn.k_norm.weight")


def _gptj_rotary(f: dict[str, Any]) -> dict[str, Any]:
    """rotary_dim: an even number of features ≤ each head's (n_embd / n_head)."""
    r, d = f["rope_dim"], f["d_head"]
    if isinstance(r, bool) or not isinstance(r, int) or not 0 < r <= d or r % 2:
        raise ValueError(
            f"config.json: rotary_dim must be an even int in (0, {d}] (n_embd / n_head), got {r!r}"
        )
    return {}


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
    derive=_gptj_rotary,
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
        W("blocks.{}.norm2.weight", "layers.{}.post_attention_layernorm.weight", when="block=pre"),
        W("blocks.{}.norm2.bias", "layers.{}.post_attention_layernorm.bias", when="block=pre"),
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


def _falcon_layout(f: dict[str, Any]) -> dict[str, Any]:
    """kv heads and block from Falcon's three layouts: new_decoder_architecture (num_kv_heads
    groups; two LayerNorms, ln_attn and ln_mlp, in parallel, or one with
    num_ln_in_parallel_attn=1), multi_query (one kv head), or one kv head per query head; the
    older two parallel from one LayerNorm (parallel_attn) or sequential."""
    new, H = f["new_arch"], f["n_heads"]
    kv = (f.get("falcon_kv") or H) if new else (1 if f["multi_query"] else H)
    if not f["parallel"]:
        block = "pre"
    else:
        block = "parallel" if new and f.get("n_ln", 2) == 2 else "parallel1"
    bias = bool(f["bias"])
    return {"n_kv_heads": kv, "block": block, "attn_bias": bias, "out_bias": bias,
            "mlp_bias": bias}  # fmt: skip


# Falcon (RoPE): fused query_key_value grouped per kv head (multi-query, GQA with
# new_decoder_architecture, or one kv head per query head), half-split RoPE on every feature,
# LayerNorm with bias, attention and MLP in parallel (two LayerNorms ln_attn / ln_mlp with
# new_decoder_architecture, else one) or sequential, a plain GELU MLP, biases all or none
_F = "h.{}."
_FALCON = Family(
    "falcon", "decoder",
    {
        **CORE_FIELDS,
        "n_layers": ("num_hidden_layers", "n_layer"),
        "n_heads": ("num_attention_heads", "n_head"),
        "d_model": ("hidden_size", "n_embed"),
        "d_ff": ("ffn_hidden_size",),
        "norm_eps": ("layer_norm_epsilon",),
        "act": ("activation",),
        "rope_base": ROPE_BASE,
        "new_arch": ("new_decoder_architecture",),
        "multi_query": ("multi_query",),
        "parallel": ("parallel_attn",),
        "falcon_kv": ("num_kv_heads",),
        "n_ln": ("num_ln_in_parallel_attn",),
        "bias": ("bias",),
    },
    (
        W("embed.weight", "word_embeddings.weight"),
        W("norm.weight", "ln_f.weight"),
        W("norm.bias", "ln_f.bias"),
        W("lm_head.weight", "lm_head.weight", when="untied"),
        W("blocks.{}.norm1.weight", _F + "ln_attn.weight", when="block=parallel"),
        W("blocks.{}.norm1.bias", _F + "ln_attn.bias", when="block=parallel"),
        W("blocks.{}.norm2.weight", _F + "ln_mlp.weight", when="block=parallel"),
        W("blocks.{}.norm2.bias", _F + "ln_mlp.bias", when="block=parallel"),
        W("blocks.{}.norm1.weight", _F + "input_layernorm.weight", when="block!=parallel"),
        W("blocks.{}.norm1.bias", _F + "input_layernorm.bias", when="block!=parallel"),
        W("blocks.{}.norm2.weight", _F + "post_attention_layernorm.weight", when="block=pre"),
        W("blocks.{}.norm2.bias", _F + "post_attention_layernorm.bias", when="block=pre"),
        W("blocks.{}.attn.W_Q", _F + "self_attention.query_key_value.weight", "falcon.q"),
        W("blocks.{}.attn.W_K", _F + "self_attention.query_key_value.weight", "falcon.k"),
        W("blocks.{}.attn.W_V", _F + "self_attention.query_key_value.weight", "falcon.v"),
        W("blocks.{}.attn.b_Q", _F + "self_attention.query_key_value.bias", "falcon.bq",
          when="attn_bias"),
        W("blocks.{}.attn.b_K", _F + "self_attention.query_key_value.bias", "falcon.bk",
          when="attn_bias"),
        W("blocks.{}.attn.b_V", _F + "self_attention.query_key_value.bias", "falcon.bv",
          when="attn_bias"),
        W("blocks.{}.attn.W_O", _F + "self_attention.dense.weight", "o"),
        W("blocks.{}.attn.b_O", _F + "self_attention.dense.bias", when="out_bias"),
        W("blocks.{}.mlp.up.weight", _F + "mlp.dense_h_to_4h.weight"),
        W("blocks.{}.mlp.up.bias", _F + "mlp.dense_h_to_4h.bias", when="mlp_bias"),
        W("blocks.{}.mlp.down.weight", _F + "mlp.dense_4h_to_h.weight"),
        W("blocks.{}.mlp.down.bias", _F + "mlp.dense_4h_to_h.bias", when="mlp_bias"),
    ),
    fixed={"norm": "layer", "gated": False},
    defaults={"new_arch": False, "multi_query": True, "parallel": True, "bias": False,
              "act": "gelu", "norm_eps": 1e-5, "rope_base": 10000.0, "tie_embeddings": True,
              "max_positions": 2048},
    prefix="transformer.", classes=("Falcon",),
    unsupported=(
        # transformers' eager attention adds the ALiBi bias twice (in the scores and again in
        # the mask), its SDPA path once, each rounded to bfloat16: no one model to match
        ("alibi=true", lambda cfg: bool(cfg.get("alibi"))),
        # transformers builds no norm that such a block's forward reads: no model to match
        ("new_decoder_architecture and parallel_attn=false",
         lambda cfg: bool(cfg.get("new_decoder_architecture"))
         and cfg.get("parallel_attn") is False),
        ("num_ln_in_parallel_attn=2 without new_decoder_architecture",
         lambda cfg: not cfg.get("new_decoder_architecture")
         and cfg.get("parallel_attn", True) is not False
         and cfg.get("num_ln_in_parallel_attn") == 2),
    ),
    derive=_falcon_layout,
)  # fmt: skip

DENSE_FAMILIES: tuple[Family, ...] = (_GPTJ, _STABLELM, _COHERE, _FALCON)
