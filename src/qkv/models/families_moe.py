"""Mixture-of-experts decoder families, each a declarative `Family` (see `families_base.py`):
the Llama layout whose MLP is, on some or all layers, a `qkv.nn.SparseMoE` (a router `gate`
(e, m) scoring e gated experts, the top k per token, blended by their softmax probabilities).

    mixtral     Mistral attention (sliding_window on every layer); block_sparse_moe.gate and
                experts.{e}.w1 (gate) / w3 (up) / w2 (down); weights always renormalised
    qwen3_moe   Qwen3 attention (QK-norm per head); mlp.gate, mlp.experts.{e}.gate_proj /
                up_proj / down_proj; norm_topk_prob; dense MLP (intermediate_size) on the layers
                in mlp_only_layers or not a multiple of decoder_sparse_step (1-based)
    qwen2_moe   Qwen2 attention (q/k/v biases, `qkv_bias`); as qwen3_moe plus a shared expert
                (shared_expert_intermediate_size) gated by sigmoid(shared_expert_gate(x))
    olmoe       OLMoE: QK-norm over the whole q and k projections (as OLMo 2), pre-norm
                blocks (as Llama); every layer sparse

The experts' names are those `save_pretrained` writes and the Hub's checkpoints hold, one
tensor per expert (transformers 5 fuses them into experts.gate_up_proj / down_proj in memory
only); a checkpoint with the fused names is reported as missing / unexpected tensors.
Defaults are transformers' own (`configuration_<name>.py`) for configs that omit a key.

Letters: e experts, f expert hidden dim, m model dim.
"""

from __future__ import annotations

from typing import Any

from ..nn import MoEConfig
from .families_base import LAYER_MLP, LLAMA_WEIGHTS, Family, W, llama_like

_DENSE = tuple(w for w in LLAMA_WEIGHTS if w.dst.startswith("blocks.{}.mlp."))
_NOT_MLP = tuple(w for w in LLAMA_WEIGHTS if not w.dst.startswith("blocks.{}.mlp."))


def _sparse(router: str, experts: str, gate: str, up: str, down: str) -> tuple[W, ...]:
    """The SparseMoE's tensors, on the sparse layers: router, then each expert's gated MLP."""
    e = experts + "{e}."
    return (
        W("blocks.{}.mlp.router.weight", router, layers="moe"),
        W("blocks.{}.mlp.experts.{e}.gate.weight", e + gate, layers="moe"),
        W("blocks.{}.mlp.experts.{e}.up.weight", e + up, layers="moe"),
        W("blocks.{}.mlp.experts.{e}.down.weight", e + down, layers="moe"),
    )


def _positive_int(f: dict[str, Any], ours: str, key: str) -> int:
    v = f[ours]
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"config.json: {key} must be an int ≥ 1, got {v!r}")
    return v


def _moe(
    f: dict[str, Any],
    *,
    n_key: str,
    width: str,
    width_key: str,
    normalise: bool,
    sparse: tuple[bool, ...],
    d_shared: int = 0,
) -> dict[str, Any]:
    """`moe` and `moe_layers` from the fields read (`n_experts`, `top_k`, the experts' width
    f[width]) and the layers `sparse` marks; config errors name the config.json key. No sparse
    layer at all: a dense model (moe None)."""
    if not any(sparse):
        return {"moe": None, "moe_layers": None}
    n = _positive_int(f, "n_experts", n_key)
    k = _positive_int(f, "top_k", "num_experts_per_tok")
    if k > n:
        raise ValueError(
            f"config.json: num_experts_per_tok={k} exceeds {n_key}={n}; a token can use each "
            "expert once"
        )
    d_expert = _positive_int(f, width, width_key)
    moe = MoEConfig(n, k, d_expert, normalise=normalise, d_shared=d_shared)
    return {"moe": moe, "moe_layers": None if all(sparse) else sparse}


# Mixtral: Mistral plus a sparse MLP on every layer, experts as wide as intermediate_size,
# the top-k weights always renormalised
def _mixtral(f: dict[str, Any]) -> dict[str, Any]:
    return _moe(f, n_key="num_local_experts", width="d_ff", width_key="intermediate_size",
                normalise=True, sparse=(True,) * f["n_layers"])  # fmt: skip


_MIXTRAL = llama_like(
    "mixtral", classes=("Mixtral",), window="all",
    weights=(*_NOT_MLP, *_sparse("layers.{}.block_sparse_moe.gate.weight",
                                 "layers.{}.block_sparse_moe.experts.", "w1.weight", "w3.weight",
                                 "w2.weight")),
    fields={"window": ("sliding_window",), "n_experts": ("num_local_experts",),
            "top_k": ("num_experts_per_tok",)},
    fixed={"attn_bias": False, "out_bias": False, "mlp_bias": False},
    defaults={"n_experts": 8, "top_k": 2, "norm_eps": 1e-5, "rope_base": 1e6,
              "tie_embeddings": False, "act": "silu"},
    derive=_mixtral,
)  # fmt: skip


# Qwen-MoE: the layers in mlp_only_layers, and those whose 1-based index is not a multiple of
# decoder_sparse_step, keep a dense MLP (transformers: `layer_idx not in mlp_only_layers and
# num_experts > 0 and (layer_idx + 1) % decoder_sparse_step == 0`)
def _qwen_sparse(f: dict[str, Any]) -> tuple[bool, ...]:
    step, dense = f["sparse_step"], f["mlp_only"]
    if isinstance(step, bool) or not isinstance(step, int) or step < 1:
        raise ValueError(f"config.json: decoder_sparse_step must be an int ≥ 1, got {step!r}")
    if not isinstance(dense, list) or any(
        isinstance(i, bool) or not isinstance(i, int) for i in dense
    ):
        raise ValueError(
            f"config.json: mlp_only_layers must be a list of layer indices, got {dense!r}"
        )
    n_experts = f["n_experts"]
    return tuple(
        i not in dense and n_experts != 0 and (i + 1) % step == 0 for i in range(f["n_layers"])
    )


def _qwen_moe(f: dict[str, Any], d_shared: int = 0) -> dict[str, Any]:
    return _moe(f, n_key="num_experts", width="d_expert", width_key="moe_intermediate_size",
                normalise=bool(f["normalise"]), sparse=_qwen_sparse(f), d_shared=d_shared)  # fmt: skip


_QWEN_MOE_FIELDS = {
    "n_experts": ("num_experts", "num_local_experts"),
    "top_k": ("num_experts_per_tok",),
    "d_expert": ("moe_intermediate_size",),
    "normalise": ("norm_topk_prob",),
    "sparse_step": ("decoder_sparse_step",),
    "mlp_only": ("mlp_only_layers",),
    "window": ("sliding_window",),
    "use_window": ("use_sliding_window",),
}
_QWEN_MOE_DEFAULTS = {"sparse_step": 1, "mlp_only": [], "normalise": False, "norm_eps": 1e-6,
                      "tie_embeddings": False, "act": "silu", "use_window": False}  # fmt: skip
_M = LAYER_MLP
_QWEN_MOE_WEIGHTS = (
    *_NOT_MLP,
    *(W(w.dst, w.src, w.reshape, w.when, layers="dense") for w in _DENSE),
    *_sparse(_M + "gate.weight", _M + "experts.", "gate_proj.weight", "up_proj.weight",
             "down_proj.weight"),
)  # fmt: skip


# Qwen3-MoE: Qwen3's attention (QK-norm per head); a window on every layer if
# use_sliding_window (transformers drops sliding_window otherwise)
def _qwen3_moe(f: dict[str, Any]) -> dict[str, Any]:
    window = f.get("window") if f["use_window"] else None
    return {**_qwen_moe(f), "window": window}


_QWEN3_MOE = llama_like(
    "qwen3_moe", classes=("Qwen3Moe",), window="all", weights=_QWEN_MOE_WEIGHTS,
    fields=_QWEN_MOE_FIELDS, fixed={"qk_norm": True, "mlp_bias": False},
    defaults={**_QWEN_MOE_DEFAULTS, "n_experts": 128, "top_k": 8, "d_expert": 768},
    derive=_qwen3_moe,
)  # fmt: skip


# Qwen2-MoE: Qwen2's attention (q/k/v biases by qkv_bias, none on o); every sparse layer also
# has a shared expert, gated per token by sigmoid(shared_expert_gate(x)); windows by layer_types
def _qwen2_moe(f: dict[str, Any]) -> dict[str, Any]:
    d_shared = f["d_shared"]
    if isinstance(d_shared, bool) or not isinstance(d_shared, int) or d_shared < 1:
        raise ValueError(
            f"config.json: shared_expert_intermediate_size must be an int ≥ 1, got {d_shared!r}"
        )
    return _qwen_moe(f, d_shared=d_shared)


_QWEN2_MOE = llama_like(
    "qwen2_moe", classes=("Qwen2Moe",), window="layer_types",
    weights=(
        *_QWEN_MOE_WEIGHTS,
        W("blocks.{}.mlp.shared.gate.weight", _M + "shared_expert.gate_proj.weight", layers="moe"),
        W("blocks.{}.mlp.shared.up.weight", _M + "shared_expert.up_proj.weight", layers="moe"),
        W("blocks.{}.mlp.shared.down.weight", _M + "shared_expert.down_proj.weight", layers="moe"),
        W("blocks.{}.mlp.shared_gate.weight", _M + "shared_expert_gate.weight", layers="moe"),
    ),
    fields={**_QWEN_MOE_FIELDS, "attn_bias": ("qkv_bias",),
            "d_shared": ("shared_expert_intermediate_size",)},
    fixed={"out_bias": False, "mlp_bias": False},
    defaults={**_QWEN_MOE_DEFAULTS, "n_experts": 60, "top_k": 4, "d_expert": 1408,
              "d_shared": 5632, "attn_bias": True},
    unsupported=(
        # transformers then makes every other layer below max_window_layers sliding; configs
        # it writes list layer_types
        ("use_sliding_window without layer_types",
         lambda cfg: bool(cfg.get("use_sliding_window")) and cfg.get("layer_types") is None),
    ),
    derive=_qwen2_moe,
)  # fmt: skip


# OLMoE: OLMo 2's QK-norm over the whole q (h·d) and k (k·d) projections, after their biases,
# in Llama's pre-norm blocks; a sparse MLP on every layer, experts intermediate_size wide
def _olmoe(f: dict[str, Any]) -> dict[str, Any]:
    return _moe(f, n_key="num_experts", width="d_ff", width_key="intermediate_size",
                normalise=bool(f["normalise"]), sparse=(True,) * f["n_layers"])  # fmt: skip


_OLMOE = llama_like(
    "olmoe", classes=("Olmoe",),
    weights=(*_NOT_MLP, *_sparse(_M + "gate.weight", _M + "experts.", "gate_proj.weight",
                                 "up_proj.weight", "down_proj.weight")),
    fields={"n_experts": ("num_experts", "num_local_experts"), "top_k": ("num_experts_per_tok",),
            "normalise": ("norm_topk_prob",)},
    fixed={"qk_norm": True, "qk_norm_scope": "all", "mlp_bias": False},
    defaults={"n_experts": 64, "top_k": 8, "normalise": False, "norm_eps": 1e-5,
              "tie_embeddings": False, "act": "silu"},
    unsupported=(("clip_qkv (q, k, v clamped)", lambda cfg: cfg.get("clip_qkv") is not None),),
    derive=_olmoe,
)  # fmt: skip

MOE_FAMILIES: tuple[Family, ...] = (_MIXTRAL, _QWEN3_MOE, _QWEN2_MOE, _OLMOE)
