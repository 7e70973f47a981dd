"""The tiled backend: exact attention by online softmax over key blocks, O(N) memory.

For each block of query rows, keys are visited in blocks; a running max `m`, running sum `l`
and accumulator `acc` are rescaled as each block arrives (Milakov & Gimelshein 2018; Dao et al.
2022). Only the keys the band (causal/window) can keep are visited, and a block that a mask
empties is skipped. The backward pass recomputes each tile from q, k and the saved LSE, so no
(i j) matrix is ever stored; it is a custom autograd Function.

GQA without copying K/V: the g query heads that share kv head h are laid out as rows of one
matrix, q (b, hk, g, i, d) → (b, hk, g·i, d), so `q_blk @ kᵀ` serves the whole group and dK/dV
sum over the group inside the matmul. Pure PyTorch: runs on any device torch does.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import scoring
from .reference import compute_dtype
from .spec import Spec

BLOCK_Q = 256
BLOCK_K = 512


def key_blocks(spec: Spec, qs: int, qe: int, block_k: int) -> list[tuple[int, int]]:
    start, stop = scoring.band_range(spec, qs, qe - 1)
    return [(j, min(j + block_k, stop)) for j in range(start, stop, block_k)]


def _dropout_keep(seed: int, qs: int, ks: int, shape: torch.Size, p: float, device: torch.device) -> Tensor:
    """The dropout keep-mask of one tile, a pure function of (seed, tile): forward and backward
    regenerate the very same mask without storing it."""
    g = torch.Generator(device=device)
    g.manual_seed((seed * 1_000_003 + qs * 65_537 + ks) % (2**63))
    return torch.rand(shape, generator=g, device=device) >= p


class _Tiles:
    """Shared tile arithmetic of forward and backward for one call."""

    def __init__(self, q: Tensor, k: Tensor, v: Tensor, spec: Spec, seed: int, block_q: int, block_k: int):
        self.spec, self.seed, self.block_q, self.block_k = spec, seed, block_q, block_k
        self.cdt = compute_dtype(q.dtype)
        self.kbad = scoring.bad_keys(k, spec.G)
        self.k = scoring.finite(k) if self.kbad is not None else k
        self.vbad = None if bool(torch.isfinite(v).all()) else ~torch.isfinite(v)
        self.v = scoring.finite(v) if self.vbad is not None else v
        self.q5 = q.unflatten(1, (spec.Hk, spec.G))  # (b hk g i d)
        self.plain = not (spec.has_mods or spec.mask is not None or spec.mask_mod is not None)
        self.plain = self.plain and self.kbad is None

    def q_block(self, qs: int, qe: int) -> Tensor:  # (b hk (g i) d)
        s = self.spec
        return self.q5[:, :, :, qs:qe].reshape(s.B, s.Hk, s.G * (qe - qs), s.D)

    def raw(self, qb: Tensor, ks: int, ke: int) -> Tensor:
        """Scaled scores of a tile, (b h i j) in the compute dtype."""
        return scoring.scaled_scores(qb, self.k[:, :, ks:ke], self.spec)

    def logits(self, raw: Tensor, qs: int, qe: int, ks: int, ke: int) -> tuple[Tensor, Tensor | None, bool]:
        """(logits, keep, empty): the score pipeline on one tile; `empty` if nothing is kept."""
        blk = scoring.block(self.spec, slice(qs, qe), ks, ke, raw.device)
        if self.plain and blk.band_full:
            return raw, None, False
        logits, keep = scoring.scores(raw, self.spec, blk, self.kbad)
        return logits, keep, keep is not None and not bool(keep.any())

    def dropout(self, p: Tensor, qs: int, ks: int) -> Tensor | None:
        d = self.spec.dropout_p
        if d == 0:
            return None
        return _dropout_keep(self.seed, qs, ks, p.shape, d, p.device).to(p.dtype) / (1.0 - d)

    def grouped(self, t: Tensor) -> Tensor:  # (b h i j) → (b hk (g i) j)
        return t.reshape(self.spec.B, self.spec.Hk, -1, t.shape[-1])


def _forward(t: _Tiles, q: Tensor) -> tuple[Tensor, Tensor]:
    """(out, lse) in the compute dtype: fp32 output is kept for the backward's rowsum(dO∘O),
    which would lose digits from a bf16-rounded O."""
    s = t.spec
    out = torch.zeros(s.B, s.Hq, s.Sq, s.Dv, dtype=t.cdt, device=q.device)  # (b h i e)
    lse = torch.full((s.B, s.Hq, s.Sq), float("-inf"), dtype=t.cdt, device=q.device)
    out5 = out.view(s.B, s.Hk, s.G, s.Sq, s.Dv)
    for qs in range(0, s.Sq, t.block_q):
        qe = min(qs + t.block_q, s.Sq)
        qb = t.q_block(qs, qe)
        m = torch.full((s.B, s.Hq, qe - qs), float("-inf"), dtype=t.cdt, device=q.device)
        l = torch.zeros_like(m)
        acc = torch.zeros(s.B, s.Hk, s.G * (qe - qs), s.Dv, dtype=t.cdt, device=q.device)
        hit = torch.zeros_like(acc) if t.vbad is not None else None
        for ks, ke in key_blocks(s, qs, qe, t.block_k):
            logits, _, empty = t.logits(t.raw(qb, ks, ke), qs, qe, ks, ke)
            if empty:
                continue
            m_new = torch.maximum(m, logits.amax(-1))
            m_safe = scoring.safe_max(m_new)
            p = logits.sub_(m_safe.unsqueeze(-1)).exp_()  # (b h i j), in place
            alpha = torch.exp(m - m_safe)
            l = l * alpha + p.sum(-1)
            drop = t.dropout(p, qs, ks)
            pd = t.grouped(p if drop is None else p * drop)
            acc.mul_(t.grouped(alpha.unsqueeze(-1))).add_((pd.to(q.dtype) @ t.v[:, :, ks:ke]).to(t.cdt))
            if hit is not None:
                hit.add_((pd != 0).to(t.cdt) @ t.vbad[:, :, ks:ke].to(t.cdt))
            m = m_new
        l_safe = torch.where(l == 0, torch.ones_like(l), l)
        o = acc / t.grouped(l_safe.unsqueeze(-1))
        if hit is not None:
            o = o.masked_fill(hit > 0, float("nan"))
        out5[:, :, :, qs:qe] = o.view(s.B, s.Hk, s.G, qe - qs, s.Dv)
        lse[:, :, qs:qe] = scoring.safe_max(m) + torch.log(l)
    return out, lse


def _backward(t: _Tiles, q: Tensor, out: Tensor, lse: Tensor, dout: Tensor, dlse: Tensor | None):
    s = t.spec
    cdt = t.cdt
    dq = torch.zeros(s.B, s.Hq, s.Sq, s.D, dtype=cdt, device=q.device)
    dk = torch.zeros(s.B, s.Hk, s.Sk, s.D, dtype=cdt, device=q.device)
    dv = torch.zeros(s.B, s.Hk, s.Sk, s.Dv, dtype=cdt, device=q.device)
    dq5 = dq.view(s.B, s.Hk, s.G, s.Sq, s.D)
    do5 = dout.unflatten(1, (s.Hk, s.G))
    o5 = out.unflatten(1, (s.Hk, s.G))
    for qs in range(0, s.Sq, t.block_q):
        qe = min(qs + t.block_q, s.Sq)
        n = qe - qs
        qb = t.q_block(qs, qe)
        dob = do5[:, :, :, qs:qe].reshape(s.B, s.Hk, s.G * n, s.Dv)
        ob = o5[:, :, :, qs:qe].reshape(s.B, s.Hk, s.G * n, s.Dv)
        delta = (dob.to(cdt) * ob.to(cdt)).sum(-1).view(s.B, s.Hq, n, 1)  # rowsum(dO∘O)
        if dlse is not None:
            delta = delta - dlse[:, :, qs:qe].unsqueeze(-1).to(cdt)
        lse_b = lse[:, :, qs:qe].unsqueeze(-1)
        lse_b = torch.where(lse_b == float("-inf"), torch.full_like(lse_b, float("inf")), lse_b)
        dqb = torch.zeros(s.B, s.Hk, s.G * n, s.D, dtype=cdt, device=q.device)
        for ks, ke in key_blocks(s, qs, qe, t.block_k):
            raw = t.raw(qb, ks, ke)
            if t.spec.has_mods:
                raw = raw.detach().requires_grad_()
                with torch.enable_grad():
                    logits, keep, empty = t.logits(raw, qs, qe, ks, ke)
            else:
                logits, keep, empty = t.logits(raw, qs, qe, ks, ke)
            if empty:
                continue
            p = torch.exp(logits.detach() - lse_b)  # (b h i j)
            drop = t.dropout(p, qs, ks)
            pd = p if drop is None else p * drop
            dv[:, :, ks:ke] += (t.grouped(pd).transpose(-1, -2).to(dout.dtype) @ dob).to(cdt)
            dp = (dob @ t.v[:, :, ks:ke].transpose(-1, -2)).to(cdt).view_as(p)
            if drop is not None:
                dp = dp * drop
            ds = p * (dp - delta)
            if t.spec.has_mods:
                (ds,) = torch.autograd.grad(logits, raw, ds)
                if keep is not None:
                    ds = ds.masked_fill(~keep, 0.0)
            ds = t.grouped(ds * s.scale)  # (b hk (g i) j)
            dqb += (ds.to(q.dtype) @ t.k[:, :, ks:ke]).to(cdt)
            dk[:, :, ks:ke] += (ds.transpose(-1, -2).to(q.dtype) @ qb).to(cdt)
        dq5[:, :, :, qs:qe] = dqb.view(s.B, s.Hk, s.G, n, s.D)
    return dq, dk, dv


class _TiledAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, spec: Spec, block_q: int, block_k: int):
        seed = 0
        if spec.dropout_p > 0:
            seed = int(torch.randint(0, 2**62, (1,), generator=spec.generator))
        t = _Tiles(q, k, v, spec, seed, block_q, block_k)
        out_c, lse = _forward(t, q)
        ctx.save_for_backward(q, k, v, out_c, lse)
        ctx.spec, ctx.seed, ctx.blocks = spec, seed, (block_q, block_k)
        return out_c.to(q.dtype), lse

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        t = _Tiles(q, k, v, ctx.spec, ctx.seed, *ctx.blocks)
        if dout is None:
            dout = torch.zeros_like(out)
        dq, dk, dv = _backward(t, q, out, lse, dout.contiguous(), dlse)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None


def tiled(
    q: Tensor, k: Tensor, v: Tensor, spec: Spec, block_q: int = BLOCK_Q, block_k: int = BLOCK_K
) -> tuple[Tensor, Tensor]:
    """(out (b h i e), lse (b h i)) by online softmax; differentiable in q, k, v."""
    if spec.mask is not None and spec.mask.requires_grad:
        raise ValueError(
            "the tiled backend does not differentiate through a float mask; "
            "pass mask.detach(), or backend='reference' or 'sdpa' to learn the bias"
        )
    if block_q < 1 or block_k < 1:
        raise ValueError(f"block sizes must be ≥ 1, got block_q={block_q}, block_k={block_k}")
    return _TiledAttention.apply(q, k, v, spec, block_q, block_k)
