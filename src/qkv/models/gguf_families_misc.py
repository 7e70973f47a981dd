"""GGUF architectures `gemma` (Gemma 1), `olmo2` and `cohere2`, as declarative `GGUFFamily`
descriptions (see `gguf_families.py` for what each field says), laid out as llama.cpp's
`convert_hf_to_gguf.py` writes them (GemmaModel, Olmo2Model, Cohere2Model). transformers'
GGUF loader reads none of the three: their tests compare with the transformers model the file
was converted from.

Gemma (`gemma`: Gemma 2B / 7B and their tunes): the Llama tensor names; RMSNorm gains stored as
1 + w (the converter adds the 1 to every `*norm.weight`), so read with `norm_offset` 0;
embeddings × √d_model; GeGLU with tanh GELU; d_head from `attention.key_length` (7B: 256 ≠
3072/16); Q/K rows as Hugging Face's (NeoX RoPE, no permutation); the unembedding is always
`token_embd` (the converter skips lm_head). The converter writes no `rope.freq_base`: llama.cpp's
10⁴, Gemma's own, unless a file states one.

OLMo 2 (`olmo2`): no norm before a sublayer, an RMSNorm on each sublayer's output
(`post_attention_norm`, `post_ffw_norm`: h = x + norm1(attn(x)), out = h + norm2(mlp(h))),
QK-norm over the whole q and k projections (`attn_q_norm` (h·d,), `attn_k_norm` (k·d,)), NeoX
RoPE with Hugging Face's Q/K rows, no biases (llama.cpp's olmo2 has no bias tensors). Refused:
`attention.sliding_window` (OLMo 3, which the converter writes as olmo2 with sliding layers)
and RoPE scaling.

Cohere 2 (`cohere2`: Command R7B): Cohere's block (one LayerNorm without bias,
`attention.layer_norm_epsilon`, feeding attention and a SwiGLU MLP side by side), interleaved
RoPE pairs with Hugging Face's Q/K rows (llama.cpp's "norm" RoPE, no permutation), logits ×
`logit_scale`, a window of `attention.sliding_window` keys on three layers of every four and
the fourth global (llama.cpp's fixed pattern 4, as transformers' sliding_window_pattern 4),
RoPE on the sliding layers only: the global layers are NoPE; unembedding tied to `token_embd`.
`logit_scale` and `attention.sliding_window` are required, as llama.cpp. Refused, not guessed:
an `attention.sliding_window_pattern` other than 4, a `rope.dimension_count` other than the head
dim (partial rotary, which transformers' Cohere 2 does not have), RoPE scaling.

Built on `gguf_families_base`; `gguf_families` lists these families in its registry.

Letters: h query heads, k kv heads, d head dim, m model dim.
"""

from __future__ import annotations

from typing import Any

from . import gguf
from .families import W
from .gguf_families_base import CORE_FIELDS, LLAMA_WEIGHTS, ROPE_SCALING, B, GGUFFamily

# Gemma 1: Llama's layout, gains stored 1 + w (offset 0 here), embeddings × √d_model, GeGLU
_GEMMA = GGUFFamily(
    "gemma", "gemma", CORE_FIELDS, LLAMA_WEIGHTS,
    fixed={"norm": "rms", "act": "gelu_tanh", "gated": True, "norm_offset": 0.0},
    defaults={"rope_base": 10000.0},  # llama.cpp's; the converter writes no rope.freq_base
    merges_by="file", derive=lambda f: {"embed_scale": f["d_model"] ** 0.5},
    unsupported=(ROPE_SCALING,),
)  # fmt: skip

_OLMO2 = GGUFFamily(
    "olmo2", "olmo2", CORE_FIELDS,
    (
        *(w for w in LLAMA_WEIGHTS
          if w.dst not in ("blocks.{}.norm1.weight", "blocks.{}.norm2.weight")),
        W("blocks.{}.norm1.weight", B + "post_attention_norm.weight"),
        W("blocks.{}.norm2.weight", B + "post_ffw_norm.weight"),
        W("blocks.{}.attn.q_norm.weight", B + "attn_q_norm.weight"),  # (h·d,)
        W("blocks.{}.attn.k_norm.weight", B + "attn_k_norm.weight"),  # (k·d,)
    ),
    fixed={"norm": "rms", "act": "silu", "gated": True, "block": "output_norm", "qk_norm": True,
           "qk_norm_scope": "all"},
    defaults={"rope_base": 10000.0},
    unsupported=(
        ROPE_SCALING,
        ("sliding-window attention (olmo2.attention.sliding_window: OLMo 3's layout)",
         lambda c: "olmo2.attention.sliding_window" in c.metadata),
    ),
)  # fmt: skip

_COHERE2_PATTERN = 4  # llama.cpp's: layer i slides unless (i + 1) % 4 == 0


def _cohere2_keys(c: gguf.GGUFContents) -> dict[str, Any]:
    """The keys llama.cpp requires for cohere2 and the values it is known to read, checked with
    the file's name (no field is read from the tensors)."""
    md = c.metadata
    for key in ("logit_scale", "attention.sliding_window"):
        if md.get(f"cohere2.{key}") is None:
            raise ValueError(f"{c.path}: metadata key 'cohere2.{key}' is missing")
    p = md.get("cohere2.attention.sliding_window_pattern")
    if p is not None and (isinstance(p, bool) or p != _COHERE2_PATTERN):
        raise ValueError(
            f"{c.path}: 'cohere2.attention.sliding_window_pattern' is {p!r}; qkv reads "
            f"cohere2 with llama.cpp's pattern {_COHERE2_PATTERN} (three sliding layers, then "
            "a global one) only"
        )
    r, d = md.get("cohere2.rope.dimension_count"), md.get("cohere2.attention.key_length")
    d = d if d is not None else md["cohere2.embedding_length"] // md["cohere2.attention.head_count"]
    if r is not None and r != d:
        raise ValueError(
            f"{c.path}: 'cohere2.rope.dimension_count' is {r}, not the head dim {d} (partial "
            "rotary), which qkv does not implement for cohere2"
        )
    return {}


def _cohere2(f: dict[str, Any]) -> dict[str, Any]:
    """Layers 0, 1, 2 slide and rotate, layer 3 attends globally without positions, and so on."""
    local = [(i + 1) % _COHERE2_PATTERN != 0 for i in range(f["n_layers"])]
    return {
        "windows": tuple(int(f["window"]) if s else None for s in local),
        "rope_layers": tuple(local),
        "rope_dim": None,
    }


_COHERE2 = GGUFFamily(
    "cohere2", "cohere2",
    {**CORE_FIELDS, "d_head": ("attention.key_length",),
     "norm_eps": ("attention.layer_norm_epsilon",), "logit_scale": ("logit_scale",),
     "window": ("attention.sliding_window",)},
    tuple(w for w in LLAMA_WEIGHTS if w.dst != "blocks.{}.norm2.weight"),
    fixed={"norm": "layer", "norm_bias": False, "act": "silu", "gated": True,
           "block": "parallel1", "rope_interleaved": True},
    defaults={"rope_base": 10000.0},
    derive=_cohere2, from_tensors=_cohere2_keys, unsupported=(ROPE_SCALING,),
)  # fmt: skip

MISC_GGUF_FAMILIES: tuple[GGUFFamily, ...] = (_GEMMA, _OLMO2, _COHERE2)
