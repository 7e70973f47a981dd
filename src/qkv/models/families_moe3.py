"""Three more mixture-of-experts decoder families, each a declarative `Family` (see
`families_base.py`), each with a shared expert that every token goes through, ungated:

    ernie4_5_moe      ERNIE 4.5 MoE (21B-A3B, 300B-A47B): ERNIE 4.5's attention (RoPE in
                      interleaved pairs over the whole head); the router scores the experts by
                      softmax, chooses the top moe_k by those scores plus a learned
                      e_score_correction_bias (the choice only), renormalises the unbiased
                      weights, dividing by max(Σ, moe_norm_min); moe_num_shared_experts shared
                      experts as one MLP of width moe_num_shared_experts · moe_intermediate_size
                      (none when 0); sparse on the layers i with (i + 1) % moe_layer_interval
                      == 0 and moe_layer_start_index ≤ i ≤ moe_layer_end_index (−1: the last),
                      dense MLP (intermediate_size) elsewhere; tied embeddings by default; the
                      multi-token-prediction tensors (`*mtp*`) ignored, as transformers does
    hunyuan_v1_moe    Tencent Hunyuan-A13B: Hunyuan's attention (QK-norm per head after RoPE,
                      q/k/v/o biases by attention_bias, NTK-alpha RoPE as a fixed base); every
                      layer sparse, num_experts experts and one shared MLP, all intermediate_size
                      wide; top moe_topk of the softmax, always renormalised (a per-layer
                      moe_topk list must name one k: qkv's layers share one router shape)
    granitemoeshared  GraniteMoE (Granite's four multipliers, top-k logits then their softmax)
                      plus a shared MLP of width shared_intermediate_size (none when 0), its gate
                      and up rows fused in shared_mlp.input_linear, added to the experts' output
                      before the residual multiplier

Defaults are transformers' own (`configuration_<name>.py`) for configs that omit a key. What
transformers cannot build, or qkv cannot honour exactly, is a named error: ERNIE's use_bias
(biases on every projection, the shared experts' and lm_head's too), a null head_dim or
num_key_value_heads (ERNIE), no head_dim (Hunyuan), a num_experts list or a moe_topk list that
varies by layer (Hunyuan).

Letters: e experts, f expert hidden dim, m model dim.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ..nn import MoEConfig
from .families_base import (
    DECODER_IGNORE,
    LAYER_MLP,
    SELF_ATTN,
    Family,
    W,
    llama_like,
)
from .families_dense3 import _KV_HEADS, _NULL_SHAPES
from .families_dense4 import _HUNYUAN, _hunyuan
from .families_extra import _GRANITEMOE
from .families_moe import _DENSE, _NOT_MLP, _sparse

_M = LAYER_MLP


def _int(f: dict[str, Any], ours: str, key: str, low: int | None = 1) -> int:
    """f[ours] as an int ≥ low (None: any int); errors name config.json's `key`."""
    v = f.get(ours)
    if isinstance(v, bool) or not isinstance(v, int) or (low is not None and v < low):
        want = "an int" if low is None else f"an int ≥ {low}"
        raise ValueError(f"config.json: {key} must be {want}, got {v!r}")
    return v


def _moe_config(keys: str, **kw: Any) -> MoEConfig:
    try:
        return MoEConfig(**kw)
    except ValueError as e:  # top_k > n_experts, ...
        raise ValueError(f"config.json: {keys}: {str(e).removeprefix('MoEConfig: ')}") from e


def _expert_weights(router: str, shared: str, **w: Any) -> tuple[W, ...]:
    """Router, per-expert gate/up/down, the shared MLP's gate/up/down, on the sparse layers."""
    return (
        *_sparse(router, _M + "experts.", "gate_proj.weight", "up_proj.weight",
                 "down_proj.weight"),
        *(W(f"blocks.{{}}.mlp.shared.{p}.weight", f"{shared}{p}_proj.weight", layers="moe", **w)
          for p in ("gate", "up", "down")),
    )  # fmt: skip


# --------------------------------------------------------------------------------------------
# ERNIE 4.5 MoE: transformers' Ernie4_5_MoeTopKRouter (float32 router, softmax, the choice by
# softmax + e_score_correction_bias, weights gathered from the softmax / clamp(Σ, moe_norm_min))
def _ernie_sparse(f: dict[str, Any]) -> tuple[bool, ...]:
    """transformers: `(i + 1) % moe_layer_interval == 0 and moe_layer_start_index <= i <=
    moe_layer_end_index`, an end of −1 meaning the last layer."""
    n = f["n_layers"]
    start = _int(f, "moe_start", "moe_layer_start_index", None)
    end = _int(f, "moe_end", "moe_layer_end_index", None)
    every = _int(f, "moe_every", "moe_layer_interval")
    end = n - 1 if end == -1 else end
    return tuple((i + 1) % every == 0 and start <= i <= end for i in range(n))


def _ernie4_5_moe(f: dict[str, Any]) -> dict[str, Any]:
    sparse = _ernie_sparse(f)
    if not any(sparse):
        return {"moe": None, "moe_layers": None}
    n, k = _int(f, "n_experts", "moe_num_experts"), _int(f, "top_k", "moe_k")
    d, shared = (
        _int(f, "d_expert", "moe_intermediate_size"),
        _int(f, "n_shared", "moe_num_shared_experts", 0),
    )
    norm_min = f["norm_min"]
    if (
        isinstance(norm_min, bool)
        or not isinstance(norm_min, int | float)
        or not (0 <= norm_min < 1e300)
    ):
        raise ValueError(f"config.json: moe_norm_min must be a number ≥ 0, got {norm_min!r}")
    moe = _moe_config(f"moe_num_experts={n}, moe_k={k}", n_experts=n, top_k=k, d_expert=d,
                      d_shared=shared * d, shared_gated=not shared, score_bias=True,
                      norm_min=float(norm_min), router_fp32=True)  # fmt: skip
    return {"moe": moe, "moe_layers": None if all(sparse) else sparse}


_ERNIE4_5_MOE = llama_like(
    "ernie4_5_moe", classes=("Ernie4_5_MoeFor", "Ernie4_5_MoeModel"),
    weights=(
        *_NOT_MLP,
        *(W(w.dst, w.src, w.reshape, w.when, layers="dense") for w in _DENSE),
        *_expert_weights(_M + "gate.weight", _M + "shared_experts.", when="shared_expert"),
        W("blocks.{}.mlp.score_bias", _M + "moe_statics.e_score_correction_bias", "ernie.bias",
          layers="moe"),
    ),
    fields={**_KV_HEADS, "n_experts": ("moe_num_experts", "num_experts"),
            "top_k": ("moe_k", "num_experts_per_tok"), "d_expert": ("moe_intermediate_size",),
            "n_shared": ("moe_num_shared_experts",), "moe_start": ("moe_layer_start_index",),
            "moe_end": ("moe_layer_end_index",), "moe_every": ("moe_layer_interval",),
            "norm_min": ("moe_norm_min",)},
    fixed={"rope_interleaved": True, "attn_bias": False, "out_bias": False, "mlp_bias": False,
           "qk_norm": False},
    defaults={"n_kv_heads": 4, "rope_base": 500000.0, "tie_embeddings": True, "norm_eps": 1e-5,
              "act": "silu", "max_positions": 131072, "bos_id": 1, "eos_id": 2,
              "n_experts": 64, "top_k": 6, "d_expert": 1536, "n_shared": 2, "moe_start": 1,
              "moe_end": -1, "moe_every": 1, "norm_min": 1e-12},
    unsupported=(
        *_NULL_SHAPES,
        ("use_bias (biases on every projection, the shared experts' and lm_head's)",
         lambda cfg: bool(cfg.get("use_bias"))),
    ),
    derive=_ernie4_5_moe,
)  # fmt: skip
# transformers: `_keys_to_ignore_on_load_unexpected = ["mtp"]` (the Hub's files hold the
# multi-token-prediction block); only keys no rule reads are ignored
_ERNIE4_5_MOE = dataclasses.replace(_ERNIE4_5_MOE, ignore=(*DECODER_IGNORE, "*mtp*"))


# --------------------------------------------------------------------------------------------
# Hunyuan-A13B: every MLP a HunYuanMoEV1Moe (float32 router wg, softmax, top k, renormalised;
# its experts and its shared MLP intermediate_size wide, the shared one added as it is)
def _one_per_layer(f: dict[str, Any], ours: str, key: str) -> int:
    """A per-layer list (transformers reads entry i on layer i) that names one value, or an
    int: that int."""
    v, n = f.get(ours), f["n_layers"]
    if isinstance(v, list):
        if len(v) < n or len(set(map(repr, v[:n]))) != 1:
            raise ValueError(
                f"config.json: {key}={v!r} must give one value for all {n} layers (qkv's sparse "
                "layers share one router shape)"
            )
        f = {**f, ours: v[0]}
    return _int(f, ours, key)


def _hunyuan_v1_moe(f: dict[str, Any]) -> dict[str, Any]:
    n = _int(f, "n_experts", "num_experts")
    k, d = _one_per_layer(f, "top_k", "moe_topk"), _int(f, "d_ff", "intermediate_size")
    moe = _moe_config(f"num_experts={n}, moe_topk={k}", n_experts=n, top_k=k, d_expert=d,
                      d_shared=d, shared_gated=False, router_fp32=True)  # fmt: skip
    return {**_hunyuan(f), "moe": moe}


_A = SELF_ATTN
_HUNYUAN_V1_MOE = llama_like(
    "hunyuan_v1_moe", classes=("HunYuanMoEV1For", "HunYuanMoEV1Model"),
    weights=(
        *(w for w in _NOT_MLP if w.when != "qk_norm"),
        W("blocks.{}.attn.q_norm.weight", _A + "query_layernorm.weight"),
        W("blocks.{}.attn.k_norm.weight", _A + "key_layernorm.weight"),
        *_expert_weights(_M + "gate.wg.weight", _M + "shared_mlp."),
    ),
    fields={**_HUNYUAN.fields, "n_experts": ("num_experts", "num_local_experts"),
            "top_k": ("moe_topk", "num_experts_per_tok")},
    fixed=_HUNYUAN.fixed,
    defaults={**_HUNYUAN.defaults, "n_experts": 1, "top_k": 1},
    unsupported=(
        *_HUNYUAN.unsupported,
        # transformers' experts take num_experts as one int (a list fails to build them)
        ("a num_experts list", lambda cfg: isinstance(cfg.get("num_experts"), list)),
    ),
    rope_alpha=True, derive=_hunyuan_v1_moe,
)  # fmt: skip


# --------------------------------------------------------------------------------------------
# GraniteMoeShared: GraniteMoE's layer, plus shared_mlp(x) when shared_intermediate_size > 0
def _granitemoeshared(f: dict[str, Any]) -> dict[str, Any]:
    out = _GRANITEMOE.derive(f)
    d_shared = _int(f, "d_shared", "shared_intermediate_size", 0)
    if d_shared:
        out["moe"] = dataclasses.replace(out["moe"], d_shared=d_shared, shared_gated=False)
    return out


_S = "layers.{}.shared_mlp."
_GRANITEMOESHARED = dataclasses.replace(
    _GRANITEMOE, model_type="granitemoeshared", classes=("GraniteMoeSharedFor",),
    weights=(
        *_GRANITEMOE.weights,
        W("blocks.{}.mlp.shared.gate.weight", _S + "input_linear.weight", "shared_gate_up.gate",
          when="shared_expert", layers="moe"),
        W("blocks.{}.mlp.shared.up.weight", _S + "input_linear.weight", "shared_gate_up.up",
          when="shared_expert", layers="moe"),
        W("blocks.{}.mlp.shared.down.weight", _S + "output_linear.weight",
          when="shared_expert", layers="moe"),
    ),
    fields={**_GRANITEMOE.fields, "d_shared": ("shared_intermediate_size",)},
    defaults={**_GRANITEMOE.defaults, "d_shared": 0},
    derive=_granitemoeshared,
)  # fmt: skip

MOE3_FAMILIES: tuple[Family, ...] = (_ERNIE4_5_MOE, _HUNYUAN_V1_MOE, _GRANITEMOESHARED)
