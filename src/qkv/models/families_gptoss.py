"""OpenAI's gpt-oss (gpt-oss-20b, gpt-oss-120b) as a declarative `Family` (see `families_base.py`).

    gpt_oss   Llama's attention with q/k/v/o biases and a learned sink logit per query head
              (`self_attn.sinks` → `MultiHeadAttention.sinks`), sliding window (128) and full
              layers alternating by `layer_types`, YaRN RoPE (factor 32 over 4096 positions,
              truncate=False); every MLP a `qkv.nn.SparseMoE` whose router has a bias and takes
              the softmax over its top-k logits, and whose experts have biases and gpt-oss's
              clamped SwiGLU, (up + 1) · gate · sigmoid(1.702 · gate) (`ClampedSwiGLU`)

The experts are stored fused per layer, as transformers keeps them:
`mlp.experts.gate_up_proj` (e, m, 2f) — x @ W, gate and up interleaved in the last dim (gate
the even columns, up the odd) — its bias `gate_up_proj_bias` (e, 2f), `down_proj` (e, f, m)
and `down_proj_bias` (e, m). Each expert's rules read its slice (`weight_rules`) and split it
into the gate / up / down `nn.Linear`s of a `qkv.nn.SparseMoE` expert (`RESHAPES["oai.*"]`). The Hub's original files
hold the expert weights as MXFP4 (`*_blocks` / `*_scales`): `hf.load_dir` dequantises them
first (`models/mxfp4.py`), as transformers does on a machine without its MXFP4 kernels.

Letters: e experts, f expert hidden dim, m model dim.
"""

from __future__ import annotations

from typing import Any

from ..nn import ClampedSwiGLU
from .families_base import LLAMA_WEIGHTS, Family, W, llama_like
from .families_moe import _moe

_NOT_MLP = tuple(w for w in LLAMA_WEIGHTS if not w.dst.startswith("blocks.{}.mlp."))
_E = "layers.{}.mlp.experts."  # fused (e, …) tensors: each expert's rule reads its slice
_X = "blocks.{}.mlp.experts.{e}."


def _gpt_oss(f: dict[str, Any]) -> dict[str, Any]:
    """The SparseMoE of every layer: gpt-oss's routing (top-k logits, then their softmax),
    biases on router and experts, the clamped SwiGLU with the config's alpha and limit."""
    moe = _moe(f, n_key="num_local_experts", width="d_ff", width_key="intermediate_size",
               normalise=True, sparse=(True,) * f["n_layers"])["moe"]  # fmt: skip
    for key, name in (("alpha", "swiglu_alpha"), ("limit", "swiglu_limit")):
        v = f[key]
        if isinstance(v, bool) or not isinstance(v, int | float) or not v > 0:
            raise ValueError(f"config.json: {name} must be a number > 0, got {v!r}")
    glu = ClampedSwiGLU(alpha=float(f["alpha"]), limit=float(f["limit"]), up_offset=1.0)
    moe = type(moe)(moe.n_experts, moe.top_k, moe.d_expert, normalise=True,
                    order="topk_softmax", router_bias=True, expert_bias=True, glu=glu)  # fmt: skip
    return {"moe": moe, "moe_layers": None}


_GPT_OSS = llama_like(
    "gpt_oss", classes=("GptOss",), window="layer_types",
    weights=(
        *_NOT_MLP,
        W("blocks.{}.attn.sinks", "layers.{}.self_attn.sinks"),
        W("blocks.{}.mlp.router.weight", "layers.{}.mlp.router.weight"),
        W("blocks.{}.mlp.router.bias", "layers.{}.mlp.router.bias"),
        W(_X + "gate.weight", _E + "gate_up_proj", "oai.gate", layers="moe"),
        W(_X + "up.weight", _E + "gate_up_proj", "oai.up", layers="moe"),
        W(_X + "gate.bias", _E + "gate_up_proj_bias", "oai.bgate", layers="moe"),
        W(_X + "up.bias", _E + "gate_up_proj_bias", "oai.bup", layers="moe"),
        W(_X + "down.weight", _E + "down_proj", "t", layers="moe"),
        W(_X + "down.bias", _E + "down_proj_bias", layers="moe"),
    ),
    fields={"window": ("sliding_window",), "n_experts": ("num_local_experts",),
            "top_k": ("num_experts_per_tok",), "alpha": ("swiglu_alpha",),
            "limit": ("swiglu_limit",)},
    fixed={"mlp_bias": False, "attn_sinks": True},
    defaults={"n_experts": 128, "top_k": 4, "alpha": 1.702, "limit": 7.0, "norm_eps": 1e-5,
              "rope_base": 150000.0, "tie_embeddings": False, "act": "silu",
              "attn_bias": True, "out_bias": True, "d_head": 64, "window": 128},
    derive=_gpt_oss,
)  # fmt: skip

GPT_OSS_FAMILIES: tuple[Family, ...] = (_GPT_OSS,)
