"""GGUF architectures `granite` (IBM Granite 3.x dense) and `granitemoe` (Granite 3.x MoE), as
declarative `GGUFFamily` descriptions (see `gguf_families.py` for what each field says), laid out
as llama.cpp's `convert_hf_to_gguf.py` writes them (GraniteModel subclasses its LlamaModel,
GraniteMoeModel subclasses GraniteModel). transformers' GGUF loader reads neither, so the tests'
oracle is transformers' Granite / GraniteMoe model written into a GGUF by those rules.

Granite is Llama (the Llama tensor names; Q/K rows permuted for llama.cpp's interleaved RoPE,
which the loader undoes) with four multipliers, which the converter renames and llama.cpp
requires (`ml.get_key` without a default), each here as llama.cpp applies it:

    <arch>.embedding_scale   (embedding_multiplier)  token embeddings × s
    <arch>.residual_scale    (residual_multiplier)   each sublayer's output × s before the sum
    <arch>.attention.scale   (attention_multiplier)  scores × s in place of 1/√d (0: 1/√d)
    <arch>.logit_scale       (logits_scaling)        logits ÷ s

A missing one is an error naming the key. RoPE scaling is refused (no Granite 3.x model has any).

GraniteMoE: the same attention and multipliers, a sparse MLP on every layer: the router
`blk.N.ffn_gate_inp` (e, m) and the experts stacked, `ffn_gate_exps` / `ffn_up_exps` (e, f, m)
(the converter splits Hugging Face's input_linear (e, 2f, m) into its gate and up rows) and
`ffn_down_exps` (e, m, f); e = `expert_count`, top k = `expert_used_count`, f =
`feed_forward_length` (llama.cpp's n_ff for granitemoe's experts). Each expert's slice is one
of `qkv.nn.SparseMoE`'s gated experts (`{e}` in a weight's dst only: `gguf_families.rules`).
llama.cpp's routing (softmax over every expert, top k, renormalised) is transformers' (top k of
the logits, then their softmax): `normalise=True`. Quantised expert tensors (Q8_0, ...) are
dequantised like any tensor. Refused: GraniteMoeShared's shared expert (`ffn_*_shexp`), which
this family does not build.

Letters: e experts, f expert hidden dim, h query heads, k kv heads, d head dim, m model dim.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..nn import MoEConfig
from .families import W
from .gguf_families_base import CORE_FIELDS, LLAMA_WEIGHTS, ROPE_SCALING, B, GGUFFamily

# Llama's tensors, attn_q / attn_k in llama.cpp's interleaved-pair row order
_PERMUTED = tuple(
    W(w.dst, w.src, {"blocks.{}.attn.W_Q": "permuted.q", "blocks.{}.attn.W_K": "permuted.k"}
      .get(w.dst, w.reshape), w.when)
    for w in LLAMA_WEIGHTS
)  # fmt: skip
_SCALES = {"embed_scale": ("embedding_scale",), "residual_scale": ("residual_scale",),
           "attn_scale": ("attention.scale",), "logits_scaling": ("logit_scale",)}  # fmt: skip


def _positive(arch: str, f: dict[str, Any], ours: str, kind: type) -> Any:
    """f[ours], required (llama.cpp reads it without a default) and > 0."""
    key = f"'{arch}.{_FIELDS[ours][0]}'"
    if ours not in f:
        raise ValueError(f"metadata key {key} is missing (llama.cpp requires it for {arch})")
    v = f[ours]
    ok = isinstance(v, int | float) and not isinstance(v, bool) and v > 0
    if not ok or (kind is int and not float(v).is_integer()):
        raise ValueError(f"metadata key {key} must be {'an int' if kind is int else 'a number'} "
                         f"> 0, got {v!r}")  # fmt: skip
    return kind(v)


def _granite(arch: str) -> Callable[[dict[str, Any]], dict[str, Any]]:
    """The four multipliers as `DecoderConfig` fields (logits ÷ logit_scale: its reciprocal)."""

    def derive(f: dict[str, Any]) -> dict[str, Any]:
        # llama.cpp: f_attention_scale 0 → 1/√d (the converter never writes 0)
        attn = None if f.get("attn_scale") == 0 else _positive(arch, f, "attn_scale", float)
        return {
            "embed_scale": _positive(arch, f, "embed_scale", float),
            "residual_scale": _positive(arch, f, "residual_scale", float),
            "attn_scale": attn,
            "logit_scale": 1.0 / _positive(arch, f, "logits_scaling", float),
        }

    return derive


def _granitemoe(f: dict[str, Any]) -> dict[str, Any]:
    n = _positive("granitemoe", f, "n_experts", int)
    k = _positive("granitemoe", f, "top_k", int)
    if k > n:
        raise ValueError(f"metadata key 'granitemoe.expert_used_count' is {k}, more than "
                         f"'granitemoe.expert_count' {n}; a token can use each expert once")  # fmt: skip
    return {**_granite("granitemoe")(f), "moe": MoEConfig(n, k, int(f["d_ff"]), normalise=True)}


_FIELDS = {**CORE_FIELDS, **_SCALES, "n_experts": ("expert_count",),
           "top_k": ("expert_used_count",)}  # fmt: skip
_FIXED = {"norm": "rms", "act": "silu", "gated": True}

_GRANITE = GGUFFamily(
    "granite", "granite", {**CORE_FIELDS, **_SCALES}, _PERMUTED,
    fixed=_FIXED, defaults={"rope_base": 10000.0}, qk_permuted=True,
    derive=_granite("granite"), unsupported=(ROPE_SCALING,),
)  # fmt: skip


def _shared_expert(c: Any) -> bool:
    return any(".ffn_" in n and "_shexp." in n for n in c.tensors)


_GRANITEMOE = GGUFFamily(
    "granitemoe", "granitemoe", _FIELDS,
    (
        *(w for w in _PERMUTED if not w.dst.startswith("blocks.{}.mlp.")),
        W("blocks.{}.mlp.router.weight", B + "ffn_gate_inp.weight", layers="moe"),
        # (e, f, m) / (e, m, f): expert e's slice
        W("blocks.{}.mlp.experts.{e}.gate.weight", B + "ffn_gate_exps.weight", layers="moe"),
        W("blocks.{}.mlp.experts.{e}.up.weight", B + "ffn_up_exps.weight", layers="moe"),
        W("blocks.{}.mlp.experts.{e}.down.weight", B + "ffn_down_exps.weight", layers="moe"),
    ),
    fixed={**_FIXED, "mlp_bias": False}, defaults={"rope_base": 10000.0}, qk_permuted=True,
    derive=_granitemoe,
    unsupported=(
        ROPE_SCALING,
        ("a shared expert (blk.N.ffn_gate_shexp / ffn_up_shexp / ffn_down_shexp: "
         "GraniteMoeShared)", _shared_expert),
    ),
)  # fmt: skip

GRANITE_GGUF_FAMILIES: tuple[GGUFFamily, ...] = (_GRANITE, _GRANITEMOE)
