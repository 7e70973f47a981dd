"""Hugging Face architectures as declarative descriptions, one `Family` per `model_type`.

A family says how to read its `config.json` into the generic `DecoderConfig` / `EncoderConfig`
(`fields`: our field ← the first present HF key, dotted for nested dicts; `fixed`: values the
architecture implies) and how its checkpoint keys map onto the model (`weights`: `W(dst, src,
reshape, when)` with `{}` for the layer; `reshape` names a conversion in `RESHAPES`; `when`
names a bool config field that must hold for the tensor to exist). Keys are matched after the
family's `prefix` (the base model's name inside a *ForCausalLM / *ForMaskedLM) is stripped.
`unsupported` lists config settings the generic models do not implement: each is a clear
error naming the setting, never a silently wrong model.

Letters: h query heads, k kv heads, d head dim, m model dim.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from .convert import Reshape, heads_bias, heads_in, heads_out


@dataclass(frozen=True)
class W:
    """Model tensor `dst` ← `RESHAPES[reshape](config)(checkpoint[src])`, if config.`when`."""

    dst: str
    src: str
    reshape: str | None = None
    when: str | None = None


@dataclass(frozen=True)
class Family:
    model_type: str
    kind: str  # "decoder" | "encoder"
    fields: Mapping[str, tuple[str, ...]]
    weights: tuple[W, ...]
    fixed: Mapping[str, Any] = field(default_factory=dict)
    defaults: Mapping[str, Any] = field(default_factory=dict)
    prefix: str = ""
    ignore: tuple[str, ...] = ()
    unsupported: tuple[tuple[str, Callable[[Any], bool]], ...] = ()
    window: str = "none"  # "all": `sliding_window` on every layer; "layer_types": per layer
    # (`layer_types`, else every `window_pattern`-th layer global, else Qwen's max_window_layers)
    classes: tuple[str, ...] = ()  # `architectures` names (prefixes) when model_type is absent
    derive: Callable[[dict[str, Any]], dict[str, Any]] | None = None  # fields from fields


def _split(part: int, reshape: Callable[[Any], Reshape]) -> Callable[[Any], Reshape]:
    """GPT-2's fused c_attn, (m, 3m) Conv1D (in, out) or its (3m,) bias: third `part` of the
    output features, then `reshape`."""

    def make(c: Any) -> Reshape:
        inner = reshape(c)

        def fn(w: Tensor) -> Tensor:
            if w.shape[-1] != 3 * c.d_model:
                return w  # convert's shape check names the tensor
            return inner(w.chunk(3, dim=-1)[part].transpose(0, -1))

        return fn

    return make


def _per_head(part: int, reshape: Callable[[Any], Reshape]) -> Callable[[Any], Reshape]:
    """GPT-NeoX's fused query_key_value, (h·3·d, m) or its (h·3·d,) bias, interleaved per head
    (head h's q, k, v are rows h·3d + [0, d), [d, 2d), [2d, 3d)): the `part` of every head,
    as the (h·d, …) tensor of a separate projection, then `reshape`."""

    def make(c: Any) -> Reshape:
        inner, H, D = reshape(c), c.n_heads, c.d_head

        def fn(w: Tensor) -> Tensor:
            if w.shape[0] != 3 * H * D:
                return w  # convert's shape check names the tensor
            return inner(w.unflatten(0, (H, 3, D))[:, part].flatten(0, 1))

        return fn

    return make


def _rows(part: int, sizes: Callable[[Any], tuple[int, ...]], reshape: Callable[[Any], Reshape]):
    """A fused projection stacked by rows (Phi-3's qkv_proj (h·d + 2·k·d, m), gate_up_proj
    (2f, m)): block `part` of the row blocks `sizes(config)`, then `reshape`."""

    def make(c: Any) -> Reshape:
        inner, n = reshape(c), sizes(c)

        def fn(w: Tensor) -> Tensor:
            if w.shape[0] != sum(n):
                return w
            return inner(w.split(n, 0)[part])

        return fn

    return make


def _qkv_rows(c: Any) -> tuple[int, int, int]:
    return c.n_heads * c.d_head, c.n_kv_heads * c.d_head, c.n_kv_heads * c.d_head


def _conv1d(reshape: Callable[[Any], Reshape]) -> Callable[[Any], Reshape]:
    """A Conv1D weight (in, out) is an nn.Linear weight transposed."""

    def make(c: Any) -> Reshape:
        inner = reshape(c)
        return lambda w: inner(w.t())

    return make


RESHAPES: dict[str, Callable[[Any], Reshape]] = {
    "q": lambda c: heads_in(c.n_heads, c.d_head),  # (h·d, m) → (h m d)
    "kv": lambda c: heads_in(c.n_kv_heads, c.d_head),  # (k·d, m) → (k m d)
    "o": lambda c: heads_out(c.n_heads, c.d_head),  # (m, h·d) → (h d m)
    "bq": lambda c: heads_bias(c.n_heads, c.d_head),  # (h·d,) → (h d)
    "bkv": lambda c: heads_bias(c.n_kv_heads, c.d_head),
    "t": lambda c: Tensor.t,  # Conv1D (in, out) → nn.Linear (out, in)
    "c_attn.q": _split(0, lambda c: heads_in(c.n_heads, c.d_head)),
    "c_attn.k": _split(1, lambda c: heads_in(c.n_kv_heads, c.d_head)),
    "c_attn.v": _split(2, lambda c: heads_in(c.n_kv_heads, c.d_head)),
    "c_attn.bq": _split(0, lambda c: heads_bias(c.n_heads, c.d_head)),
    "c_attn.bk": _split(1, lambda c: heads_bias(c.n_kv_heads, c.d_head)),
    "c_attn.bv": _split(2, lambda c: heads_bias(c.n_kv_heads, c.d_head)),
    "c_proj.o": _conv1d(lambda c: heads_out(c.n_heads, c.d_head)),
    "neox.q": _per_head(0, lambda c: heads_in(c.n_heads, c.d_head)),
    "neox.k": _per_head(1, lambda c: heads_in(c.n_heads, c.d_head)),
    "neox.v": _per_head(2, lambda c: heads_in(c.n_heads, c.d_head)),
    "neox.bq": _per_head(0, lambda c: heads_bias(c.n_heads, c.d_head)),
    "neox.bk": _per_head(1, lambda c: heads_bias(c.n_heads, c.d_head)),
    "neox.bv": _per_head(2, lambda c: heads_bias(c.n_heads, c.d_head)),
    "qkv_proj.q": _rows(0, _qkv_rows, lambda c: heads_in(c.n_heads, c.d_head)),
    "qkv_proj.k": _rows(1, _qkv_rows, lambda c: heads_in(c.n_kv_heads, c.d_head)),
    "qkv_proj.v": _rows(2, _qkv_rows, lambda c: heads_in(c.n_kv_heads, c.d_head)),
    "gate_up.gate": _rows(0, lambda c: (c.d_ff, c.d_ff), lambda c: lambda w: w),
    "gate_up.up": _rows(1, lambda c: (c.d_ff, c.d_ff), lambda c: lambda w: w),
}

# --------------------------------------------------------------------------------------------
# decoders: the Llama layout and its relatives

_ROPE_BASE = ("rope_parameters.rope_theta", "rope_theta")
# the names most decoders' configs share
_CORE_FIELDS = {
    "n_layers": ("num_hidden_layers",),
    "n_heads": ("num_attention_heads",),
    "d_model": ("hidden_size",),
    "vocab_size": ("vocab_size",),
    "max_positions": ("max_position_embeddings",),
    "tie_embeddings": ("tie_word_embeddings",),
    "bos_id": ("bos_token_id",),
    "eos_id": ("eos_token_id",),
}
_LLAMA_FIELDS = {
    **_CORE_FIELDS,
    "n_kv_heads": ("num_key_value_heads", "num_attention_heads"),
    "d_head": ("head_dim",),
    "d_ff": ("intermediate_size",),
    "norm_eps": ("rms_norm_eps",),
    "act": ("hidden_act",),
    "rope_base": _ROPE_BASE,
    "attn_bias": ("attention_bias",),
    "out_bias": ("attention_bias",),
    "mlp_bias": ("mlp_bias",),
}
_LLAMA_DEFAULTS = {"rope_base": 10000.0, "tie_embeddings": True, "attn_bias": False,
                   "out_bias": False, "mlp_bias": False}  # fmt: skip
_ROPE_SCALING = (
    "rope_parameters.rope_type (rope scaling: linear, dynamic, yarn, llama3, ...)",
    lambda cfg: (
        (_get(cfg, ("rope_parameters.rope_type",)) or "default") != "default"
        or bool(cfg.get("rope_scaling"))
    ),
)

_A, _M = "layers.{}.self_attn.", "layers.{}.mlp."
_LLAMA_WEIGHTS = (
    W("embed.weight", "embed_tokens.weight"),
    W("norm.weight", "norm.weight"),
    W("lm_head.weight", "lm_head.weight", when="untied"),
    W("blocks.{}.norm1.weight", "layers.{}.input_layernorm.weight"),
    W("blocks.{}.norm2.weight", "layers.{}.post_attention_layernorm.weight"),
    W("blocks.{}.attn.W_Q", _A + "q_proj.weight", "q"),
    W("blocks.{}.attn.W_K", _A + "k_proj.weight", "kv"),
    W("blocks.{}.attn.W_V", _A + "v_proj.weight", "kv"),
    W("blocks.{}.attn.W_O", _A + "o_proj.weight", "o"),
    W("blocks.{}.attn.b_Q", _A + "q_proj.bias", "bq", when="attn_bias"),
    W("blocks.{}.attn.b_K", _A + "k_proj.bias", "bkv", when="attn_bias"),
    W("blocks.{}.attn.b_V", _A + "v_proj.bias", "bkv", when="attn_bias"),
    W("blocks.{}.attn.b_O", _A + "o_proj.bias", when="out_bias"),
    W("blocks.{}.attn.q_norm.weight", _A + "q_norm.weight", when="qk_norm"),
    W("blocks.{}.attn.k_norm.weight", _A + "k_norm.weight", when="qk_norm"),
    W("blocks.{}.mlp.gate.weight", _M + "gate_proj.weight"),
    W("blocks.{}.mlp.up.weight", _M + "up_proj.weight"),
    W("blocks.{}.mlp.down.weight", _M + "down_proj.weight"),
    W("blocks.{}.mlp.gate.bias", _M + "gate_proj.bias", when="mlp_bias"),
    W("blocks.{}.mlp.up.bias", _M + "up_proj.bias", when="mlp_bias"),
    W("blocks.{}.mlp.down.bias", _M + "down_proj.bias", when="mlp_bias"),
)
_DECODER_IGNORE = ("layers.*.self_attn.rotary_emb.inv_freq", "rotary_emb.inv_freq")


def _llama_like(model_type: str, **kw: Any) -> Family:
    fields = {**_LLAMA_FIELDS, **kw.pop("fields", {})}
    return Family(
        model_type, "decoder", fields, kw.pop("weights", _LLAMA_WEIGHTS),
        defaults={**_LLAMA_DEFAULTS, **kw.pop("defaults", {})},
        prefix="model.", ignore=_DECODER_IGNORE,
        unsupported=(_ROPE_SCALING, *kw.pop("unsupported", ())), **kw,
    )  # fmt: skip


# Gemma 2: the Llama names, but its post_attention_layernorm follows attention (a post-norm)
_GEMMA2_WEIGHTS = (
    *(w for w in _LLAMA_WEIGHTS if w.dst != "blocks.{}.norm2.weight"),
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
_GEMMA2 = _llama_like(
    "gemma2", classes=("Gemma2For",), weights=_GEMMA2_WEIGHTS, window="layer_types",
    fixed={"norm_offset": 1.0, "block": "sandwich"}, fields=_GEMMA2_FIELDS,
    unsupported=(_BIDIRECTIONAL,), derive=_gemma2_scales,
    defaults={"window_pattern": 2},  # configs without layer_types: every 2nd layer global
)  # fmt: skip

# Gemma 3: Gemma 2 plus QK-norm (RMSNorm 1 + w on each head's q and k), RoPE base 10⁴ on the
# sliding layers and 10⁶ on the global ones, five sliding layers to one global; rope_parameters
# holds one entry per layer type (older configs: rope_theta and rope_local_base_freq)
_GEMMA3 = _llama_like(
    "gemma3_text", classes=("Gemma3ForCausalLM", "Gemma3TextModel"), weights=_GEMMA2_WEIGHTS,
    window="layer_types", fixed={"norm_offset": 1.0, "block": "sandwich", "qk_norm": True},
    fields={
        **_GEMMA2_FIELDS,
        "rope_base": ("rope_parameters.full_attention.rope_theta", *_ROPE_BASE),
        "local_rope_base": ("rope_parameters.sliding_attention.rope_theta",
                            "rope_local_base_freq"),
    },
    unsupported=(
        _BIDIRECTIONAL,
        ("rope_parameters.<layer type>.rope_type (rope scaling: linear, yarn, ...)",
         lambda cfg: any((_get(cfg, (f"rope_parameters.{t}.rope_type",)) or "default")
                         != "default" for t in ("full_attention", "sliding_attention"))),
    ),
    derive=_gemma2_scales, defaults={"rope_base": 1e6, "local_rope_base": 1e4, "window_pattern": 6},
)  # fmt: skip


def _rope_dim(f: dict[str, Any]) -> dict[str, Any]:
    """Partial rotary: the first int(d_head · fraction) features of each head rotate."""
    frac = f.get("rope_fraction", 1.0)
    return {} if frac == 1.0 else {"rope_dim": int(f["d_head"] * frac)}


# Phi-3: the Llama layout with fused qkv_proj and gate_up_proj, a window on every layer
_PHI3 = Family(
    "phi3", "decoder",
    {**_LLAMA_FIELDS, "window": ("sliding_window",),
     "rope_fraction": ("rope_parameters.partial_rotary_factor", "partial_rotary_factor")},
    (
        *(w for w in _LLAMA_WEIGHTS if w.when is None or w.when == "untied"
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
    defaults={**_LLAMA_DEFAULTS, "tie_embeddings": False}, prefix="model.",
    ignore=_DECODER_IGNORE, unsupported=(_ROPE_SCALING,), window="all", classes=("Phi3",),
    derive=_rope_dim,
)  # fmt: skip

# GPT-NeoX (Pythia): fused query_key_value interleaved per head, partial rotary, LayerNorm,
# parallel residual (`use_parallel_residual`), biases everywhere, an untied `embed_out`
_X = "layers.{}."
_GPT_NEOX = Family(
    "gpt_neox", "decoder",
    {
        **_CORE_FIELDS,
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
    prefix="gpt_neox.", classes=("GPTNeoX",), unsupported=(_ROPE_SCALING,),
    # causal-mask and rotary buffers of old checkpoints
    ignore=("layers.*.attention.bias", "layers.*.attention.masked_bias",
            "layers.*.attention.rotary_emb.inv_freq"),
    derive=lambda f: {**_rope_dim(f), "block": "parallel" if f["parallel"] else "pre"},
)  # fmt: skip

# OPT: learned positions numbered from 2, ReLU, LayerNorm before (or, OPT-350m, after) each
# sublayer; post-norm models have no final norm
_O = "layers.{}."
_OPT = Family(
    "opt", "decoder",
    {
        **_CORE_FIELDS,
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

FAMILIES: dict[str, Family] = {
    f.model_type: f
    for f in (
        _llama_like("llama", classes=("Llama",)),
        _llama_like("mistral", window="all", fields={"window": ("sliding_window",)},
                    classes=("Mistral",)),
        _llama_like("qwen2", classes=("Qwen2",), fixed={"attn_bias": True, "out_bias": False}, window="layer_types",
                    fields={"window": ("sliding_window",)}),
        _llama_like("qwen3", classes=("Qwen3",), fixed={"qk_norm": True}, window="layer_types",
                    fields={"window": ("sliding_window",)}),
        # Gemma: RMSNorm scaling by 1 + w, embeddings × √d_model, GeGLU (tanh GELU gate)
        _llama_like("gemma", classes=("GemmaFor",), fixed={"norm_offset": 1.0},
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
    )
}  # fmt: skip

ACTS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
        "gelu_fast": "gelu_tanh", "silu": "silu", "swish": "silu", "relu": "relu"}  # fmt: skip


def _get(cfg: Mapping[str, Any], keys: tuple[str, ...]) -> Any:
    """The value of the first of `keys` present (dotted keys reach into nested dicts)."""
    for key in keys:
        node: Any = cfg
        for part in key.split("."):
            node = node.get(part) if isinstance(node, Mapping) else None
        if node is not None:
            return node
    return None


def read_fields(family: Family, cfg: Mapping[str, Any], where: str) -> dict[str, Any]:
    """config.json → the generic config's fields (unconverted: see `hf.build_config`)."""
    for what, present in family.unsupported:
        if present(cfg):
            raise ValueError(
                f"{where}: {family.model_type} with {what} is not supported by qkv's generic "
                f"{family.kind}; only the plain architecture is"
            )
    out = dict(family.defaults)
    out.update({k: v for k, keys in family.fields.items() if (v := _get(cfg, keys)) is not None})
    out.update(family.fixed)
    return out
