"""The reference backend: the textbook formula, every intermediate kept. The tests' oracle.

    s = scale · q @ kᵀ          (b h i j)   scores
    ℓ = masks(score_mod(softcap(s)))        logits, −inf where dropped
    w = softmax(ℓ)               (b h i j)   weights (fp32, or fp64 for fp64 input); with
                                            sinks σ (h), softmax([ℓ, σ_h]) without its last column
    o = dropout(w) @ v           (b h i e)

Everything runs in the compute dtype, fp32 (fp64 for fp64 input): fp16/bf16 inputs are widened
(exactly) first, so the scores, softmax, weights, LSE, the product with v and, by autograd, dP
are fp32, as in FlashAttention's own reference (`attention_ref(upcast=True)`); only `out` (and
the gradients) are rounded to the input dtype. The "plain same-dtype implementation" that the
tests' error budget needs is written out in the tests, sharing no code with this one. Memory is
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
    out: Tensor  # (b h i e) in the input dtype


def softmax_lse(logits: Tensor, sinks: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Softmax over the last axis that returns 0 (not NaN) for an all −inf row, and its LSE.
    `sinks` (h,): one more logit per row of head h with no value behind it (its weight is
    1 − Σ w), written out as an extra term of the sum."""
    m = logits.amax(-1)
    if sinks is not None:
        sig = scoring.sink_logits(sinks, m).expand_as(m)
        m = torch.maximum(m, sig)
    m = scoring.safe_max(m)
    e = torch.exp(logits - m.unsqueeze(-1))
    total = e.sum(-1)
    if sinks is not None:
        total = total + torch.exp(torch.where(sig == m, 0.0, sig - m))  # σ = m = +inf: 1
    empty = total == 0  # log(0)'s gradient would be inf, and 0·inf NaN even where unused
    safe = torch.where(empty, torch.ones_like(total), total)
    lse = torch.where(empty, torch.full_like(total, float("-inf")), m + torch.log(safe))
    return e / safe.unsqueeze(-1), lse


def blend(w: Tensor, v: Tensor) -> Tensor:
    """w (b h i j) @ v (b h j e) where a NaN/inf value reaches only rows that weight it > 0
    (under torch.func transforms always the checked product: `scoring.all_finite`)."""
    if scoring.all_finite(v):
        return w @ v
    out = w @ scoring.finite(v)
    hit = (w != 0).to(w.dtype) @ (~torch.isfinite(v)).to(w.dtype)
    return out.masked_fill(hit > 0, float("nan"))


def reference(q: Tensor, k: Tensor, v: Tensor, spec: Spec) -> Intermediates:
    """Explicit attention; differentiable by autograd; float64-capable. Intermediates are in
    the compute dtype (fp32 for fp16/bf16 input), `out` in the input dtype."""
    cdt = scoring.compute_dtype(q.dtype)
    G = spec.G
    kk = scoring.widen(k).repeat_interleave(G, dim=1)  # (b h j d)
    vv = scoring.widen(v).repeat_interleave(G, dim=1)  # (b h j e)
    kbad = scoring.bad_keys(k, G)
    s = (scoring.widen(q) @ scoring.finite(kk).transpose(-1, -2)) * spec.scale  # (b h i j)
    blk = scoring.block(spec, slice(0, spec.Sq), 0, spec.Sk, q.device)
    logits, _ = scoring.scores(s, spec, blk, kbad)
    if spec.Sk == 0:
        w = logits
        lse = torch.full(logits.shape[:-1], float("-inf"), dtype=cdt, device=q.device)
        if spec.sinks is not None:  # the sink is the row's only logit
            lse = scoring.sink_logits(spec.sinks, lse).expand(lse.shape)
    else:
        w, lse = softmax_lse(logits, spec.sinks)
    wd = w
    if spec.dropout_p > 0:
        u = torch.rand(w.shape, generator=spec.generator, dtype=cdt, device=w.device)
        wd = w * (u >= spec.dropout_p) / (1.0 - spec.dropout_p)
    out = blend(wd, vv).to(v.dtype)
    return Intermediates(scores=s, logits=logits, weights=w, lse=lse, out=out)


def double_backward_vjp(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    spec: Spec,
    dout: Tensor,
    dlse: Tensor | None,
    needs: tuple[bool, ...],
    backend: str,
) -> tuple[Tensor | None, ...]:
    """(dq, dk, dv), and d sinks when `needs` has a fourth flag, as a differentiable graph,
    for a fused backend's backward when autograd asks for one (`create_graph=True`: gradient
    penalties, Hessian-vector products, MAML).

    The fused backwards compute exact first derivatives without a graph; for second ones the
    forward is recomputed here by the reference, whose autograd graph gives the same first
    derivatives and differentiates again. Costs the reference's O(Sq·Sk) memory, only then.
    Dropout masks are drawn per tile by the fused backends and cannot be redrawn here.
    """
    refuse_twice_through_dropout(spec.dropout_p, backend)
    inputs = (q, k, v, spec.sinks)[: len(needs)]
    with torch.enable_grad():
        r = reference(q, k, v, spec)
        outs, grads = [r.out], [dout]
        if dlse is not None:
            outs.append(r.lse)
            grads.append(dlse)
        return graph_grads(outs, grads, inputs, needs)


def refuse_twice_through_dropout(dropout_p: float, backend: str) -> None:
    """A backend whose dropout masks cannot be redrawn refuses `create_graph=True` by name."""
    if dropout_p > 0:
        raise ValueError(
            f"backend={backend!r} cannot differentiate twice (create_graph=True) through "
            f"dropout_p={dropout_p}: its dropout masks cannot be redrawn; use "
            "backend='reference' for second derivatives with dropout"
        )


def graph_grads(
    outs: list[Tensor], grads: list[Tensor], inputs: tuple[Tensor, ...], needs: tuple[bool, ...]
) -> tuple[Tensor | None, ...]:
    """∂(Σ outs·grads)/∂ each input with `needs`, as a differentiable graph (create_graph);
    None where not needed, zeros where needed but unused."""
    wrt = [t for t, n in zip(inputs, needs, strict=True) if n]
    got = iter(torch.autograd.grad(outs, wrt, grads, create_graph=True, allow_unused=True))
    res = []
    for t, n in zip(inputs, needs, strict=True):
        g = next(got) if n else None
        res.append(torch.zeros_like(t) if n and g is None else g)
    return tuple(res)
