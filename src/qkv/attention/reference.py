"""The reference backend: the textbook formula, every intermediate kept. The tests' oracle.

    s = scale · q @ kᵀ          (b h i j)   scores
    ℓ = masks(score_mod(softcap(s)))        logits, −inf where dropped
    w = softmax(ℓ)               (b h i j)   weights (fp32, or fp64 for fp64 input)
    o = dropout(w) @ v           (b h i e)

Matmuls run in the input dtype, the softmax in fp32 (fp64 for fp64 input): exactly the "plain
same-dtype implementation" the error budget of the fast backends is measured against. Memory is
O(Sq·Sk) per head: use it for checking and teaching, not for long inputs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from . import scoring
from .spec import Spec


@dataclass(frozen=True)
class Intermediates:
    """What the reference computed, named. Shapes use b h i j e (e = value dim)."""

    scores: Tensor  # (b h i j) scale·q·k, before softcap, score_mod and masks
    logits: Tensor  # (b h i j) after softcap, score_mod and masks (−inf = dropped)
    weights: Tensor  # (b h i j) softmax rows, before dropout; an empty row is all 0
    lse: Tensor  # (b h i) log-sum-exp of logits (fp32; fp64 for fp64 input); −inf for an empty row
    out: Tensor  # (b h i e)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def softmax_lse(logits: Tensor) -> tuple[Tensor, Tensor]:
    """Softmax over the last axis that returns 0 (not NaN) for an all −inf row, and its LSE."""
    m = scoring.safe_max(logits.amax(-1))
    e = torch.exp(logits - m.unsqueeze(-1))
    total = e.sum(-1)
    w = e / torch.where(total == 0, torch.ones_like(total), total).unsqueeze(-1)
    return w, m + torch.log(total)


def blend(w: Tensor, v: Tensor) -> Tensor:
    """w (b h i j) @ v (b h j e) where a NaN/inf value reaches only rows that weight it > 0."""
    if scoring.all_finite(v):
        return w @ v
    out = w @ scoring.finite(v)
    hit = (w != 0).to(w.dtype) @ (~torch.isfinite(v)).to(w.dtype)
    return out.masked_fill(hit > 0, float("nan"))


def reference(q: Tensor, k: Tensor, v: Tensor, spec: Spec) -> Intermediates:
    """Explicit attention; differentiable by autograd; float64-capable."""
    cdt = compute_dtype(q.dtype)
    G = spec.G
    kk = k.repeat_interleave(G, dim=1)  # (b h j d)
    vv = v.repeat_interleave(G, dim=1)  # (b h j e)
    kbad = scoring.bad_keys(k, G)
    s = (q @ scoring.finite(kk).transpose(-1, -2)).to(cdt) * spec.scale  # (b h i j)
    blk = scoring.block(spec, slice(0, spec.Sq), 0, spec.Sk, q.device)
    logits, _ = scoring.scores(s, spec, blk, kbad)
    if spec.Sk == 0:
        w = logits
        lse = torch.full(logits.shape[:-1], float("-inf"), dtype=cdt, device=q.device)
    else:
        w, lse = softmax_lse(logits)
    wd = w
    if spec.dropout_p > 0:
        u = torch.rand(w.shape, generator=spec.generator, dtype=cdt, device=w.device)
        wd = w * (u >= spec.dropout_p) / (1.0 - spec.dropout_p)
    out = blend(wd.to(v.dtype), vv)
    return Intermediates(scores=s, logits=logits, weights=w, lse=lse, out=out)
