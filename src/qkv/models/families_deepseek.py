"""DeepSeek-V3's architecture as a declarative `Family` (see `families_base.py`): DeepSeek-V3,
R1 and Kimi K2 checkpoints (model_type deepseek_v3).

    deepseek_v3  multi-head latent attention (`qkv.nn.LatentAttention`, `DecoderConfig.mla`):
                 q from the latent c_q = RMSNorm(q_a_proj(x)) by q_b_proj (q_proj from x
                 when q_lora_rank is null); k and v of every head from one latent
                 c_kv = RMSNorm(kv_a_proj_with_mqa(x)[:kv_lora_rank]) by kv_b_proj, plus one
                 rotary key k_pe (the projection's last qk_rope_head_dim features) shared by
                 every head; RoPE on the last qk_rope_head_dim features of each head only, on
                 pairs (x[2p], x[2p+1]) when rope_interleave (the default) else halves; q·k
                 over qk_nope_head_dim + qk_rope_head_dim features, values v_head_dim wide;
                 the latents' RMSNorms at eps 1e-6 whatever rms_norm_eps says (transformers and
                 DeepSeek's code keep RMSNorm's default there); attention_bias biases
                 q_a_proj, kv_a_proj_with_mqa and o_proj. YaRN with mscale_all_dim
                 multiplies the scores' scale 1/√(qk_head_dim) by m² (m = 0.1·mscale_all_dim·
                 ln(factor) + 1; transformers' `yarn_apply_mscale`: any rope_type but
                 "default"), beside YaRN's own cos/sin factor m(mscale)/m(mscale_all_dim).
                 The MLP from layer first_k_dense_replace on is DeepSeek-V3's routed
                 `SparseMoE` (sigmoid scores, score-correction bias, group-limited top-k,
                 routed_scaling_factor, ungated shared experts: `families_moe2._deepseek_moe`);
                 the first layers are dense (intermediate_size). The multi-token-prediction
                 layer the Hub's files hold after the last (layers.61) is ignored, as
                 transformers ignores it.

Refused by name: num_key_value_heads ≠ num_attention_heads (transformers' MLA has one k/v per
head), a config without q_lora_rank (transformers would take 1536: say it, or null),
rope_interleave null (transformers reads it as false), and FP8-quantised files
(quantization_config: the Hub's DeepSeek-V3 and Kimi K2 ship block-scaled FP8; dequantise to
bf16 first).

Letters: h heads, c latent dim, n nope head dim, r rope head dim, e value head dim, m model dim.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from torch import Tensor

from ..nn import MLAConfig
from .convert import Reshape
from .families_base import DECODER_IGNORE, SELF_ATTN, Family, W, llama_like
from .families_moe import _NOT_MLP
from .families_moe2 import _FIELDS as _MOE_FIELDS
from .families_moe2 import _WEIGHTS as _MOE2_WEIGHTS
from .families_moe2 import _deepseek_moe


def _kv_b(part: int):
    """kv_b_proj's weight (h·(n+e), c_kv), each head's n key rows then its e value rows: the
    keys' W_UK (h c_kv n) (part 0) or the values' W_UV (h c_kv e) (part 1)."""

    def make(c: Any) -> Reshape:
        H, n, e = c.n_heads, c.mla.qk_nope_head_dim, c.mla.v_head_dim

        def fn(w: Tensor) -> Tensor:
            if w.dim() != 2 or w.shape[0] != H * (n + e):
                return w  # convert's shape check names the tensor
            return w.view(H, n + e, -1).split((n, e), 1)[part].transpose(1, 2)

        return fn

    return make


def _o(c: Any) -> Reshape:
    """o_proj's weight (m, h·e) → W_O (h e m)."""
    H, e = c.n_heads, c.mla.v_head_dim

    def fn(w: Tensor) -> Tensor:
        if w.dim() != 2 or w.shape[1] != H * e:
            return w
        return w.t().view(H, e, w.shape[0])

    return fn


# `families.py` adds these to RESHAPES
DEEPSEEK_RESHAPES = {"mla.uk": _kv_b(0), "mla.uv": _kv_b(1), "mla.o": _o}

_A = SELF_ATTN
_ATTN = (
    W("blocks.{}.attn.q_down.weight", _A + "q_a_proj.weight", when="mla_q!=direct"),
    W("blocks.{}.attn.q_down.bias", _A + "q_a_proj.bias", when="mla_q=latent_bias"),
    W("blocks.{}.attn.q_latent_norm.weight", _A + "q_a_layernorm.weight", when="mla_q!=direct"),
    W("blocks.{}.attn.W_Q", _A + "q_b_proj.weight", "q", when="mla_q!=direct"),
    W("blocks.{}.attn.W_Q", _A + "q_proj.weight", "q", when="mla_q=direct"),
    W("blocks.{}.attn.kv_down.weight", _A + "kv_a_proj_with_mqa.weight"),
    W("blocks.{}.attn.kv_down.bias", _A + "kv_a_proj_with_mqa.bias", when="attn_bias"),
    W("blocks.{}.attn.kv_latent_norm.weight", _A + "kv_a_layernorm.weight"),
    W("blocks.{}.attn.W_UK", _A + "kv_b_proj.weight", "mla.uk"),
    W("blocks.{}.attn.W_UV", _A + "kv_b_proj.weight", "mla.uv"),
    W("blocks.{}.attn.W_O", _A + "o_proj.weight", "mla.o"),
    W("blocks.{}.attn.b_O", _A + "o_proj.bias", when="out_bias"),
)
_WEIGHTS = (
    *(w for w in _NOT_MLP if not w.dst.startswith("blocks.{}.attn.")),
    *_ATTN,
    *(w for w in _MOE2_WEIGHTS if w.dst.startswith("blocks.{}.mlp.")),
)

_ROPE = ("rope_scaling.", "rope_parameters.")  # the legacy dict wins, as `hf._rope_scalings`


def _rope_key(name: str, *also: str) -> tuple[str, ...]:
    return tuple(p + n for n in (name, *also) for p in _ROPE)


def _deepseek_v3(f: dict[str, Any]) -> dict[str, Any]:
    """d_head, `mla`, the scores' scale (× YaRN's mscale_all_dim factor squared) and the MoE."""
    try:  # MLAConfig's field names are config.json's
        mla = MLAConfig(f.get("q_lora_rank"), f["kv_lora_rank"], f["qk_nope_head_dim"],
                        f["qk_rope_head_dim"], f["v_head_dim"])  # fmt: skip
    except ValueError as e:
        raise ValueError(f"config.json: {str(e).removeprefix('MLAConfig: ')}") from e
    out = {"mla": mla, "d_head": mla.qk_head_dim, **_deepseek_moe(f)}
    kind, m_all = f.get("rope_kind") or "default", f.get("mscale_all_dim")
    if kind != "default" and m_all:
        factor = f.get("rope_factor")
        if isinstance(factor, bool) or not isinstance(factor, int | float):
            raise ValueError(
                f"config.json: rope scaling with mscale_all_dim={m_all} needs a numeric "
                f"factor (transformers' yarn_apply_mscale reads it), got {factor!r}"
            )
        m = 1.0 if factor <= 1 else 0.1 * m_all * math.log(factor) + 1.0
        out["attn_scale"] = m * m / math.sqrt(mla.qk_head_dim)
    return out


_DEEPSEEK_V3 = llama_like(
    "deepseek_v3", classes=("DeepseekV3",), weights=_WEIGHTS,
    fields={**_MOE_FIELDS, "n_kv_heads": ("num_key_value_heads", "num_attention_heads"),
            "d_head": ("qk_rope_head_dim",),  # a placeholder: derive sets n + r
            "rope_interleaved": ("rope_interleave",),
            "q_lora_rank": ("q_lora_rank",), "kv_lora_rank": ("kv_lora_rank",),
            "qk_nope_head_dim": ("qk_nope_head_dim",),
            "qk_rope_head_dim": ("qk_rope_head_dim",), "v_head_dim": ("v_head_dim",),
            "rope_kind": _rope_key("rope_type", "type"),
            "rope_factor": _rope_key("factor"), "mscale_all_dim": _rope_key("mscale_all_dim")},
    fixed={"mlp_bias": False},
    defaults={"kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
              "v_head_dim": 128, "rope_interleaved": True, "n_experts": 256, "top_k": 8,
              "d_expert": 2048, "n_shared": 1, "normalise": True, "scale": 2.5, "n_group": 8,
              "topk_group": 4, "first_dense": 3, "attn_bias": False, "out_bias": False,
              "norm_eps": 1e-6, "tie_embeddings": False, "act": "silu",
              "max_positions": 4096, "d_ff": 18432},
    unsupported=(
        ("num_key_value_heads ≠ num_attention_heads (multi-head latent attention has one k "
         "and v per head)",
         lambda cfg: cfg.get("num_key_value_heads") not in (None, cfg.get("num_attention_heads"))),
        ("no q_lora_rank key (transformers would take 1536: state it, or null for q_proj)",
         lambda cfg: "q_lora_rank" not in cfg),
        ("rope_interleave=null (transformers reads it as false: say true or false)",
         lambda cfg: "rope_interleave" in cfg and cfg["rope_interleave"] is None),
        ("quantization_config (FP8 block-quantised weights: dequantise to bf16 first)",
         lambda cfg: cfg.get("quantization_config") is not None),
    ),
    derive=_deepseek_v3,
)  # fmt: skip
# the multi-token-prediction layer after DeepSeek-V3's 61: unused, as transformers
# (`_keys_to_ignore_on_load_unexpected`)
_DEEPSEEK_V3 = dataclasses.replace(_DEEPSEEK_V3, ignore=(*DECODER_IGNORE, "layers.61.*"))

DEEPSEEK_FAMILIES: tuple[Family, ...] = (_DEEPSEEK_V3,)
