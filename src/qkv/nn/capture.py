"""Capture what every attention layer looked up, without hooks: a context manager sets a
context variable that `MultiHeadAttention.forward` checks (one `ContextVar.get` when inactive).

Letters: b batch, h head, i query position, j key position, d head dim, e value dim, m model dim.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn


@dataclass
class AttentionRecord:
    """One attention call, everything needed to recompute its lookups exactly.

    q (b h i d) and k (b hk j d) are after RoPE; v (b hk j e); z (b h i e) is the per-head
    output before W_O; W_O (h e m); lse (b h i) the log-sum-exp of each query's scores (fp32).
    `attn_kwargs` (causal, mask, scale) are what `qkv.attention_weights(q, k, lse, **attn_kwargs)`
    needs to give the exact softmax rows. Head h's contribution to the output is `z[:, h] @ W_O[h]`;
    the module output is the sum over heads plus b_O.
    """

    layer: int
    q: Tensor
    k: Tensor
    v: Tensor
    z: Tensor
    W_O: Tensor
    attn_kwargs: dict[str, Any]
    lse: Tensor | None = None
    b_O: Tensor | None = None


@dataclass
class Capture:
    """The records of one `capture(...)` block, in call order (`layers[n].layer` is the index of
    the module among the model's MultiHeadAttention modules)."""

    index: dict[int, int]  # id(module) -> layer index
    only: frozenset[int] | None = None
    detach: bool = True
    layers: list[AttentionRecord] = field(default_factory=list)

    def wants(self, module: nn.Module) -> int | None:
        """The layer index to record `module` under, or None to skip it."""
        i = self.index.get(id(module))
        if i is None or (self.only is not None and i not in self.only):
            return None
        return i

    def layer(self, i: int) -> AttentionRecord:
        """The last record of layer i."""
        for rec in reversed(self.layers):
            if rec.layer == i:
                return rec
        raise KeyError(
            f"layer {i} was not recorded; recorded layers: {sorted({r.layer for r in self.layers})}"
        )


_ACTIVE: ContextVar[tuple[Capture, ...]] = ContextVar("qkv_capture", default=())


def active() -> tuple[Capture, ...]:
    """The captures in force (innermost last); empty when none is."""
    return _ACTIVE.get()


@contextlib.contextmanager
def capture(
    model: nn.Module, *, layers: Iterable[int] | None = None, detach: bool = True
) -> Iterator[Capture]:
    """Record every MultiHeadAttention call inside `model` while the block runs::

        with qkv.nn.capture(model) as cap:
            model(ids)
        rec = cap.layers[3]              # AttentionRecord: q, k, v, z, W_O, lse, attn_kwargs
        w = qkv.attention_weights(rec.q, rec.k, rec.lse, rows=[5], **rec.attn_kwargs)

    `layers` restricts recording to those layer indices (saves memory on long inputs).
    `detach=False` keeps the autograd graph. Captures nest; each sees the calls of its model.
    Nothing is N×N: records hold O(N) tensors and the LSE. Removed in `finally`.
    """
    from .attention import MultiHeadAttention  # local: attention.py imports this module

    if not isinstance(model, nn.Module):
        raise TypeError(f"capture expects a torch.nn.Module, got {type(model).__name__}")
    mods = [m for m in model.modules() if isinstance(m, MultiHeadAttention)]
    if not mods:
        raise ValueError(f"{type(model).__name__} has no MultiHeadAttention modules to capture")
    only = None if layers is None else frozenset(int(i) for i in layers)
    if only is not None and (bad := sorted(i for i in only if not 0 <= i < len(mods))):
        raise ValueError(
            f"layers {bad} out of range: the model has {len(mods)} attention layers (0..{len(mods) - 1})"
        )
    cap = Capture(index={id(m): i for i, m in enumerate(mods)}, only=only, detach=detach)
    token = _ACTIVE.set((*_ACTIVE.get(), cap))
    try:
        yield cap
    finally:
        _ACTIVE.reset(token)
