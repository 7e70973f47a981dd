"""Padded batches on their real tokens only: the rows of x (b i m) that `keep` marks are packed
back to back into (1 n m), and `fn(packed, segments)` runs on them, `segments` being each text's
number of real tokens (what MultiHeadAttention's `segments` takes). Every op of a transformer but
attention works per token, so this equals the masked batch on real tokens while skipping the
padding's work (FlashAttention's variable-length mode does the same for attention alone).

    y = unpadded(x, keep, partial(run_blocks, model.blocks))     # (b i m), 0 at padded rows

Letters: b batch, i position, n real tokens in all, m feature.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from torch import Tensor, nn


def unpadded(x: Tensor, keep: Tensor, fn: Callable[[Tensor, list[int]], Tensor]) -> Tensor:
    """x (b i m), keep (b i) bool → fn's (1 n m') output scattered back to (b i m'), 0 where
    keep is False. Rows keep their tokens' order; a row with no real token gets none."""
    B, S = keep.shape
    if x.shape[:2] != (B, S):
        raise ValueError(f"keep {tuple(keep.shape)} must match x's (B, S) = {tuple(x.shape[:2])}")
    idx = keep.reshape(-1).nonzero().squeeze(1)  # (n,) real tokens, row by row
    segments = [n for n in keep.sum(1).tolist() if n > 0]
    if not segments:
        return x.new_zeros(B, S, x.shape[-1])  # nothing real: fn has nothing to run on
    y = fn(x.reshape(B * S, -1).index_select(0, idx)[None], segments)[0]  # (n m')
    return y.new_zeros(B * S, y.shape[-1]).index_copy(0, idx, y).view(B, S, -1)


def one_run_per_row(keep: Tensor) -> bool:
    """True when each row's real tokens are consecutive (left or right padding, no holes): then
    packing shifts every token of a text by the same offset, which relative position schemes
    such as RoPE do not see. With holes, positions inside a text would change."""
    runs = keep[:, :1].sum(1) + (keep[:, 1:] & ~keep[:, :-1]).sum(1)  # (b,) starts of runs
    return bool((runs <= 1).all())


def run_blocks(blocks: Iterable[nn.Module], h: Tensor, segments: list[int]) -> Tensor:
    """Each block in turn on texts packed back to back (1 n m), each text attending within
    itself (the blocks pass `segments` to MultiHeadAttention)."""
    for block in blocks:
        h = block(h, segments=segments)
    return h
