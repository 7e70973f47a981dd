"""Three more dense decoder families with sliding-window layers, each a declarative `Family`
(see `families_base.py`):

    ministral  Ministral 8B: Mistral (no biases anywhere) with a sliding window on the layers
               `layer_types` marks (without it, on every layer)
    olmo3      OLMo 3: OLMo 2 (QK-norm over whole q and k projections, a norm after each
               sublayer, none before) with a window on three layers in four (`layer_types`)
               and RoPE parameters per layer type: rope_scaling / rope_parameters.full_attention
               (YaRN in the released models) scales the global layers only
    exaone4    EXAONE 4.0: OLMo 2's norms after each sublayer, QK-norm per head (one gain), a
               window on the layers `layer_types` (else sliding_window_pattern) marks, and RoPE
               on those layers only: the global layers have no positions (NoPE), unless
               sliding_window is null, when every layer is global and rotates

Defaults are transformers' own (`configuration_<name>.py`) for configs that omit a key. Where
transformers cannot build a model from a config (ministral and olmo3 with sliding_window null,
a layer type other than sliding_attention / full_attention), that setting is a named error.

Letters: h query heads, k kv heads, d head dim, m model dim.
"""

from __future__ import annotations

from typing import Any

from .families_base import LLAMA_WEIGHTS, Family, llama_like
from .families_more import _OLMO2

_SLIDING, _FULL = "sliding_attention", "full_attention"
_WINDOW_FIELDS = {"window": ("sliding_window",), "layer_types": ("layer_types",)}


# transformers' ministral and olmo3 always build a sliding mask, which needs a window:
# sliding_window null is a ValueError (or TypeError) there, no model to match
_NULL_WINDOW = (
    "sliding_window=null",
    lambda cfg: "sliding_window" in cfg and cfg["sliding_window"] is None,
)


def _checked_types(f: dict[str, Any]) -> list[str] | None:
    """config.json's layer_types, one 'sliding_attention' or 'full_attention' per layer, or
    None when it has none."""
    n, types = f["n_layers"], f.get("layer_types")
    if types is not None and not (
        isinstance(types, list) and len(types) == n and all(t in (_SLIDING, _FULL) for t in types)
    ):
        raise ValueError(
            f"config.json: layer_types must list 'sliding_attention' or 'full_attention' for "
            f"each of the {n} layers, got {types!r}"
        )
    return types


def _only_checked(f: dict[str, Any]) -> dict[str, Any]:
    """layer_types checked; `hf` reads the windows and RoPE bases from it (else the pattern)."""
    _checked_types(f)
    return {}


# Ministral: Mistral's layout, no bias on q/k/v/o nor the MLP whatever attention_bias and
# mlp_bias say; a window on the sliding_attention layers, every layer when layer_types is absent
def _ministral_layers(f: dict[str, Any]) -> dict[str, Any]:
    if _checked_types(f) is not None:
        return {}
    # no layer_types: every layer slides; `hf._layer_types` reads that as a window_pattern p
    # with no p-th layer in range (every (n+1)-th layer global: none)
    return {"window_pattern": f["n_layers"] + 1}


_MINISTRAL = llama_like(
    "ministral", classes=("MinistralFor", "MinistralModel"), window="layer_types",
    fields=_WINDOW_FIELDS,
    weights=tuple(w for w in LLAMA_WEIGHTS if w.when != "qk_norm"),
    fixed={"attn_bias": False, "out_bias": False, "mlp_bias": False, "qk_norm": False},
    defaults={"tie_embeddings": False, "norm_eps": 1e-6, "act": "silu", "window": 4096},
    unsupported=(_NULL_WINDOW,),
    derive=_ministral_layers,
)  # fmt: skip


# OLMo 3: OLMo 2 plus a window on the sliding_attention layers (without layer_types, every 4th
# layer global) and RoPE parameters per layer type, both 500000 by default; an old config's
# top-level rope_theta and rope_scaling are the full_attention layers' only (transformers'
# convert_rope_params_to_dict: the sliding layers then keep 500000 and no scaling)
_OLMO3 = llama_like(
    "olmo3", classes=("Olmo3",), window="layer_types", weights=_OLMO2.weights,
    fields={**_WINDOW_FIELDS,
            "rope_base": ("rope_parameters.full_attention.rope_theta", "rope_theta"),
            "local_rope_base": ("rope_parameters.sliding_attention.rope_theta",)},
    fixed={"qk_norm": True, "qk_norm_scope": "all", "block": "output_norm", "mlp_bias": False},
    defaults={"tie_embeddings": False, "norm_eps": 1e-5, "act": "silu", "window": 4096,
              "window_pattern": 4, "rope_base": 500000.0, "local_rope_base": 500000.0},
    unsupported=(_NULL_WINDOW,), rope_by_layer_type=True,
    derive=_only_checked,
)  # fmt: skip


# EXAONE 4: without layer_types, every sliding_window_pattern-th layer (4) is global; q and k
# rotate only where `sliding_window is None or is_sliding`, so a hybrid model's global layers
# are NoPE. transformers fills in 4096 for an absent sliding_window but reads null as "no
# window" (every layer global, with RoPE): a config must say which
def _exaone4_layers(f: dict[str, Any]) -> dict[str, Any]:
    n, types, every = f["n_layers"], _checked_types(f), f["window_pattern"]
    if f.get("window") is None:
        if types is not None and _SLIDING in types:  # transformers: a TypeError
            raise ValueError(
                "config.json: layer_types marks sliding_attention layers but sliding_window is "
                "null; give the window, or mark every layer full_attention"
            )
        return {}  # no windows (`hf._windows`), RoPE on every layer
    if types is None:
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(
                f"config.json: sliding_window_pattern must be an int ≥ 1 when layer_types is "
                f"absent, got {every!r}"
            )
        types = [_SLIDING if (i + 1) % every else _FULL for i in range(n)]
    return {"rope_layers": tuple(t == _SLIDING for t in types)}


_EXAONE4 = llama_like(
    "exaone4", classes=("Exaone4",), window="layer_types", weights=_OLMO2.weights,
    fields={**_WINDOW_FIELDS, "window_pattern": ("sliding_window_pattern",)},
    fixed={"qk_norm": True, "qk_norm_scope": "head", "block": "output_norm",
           "attn_bias": False, "out_bias": False, "mlp_bias": False},
    defaults={"tie_embeddings": False, "norm_eps": 1e-5, "act": "silu", "window_pattern": 4},
    unsupported=(
        ("no sliding_window key (transformers would take 4096; write the window, or null for "
         "none)", lambda cfg: "sliding_window" not in cfg),
    ),
    derive=_exaone4_layers,
)  # fmt: skip

DENSE2_FAMILIES: tuple[Family, ...] = (_MINISTRAL, _OLMO3, _EXAONE4)
