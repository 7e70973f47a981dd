"""L2 — modules that own W_Q, W_K, W_V, W_O and call `qkv.attention`.

rope = RotaryEmbedding(64, base=1e5)                      # half-split (HF Llama) layout
attn = MultiHeadAttention(576, 9, n_kv_heads=3, rope=rope, causal=True)
cache = KVCache(n_layers)                                  # attn(x, cache=cache[layer])
with capture(model) as cap: model(ids)                     # cap.layers: AttentionRecord
quant.linear(x, w, b, mirror)                              # decode step from checkpoint blocks
fused.rms_norm(x, w, eps)                                  # one-pass CPU kernels (inference)
"""

from . import fused, quant
from .attention import MultiHeadAttention
from .blocks import (
    ACTIVATIONS,
    MLP,
    ParallelBlock,
    PostNormBlock,
    PreNormBlock,
    RMSNorm,
    SandwichBlock,
)
from .cache import KVCache, LayerCache
from .capture import AttentionRecord, Capture, capture
from .rope import RotaryEmbedding

__all__ = [
    "ACTIVATIONS",
    "MLP",
    "AttentionRecord",
    "Capture",
    "KVCache",
    "LayerCache",
    "MultiHeadAttention",
    "ParallelBlock",
    "PostNormBlock",
    "PreNormBlock",
    "RMSNorm",
    "RotaryEmbedding",
    "SandwichBlock",
    "capture",
    "fused",
    "quant",
]
