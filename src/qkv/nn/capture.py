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

import torch
from torch import Tensor, nn


@dataclass
class AttentionRecord:
    """One attention call, everything needed to recompute its lookups exactly.

    q (b h i d) and k (b hk j d) are after RoPE; v (b hk j e); z (b h i e) is the per-head
    output before W_O; W_O (h e m); lse (b h i) the log-sum-exp of each query's scores (fp32).
    `attn_kwargs` (causal, mask, scale) are what `qkv.attention_weights(q, k, lse, **attn_kwargs)`
    needs to give the exact softmax rows. Head h's contribution to the output is `z[:, h] @ W_O[h]`;
    the module output is the sum over heads plus b_O.

    `segment` is None for an ordinary call. A packed call (MultiHeadAttention's `segments`,
    which the models use to run a padded batch on its real tokens) records one record per
    text: `segment` s is the text's index among the packed ones, and q, k, v, z, lse hold that
    text alone, b = 1 and i = j = its real tokens (positions from 0, as it attended).
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
    segment: int | None = None


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

    def layer(self, i: int, segment: int | None = None) -> AttentionRecord:
        """The last record of layer i; of text `segment` when the layer ran packed texts."""
        for rec in reversed(self.layers):
            if rec.layer != i:
                continue
            if rec.segment is not None and segment is None:
                raise ValueError(
                    f"layer {i} ran a packed batch and recorded each text apart: pass "
                    f"segment=0..{rec.segment} (the text's index among those with real tokens)"
                )
            if rec.segment == segment:
                return rec
        raise KeyError(
            f"layer {i}{'' if segment is None else f' segment {segment}'} was not recorded; "
            f"recorded layers: {sorted({r.layer for r in self.layers})}"
        )


def recorders(module: nn.Module) -> list[tuple[Capture, int]]:
    """The captures in force that want `module`'s calls, with the layer index each files them
    under; empty (one ContextVar.get) when none is active, and inside torch.compile's tracing
    (a compiled graph records nothing: capture in eager mode)."""
    if torch.compiler.is_compiling():
        return []
    caps = _ACTIVE.get()
    return [(c, i) for c in caps if (i := c.wants(module)) is not None] if caps else []


def record(
    recording: list[tuple[Capture, int]],
    module: nn.Module,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    z: Tensor,
    lse: Tensor,
    attn_kwargs: dict[str, Any],
    segment: int | None = None,
) -> None:
    """Append one AttentionRecord of this call of `module` (its W_O, b_O) to each capture."""
    for cap, i in recording:
        t = (lambda a: a.detach()) if cap.detach else (lambda a: a)
        b_O = getattr(module, "b_O", None)
        cap.layers.append(
            AttentionRecord(
                layer=i, q=t(q), k=t(k), v=t(v), z=t(z), W_O=t(module.W_O), lse=t(lse),
                attn_kwargs=attn_kwargs, b_O=None if b_O is None else t(b_O), segment=segment,
            )
        )  # fmt: skip


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
