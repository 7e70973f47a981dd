"""Four more decoder families, each a declarative `Family` (see `families_base.py`):

    cohere2     Command R7B: Cohere's block (one bias-free LayerNorm feeding attention and a
                SwiGLU MLP side by side, interleaved RoPE, logits × logit_scale), sliding
                windows on the layers `layer_types` marks, and RoPE on those layers only: the
                global layers have no positions at all (NoPE)
    granitemoe  Granite's four multipliers with a sparse MLP on every layer; the experts are
                stored stacked, input_linear (e, 2f, m) (gate rows, then up) and output_linear
                (e, m, f), split per expert on loading (`Family.unstacked`)
    olmo        OLMo 1: Llama with a LayerNorm that learns nothing (no weight, no bias, eps
                1e-5) and clip_qkv clamping q, k and v
    arcee       AFM: Llama with a plain MLP down(relu(up(x))²)

Defaults are transformers' own (`configuration_<name>.py`) for configs that omit a key.

Letters: e experts, f expert hidden dim, h query heads, k kv heads, d head dim, m model dim.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from .families_base import LLAMA_WEIGHTS, Family, W, llama_like
from .families_moe import _moe
from .families_more import _granite_scales

_LAYER_TYPES = ("sliding_attention", "full_attention")


# Cohere 2: `layer_types` (else every sliding_window_pattern-th layer global, 4) says which
# layers slide; transformers rotates q and k only on those (`if self.sliding_window is not
# None: apply_rotary_pos_emb`): the full_attention layers are NoPE
def _cohere2_layers(f: dict[str, Any]) -> dict[str, Any]:
    n, types, every = f["n_layers"], f.get("layer_types"), f["window_pattern"]
    if types is None:
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(
                f"config.json: sliding_window_pattern must be an int ≥ 1, got {every!r}"
            )
        types = [_LAYER_TYPES[(i + 1) % every == 0] for i in range(n)]
    if not isinstance(types, list) or len(types) != n or any(t not in _LAYER_TYPES for t in types):
        raise ValueError(
            f"config.json: layer_types must list 'sliding_attention' or 'full_attention' for "
            f"each of the {n} layers, got {types!r}"
        )
    return {"rope_layers": tuple(t == "sliding_attention" for t in types)}


_COHERE2 = llama_like(
    "cohere2", classes=("Cohere2",), window="layer_types",
    fields={"d_head": (),  # hidden_size / num_attention_heads, whatever head_dim says
            "norm_eps": ("layer_norm_eps",), "logit_scale": ("logit_scale",),
            "window": ("sliding_window",), "window_pattern": ("sliding_window_pattern",),
            "layer_types": ("layer_types",)},
    weights=tuple(w for w in LLAMA_WEIGHTS if w.dst != "blocks.{}.norm2.weight"
                  if w.when != "qk_norm"),
    fixed={"norm": "layer", "norm_bias": False, "block": "parallel1", "rope_interleaved": True,
           "mlp_bias": False, "qk_norm": False},
    defaults={"logit_scale": 0.0625, "norm_eps": 1e-5, "rope_base": 10000.0,
              "tie_embeddings": True, "act": "silu", "window_pattern": 4, "window": 4096},
    unsupported=(
        # transformers then builds no sliding mask (a ValueError) nor a cache: no model to match
        ("sliding_window=null", lambda cfg: "sliding_window" in cfg
         and cfg["sliding_window"] is None),
    ),
    derive=_cohere2_layers,
)  # fmt: skip


# GraniteMoE: Granite's multipliers (embeddings, each sublayer's output, scores, logits), a
# sparse MLP on every layer. Its router takes the top k logits, then their softmax: the same
# weights as a softmax over every expert renormalised over the top k (exp(l_i − l_max) over
# the same k terms), so `SparseMoE` with normalise=True, up to rounding
def _granitemoe(f: dict[str, Any]) -> dict[str, Any]:
    """Granite's scales and a sparse MLP on every layer, routed as GraniteMoE's router does:
    the top k logits, then their softmax (`order="topk_softmax"`)."""
    moe = _moe(f, n_key="num_local_experts", width="d_ff", width_key="intermediate_size",
               normalise=True, sparse=(True,) * f["n_layers"])  # fmt: skip
    moe["moe"] = dataclasses.replace(moe["moe"], order="topk_softmax")
    return {**_granite_scales(f), **moe}


_G = "layers.{}.block_sparse_moe."
_GRANITEMOE = llama_like(
    "granitemoe", classes=("GraniteMoeForCausalLM",),
    weights=(
        *(w for w in LLAMA_WEIGHTS if not w.dst.startswith("blocks.{}.mlp.")),
        W("blocks.{}.mlp.router.weight", _G + "router.layer.weight", layers="moe"),
        W("blocks.{}.mlp.experts.{e}.gate.weight", _G + "experts.{e}.input_linear.weight",
          "gate_up.gate", layers="moe"),
        W("blocks.{}.mlp.experts.{e}.up.weight", _G + "experts.{e}.input_linear.weight",
          "gate_up.up", layers="moe"),
        W("blocks.{}.mlp.experts.{e}.down.weight", _G + "experts.{e}.output_linear.weight",
          layers="moe"),
    ),
    unstacked=((_G + "input_linear.weight", _G + "experts.*.input_linear.weight"),
               (_G + "output_linear.weight", _G + "experts.*.output_linear.weight")),
    fields={"embed_scale": ("embedding_multiplier",), "residual_scale": ("residual_multiplier",),
            "attn_scale": ("attention_multiplier",), "logits_scaling": ("logits_scaling",),
            "n_experts": ("num_local_experts",), "top_k": ("num_experts_per_tok",)},
    fixed={"mlp_bias": False},
    defaults={"tie_embeddings": False, "norm_eps": 1e-6, "act": "silu", "embed_scale": 1.0,
              "residual_scale": 1.0, "attn_scale": 1.0, "logits_scaling": 1.0,
              "n_experts": 8, "top_k": 2},
    derive=_granitemoe,
)  # fmt: skip


# OLMo 1: Llama with LayerNorm (x − mean)/√(var + 1e-5), nothing learned, before each sublayer
# and at the end; q/k/v/o biases with attention_bias; clip_qkv c clamps q, k, v to [−c, c]
_OLMO = llama_like(
    "olmo", classes=("OlmoForCausalLM",),
    weights=tuple(w for w in LLAMA_WEIGHTS if w.dst not in (
        "norm.weight", "blocks.{}.norm1.weight", "blocks.{}.norm2.weight")
        if w.when != "qk_norm"),
    fields={"clip_qkv": ("clip_qkv",)},
    fixed={"norm": "layer", "norm_affine": False, "norm_eps": 1e-5, "mlp_bias": False,
           "qk_norm": False},
    defaults={"tie_embeddings": False, "act": "silu"},
)  # fmt: skip


# Arcee (AFM): Llama with a plain MLP, down(act(up(x))), act relu² by default (NemotronMLP)
_ARCEE = llama_like(
    "arcee", classes=("Arcee",),
    weights=tuple(w for w in LLAMA_WEIGHTS if not w.dst.startswith("blocks.{}.mlp.gate.")),
    fixed={"gated": False},
    defaults={"tie_embeddings": False, "norm_eps": 1e-5, "act": "relu2"},
)  # fmt: skip

EXTRA_FAMILIES: tuple[Family, ...] = (_COHERE2, _GRANITEMOE, _OLMO, _ARCEE)
