"""Three more dense decoder families, each a declarative `Family` (see `families_base.py`):

    nemotron          Nemotron-4 / Minitron: LayerNorm with a bias whose gain is stored as
                      w − 1 (LayerNorm1P: norm_offset 1, every norm), an ungated MLP
                      down(relu(up(x))²) (hidden_act relu2), RoPE on the first
                      partial_rotary_factor (0.5) of each head, biases on q, k, v and o by
                      attention_bias, on the MLP by mlp_bias
    helium            Kyutai Helium: Llama with RoPE in interleaved pairs (x[2p], x[2p+1]) over
                      the whole head, q/k/v biases by attention_bias and never one on o_proj
                      (whose input is hidden_size wide: heads · head_dim must equal it)
    hunyuan_v1_dense  Tencent Hunyuan (dense): Llama with QK-norm (an RMSNorm over each head,
                      one gain: query_layernorm, key_layernorm) applied after RoPE, not before;
                      q/k/v/o biases by attention_bias, none on the MLP

Defaults are transformers' own (`configuration_<name>.py`) for configs that omit a key; among
them Helium's head_dim 128 and num_key_value_heads 20 (not hidden_size / heads and heads).
Where transformers cannot build a model from a config (Nemotron without num_key_value_heads,
Hunyuan without head_dim, Helium with heads · head_dim ≠ hidden_size or a null head_dim /
num_key_value_heads) that setting is a named error. Hunyuan's NTK-alpha RoPE (rope_scaling
type "dynamic" with an alpha, in the released checkpoints) is a fixed base θ·alpha^(d/(d−2)).

Letters: h query heads, k kv heads, d head dim, m model dim, f MLP hidden dim.
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
)
from .families_dense3 import _KV_HEADS, _NULL_SHAPES, _glm4_rope


def _absent_or_null(key: str, why: str) -> tuple[str, Any]:
    return (f"no {key} (or {key}=null: {why})", lambda cfg: cfg.get(key) is None)


# Nemotron: every norm is LayerNorm1P, F.layer_norm(x, weight + 1, bias); the MLP has no gate;
# r = int(head_dim · partial_rotary_factor) features rotate, half-split among themselves (an odd
# r turns r + 1 in transformers, as GLM-4: refused by `_glm4_rope`)
_A, _M = SELF_ATTN, LAYER_MLP
_NEMOTRON = Family(
    "nemotron", "decoder",
    fields={**CORE_FIELDS, "n_kv_heads": ("num_key_value_heads",), "d_head": ("head_dim",),
            "d_ff": ("intermediate_size",), "norm_eps": ("norm_eps",), "act": ("hidden_act",),
            "rope_base": ROPE_BASE,
            "rope_fraction": ("rope_parameters.partial_rotary_factor", "partial_rotary_factor"),
            "attn_bias": ("attention_bias",), "out_bias": ("attention_bias",),
            "mlp_bias": ("mlp_bias",)},
    weights=(
        W("embed.weight", "embed_tokens.weight"),
        W("norm.weight", "norm.weight"),
        W("norm.bias", "norm.bias"),
        W("lm_head.weight", "lm_head.weight", when="untied"),
        W("blocks.{}.norm1.weight", "layers.{}.input_layernorm.weight"),
        W("blocks.{}.norm1.bias", "layers.{}.input_layernorm.bias"),
        W("blocks.{}.norm2.weight", "layers.{}.post_attention_layernorm.weight"),
        W("blocks.{}.norm2.bias", "layers.{}.post_attention_layernorm.bias"),
        *(w for w in LLAMA_WEIGHTS if w.dst.startswith("blocks.{}.attn.W_")),
        *(w for w in LLAMA_WEIGHTS if w.dst.startswith("blocks.{}.attn.b_")),
        W("blocks.{}.mlp.up.weight", _M + "up_proj.weight"),
        W("blocks.{}.mlp.down.weight", _M + "down_proj.weight"),
        W("blocks.{}.mlp.up.bias", _M + "up_proj.bias", when="mlp_bias"),
        W("blocks.{}.mlp.down.bias", _M + "down_proj.bias", when="mlp_bias"),
    ),
    fixed={"norm": "layer", "norm_offset": 1.0, "gated": False},
    defaults={"act": "relu2", "norm_eps": 1e-5, "rope_base": 10000.0, "rope_fraction": 0.5,
              "tie_embeddings": False, "attn_bias": False, "out_bias": False,
              "mlp_bias": False, "max_positions": 4096, "bos_id": 2, "eos_id": 3},
    prefix="model.", ignore=DECODER_IGNORE, classes=("NemotronFor", "NemotronModel"),
    unsupported=(_absent_or_null("num_key_value_heads", "transformers cannot build the model; "
                                 "give the number of kv heads"),),
    derive=_glm4_rope,
)  # fmt: skip


# Helium: o_proj is nn.Linear(hidden_size, hidden_size, bias=False), so transformers builds a
# model only when heads · head_dim = hidden_size
def _helium_shapes(f: dict[str, Any]) -> dict[str, Any]:
    h, d, m = f["n_heads"], f["d_head"], f["d_model"]
    if h * d != m:
        raise ValueError(
            f"config.json: num_attention_heads · head_dim = {h} · {d} = {h * d} must equal "
            f"hidden_size={m} (Helium's o_proj takes hidden_size features)"
        )
    return {}


_HELIUM = llama_like(
    "helium", classes=("HeliumFor", "HeliumModel"),
    weights=tuple(w for w in LLAMA_WEIGHTS if w.when != "qk_norm"),
    fields=_KV_HEADS,
    fixed={"rope_interleaved": True, "out_bias": False, "qk_norm": False},
    defaults={"d_head": 128, "n_kv_heads": 20, "rope_base": 100000.0, "norm_eps": 1e-8,
              "tie_embeddings": False, "act": "silu", "max_positions": 4096, "bos_id": 1,
              "eos_id": 2},
    unsupported=_NULL_SHAPES, derive=_helium_shapes,
)  # fmt: skip


# Hunyuan: q and k rotate, then each head is RMS-normalised (query_layernorm, key_layernorm);
# transformers' attention reads config.head_dim as it is (None: a TypeError). The released
# checkpoints' RoPE is NTK-alpha: rope_scaling {"type": "dynamic", "alpha": a}, which
# transformers reads as a fixed base θ·a^(d/(d−2)) (`compute_ntk_alpha_rope_parameters`)
def _hunyuan(f: dict[str, Any]) -> dict[str, Any]:
    if f.get("rope_kind") != "dynamic" or not f.get("alpha"):
        return {}
    alpha, d = f["alpha"], f["d_head"]
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not alpha > 0:
        raise ValueError(f"config.json: rope_scaling.alpha must be a number > 0, got {alpha!r}")
    return {"rope_base": float(f["rope_base"]) * float(alpha) ** (d / (d - 2))}


_HUNYUAN = llama_like(
    "hunyuan_v1_dense", classes=("HunYuanDenseV1For", "HunYuanDenseV1Model"),
    weights=(
        *(w for w in LLAMA_WEIGHTS if w.when not in ("qk_norm", "mlp_bias")),
        W("blocks.{}.attn.q_norm.weight", _A + "query_layernorm.weight"),
        W("blocks.{}.attn.k_norm.weight", _A + "key_layernorm.weight"),
    ),
    fields={"alpha": ("rope_scaling.alpha", "rope_parameters.alpha"),
            "rope_kind": ("rope_scaling.type", "rope_scaling.rope_type",
                          "rope_parameters.rope_type", "rope_parameters.type")},
    fixed={"qk_norm": True, "qk_norm_scope": "head", "qk_norm_after_rope": True,
           "mlp_bias": False},
    defaults={"norm_eps": 1e-5, "tie_embeddings": False, "act": "silu", "max_positions": 2048,
              "bos_id": 1, "eos_id": 2},
    unsupported=(
        _absent_or_null("head_dim", "transformers cannot build the model; give head_dim"),
    ),
    rope_alpha=True, derive=_hunyuan,
)  # fmt: skip

DENSE4_FAMILIES: tuple[Family, ...] = (_NEMOTRON, _HELIUM, _HUNYUAN)
