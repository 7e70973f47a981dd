"""L1 — attention as pure functions on tensors: the engine.

    out = qkv.attention(q, k, v, causal=True)                 # (B, Hq, Sq, Dv)
    out, lse = qkv.attention(q, k, v, return_lse=True)        # lse (B, Hq, Sq)
    w = qkv.attention_weights(q, k, lse, rows=[5])            # exact rows, O(rows·Sk)

Nothing here knows about projections, models or the lens.
"""

from .api import (
    BACKENDS,
    attention,
    attention_weights,
    auto_backend,
    choose_backend,
    reference_attention,
)
from .mods import (
    alibi,
    alibi_slopes,
    and_masks,
    causal_mask,
    document_mask,
    key_padding_mask,
    or_masks,
    prefix_lm_mask,
    sliding_window_mask,
    softcap,
)
from .reference import Intermediates
from .spec import MaskMod, ScoreMod

__all__ = [
    "BACKENDS",
    "Intermediates",
    "MaskMod",
    "ScoreMod",
    "alibi",
    "alibi_slopes",
    "and_masks",
    "attention",
    "attention_weights",
    "auto_backend",
    "causal_mask",
    "choose_backend",
    "document_mask",
    "key_padding_mask",
    "or_masks",
    "prefix_lm_mask",
    "reference_attention",
    "sliding_window_mask",
    "softcap",
]
