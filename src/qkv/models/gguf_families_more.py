"""More GGUF architectures, each a declarative `GGUFFamily` (see `gguf_families.py`): GPT-2,
StarCoder2 and BLOOM, the LayerNorm-with-bias, plain-GELU-MLP decoders, as llama.cpp's
converter (`convert_hf_to_gguf.py`) writes them:

* gpt2: learned positions (`position_embd.weight`, `context_length` rows); Hugging Face's
  Conv1D weights transposed to (out, in), so `attn_qkv` (3m, m) holds rows Q | K | V and
  `attn_qkv.bias` (3m,) the same; `output.weight` a copy of the embeddings (not tied);
* starcoder2: Llama's tensor names with q/k/v/o and MLP biases, NeoX RoPE (Q/K rows as Hugging
  Face's, no permutation), RoPE base from `rope.freq_base`; no sliding window: the converter
  writes none for StarCoder2 (transformers' GGUF reader reads none either), where its config
  states 4096 keys, which only differs past 4096 tokens;
* bloom: ALiBi (`qkv.alibi`, llama.cpp's slopes, which are Hugging Face's for any head count),
  a LayerNorm on the embeddings (`token_embd_norm`), BLOOM's tanh GELU; the converter
  reorders BLOOM's per-head fused query_key_value (h, 3, d, m) into rows Q | K | V (3·h·d, m),
  GPT-2's layout, so it is split as GPT-2's here; `output.weight` a copy of the embeddings.

Every one reads `<arch>.attention.layer_norm_epsilon` (LayerNorm, not RMSNorm) and its
`feed_forward_length` (4·m for GPT-2 and BLOOM, as the converter writes it).

Built on `gguf_families_base` (`GGUFFamily`, `W`, the reshapes, among them the fused-bias split
`qkv.bq/bk/bv`); `gguf_families` lists these families in its registry.

Letters: h query heads, k kv heads, d head dim, m model dim.
"""

from __future__ import annotations

from .gguf_families_base import CORE_FIELDS, ROPE_SCALING, B, GGUFFamily, W

_LN_FIELDS = {**CORE_FIELDS, "norm_eps": ("attention.layer_norm_epsilon",)}

# LayerNorm gains and biases, output.weight (the converter's copy of the embeddings)
_LN_WEIGHTS = (
    W("embed.weight", "token_embd.weight"),
    W("norm.weight", "output_norm.weight"),
    W("norm.bias", "output_norm.bias"),
    W("lm_head.weight", "output.weight", when="untied"),
    W("blocks.{}.norm1.weight", B + "attn_norm.weight"),
    W("blocks.{}.norm1.bias", B + "attn_norm.bias"),
    W("blocks.{}.norm2.weight", B + "ffn_norm.weight"),
    W("blocks.{}.norm2.bias", B + "ffn_norm.bias"),
    W("blocks.{}.attn.W_O", B + "attn_output.weight", "o"),
    W("blocks.{}.attn.b_O", B + "attn_output.bias"),
    W("blocks.{}.mlp.up.weight", B + "ffn_up.weight"),
    W("blocks.{}.mlp.up.bias", B + "ffn_up.bias"),
    W("blocks.{}.mlp.down.weight", B + "ffn_down.weight"),
    W("blocks.{}.mlp.down.bias", B + "ffn_down.bias"),
)
# one attn_qkv (h·d + 2·k·d, m) and its bias, rows Q | K | V (GPT-2; BLOOM after the converter)
_FUSED_QKV = (
    W("blocks.{}.attn.W_Q", B + "attn_qkv.weight", "qkv.q"),
    W("blocks.{}.attn.W_K", B + "attn_qkv.weight", "qkv.k"),
    W("blocks.{}.attn.W_V", B + "attn_qkv.weight", "qkv.v"),
    W("blocks.{}.attn.b_Q", B + "attn_qkv.bias", "qkv.bq"),
    W("blocks.{}.attn.b_K", B + "attn_qkv.bias", "qkv.bk"),
    W("blocks.{}.attn.b_V", B + "attn_qkv.bias", "qkv.bv"),
)
_PLAIN_MLP = {"norm": "layer", "gated": False, "attn_bias": True, "out_bias": True,
              "mlp_bias": True}  # fmt: skip

# GPT-2: learned positions, GELU-tanh (gelu_new), fused Q | K | V
_GPT2 = GGUFFamily(
    "gpt2", "gpt2", _LN_FIELDS,
    (*_LN_WEIGHTS, *_FUSED_QKV, W("embed_positions.weight", "position_embd.weight")),
    fixed={**_PLAIN_MLP, "positions": "learned", "act": "gelu_tanh"},
    unsupported=(ROPE_SCALING,),
)  # fmt: skip

# StarCoder2: separate attn_q/k/v with biases, GQA, NeoX RoPE, GELU-tanh (gelu_pytorch_tanh)
_STARCODER2 = GGUFFamily(
    "starcoder2", "starcoder2", _LN_FIELDS,
    (
        *_LN_WEIGHTS,
        W("blocks.{}.attn.W_Q", B + "attn_q.weight", "q"),
        W("blocks.{}.attn.W_K", B + "attn_k.weight", "kv"),
        W("blocks.{}.attn.W_V", B + "attn_v.weight", "kv"),
        W("blocks.{}.attn.b_Q", B + "attn_q.bias", "bq"),
        W("blocks.{}.attn.b_K", B + "attn_k.bias", "bkv"),
        W("blocks.{}.attn.b_V", B + "attn_v.bias", "bkv"),
    ),
    fixed={**_PLAIN_MLP, "positions": "rope", "act": "gelu_tanh"},
    defaults={"rope_base": 10000.0},  # llama.cpp's default base
    unsupported=(ROPE_SCALING,),
)  # fmt: skip

# BLOOM: ALiBi, a LayerNorm on the embeddings, BLOOM's GELU, fused Q | K | V (see above)
_BLOOM = GGUFFamily(
    "bloom", "bloom", _LN_FIELDS,
    (
        *_LN_WEIGHTS, *_FUSED_QKV,
        W("embed_norm.weight", "token_embd_norm.weight"),
        W("embed_norm.bias", "token_embd_norm.bias"),
    ),
    fixed={**_PLAIN_MLP, "positions": "alibi", "embed_norm": True, "act": "gelu_tanh_bloom"},
)  # fmt: skip

MORE_GGUF_FAMILIES: tuple[GGUFFamily, ...] = (_GPT2, _STARCODER2, _BLOOM)
