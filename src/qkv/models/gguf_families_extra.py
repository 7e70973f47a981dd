"""GGUF architectures `stablelm` and `falcon`, as declarative `GGUFFamily` descriptions (see
`gguf_families.py` for what each field says), laid out as llama.cpp's `convert_hf_to_gguf.py`
writes them and read as transformers' GGUF loader reads them (the parity oracle).

StableLM (`stablelm`: StableLM 2 1.6B, StableLM 3B 4E1T, Zephyr): the Llama tensor names plus
LayerNorm biases (`attn_norm.bias`, `ffn_norm.bias`, `output_norm.bias`), NeoX RoPE on the
first `rope.dimension_count` features of each head (partial_rotary_factor · d, 0.25 in every
StableLM), Q/K rows as Hugging Face's (no permutation), epsilon from
`attention.layer_norm_epsilon`. Two things the file says through its tensors only, as llama.cpp
and transformers both read them: q/k/v biases (`blk.N.attn_q.bias`: StableLM 2's
use_qkv_bias) and the block, sequential when `blk.N.ffn_norm` exists, else parallel from the
one norm (x + attn(n) + mlp(n), n = attn_norm(x); StableLM 2 12B). `stablelm.use_parallel_residual`
is not read: llama.cpp's converter writes true when the Hugging Face config omits the key
(StableLM 3B 4E1T), a sequential model. Refused: the per-head QK LayerNorm tensors
`attn_q_norm` / `attn_k_norm` (StableLM 2 12B), which transformers' GGUF loader does not read
(it builds no q_layernorm and drops them), and RoPE scaling.

Falcon (`falcon`: Falcon 7B and its tunes): llama.cpp's converter regroups the fused
query_key_value, grouped per kv head in Hugging Face's checkpoint, into Q | K | V by rows (its
"jploski" layout, `general.tensor_data_layout`), so `attn_qkv` splits as Phi-3's does; NeoX
RoPE on every feature (no permutation); one LayerNorm with bias feeding attention and a plain
GELU MLP side by side; no linear biases; base 10⁴ (the converter writes no rope.freq_base).
Read as transformers reads a Falcon GGUF: multi-query (`attention.head_count_kv` 1), erf GELU
(llama.cpp's kernel uses the tanh form). Refused: Falcon 40B / 180B's layout
(`attention.head_count_kv` > 1, a second norm `blk.N.attn_norm_2` for attention), which
transformers' GGUF loader cannot build (it makes a multi-query model and ignores attn_norm_2),
and RoPE scaling. An `output.weight` is used (llama.cpp's rule); transformers ties Falcon's
unembedding to `token_embd` whatever the file holds, which agrees when the converter wrote
the tied lm_head as its own copy.

Built on `gguf_families_base`; `gguf_families` lists these families in its registry.

Letters: h query heads, k kv heads, d head dim, m model dim.
"""

from __future__ import annotations

from typing import Any

from . import gguf
from .families import W
from .gguf_families_base import (
    CORE_FIELDS,
    LLAMA_WEIGHTS,
    ROPE_SCALING,
    B,
    GGUFFamily,
    partial_rope,
)


def _stablelm_tensors(c: gguf.GGUFContents) -> dict[str, Any]:
    """q/k/v biases and the block from the tensors present, as llama.cpp and transformers."""
    names = c.tensors.keys()
    return {
        "attn_bias": any(n.endswith(".attn_q.bias") for n in names),
        "block": "pre" if any(n.endswith(".ffn_norm.weight") for n in names) else "parallel1",
    }


def _has(suffix: str):
    return lambda c: any(n.endswith(suffix) for n in c.tensors)


_STABLELM = GGUFFamily(
    "stablelm", "stablelm",
    {**CORE_FIELDS, "d_head": ("attention.key_length",),
     "norm_eps": ("attention.layer_norm_epsilon",), "rope_dim": ("rope.dimension_count",)},
    (
        *(w for w in LLAMA_WEIGHTS if w.dst != "blocks.{}.norm2.weight"),
        W("norm.bias", "output_norm.bias"),
        W("blocks.{}.norm1.bias", B + "attn_norm.bias"),
        W("blocks.{}.norm2.weight", B + "ffn_norm.weight", when="block=pre"),
        W("blocks.{}.norm2.bias", B + "ffn_norm.bias", when="block=pre"),
        W("blocks.{}.attn.b_Q", B + "attn_q.bias", "bq", when="attn_bias"),
        W("blocks.{}.attn.b_K", B + "attn_k.bias", "bkv", when="attn_bias"),
        W("blocks.{}.attn.b_V", B + "attn_v.bias", "bkv", when="attn_bias"),
    ),
    fixed={"norm": "layer", "act": "silu", "gated": True, "out_bias": False, "mlp_bias": False},
    defaults={"rope_base": 10000.0},  # llama.cpp's; the converter writes no rope.freq_base
    derive=partial_rope, from_tensors=_stablelm_tensors,
    unsupported=(
        ROPE_SCALING,
        ("per-head QK LayerNorm (blk.N.attn_q_norm.weight / attn_k_norm.weight: StableLM 2 "
         "12B), which transformers' GGUF loader does not read",
         lambda c: _has(".attn_q_norm.weight")(c) or _has(".attn_k_norm.weight")(c)),
    ),
)  # fmt: skip


def _kv_heads(c: gguf.GGUFContents) -> bool:
    n = c.metadata.get(
        "falcon.attention.head_count_kv", c.metadata.get("falcon.attention.head_count")
    )
    return n is not None and int(n) != 1


_FALCON = GGUFFamily(
    "falcon", "falcon",
    {**CORE_FIELDS, "d_head": ("attention.key_length",),
     "norm_eps": ("attention.layer_norm_epsilon",)},
    (
        W("embed.weight", "token_embd.weight"),
        W("norm.weight", "output_norm.weight"),
        W("norm.bias", "output_norm.bias"),
        W("lm_head.weight", "output.weight", when="untied"),
        W("blocks.{}.norm1.weight", B + "attn_norm.weight"),
        W("blocks.{}.norm1.bias", B + "attn_norm.bias"),
        # Q | K | V by rows (the converter's regrouping of query_key_value)
        W("blocks.{}.attn.W_Q", B + "attn_qkv.weight", "qkv.q"),
        W("blocks.{}.attn.W_K", B + "attn_qkv.weight", "qkv.k"),
        W("blocks.{}.attn.W_V", B + "attn_qkv.weight", "qkv.v"),
        W("blocks.{}.attn.W_O", B + "attn_output.weight", "o"),
        W("blocks.{}.mlp.up.weight", B + "ffn_up.weight"),
        W("blocks.{}.mlp.down.weight", B + "ffn_down.weight"),
    ),
    fixed={"norm": "layer", "act": "gelu", "gated": False, "block": "parallel1"},
    defaults={"rope_base": 10000.0},  # llama.cpp's; the converter writes no rope.freq_base
    unsupported=(
        ROPE_SCALING,
        ("more than one kv head (falcon.attention.head_count_kv > 1: Falcon 40B / 180B's "
         "layout), which transformers' GGUF loader cannot build", _kv_heads),
        ("a second norm per layer (blk.N.attn_norm_2: Falcon 40B / 180B's layout), which "
         "transformers' GGUF loader does not read", _has(".attn_norm_2.weight")),
    ),
)  # fmt: skip

EXTRA_GGUF_FAMILIES: tuple[GGUFFamily, ...] = (_STABLELM, _FALCON)
