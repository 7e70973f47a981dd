"""`auto`'s SDPA with a gradient on CUDA, kept clear of NaN/inf in masked-out K/V with no host
sync: its answer and its gradients are checked on the device, and redone by the Triton kernels
only where they came back non-finite.

Forward: SDPA, then `triton_kernel.repair` (rows of out holding NaN/inf recomputed with the
cleaning visits; the kernel writes into SDPA's out, which SDPA's backward also reads, so its
Δ = rowsum(dO∘O) sees the repaired rows). Backward: SDPA's own, then one kernel reads the
gradients it returned and raises a device flag if any holds NaN/inf; then three launches gated
by that flag (`_lse_delta_kernel`, the Triton backward's dK/dV and dQ passes) recompute every
gradient with masked NaN/inf kept out, writing over SDPA's. With the flag down, each of their
programs reads the flag and returns: finite gradients are SDPA's, bit for bit.

Why checking the gradients suffices: SDPA leaks a masked NaN/inf only through the products
0·NaN and 0·inf (a masked P_ij = 0 against a bad v_j in dP, or a masked dS_ij = 0 against a
bad k_j in dQ; with an additive mask also NaN + −inf in a score), and each makes some gradient
it returns non-finite. dQ and dK are sums of one dS tile, so a leak into dK or dV shows in dQ
too when dQ is computed: the flag reads dq when it is asked for, dk and dv otherwise.

`create_graph=True` (a backward that is itself differentiated) checks K/V on the host instead
and, where they hold NaN/inf, recomputes the gradients through the reference.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import scoring, tiled
from .builds import BuildFailures, head_dim_class
from .reference import double_backward_vjp
from .spec import Spec
from .triton_backward import passes
from .triton_kernel import (
    _MAX,
    _SUM,
    INTERPRETED,
    LOG2E,
    _attend,
    _block_range,
    _nonfinite,
    _query_block,
    build_error,
    cdiv,
    repair_config,
)


@triton.jit
def _nonfinite_kernel(X, sxb, sxh, sxs, sxd, H, S, D, FLAG, BLOCK_S: tl.constexpr,
                      BLOCK_D: tl.constexpr):  # fmt: skip
    """Grid (cdiv(S, BLOCK_S), B·H): FLAG (int32) ← 1 if X (b h s d) holds NaN/inf."""
    pid_bh = tl.program_id(1)
    offs_s = tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    base = X + (pid_bh // H) * sxb + (pid_bh % H) * sxh
    ok = (offs_s < S)[:, None] & (offs_d < D)[None, :]
    x = tl.load(base + offs_s[:, None] * sxs + offs_d[None, :] * sxd, mask=ok, other=0.0)
    bad = tl.reduce(tl.reduce(_nonfinite(x).to(tl.int32), 1, _MAX), 0, _MAX)
    tl.atomic_max(FLAG, bad, mask=bad > 0)


@triton.jit
def _lse_delta_kernel(Q, K, V, DO, LSE, DLT, GATE,
                      sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
                      sdb, sdh, sdm, sdd, Hq, G, Sq, Sk, D, left, right, qk_scale,
                      HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, EVEN_D: tl.constexpr,
                      DOT_PREC: tl.constexpr, DOT_F32: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):  # fmt: skip
    """Grid (cdiv(Sq, BLOCK_M), B·Hq), gated by GATE (int32; 0: return at once). The cleaning
    forward of one query block, keeping only what the backward needs: LSE (b h i) natural log
    and Δ = rowsum(dO∘O) (b h i) from O in fp32, both fp32 contiguous; O is never stored."""
    if tl.load(GATE) == 0:
        return
    pid_bh, b, h, hk, qs, qe, offs_m, offs_d = _query_block(
        tl.program_id(0), Hq, G, Sq, BLOCK_M, BLOCK_D
    )
    m_ok = offs_m < Sq
    ok = m_ok[:, None] & (offs_d < D)[None, :]
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqm + offs_d[None, :] * sqd,
                mask=ok, other=0.0)  # (i d)  # fmt: skip
    if DOT_F32:
        q = q.to(tl.float32)
    lo, mid_lo, mid_hi, hi = _block_range(qs, qe, Sk, Sk - Sq, left, right, HAS_LEFT,
                                          HAS_RIGHT, BLOCK_N)  # fmt: skip
    out, lse, _m, _i = _attend(  # pointer loads (K, V again as the unread descriptors)
        q, K + b * skb + hk * skh, V + b * svb + hk * svh, skn, skd, svn, svd, K, V, b, hk,
        offs_m, offs_d, h, LSE, Sk, D, Sk - Sq, left, right, qk_scale, 0.0, 0.0, 0.0, lo,
        mid_lo, mid_hi, hi, HAS_LEFT, HAS_RIGHT, True, False, EVEN_D, DOT_PREC, DOT_F32, 0,
        False, False, BLOCK_M, BLOCK_N, BLOCK_D,
    )  # fmt: skip
    do = tl.load(DO + b * sdb + h * sdh + offs_m[:, None] * sdm + offs_d[None, :] * sdd,
                 mask=ok, other=0.0).to(tl.float32)  # fmt: skip
    dlt = tl.reduce(do * out, 1, _SUM)
    tl.store(LSE + pid_bh * Sq + offs_m, lse, mask=m_ok)
    tl.store(DLT + pid_bh * Sq + offs_m, dlt, mask=m_ok)


def redo_if_nonfinite(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    spec: Spec,
    dout: Tensor,
    grads: tuple[Tensor | None, Tensor | None, Tensor | None],
) -> None:
    """Rewrite `grads` (SDPA's dq, dk, dv; None where not asked for) in place by the Triton
    backward with masked NaN/inf kept out, if the checked ones hold NaN/inf; else leave them.
    Four or five kernel launches, no host sync. The request must be one the Triton kernels
    compute (`triton_kernel.unsupported`), without sinks."""
    s = spec
    if s.Sq == 0 or s.Sk == 0 or s.B * s.Hq == 0:
        return
    flag = torch.zeros(1, dtype=torch.int32, device=q.device)
    checked = [grads[0]] if grads[0] is not None else [g for g in grads[1:] if g is not None]
    for g in checked:
        B, H, S, D = g.shape
        block_d = head_dim_class(D)
        _nonfinite_kernel[(cdiv(S, 64), B * H)](g, *g.stride(), H, S, D, flag,
                                                BLOCK_S=64, BLOCK_D=block_d)  # fmt: skip
    lse = torch.empty(s.B, s.Hq, s.Sq, dtype=torch.float32, device=q.device)
    dlt = torch.empty_like(lse)
    block_d = head_dim_class(s.D)  # dout as it came (any strides: no copy)
    c = repair_config(q.dtype)  # a cleaning forward, launched as the repair's (gated: rare)
    _lse_delta_kernel[(cdiv(s.Sq, c.block_m), s.B * s.Hq)](
        q, k, v, dout, lse, dlt, flag, *q.stride(), *k.stride(), *v.stride(), *dout.stride(),
        s.Hq, s.G, s.Sq, s.Sk, s.D, s.left or 0, s.right or 0, s.scale * LOG2E,
        HAS_LEFT=s.left is not None, HAS_RIGHT=s.right is not None, EVEN_D=block_d == s.D,
        DOT_PREC="ieee" if q.dtype == torch.float32 else "tf32",
        DOT_F32=INTERPRETED and q.dtype == torch.bfloat16,
        BLOCK_M=c.block_m, BLOCK_N=c.block_n, BLOCK_D=block_d, num_warps=c.num_warps,
        num_stages=c.num_stages,
    )  # fmt: skip
    passes(q, k, v, s, lse, dlt, dout, grads, interpreted=INTERPRETED, gate=flag)


class _Box:
    """dO, handed from `_Tap`'s backward to `_Check`'s, which autograd runs after SDPA's."""

    dout: Tensor | None = None


class _Tap(torch.autograd.Function):
    """The identity on SDPA's out, whose backward keeps dO for `_Check`."""

    @staticmethod
    def forward(ctx, box: _Box, out: Tensor) -> Tensor:
        ctx.box = box
        return out.view_as(out)

    @staticmethod
    def backward(ctx, dout):
        ctx.box.dout = dout
        return None, dout


class _Check(torch.autograd.Function):
    """The identity on q, k, v (those that need a gradient), whose backward checks SDPA's
    gradients of them and redoes them where non-finite (see the module docstring)."""

    @staticmethod
    def forward(ctx, box: _Box, spec: Spec, q: Tensor, k: Tensor, v: Tensor):
        ctx.set_materialize_grads(False)
        ctx.box, ctx.spec = box, spec
        ctx.save_for_backward(q, k, v)
        outs = tuple(t.view_as(t) for t in (q, k, v))
        needs = ctx.needs_input_grad[2:]
        ctx.mark_non_differentiable(*(o for o, n in zip(outs, needs, strict=True) if not n))
        return outs

    @staticmethod
    def backward(ctx, dq, dk, dv):
        q, k, v = ctx.saved_tensors
        dout, ctx.box.dout = ctx.box.dout, None
        grads = (dq, dk, dv)
        if dout is None:  # nothing flowed through out: SDPA's backward did not run
            return None, None, *grads
        if torch.is_grad_enabled():  # create_graph=True: the host check, then the reference
            if scoring.all_finite(k, v):
                return None, None, *grads
            needs = ctx.needs_input_grad[2:]
            return None, None, *double_backward_vjp(q, k, v, ctx.spec, dout, None, needs, "auto")
        return None, None, *_redone(q, k, v, ctx.spec, dout, grads)


# where this process's Triton could not build the redo (by dtype and head dim)
_REDO_BROKEN = BuildFailures(
    "the Triton check of SDPA's gradients", "K/V are checked on the host instead"
)


def _redone(q, k, v, spec, dout, grads):
    """`redo_if_nonfinite`, or where Triton cannot build it here, the host check and tiled's
    backward (with a warning, once per dtype and head dim)."""
    if not _REDO_BROKEN.broken(q.dtype, spec.D):
        try:
            redo_if_nonfinite(q, k, v, spec, dout, grads)
            return grads
        except Exception as e:
            if not build_error(e):
                raise
            _REDO_BROKEN.record(e, q.dtype, spec.D, stacklevel=4)
    if scoring.all_finite(k, v):
        return grads
    xs = [t.detach().requires_grad_(g is not None) for t, g in zip((q, k, v), grads, strict=True)]
    with torch.enable_grad():
        out, _ = tiled.tiled(*xs, spec)
        wrt = [t for t in xs if t.requires_grad]
        got = iter(torch.autograd.grad(out, wrt, dout))
    return tuple(next(got) if g is not None else None for g in grads)


def sdpa_checked(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    spec: Spec,
    run: Callable[[Tensor, Tensor, Tensor], Tensor],
    repair: Callable[[Tensor], Tensor],
) -> Tensor:
    """`run(q, k, v)` (SDPA, differentiable), then `repair(out)`, then its gradients checked
    and redone where non-finite; see the module docstring. `repair` returns `out` itself,
    repaired in place, or an answer computed otherwise (differentiable in q, k, v), which is
    then returned as it is."""
    box = _Box()
    q2, k2, v2 = _Check.apply(box, spec, q, k, v)
    out = run(q2, k2, v2)
    got = repair(out)
    if got is not out:
        return got
    return _Tap.apply(box, out)
