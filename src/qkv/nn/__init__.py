"""L2 — modules that own W_Q, W_K, W_V, W_O and call `qkv.attention`.

rope = RotaryEmbedding(64, base=1e5)                      # half-split (HF Llama) layout
attn = MultiHeadAttention(576, 9, n_kv_heads=3, rope=rope, causal=True)
cache = KVCache(n_layers)                                  # attn(x, cache=cache[layer])
with capture(model) as cap: model(ids)                     # cap.layers: AttentionRecord
accelerate(model, blocks)                                  # float32 CPU inference twins
cast(model, "bf16")                                         # bfloat16, routers kept float32 where HF keeps them
moe = SparseMoE(m, f, n_experts=8, top_k=2)                # a sparse MLP: top 2 of 8 experts per token
mla = LatentAttention(m, h, MLAConfig(1536, 512, 128, 64, 128), rope=RotaryEmbedding(64))  # DeepSeek
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
from .dtypes import as_dtype, cast
from .latent import LatentAttention, MLAConfig
from .moe import GLUMLP, ClampedSwiGLU, MoEConfig, SparseMoE, route
from .rope import RopeScaling, RotaryEmbedding

__all__ = [
    "ACTIVATIONS",
    "GLUMLP",
    "MLP",
    "AttentionRecord",
    "Capture",
    "ClampedSwiGLU",
    "Embedding",
    "KVCache",
    "LatentAttention",
    "LayerCache",
    "MLAConfig",
    "MoEConfig",
    "MultiHeadAttention",
    "ParallelBlock",
    "PerHeadNorm",
    "PostNormBlock",
    "PreNormBlock",
    "RMSNorm",
    "RopeScaling",
    "RotaryEmbedding",
    "SandwichBlock",
    "SparseMoE",
    "accelerate",
    "as_dtype",
    "capture",
    "cast",
    "fused",
    "quant",
    "route",
]
