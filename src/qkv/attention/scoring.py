"""The score pipeline every backend shares, applied to any block of rows × keys.

    s = scale·q·k  →  softcap c·tanh(s/c)  →  score_mod  →  masks (−inf)  →  (+ float bias)

A block is query rows `rows` (a slice or an index tensor into 0..Sq) against keys `ks:ke`.
Index tensors handed to `mask_mod`/`score_mod` are 4-D and broadcastable to (b h i j):
`b (B,1,1,1)`, `h (1,Hq,1,1)`, `q_idx (1,1,i,1)`, `kv_idx (1,1,1,j)`. `q_idx` is the query's
**absolute position** i + δ (δ = Sk − Sq), the same coordinate `causal=True` uses, so a mod
stays correct when decoding with a KV cache; it equals FlexAttention's q_idx when Sq == Sk.

A loop over many blocks builds `Positions` once per call: blocks then slice its index tensors
(views, no kernel launch) and reuse band masks of equal shape and diagonal offset.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .spec import Spec

NEG_INF = float("-inf")


BAND_CACHE = 64  # band masks kept per call (a tile loop meets only a few diagonal offsets)


@dataclass(frozen=True)
class Positions:
    """Index tensors of one call, built once and sliced per block (views: no launch per tile)."""

    b: Tensor  # (B,1,1,1)
    h: Tensor  # (1,Hq,1,1)
    q: Tensor  # (Sq,) int64 absolute positions i + δ
    k: Tensor  # (Sk,) int64 key positions j
    bands: dict  # (diagonal offset, rows, cols) → bool band mask (i j), shared by equal blocks


def positions(spec: Spec, device: torch.device) -> Positions:
    return Positions(
        b=torch.arange(spec.B, device=device).view(-1, 1, 1, 1),
        h=torch.arange(spec.Hq, device=device).view(1, -1, 1, 1),
        q=torch.arange(spec.delta, spec.delta + spec.Sq, device=device),
        k=torch.arange(spec.Sk, device=device),
        bands={},
    )


@dataclass(frozen=True)
class Block:
    rows: slice | Tensor  # query rows i into 0..Sq
    ks: int  # keys ks:ke
    ke: int
    q_pos: Tensor  # (i,) int64 absolute positions i + δ
    band_full: bool  # the band (causal/window) keeps every (i, j) of this block
    pos: Positions | None = None  # the call's index tensors, when a tile loop built them


def block(
    spec: Spec,
    rows: slice | Tensor,
    ks: int,
    ke: int,
    device: torch.device,
    pos: Positions | None = None,
) -> Block:
    """Describe a block; `band_full` lets the caller skip building the band mask."""
    if isinstance(rows, slice):
        if pos is not None:
            q_pos = pos.q[rows]
        else:
            q_pos = torch.arange(rows.start, rows.stop, device=device) + spec.delta
        lo, hi = rows.start + spec.delta, rows.stop - 1 + spec.delta
    else:
        q_pos = rows.to(device=device, dtype=torch.long) + spec.delta
        lo = int(q_pos.min()) if q_pos.numel() else 0
        hi = int(q_pos.max()) if q_pos.numel() else 0
    full = (spec.left is None or ks >= hi - spec.left) and (
        spec.right is None or ke - 1 <= lo + spec.right
    )
    return Block(rows=rows, ks=ks, ke=ke, q_pos=q_pos, band_full=full, pos=pos)


def band_range(spec: Spec, lo: int, hi: int) -> tuple[int, int]:
    """Keys [start, stop) that the band can keep for query rows lo..hi (inclusive)."""
    start = 0 if spec.left is None else max(0, lo + spec.delta - spec.left)
    stop = spec.Sk if spec.right is None else min(spec.Sk, hi + spec.delta + spec.right + 1)
    return start, max(start, stop)


def _grids(spec: Spec, blk: Block, device: torch.device) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    qi = blk.q_pos.view(1, 1, -1, 1)
    if blk.pos is not None:
        return blk.pos.b, blk.pos.h, qi, blk.pos.k[blk.ks : blk.ke].view(1, 1, 1, -1)
    b = torch.arange(spec.B, device=device).view(-1, 1, 1, 1)
    h = torch.arange(spec.Hq, device=device).view(1, -1, 1, 1)
    kj = torch.arange(blk.ks, blk.ke, device=device).view(1, 1, 1, -1)
    return b, h, qi, kj


MOD_INDEXING = (
    "its index arguments are integer tensors broadcast over (b h i j) — b (B,1,1,1), "
    "h (1,Hq,1,1), q_idx (1,1,i,1), kv_idx (1,1,1,j) — so index a captured tensor with them all "
    "at once, e.g. bias[b, q_idx] or bias[b, h, q_idx, kv_idx]; FlexAttention-style "
    "bias[b][q_idx] indexes the result of bias[b] again along its first axis"
)


def call_mod(name: str, fn, *args: Tensor) -> Tensor:
    """Call a user's mask_mod/score_mod on a block's index tensors (the last four args), and
    explain the broadcast indexing contract if it fails to index, fails on mismatched shapes
    (IndexError, RuntimeError: the same type is raised again, with the hint) or returns a
    tensor that does not broadcast to the block's (b h i j) (ValueError)."""
    try:
        out = fn(*args)
    except IndexError as e:
        raise IndexError(f"{name} raised IndexError ({e}); if it indexes: {MOD_INDEXING}") from e
    except RuntimeError as e:
        raise RuntimeError(
            f"{name} raised RuntimeError ({e}); if it indexes: {MOD_INDEXING}"
        ) from e
    if isinstance(out, Tensor):
        want = torch.broadcast_shapes(*(a.shape for a in args[-4:]))
        try:
            fits = torch.broadcast_shapes(out.shape, want) == want
        except RuntimeError:
            fits = False
        if not fits:
            raise ValueError(
                f"{name} returned shape {tuple(out.shape)}, which does not broadcast to the "
                f"block's (b h i j) = {tuple(want)}: {MOD_INDEXING}"
            )
    return out


def _slice(m: Tensor, blk: Block) -> Tensor:  # (b h i j) mask restricted to the block
    if m.shape[2] != 1:
        m = m[:, :, blk.rows]
    return m if m.shape[3] == 1 else m[..., blk.ks : blk.ke]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of scores, softmax, LSE and the backward's dP: fp64 for fp64 input, else fp32
    (fp16/bf16 included, as FlashAttention)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def widen(x: Tensor) -> Tensor:
    """x in its compute dtype: fp16/bf16 → fp32 (exact, a copy); fp32/fp64 as is (no copy)."""
    return x.to(compute_dtype(x.dtype))


def scaled_scores(qg: Tensor, k: Tensor, spec: Spec) -> Tensor:
    """scale·q·kᵀ for grouped queries `qg (b hk (g i) d)` and keys `k (b hk j d)` → (b h i j),
    in the compute dtype. fp16/bf16 operands are widened first (exactly), so the products are
    summed in fp32 and the scores are never rounded to half precision; the scale folds into q.
    """
    t = (widen(qg) * spec.scale) @ widen(k).transpose(-1, -2)
    return t.view(spec.B, spec.Hq, -1, k.shape[2])


def group(q: Tensor, spec: Spec) -> Tensor:
    """(b h i d) → (b hk (g i) d): the g query heads sharing kv head hk become rows."""
    return q.unflatten(1, (spec.Hk, spec.G)).reshape(spec.B, spec.Hk, -1, q.shape[-1])


def modify(s: Tensor, spec: Spec, blk: Block) -> Tensor:
    """softcap then score_mod on scaled scores `s (b h i j)`; not in place (autograd-safe)."""
    if spec.softcap is not None:
        s = spec.softcap * torch.tanh(s / spec.softcap)
    if spec.score_mod is not None:
        out = call_mod("score_mod", spec.score_mod, s, *_grids(spec, blk, s.device))
        if not isinstance(out, Tensor) or not out.is_floating_point():
            got = out.dtype if isinstance(out, Tensor) else type(out).__name__
            hint = "; a mod that says keep/drop is a mask_mod" if got == torch.bool else ""
            raise TypeError(f"score_mod must return a floating score tensor, got {got}{hint}")
        s = torch.broadcast_to(out, s.shape).to(s.dtype)
    return s


def band(spec: Spec, blk: Block, device: torch.device) -> Tensor:
    """The band's keep-mask (i j) of a block: i+δ−left ≤ j ≤ i+δ+right. Read-only (cached).

    For a slice of rows it is a diagonal strip: with o = ks − (qs + δ), entry (r, c) is key
    ks+c of row qs+r, kept iff −left ≤ o + c − r ≤ right, i.e. `tril(right − o)` and
    `triu(−left − o)` of a block of ones; blocks of equal shape and offset share one mask.
    """
    rows = blk.rows
    if isinstance(rows, slice):
        n, w = rows.stop - rows.start, blk.ke - blk.ks
        o = blk.ks - (rows.start + spec.delta)
        key = (o, n, w)
        cache = blk.pos.bands if blk.pos is not None else None
        if cache is not None and key in cache:
            return cache[key]
        out = torch.ones(n, w, dtype=torch.bool, device=device)
        if spec.right is not None:
            out.tril_(spec.right - o)
        if spec.left is not None:
            out.triu_(-spec.left - o)
        if cache is not None and len(cache) < BAND_CACHE:
            cache[key] = out
        return out
    kj = torch.arange(blk.ks, blk.ke, device=device).view(1, -1)
    qi = blk.q_pos.view(-1, 1)
    out = torch.ones(qi.shape[0], kj.shape[1], dtype=torch.bool, device=device)
    if spec.left is not None:
        out &= kj >= qi - spec.left
    if spec.right is not None:
        out &= kj <= qi + spec.right
    return out


def keep(spec: Spec, blk: Block, device: torch.device) -> Tensor | None:
    """Bool keep-mask broadcastable to the block's (b h i j), or None when all is kept."""
    out: Tensor | None = None
    if spec.banded and not blk.band_full:
        out = band(spec, blk, device)
    if spec.keep is not None:
        m = _slice(spec.keep, blk)
        out = m if out is None else out & m
    if spec.mask_mod is not None:
        m = call_mod("mask_mod", spec.mask_mod, *_grids(spec, blk, device))
        if not isinstance(m, Tensor) or m.dtype != torch.bool:
            got = m.dtype if isinstance(m, Tensor) else type(m).__name__
            raise TypeError(f"mask_mod must return a bool tensor (True = keep), got {got}")
        out = m if out is None else out & m
    return out


def scores(
    s: Tensor, spec: Spec, blk: Block, kbad: Tensor | None = None, inplace: bool = False
) -> tuple[Tensor, Tensor | None]:
    """Full pipeline on scaled scores `s (b h i j)`: returns (logits, keep).

    `kbad (b h j)` marks keys holding NaN/inf: their scores become NaN (so a query that keeps
    such a key gets NaN, as plain math would) while a query that masks them never sees them.
    `inplace` may overwrite `s` (never when autograd must see the steps).
    """
    if kbad is not None:
        s = s.masked_fill(kbad[..., blk.ks : blk.ke].unsqueeze(-2), float("nan"))
    s = modify(s, spec, blk)
    k = keep(spec, blk, s.device)
    if k is not None:
        s = s.masked_fill_(k.logical_not(), NEG_INF) if inplace else s.masked_fill(~k, NEG_INF)
    if spec.bias is not None:
        s = s + _slice(spec.bias, blk)
    return s, k


def safe_max(m: Tensor) -> Tensor:
    """Row max with −inf (an empty row) replaced by 0, so exp(s − m) never makes NaN."""
    return m.masked_fill(m == NEG_INF, 0.0)


def empty_rows_to_inf(lse: Tensor) -> Tensor:
    """An empty row's LSE −inf becomes +inf, so exp(logit − lse) is 0 there (not NaN)."""
    return torch.where(lse == NEG_INF, torch.full_like(lse, float("inf")), lse)


def needs_grad(*xs: Tensor | None) -> bool:
    """Whether autograd will differentiate through a call on `xs` (None entries skipped)."""
    return torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in xs)


def transforms_active() -> bool:
    """Whether a torch.func transform (vmap, grad, jacrev, …) is active: then no step may read
    a tensor's values on the host (vmap cannot branch on them)."""
    return torch._C._are_functorch_transforms_active()


def all_finite(*xs: Tensor) -> bool:
    """True if no tensor in xs holds NaN/inf, in one reduction pass each and one host sync in
    all (a finite total proves it; a total that overflows is checked element-wise instead).
    Meta tensors (shapes without values) count as finite. Under a torch.func transform
    (`transforms_active`) False, "not proven": callers then take their checked path, as masks."""
    if transforms_active():
        return False
    xs = tuple(x for x in xs if x.numel() and not x.is_meta)  # meta tensors hold no values
    if not xs:
        return True
    total = xs[0].sum(dtype=torch.float32 if xs[0].dtype != torch.float64 else None)
    for x in xs[1:]:
        total = total + x.sum(dtype=total.dtype)
    return bool(torch.isfinite(total)) or all(bool(torch.isfinite(x).all()) for x in xs)


def bad_keys(k: Tensor, G: int) -> Tensor | None:
    """(b h j) bool, True where key j of query head h holds NaN/inf; None if k is finite."""
    if all_finite(k):
        return None
    bad = ~torch.isfinite(k).all(-1)
    if transforms_active():  # the mask always: vmap cannot ask whether it holds any True
        return bad.repeat_interleave(G, dim=1)
    return bad.repeat_interleave(G, dim=1) if bad.any() else None


def finite(x: Tensor) -> Tensor:
    """x with NaN/inf replaced by 0 (for matmuls whose masked terms must stay exactly 0)."""
    return torch.where(torch.isfinite(x), x, torch.zeros((), dtype=x.dtype, device=x.device))


def sink_logits(sinks: Tensor, like: Tensor) -> Tensor:
    """(Hq,) sink logits as (1 h 1) in `like`'s dtype (the compute dtype), for (b h i) rows."""
    return sinks.to(like.dtype).view(1, -1, 1)


def add_sinks(out: Tensor, lse: Tensor, sinks: Tensor) -> tuple[Tensor, Tensor]:
    """Fold per-head sink logits into a finished attention (out (b h i e), lse (b h i), both
    in the compute dtype). A sink σ_h is one more logit in every softmax row of head h, with
    no value behind it:

        lse' = log(exp(lse) + exp(σ))            out' = out · exp(lse − lse')

    exact, since out = Σ_j exp(ℓ_j − lse)·v_j and the sink adds only to the denominator. An
    empty row (lse −inf) gives out' 0 and lse' σ; a sink of −inf changes nothing."""
    sig = sink_logits(sinks, lse)
    lse2 = torch.logaddexp(lse, sig)
    kept = torch.where(lse2 == NEG_INF, torch.zeros_like(lse), torch.exp(lse - lse2))
    return out * kept.unsqueeze(-1), lse2


def sink_grad(out: Tensor, lse: Tensor, dout: Tensor, dlse: Tensor | None, sinks: Tensor) -> Tensor:
    """∂L/∂σ (Hq,) in sinks' dtype, from the finished out' and lse' (`add_sinks`):

        ∂L/∂σ_h = Σ_{b,i} p_σ(b,h,i) · (dlse − rowsum(dO ∘ O'))     p_σ = exp(σ_h − lse')

    (the sink's softmax weight times the usual Δ = rowsum(dO∘O) − dlse, negated)."""
    cdt = lse.dtype
    delta = (dout.to(cdt) * out.to(cdt)).sum(-1)  # (b h i)
    if dlse is not None:
        delta = delta - dlse.to(cdt)
    p = torch.exp(sink_logits(sinks, lse) - lse)  # (b h i); lse' = −inf only if σ = −inf
    p = torch.where(lse == NEG_INF, torch.zeros_like(p), p)
    return (-(p * delta)).sum((0, 2)).to(sinks.dtype)
