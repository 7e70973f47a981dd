"""qkv — attention as a soft lookup.

Each token's query is matched against every token's key; the scores q·k/√d become weights by a
softmax, and the output is the weighted blend of the values. Layers (imports flow down only):
attention → nn → models → lens → cli/web.
"""

from ._startup import quiet_interrupts_while_the_cli_starts

with quiet_interrupts_while_the_cli_starts():
    from .attention import (
        Intermediates,
        alibi,
        alibi_slopes,
        and_masks,
        attention,
        attention_weights,
        causal_mask,
        document_mask,
        key_padding_mask,
        or_masks,
        prefix_lm_mask,
        reference_attention,
        sliding_window_mask,
        softcap,
    )
    from .lens import compare, explain, head_search
    from .models import available, load

__version__ = "0.1.0"

__all__ = [
    "Intermediates",
    "__version__",
    "alibi",
    "alibi_slopes",
    "and_masks",
    "attention",
    "attention_weights",
    "available",
    "causal_mask",
    "compare",
    "document_mask",
    "explain",
    "head_search",
    "key_padding_mask",
    "load",
    "or_masks",
    "prefix_lm_mask",
    "reference_attention",
    "sliding_window_mask",
    "softcap",
]
