"""Mixture-of-experts families with DeepSeek-V3's routing, each a declarative `Family` (see
`families_base.py`): the Llama layout whose MLP, from layer first_k_dense_replace on, is a
`qkv.nn.SparseMoE` scoring each expert by sigmoid(router logit), choosing the top k by those
scores plus a learned `e_score_correction_bias` (optionally among the best topk_group of
n_group expert groups only), weighting them by the unbiased scores (renormalised by
norm_topk_prob, × routed_scaling_factor), plus n_shared_experts ungated shared experts (one MLP
of width n_shared_experts · moe_intermediate_size, added as it is).

    glm4_moe  GLM-4.5 / 4.6 / 4.5-Air: RoPE on the first partial_rotary_factor (0.5) of each
              head in halves (x[p], x[p + r/2]), not GLM-4's pairs; q/k/v biases by
              attention_bias (o_proj never has one); QK-norm per head by use_qk_norm; dense
              MLP (intermediate_size) on the first first_k_dense_replace (1) layers; the
              multi-token-prediction layer the Hub's files hold after the last layer
              (layers.46 / layers.92) is ignored, as transformers ignores it
    dots1     rednote dots.llm1: Qwen3's attention (QK-norm per head, always), q/k/v/o biases
              by attention_bias, sliding windows by layer_types; first_k_dense_replace dense
              layers (0 by default); n_routed_experts, num_experts_per_tok and
              n_shared_experts have no default (transformers fails without them): named errors

The experts' names are those `save_pretrained` writes and the Hub's checkpoints hold, one
tensor per expert; the router `mlp.gate.weight` (e, m) and its `mlp.gate.e_score_correction_bias`
(e,) load into `router.weight` and `score_bias`. Defaults are transformers' own
(`configuration_<name>.py`) for configs that omit a key.

Letters: e experts, f expert hidden dim, m model dim.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ..nn import MoEConfig
from .families_base import DECODER_IGNORE, LAYER_MLP, Family, W, llama_like
from .families_dense3 import _glm4_rope
from .families_moe import _DENSE, _NOT_MLP, _sparse

_M = LAYER_MLP
_WEIGHTS = (
    *_NOT_MLP,
    *(W(w.dst, w.src, w.reshape, w.when, layers="dense") for w in _DENSE),
    *_sparse(
        _M + "gate.weight",
        _M + "experts.",
        "gate_proj.weight",
        "up_proj.weight",
        "down_proj.weight",
    ),
    W("blocks.{}.mlp.score_bias", _M + "gate.e_score_correction_bias", layers="moe"),
    W("blocks.{}.mlp.shared.gate.weight", _M + "shared_experts.gate_proj.weight", layers="moe"),
    W("blocks.{}.mlp.shared.up.weight", _M + "shared_experts.up_proj.weight", layers="moe"),
    W("blocks.{}.mlp.shared.down.weight", _M + "shared_experts.down_proj.weight", layers="moe"),
)
_FIELDS = {
    "n_kv_heads": ("num_key_value_heads",),  # absent: transformers' default, not h
    "n_experts": ("n_routed_experts", "num_local_experts"),
    "top_k": ("num_experts_per_tok",),
    "d_expert": ("moe_intermediate_size",),
    "n_shared": ("n_shared_experts",),
    "normalise": ("norm_topk_prob",),
    "scale": ("routed_scaling_factor",),
    "n_group": ("n_group",),
    "topk_group": ("topk_group",),
    "first_dense": ("first_k_dense_replace",),
}
# what these keys are called in config.json, for errors
_KEYS = {
    "n_experts": "n_routed_experts", "top_k": "num_experts_per_tok",
    "d_expert": "moe_intermediate_size", "n_shared": "n_shared_experts",
    "n_group": "n_group", "topk_group": "topk_group",
    "first_dense": "first_k_dense_replace", "scale": "routed_scaling_factor",
}  # fmt: skip


def _int(f: dict[str, Any], ours: str, low: int) -> int:
    v = f.get(ours)
    if isinstance(v, bool) or not isinstance(v, int) or v < low:
        raise ValueError(f"config.json: {_KEYS[ours]} must be an int ≥ {low}, got {v!r}")
    return v


def _deepseek_moe(f: dict[str, Any]) -> dict[str, Any]:
    """`moe` and `moe_layers`: sparse from layer first_k_dense_replace on (transformers:
    `layer_idx >= first_k_dense_replace`), DeepSeek-V3's routing; none sparse: a dense model."""
    first, n_layers = _int(f, "first_dense", 0), f["n_layers"]
    sparse = tuple(i >= first for i in range(n_layers))
    if not any(sparse):
        return {"moe": None, "moe_layers": None}
    n, k, d = _int(f, "n_experts", 1), _int(f, "top_k", 1), _int(f, "d_expert", 1)
    shared = _int(f, "n_shared", 1)
    scale = f["scale"]
    if isinstance(scale, bool) or not isinstance(scale, int | float) or not 0 < scale < 1e300:
        raise ValueError(f"config.json: routed_scaling_factor must be a number > 0, got {scale!r}")
    normalise = f["normalise"]
    if not isinstance(normalise, bool):
        raise ValueError(f"config.json: norm_topk_prob must be a bool, got {normalise!r}")
    try:
        moe = MoEConfig(n, k, d, normalise=normalise, d_shared=shared * d, shared_gated=False,
                        scoring="sigmoid", score_bias=True, n_group=_int(f, "n_group", 1),
                        topk_group=_int(f, "topk_group", 1), scale=float(scale),
                        router_fp32=True)  # fmt: skip
    except ValueError as e:  # top_k / n_group / topk_group that do not fit together
        raise ValueError(
            f"config.json: n_routed_experts={n}, num_experts_per_tok={k}, n_group="
            f"{f['n_group']}, topk_group={f['topk_group']}: {str(e).removeprefix('MoEConfig: ')}"
        ) from e
    return {"moe": moe, "moe_layers": None if all(sparse) else sparse}


def _glm4_moe(f: dict[str, Any]) -> dict[str, Any]:
    return {**_glm4_rope(f), **_deepseek_moe(f)}


_NULL_KV = (
    "num_key_value_heads=null",
    lambda cfg: "num_key_value_heads" in cfg and cfg["num_key_value_heads"] is None,
)

_GLM4_MOE = llama_like(
    "glm4_moe", classes=("Glm4MoeFor", "Glm4MoeModel"), weights=_WEIGHTS,
    fields={**_FIELDS, "qk_norm": ("use_qk_norm",),
            "rope_fraction": ("rope_parameters.partial_rotary_factor", "partial_rotary_factor")},
    fixed={"out_bias": False, "mlp_bias": False},
    defaults={"n_kv_heads": 8, "n_experts": 128, "top_k": 8, "d_expert": 1408, "n_shared": 1,
              "normalise": True, "scale": 1.0, "n_group": 1, "topk_group": 1,
              "first_dense": 1, "qk_norm": False, "rope_fraction": 0.5, "attn_bias": False,
              "norm_eps": 1e-5, "tie_embeddings": False, "act": "silu",
              "max_positions": 131072},
    unsupported=(_NULL_KV,), derive=_glm4_moe,
)  # fmt: skip
# GLM-4.5's and 4.5-Air's multi-token-prediction layer after the last: unused, as transformers
# (`_keys_to_ignore_on_load_unexpected`); only keys no rule reads are ignored
_GLM4_MOE = dataclasses.replace(_GLM4_MOE, ignore=(*DECODER_IGNORE, "layers.46.*", "layers.92.*"))


# dots.llm1: without layer_types transformers makes the layers from max_window_layers (62) on
# sliding when sliding_window (4096) is set, ignoring use_sliding_window; configs it writes
# list layer_types
def _dots1_untyped_windows(cfg: dict[str, Any]) -> bool:
    if cfg.get("layer_types") is not None:
        return False
    sliding = cfg.get("sliding_window", 4096) is not None
    start, n = cfg.get("max_window_layers", 62), cfg.get("num_hidden_layers", 62)
    return bool(cfg.get("use_sliding_window")) or (sliding and start < n)


_DOTS1 = llama_like(
    "dots1", classes=("Dots1",), window="layer_types", weights=_WEIGHTS,
    fields={**_FIELDS, "window": ("sliding_window",), "out_bias": ("attention_bias",)},
    fixed={"qk_norm": True, "mlp_bias": False},
    defaults={"n_kv_heads": 32, "normalise": False, "scale": 1.0, "n_group": 1,
              "topk_group": 1, "first_dense": 0, "attn_bias": False, "out_bias": False,
              "norm_eps": 1e-6, "tie_embeddings": False, "act": "silu", "max_positions": 2048},
    unsupported=(
        _NULL_KV,
        ("sliding layers without layer_types (max_window_layers, use_sliding_window)",
         _dots1_untyped_windows),
    ),
    derive=_deepseek_moe,
)  # fmt: skip

MOE2_FAMILIES: tuple[Family, ...] = (_GLM4_MOE, _DOTS1)
