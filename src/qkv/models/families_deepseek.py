"""DeepSeek-V2's and V3's architectures as declarative `Family`s (see `families_base.py`):
DeepSeek-V3, R1 and Kimi K2 checkpoints (model_type deepseek_v3); DeepSeek-V2, V2-Lite and
DeepSeek-Coder-V2 (deepseek_v2).

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

    deepseek_v2  deepseek_v3's multi-head latent attention (the same weights, latents, norms,
                 biases and YaRN mscale_all_dim² scale), RoPE always on pairs (x[2p], x[2p+1])
                 (transformers' complex product; there is no rope_interleave key), and
                 DeepSeek-V2's router: softmax scores, no score-correction bias, the top
                 num_experts_per_tok of them ("greedy"), or of the experts in the topk_group
                 groups whose best expert scores highest ("group_limited_greedy": SparseMoE's
                 group_score="max"); the weights never renormalised, × routed_scaling_factor;
                 n_shared_experts ungated shared experts; sparse from first_k_dense_replace on.

Refused by name: num_key_value_heads ≠ num_attention_heads (transformers' MLA has one k/v per
head), a config without q_lora_rank (transformers would take 1536: say it, or null),
rope_interleave null (transformers reads it as false), and FP8-quantised files
(quantization_config: the Hub's DeepSeek-V3 and Kimi K2 ship block-scaled FP8; dequantise to
bf16 first). deepseek_v2 also refuses norm_topk_prob=true (transformers' router ignores it,
DeepSeek's own code renormalises), moe_layer_freq ≠ 1 (transformers makes every layer from
first_k_dense_replace on sparse, DeepSeek's code every moe_layer_freq-th), scoring_func other
than softmax and mlp_bias=true (transformers' dense and shared MLPs would take biases), and
names a topk_method other than greedy / group_limited_greedy.

Letters: h heads, c latent dim, n nope head dim, r rope head dim, e value head dim, m model dim.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

from torch import Tensor

from ..nn import MLAConfig, MoEConfig
from .convert import Reshape
from .families_base import DECODER_IGNORE, SELF_ATTN, Family, W, llama_like
from .families_moe import _NOT_MLP
from .families_moe2 import _FIELDS as _MOE_FIELDS
from .families_moe2 import _WEIGHTS as _MOE2_WEIGHTS
from .families_moe2 import _deepseek_moe, _int


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


def _latent(f: dict[str, Any]) -> dict[str, Any]:
    """d_head, `mla` and the scores' scale (× YaRN's mscale_all_dim factor squared)."""
    try:  # MLAConfig's field names are config.json's
        mla = MLAConfig(f.get("q_lora_rank"), f["kv_lora_rank"], f["qk_nope_head_dim"],
                        f["qk_rope_head_dim"], f["v_head_dim"])  # fmt: skip
    except ValueError as e:
        raise ValueError(f"config.json: {str(e).removeprefix('MLAConfig: ')}") from e
    out: dict[str, Any] = {"mla": mla, "d_head": mla.qk_head_dim}
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


def _deepseek_v3(f: dict[str, Any]) -> dict[str, Any]:
    """`_latent` and DeepSeek-V3's MoE."""
    return {**_latent(f), **_deepseek_moe(f)}


_TOPK_METHODS = ("greedy", "group_limited_greedy")


def _deepseek_v2(f: dict[str, Any]) -> dict[str, Any]:
    """`_latent` and DeepSeek-V2's MoE: moe2's shape checks (`_deepseek_moe`, groups aside),
    then softmax scores without a bias, groups ranked by their best expert under
    group_limited_greedy, no renormalising (transformers' DeepseekV2TopkRouter)."""
    method = f["topk_method"]
    if method not in _TOPK_METHODS:
        raise ValueError(
            f"config.json: topk_method must be one of {_TOPK_METHODS} (transformers' "
            f"DeepseekV2 router), got {method!r}"
        )
    out = _deepseek_moe({**f, "n_group": 1, "topk_group": 1, "normalise": False})
    if out["moe"] is None:
        return {**_latent(f), **out}
    g = tg = 1
    if method == "group_limited_greedy":
        g, tg = _int(f, "n_group", 1), _int(f, "topk_group", 1)
    moe: MoEConfig = out["moe"]
    try:
        moe = dataclasses.replace(moe, scoring="softmax", score_bias=False, n_group=g,
                                  topk_group=tg, group_score="max" if g > 1 else "top2")  # fmt: skip
    except ValueError as e:
        raise ValueError(
            f"config.json: n_routed_experts={moe.n_experts}, num_experts_per_tok={moe.top_k}, "
            f"n_group={g}, topk_group={tg}: {str(e).removeprefix('MoEConfig: ')}"
        ) from e
    return {**_latent(f), **out, "moe": moe}


_MLA_FIELDS = {
    "n_kv_heads": ("num_key_value_heads", "num_attention_heads"),
    "d_head": ("qk_rope_head_dim",),  # a placeholder: derive sets n + r
    "q_lora_rank": ("q_lora_rank",), "kv_lora_rank": ("kv_lora_rank",),
    "qk_nope_head_dim": ("qk_nope_head_dim",), "qk_rope_head_dim": ("qk_rope_head_dim",),
    "v_head_dim": ("v_head_dim",), "rope_kind": _rope_key("rope_type", "type"),
    "rope_factor": _rope_key("factor"), "mscale_all_dim": _rope_key("mscale_all_dim"),
}  # fmt: skip
_MLA_REFUSED = (
    ("num_key_value_heads ≠ num_attention_heads (multi-head latent attention has one k "
     "and v per head)",
     lambda cfg: cfg.get("num_key_value_heads") not in (None, cfg.get("num_attention_heads"))),
    ("no q_lora_rank key (transformers would take 1536: state it, or null for q_proj)",
     lambda cfg: "q_lora_rank" not in cfg),
    ("quantization_config (FP8 block-quantised weights: dequantise to bf16 first)",
     lambda cfg: cfg.get("quantization_config") is not None),
)  # fmt: skip


_DEEPSEEK_V3 = llama_like(
    "deepseek_v3", classes=("DeepseekV3",), weights=_WEIGHTS,
    fields={**_MOE_FIELDS, **_MLA_FIELDS, "rope_interleaved": ("rope_interleave",)},
    fixed={"mlp_bias": False},
    defaults={"kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
              "v_head_dim": 128, "rope_interleaved": True, "n_experts": 256, "top_k": 8,
              "d_expert": 2048, "n_shared": 1, "normalise": True, "scale": 2.5, "n_group": 8,
              "topk_group": 4, "first_dense": 3, "attn_bias": False, "out_bias": False,
              "norm_eps": 1e-6, "tie_embeddings": False, "act": "silu",
              "max_positions": 4096, "d_ff": 18432},
    unsupported=(
        *_MLA_REFUSED,
        ("rope_interleave=null (transformers reads it as false: say true or false)",
         lambda cfg: "rope_interleave" in cfg and cfg["rope_interleave"] is None),
    ),
    derive=_deepseek_v3,
)  # fmt: skip
# the multi-token-prediction layer after DeepSeek-V3's 61: unused, as transformers
# (`_keys_to_ignore_on_load_unexpected`)
_DEEPSEEK_V3 = dataclasses.replace(_DEEPSEEK_V3, ignore=(*DECODER_IGNORE, "layers.61.*"))


def _set(key: str, *ok: Any) -> Callable[[dict[str, Any]], bool]:
    return lambda cfg: key in cfg and cfg[key] not in ok


_DEEPSEEK_V2 = llama_like(
    "deepseek_v2", classes=("DeepseekV2",),
    weights=tuple(w for w in _WEIGHTS if w.dst != "blocks.{}.mlp.score_bias"),
    fields={**_MOE_FIELDS, **_MLA_FIELDS, "topk_method": ("topk_method",)},
    fixed={"rope_interleaved": True},
    # transformers' DeepseekV2Config defaults (n_group, topk_group, num_experts_per_tok None:
    # named when a layer needs them)
    defaults={"kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
              "v_head_dim": 128, "n_experts": 64, "top_k": None, "d_expert": 1407,
              "n_shared": 2, "normalise": False, "scale": 1.0, "n_group": None,
              "topk_group": None, "first_dense": 0, "topk_method": "greedy",
              "attn_bias": False, "out_bias": False, "mlp_bias": False, "norm_eps": 1e-6,
              "tie_embeddings": False, "act": "silu", "max_positions": 2048, "d_ff": 11008},
    unsupported=(
        *_MLA_REFUSED,
        ("norm_topk_prob=true (transformers' DeepseekV2 router never renormalises; "
         "DeepSeek's own code does)", _set("norm_topk_prob", False, None)),
        ("moe_layer_freq ≠ 1 (transformers makes every layer from first_k_dense_replace on "
         "sparse)", _set("moe_layer_freq", 1, None)),
        ("scoring_func ≠ 'softmax' (transformers' DeepseekV2 router takes a softmax)",
         _set("scoring_func", "softmax", None)),
        ("mlp_bias=true (biased dense and shared-expert MLPs)", _set("mlp_bias", False, None)),
    ),
    derive=_deepseek_v2,
)  # fmt: skip

DEEPSEEK_FAMILIES: tuple[Family, ...] = (_DEEPSEEK_V3, _DEEPSEEK_V2)
