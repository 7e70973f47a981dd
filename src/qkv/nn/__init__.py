"""L2 — modules that own W_Q, W_K, W_V, W_O and call `qkv.attention`.

rope = RotaryEmbedding(64, base=1e5)                      # half-split (HF Llama) layout
attn = MultiHeadAttention(576, 9, n_kv_heads=3, rope=rope, causal=True)
cache = KVCache(n_layers)                                  # attn(x, cache=cache[layer])
with capture(model) as cap: model(ids)                     # cap.layers: AttentionRecord
accelerate(model, blocks)                                  # float32 CPU inference twins
"""

from . import fused, quant
from .accelerate import accelerate
from .attention import MultiHeadAttention
from .blocks import (
    ACTIVATIONS,
    MLP,
    Embedding,
    ParallelBlock,
    PerHeadNorm,
    PostNormBlock,
    PreNormBlock,
    RMSNorm,
    SandwichBlock,
)
from .cache import KVCache, LayerCache
from .capture import AttentionRecord, Capture, capture
from .rope import RopeScaling, RotaryEmbedding

__all__ = [
    "ACTIVATIONS",
    "MLP",
    "AttentionRecord",
    "Capture",
    "Embedding",
    "KVCache",
    "LayerCache",
    "MultiHeadAttention",
    "ParallelBlock",
    "PerHeadNorm",
    "PostNormBlock",
    "PreNormBlock",
    "RMSNorm",
    "RopeScaling",
    "RotaryEmbedding",
    "SandwichBlock",
    "accelerate",
    "capture",
    "fused",
    "quant",
]
