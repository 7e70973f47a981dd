"""The triton backend's backward: FlashAttention-2's two passes, recomputing P from the saved LSE.

With `Δ_i = Σ_e dO_ie·O_ie − dLSE_i` (b h i), fp32, computed once by `_delta_kernel`:

    P_ij  = exp(scale·q_i·k_j − LSE_i)        kept (i, j) only; an empty row (LSE −inf) is 0
    dP_ij = dO_i · v_j                         fp32, never rounded to the input dtype
    dS_ij = P_ij · (dP_ij − Δ_i)               (the −dLSE term: ∂LSE_i/∂s_ij = P_ij)
    dV_j  = Σ_i P_ij dO_i     dK_j = scale · Σ_i dS_ij q_i     dQ_i = scale · Σ_j dS_ij k_j

Pass 1, grid (key blocks, b·Hk): one program owns a key block of one kv head and loops over the
(query head of its GQA group, query block whose band reaches it: `_query_range`) pairs, one flat
loop per run, so dK/dV sum over the group with no atomics. Pass 2, grid (query blocks, b·Hq): dQ
over the key blocks `_block_range` gives the forward. In both passes the tiles the band keeps whole
(the `mid` runs of `_block_range` and `query_block_range`) skip the mask, as the forward does.
Scores and dP are fp32 `tl.dot` accumulations (IEEE for fp32 inputs); P and dS are rounded to the
input dtype before their products, as FlashAttention does. Δ comes from the forward's O kept in
fp32 (`_TritonAttention` saves it): from the half-rounded O, dQ lands 10× past flash-attn's own
bwd-overflow criterion. Under Triton's CPU interpreter bf16 operands are widened to fp32 first (its
`tl.dot` mistakes bf16 for integers).

The masking is the forward's: bottom-right alignment δ = Sk − Sq, window (left, right)
inclusive on that diagonal, the sequence tails. NaN/inf in masked-out K or V never reach a
gradient, with no check on the host. dK/dV: on the tiles with masked entries dS is zeroed
where masked (a NaN value makes dP NaN there). dQ: a plain pass, then a second launch of it
(`REPAIR`) that reads each dQ tile and, only where a row came back NaN/inf, recomputes the rows
with dS zeroed where masked and the keys' NaN/inf cleaned (0·NaN), as the forward's repair
does: any leak is a NaN in the row, and clean inputs pay one read of dQ instead of the
cleaning on every masked tile. A kept bad key or value still gives NaN through its own P or
dP, as plain arithmetic does.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .builds import head_dim_class
from .spec import Spec
from .triton_kernel import (
    _MAX,
    Config,
    _as_operand,
    _band,
    _block_range,
    _nonfinite,
    _query_block,
    _round,
    _score_mods,
    _slope,
    cdiv,
    mod_args,
)

_SUM = tl.standard._sum_combine  # builtins only, as in triton_kernel (the interpreter needs them)


@triton.jit
def _query_range(ks, ke, Sq, delta, left, right, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr):
    """Query rows [start, stop) whose band holds any key in [ks, ke): i + δ − left ≤ j and
    j ≤ i + δ + right for some j there, i.e. i ≥ ks − δ − right and i ≤ ke − 1 − δ + left."""
    start = 0
    stop = Sq
    if HAS_RIGHT:
        start = tl.minimum(Sq, tl.maximum(0, ks - delta - right))
    if HAS_LEFT:
        stop = tl.minimum(Sq, ke - delta + left)
    stop = tl.maximum(start, stop)
    return start, stop


def query_block_range(
    ks: int,
    ke: int,
    Sq: int,
    delta: int,
    left: int | None,
    right: int | None,
    block_m: int,
    full: bool = True,
) -> tuple[int, int, int, int]:
    """Query blocks (of `block_m` rows) for keys ks..ke−1: (lo, mid_lo, mid_hi, hi).

    [lo, hi) are the blocks holding any row whose band keeps a key there (`_query_range`);
    [mid_lo, mid_hi) ⊆ [lo, hi) are blocks in which every row of the full block keeps every
    one of those keys, so the dK/dV pass needs no mask there (rows past Sq have P = 0 through
    their LSE); none unless the key block is `full` (no key past Sk, whose P could overflow).
    The kernel's `_query_block_range` computes the same integers."""
    start = 0 if right is None else min(Sq, max(0, ks - delta - right))
    stop = Sq if left is None else min(Sq, ke - delta + left)
    stop = max(start, stop)
    lo, hi = start // block_m, (stop + block_m - 1) // block_m
    # block b (rows b·m … b·m+m−1) keeps every key: b·m ≥ ke−1−δ−right, b·m+m−1 ≤ ks−δ+left
    mid_lo = (
        lo if right is None else max(lo, (max(0, ke - 1 - delta - right) + block_m - 1) // block_m)
    )
    mid_hi = hi if left is None else min(hi, max(0, ks - delta + left + 1) // block_m)
    mid_lo = min(mid_lo, hi)
    if not full:
        mid_lo = mid_hi = lo
    return lo, mid_lo, max(mid_lo, mid_hi), hi


@triton.jit
def _query_block_range(ks, ke, Sq, delta, left, right, full, HAS_LEFT: tl.constexpr,
                       HAS_RIGHT: tl.constexpr, BLOCK_M: tl.constexpr):  # fmt: skip
    """`query_block_range`, in the kernel (all operands ≥ 0 before each division)."""
    start, stop = _query_range(ks, ke, Sq, delta, left, right, HAS_LEFT, HAS_RIGHT)
    lo = start // BLOCK_M
    hi = (stop + BLOCK_M - 1) // BLOCK_M
    mid_lo = lo
    mid_hi = hi
    if HAS_RIGHT:
        mid_lo = tl.maximum(lo, (tl.maximum(0, ke - 1 - delta - right) + BLOCK_M - 1) // BLOCK_M)
    if HAS_LEFT:
        mid_hi = tl.minimum(hi, tl.maximum(0, ks - delta + left + 1) // BLOCK_M)
    mid_lo = tl.minimum(mid_lo, hi)
    mid_lo = tl.where(full, mid_lo, lo)
    mid_hi = tl.where(full, mid_hi, lo)
    return lo, mid_lo, tl.maximum(mid_lo, mid_hi), hi


@triton.jit
def _probs(q, kt, lse2, qk_scale, offs_m, offs_n, delta, cap1, cap2, slope,
           MODS: tl.constexpr, DOT_PREC: tl.constexpr):  # fmt: skip
    """(P (i j) fp32, ∂s/∂(scale·q·k): 1.0 or (i j)) for a tile, unmasked:
    exp2(scale·log2e·q·k − lse·log2e), or with MODS exp2(log2e·`_score_mods`(scale·q·k) −
    lse·log2e) (`qk_scale` is then the natural scale). Rows past Sq or keeping no key get 0:
    their lse2 is +inf. Masked tiles apply `_keep` to it."""
    s = tl.dot(q, kt, input_precision=DOT_PREC) * qk_scale
    grad = 1.0
    if MODS:
        s, grad = _score_mods(s, offs_m[:, None] + delta, offs_n[None, :], cap1, cap2, slope,
                              MODS)  # fmt: skip
        s = s * 1.4426950408889634  # log2(e)
    return tl.exp2(s - lse2[:, None]), grad


@triton.jit
def _keep(offs_m, offs_n, Sq, Sk, delta, left, right, HAS_LEFT: tl.constexpr,
          HAS_RIGHT: tl.constexpr, RANGE: tl.constexpr):  # fmt: skip
    """(i j) True where row i keeps key j: inside Sq and Sk, and the band's (`_band`)."""
    return _band(offs_m, offs_n, offs_m < Sq, Sk, delta, left, right, HAS_LEFT, HAS_RIGHT,
                 RANGE)  # fmt: skip


@triton.jit
def _query_rows(Q, DO, LSE, DLT, b, h, Hq, Sq, offs_m, offs_d, D, sqb, sqh, sqm, sqd,
                sdb, sdh, sdm, sdd, DOT_F32: tl.constexpr):  # fmt: skip
    """One query block's q (i d), dO (i e), LSE in base 2 (+inf where a row keeps no key or
    lies past Sq, so its P is 0) and Δ (i), for query head h of batch b."""
    m_ok = offs_m < Sq
    qm = m_ok[:, None] & (offs_d < D)[None, :]
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqm + offs_d[None, :] * sqd,
                mask=qm, other=0.0)  # (i d)  # fmt: skip
    do = tl.load(DO + b * sdb + h * sdh + offs_m[:, None] * sdm + offs_d[None, :] * sdd,
                 mask=qm, other=0.0)  # (i e)  # fmt: skip
    row = (b * Hq + h) * Sq + offs_m
    lse = tl.load(LSE + row, mask=m_ok, other=float("inf"))
    dlt = tl.load(DLT + row, mask=m_ok, other=0.0)
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
    if DOT_F32:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    return q, do, lse2, dlt


@triton.jit
def _key_block(K, V, b, g, offs_n, offs_d, Sk, D, skb, skh, skn, skd, svb, svh, svn, svd,
               DOT_F32: tl.constexpr):  # fmt: skip
    """One key block's k (j d) and v (j e) of kv head g of batch b, 0 past Sk."""
    kv_mask = (offs_n < Sk)[:, None] & (offs_d < D)[None, :]
    k = tl.load(K + b * skb + g * skh + offs_n[:, None] * skn + offs_d[None, :] * skd,
                mask=kv_mask, other=0.0)  # (j d)  # fmt: skip
    v = tl.load(V + b * svb + g * svh + offs_n[:, None] * svn + offs_d[None, :] * svd,
                mask=kv_mask, other=0.0)  # (j e)  # fmt: skip
    if DOT_F32:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    return k, v


@triton.jit
def _dkdv_visit(dk, dv, kt, vt, Q, DO, LSE, DLT, b, h0, GS, Hq, Sq, Sk, offs_n, offs_d, D,
                sqb, sqh, sqm, sqd, sdb, sdh, sdm, sdd, delta, left, right, qk_scale,
                cap1, cap2, SLOPES, ssb, blk_lo, blk_hi, MASKED: tl.constexpr,
                HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, DOT_PREC: tl.constexpr,
                DOT_F32: tl.constexpr, MODS: tl.constexpr, BLOCK_M: tl.constexpr):  # fmt: skip
    """dK, dV (j d) of one key block summed over query blocks [blk_lo, blk_hi) of each query
    head h0 … h0+GS−1: one flat loop over (head, block) pairs, not a loop nest per head (a
    GQA group's nest kept three loops live and spilled registers: ptxas, sm_90)."""
    n = blk_hi - blk_lo
    for t in range(0, GS * n):
        h = h0 + t // n
        offs_m = (blk_lo + t % n) * BLOCK_M + tl.arange(0, BLOCK_M)
        q, do, lse2, dlt = _query_rows(Q, DO, LSE, DLT, b, h, Hq, Sq, offs_m, offs_d, D,
                                       sqb, sqh, sqm, sqd, sdb, sdh, sdm, sdd, DOT_F32)  # fmt: skip
        slope = _slope(SLOPES, b, h, ssb, MODS)
        p, grad = _probs(q, kt, lse2, qk_scale, offs_m, offs_n, delta, cap1, cap2, slope, MODS,
                         DOT_PREC)  # (i j)  # fmt: skip
        if MASKED:
            keep = _keep(offs_m, offs_n, Sq, Sk, delta, left, right, HAS_LEFT, HAS_RIGHT,
                         False)  # fmt: skip
            p = tl.where(keep, p, 0.0)
        dv = tl.dot(tl.trans(_as_operand(p, do, DOT_F32)), do, dv, input_precision=DOT_PREC)
        dp = tl.dot(do, vt, input_precision=DOT_PREC)  # (i j) fp32
        ds = p * (dp - dlt[:, None])
        if MODS & 3:  # through the caps: ∂ cap·tanh(s/cap) = 1 − tanh²
            ds = ds * grad
        if MASKED:  # a masked NaN/inf value makes dp NaN: 0·NaN must stay 0
            ds = tl.where(keep, ds, 0.0)
        dk = tl.dot(tl.trans(_as_operand(ds, q, DOT_F32)), q, dk, input_precision=DOT_PREC)
    return dk, dv


@triton.jit
def _dkdv_kernel(Q, K, V, DO, LSE, DLT, DK, DV,
                 sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
                 sdb, sdh, sdm, sdd, skgb, skgh, skgn, skgd, svgb, svgh, svgn, svgd,
                 Hq, Hk, GS, Sq, Sk, D, left, right, qk_scale, sm_scale, GATE,
                 cap1, cap2, SLOPES, ssb,
                 HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, DOT_PREC: tl.constexpr,
                 DOT_F32: tl.constexpr, HAS_GATE: tl.constexpr, MODS: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_D: tl.constexpr):  # fmt: skip
    """Grid (cdiv(Sk, BLOCK_N), B·Hk). MODS, cap1, cap2, SLOPES, ssb as the forward's.
    DK, DV (b g j d) in any float dtype (each value rounded
    once, to nearest even); LSE, DLT (b h i) fp32 contiguous. HAS_GATE: a program whose int32
    GATE reads 0 returns at once, reading and writing nothing."""
    if HAS_GATE:
        if tl.load(GATE) == 0:
            return
    pid_n = tl.program_id(0)
    pid_bg = tl.program_id(1)
    b = pid_bg // Hk
    g = pid_bg % Hk
    delta = Sk - Sq
    ks = pid_n * BLOCK_N
    ke = tl.minimum(ks + BLOCK_N, Sk)
    offs_n = ks + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    kv_mask = (offs_n < Sk)[:, None] & (offs_d < D)[None, :]
    k, v = _key_block(K, V, b, g, offs_n, offs_d, Sk, D, skb, skh, skn, skd,
                      svb, svh, svn, svd, DOT_F32)  # fmt: skip
    kt = tl.trans(k)  # (d j)
    vt = tl.trans(v)  # (e j)
    dk = tl.full([BLOCK_N, BLOCK_D], 0.0, tl.float32)
    dv = tl.full([BLOCK_N, BLOCK_D], 0.0, tl.float32)
    lo, mid_lo, mid_hi, hi = _query_block_range(ks, ke, Sq, delta, left, right,
                                                ks + BLOCK_N <= Sk, HAS_LEFT, HAS_RIGHT,
                                                BLOCK_M)  # fmt: skip
    # each run over the query heads g·GS … g·GS+GS−1 of this kv head's group
    dk, dv = _dkdv_visit(dk, dv, kt, vt, Q, DO, LSE, DLT, b, g * GS, GS, Hq, Sq, Sk, offs_n,
                         offs_d, D, sqb, sqh, sqm, sqd, sdb, sdh, sdm, sdd, delta, left, right,
                         qk_scale, cap1, cap2, SLOPES, ssb, mid_lo, mid_hi, False, HAS_LEFT,
                         HAS_RIGHT, DOT_PREC, DOT_F32, MODS, BLOCK_M)  # fmt: skip
    dk, dv = _dkdv_visit(dk, dv, kt, vt, Q, DO, LSE, DLT, b, g * GS, GS, Hq, Sq, Sk, offs_n,
                         offs_d, D, sqb, sqh, sqm, sqd, sdb, sdh, sdm, sdd, delta, left, right,
                         qk_scale, cap1, cap2, SLOPES, ssb, lo, mid_lo, True, HAS_LEFT,
                         HAS_RIGHT, DOT_PREC, DOT_F32, MODS, BLOCK_M)  # fmt: skip
    dk, dv = _dkdv_visit(dk, dv, kt, vt, Q, DO, LSE, DLT, b, g * GS, GS, Hq, Sq, Sk, offs_n,
                         offs_d, D, sqb, sqh, sqm, sqd, sdb, sdh, sdm, sdd, delta, left, right,
                         qk_scale, cap1, cap2, SLOPES, ssb, mid_hi, hi, True, HAS_LEFT,
                         HAS_RIGHT, DOT_PREC, DOT_F32, MODS, BLOCK_M)  # fmt: skip
    dk = _round(dk * sm_scale, DK.dtype.element_ty, DOT_F32 and DK.dtype.element_ty == tl.bfloat16)
    dv = _round(dv, DV.dtype.element_ty, DOT_F32 and DV.dtype.element_ty == tl.bfloat16)
    tl.store(DK + b * skgb + g * skgh + offs_n[:, None] * skgn + offs_d[None, :] * skgd,
             dk, mask=kv_mask)  # fmt: skip
    tl.store(DV + b * svgb + g * svgh + offs_n[:, None] * svgn + offs_d[None, :] * svgd,
             dv, mask=kv_mask)  # fmt: skip


@triton.jit
def _dq_visit(dq, q, do, lse2, dlt, offs_m, Sq, delta, left, right, qk_scale, cap1, cap2,
              slope, K, V, b, hk, offs_d, Sk, D, skb, skh, skn, skd, svb, svh, svn, svd,
              blk_lo, blk_hi, MASKED: tl.constexpr, CLEAN: tl.constexpr,
              HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, DOT_PREC: tl.constexpr,
              DOT_F32: tl.constexpr, MODS: tl.constexpr, BLOCK_N: tl.constexpr):  # fmt: skip
    """dQ (i d) of one query block summed over key blocks [blk_lo, blk_hi). On masked tiles
    P is zeroed where masked, and with CLEAN (the repair launch) dS too and the keys' NaN/inf,
    so that masked NaN/inf in K or V cannot reach dQ; without it they give NaN (0·NaN), which
    the repair launch finds and recomputes."""
    for blk in range(blk_lo, blk_hi):
        offs_n = blk * BLOCK_N + tl.arange(0, BLOCK_N)
        k, v = _key_block(K, V, b, hk, offs_n, offs_d, Sk, D, skb, skh, skn, skd,
                          svb, svh, svn, svd, DOT_F32)  # fmt: skip
        p, grad = _probs(q, tl.trans(k), lse2, qk_scale, offs_m, offs_n, delta, cap1, cap2,
                         slope, MODS, DOT_PREC)  # (i j)  # fmt: skip
        if MASKED:
            keep = _keep(offs_m, offs_n, Sq, Sk, delta, left, right, HAS_LEFT, HAS_RIGHT,
                         True)  # fmt: skip
            p = tl.where(keep, p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)  # (i j) fp32
        ds = p * (dp - dlt[:, None])
        if MODS & 3:  # through the caps
            ds = ds * grad
        if MASKED and CLEAN:  # masked NaN/inf in v (dp) or k (ds·k) must not leak: 0·NaN
            # stays 0; a kept bad key still gives NaN through its ds
            ds = tl.where(keep, ds, 0.0)
            k = tl.where(_nonfinite(k), 0.0, k)
        dq = tl.dot(_as_operand(ds, k, DOT_F32), k, dq, input_precision=DOT_PREC)  # (i d)
    return dq


@triton.jit
def _dq_kernel(Q, K, V, DO, LSE, DLT, DQ,
               sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
               sdb, sdh, sdm, sdd, sgb, sgh, sgm, sgd,
               Hq, GS, Sq, Sk, D, left, right, qk_scale, sm_scale, GATE,
               cap1, cap2, SLOPES, ssb,
               HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, DOT_PREC: tl.constexpr,
               DOT_F32: tl.constexpr, HAS_GATE: tl.constexpr, MODS: tl.constexpr,
               REPAIR: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               BLOCK_D: tl.constexpr):  # fmt: skip
    """Grid (cdiv(Sq, BLOCK_M), B·Hq). DQ (b h i d) in any float dtype (rounded once);
    GATE as `_dkdv_kernel`'s. REPAIR: DQ holds this kernel's plain answer; a program whose
    tile of it is all finite returns at once, one with NaN/inf recomputes its rows with the
    cleaning visits and stores those rows."""
    if HAS_GATE:
        if tl.load(GATE) == 0:
            return
    pid_m = tl.program_id(0)
    _bh, b, h, hk, qs, qe, offs_m, offs_d = _query_block(pid_m, Hq, GS, Sq, BLOCK_M, BLOCK_D)
    qm = (offs_m < Sq)[:, None] & (offs_d < D)[None, :]
    dq_ptrs = DQ + b * sgb + h * sgh + offs_m[:, None] * sgm + offs_d[None, :] * sgd
    rows = offs_m < Sq  # the rows stored
    if REPAIR:
        got = tl.load(dq_ptrs, mask=qm, other=0.0)
        rows = rows & (tl.reduce(_nonfinite(got).to(tl.int32), 1, _MAX) > 0)
        if tl.reduce(rows.to(tl.int32), 0, _MAX) == 0:
            return
    delta = Sk - Sq
    q, do, lse2, dlt = _query_rows(Q, DO, LSE, DLT, b, h, Hq, Sq, offs_m, offs_d, D,
                                   sqb, sqh, sqm, sqd, sdb, sdh, sdm, sdd, DOT_F32)  # fmt: skip
    dq = tl.full([BLOCK_M, BLOCK_D], 0.0, tl.float32)
    slope = _slope(SLOPES, b, h, ssb, MODS)
    lo, mid_lo, mid_hi, hi = _block_range(qs, qe, Sk, delta, left, right, HAS_LEFT, HAS_RIGHT,
                                          BLOCK_N)  # fmt: skip
    dq = _dq_visit(dq, q, do, lse2, dlt, offs_m, Sq, delta, left, right, qk_scale, cap1,
                   cap2, slope, K, V, b, hk, offs_d, Sk, D, skb, skh, skn, skd, svb, svh, svn,
                   svd, mid_lo, mid_hi, False, REPAIR, HAS_LEFT, HAS_RIGHT, DOT_PREC, DOT_F32,
                   MODS, BLOCK_N)  # fmt: skip
    dq = _dq_visit(dq, q, do, lse2, dlt, offs_m, Sq, delta, left, right, qk_scale, cap1,
                   cap2, slope, K, V, b, hk, offs_d, Sk, D, skb, skh, skn, skd, svb, svh, svn,
                   svd, lo, mid_lo, True, REPAIR, HAS_LEFT, HAS_RIGHT, DOT_PREC, DOT_F32,
                   MODS, BLOCK_N)  # fmt: skip
    dq = _dq_visit(dq, q, do, lse2, dlt, offs_m, Sq, delta, left, right, qk_scale, cap1,
                   cap2, slope, K, V, b, hk, offs_d, Sk, D, skb, skh, skn, skd, svb, svh, svn,
                   svd, mid_hi, hi, True, REPAIR, HAS_LEFT, HAS_RIGHT, DOT_PREC, DOT_F32,
                   MODS, BLOCK_N)  # fmt: skip
    dq = _round(dq * sm_scale, DQ.dtype.element_ty, DOT_F32 and DQ.dtype.element_ty == tl.bfloat16)
    tl.store(dq_ptrs, dq, mask=rows[:, None] & (offs_d < D)[None, :])


@triton.jit
def _delta_kernel(O, DO, DLSE, DLT, sob, soh, som, sod, sdb, sdh, sdm, sdd, Hq, Sq, Dv,
                  HAS_DLSE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):  # fmt: skip
    """Grid (cdiv(Sq, BLOCK_M), B·Hq). DLT (b h i) fp32 = Σ_e dO·O (fp32 products and sum)
    − dLSE (fp32, (b h i) contiguous, when HAS_DLSE): Δ in one read of O and dO."""
    pid_bh = tl.program_id(1)
    b = pid_bh // Hq
    h = pid_bh % Hq
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_e = tl.arange(0, BLOCK_D)
    m_ok = offs_m < Sq
    ok = m_ok[:, None] & (offs_e < Dv)[None, :]
    o = tl.load(O + b * sob + h * soh + offs_m[:, None] * som + offs_e[None, :] * sod,
                mask=ok, other=0.0).to(tl.float32)  # fmt: skip
    do = tl.load(DO + b * sdb + h * sdh + offs_m[:, None] * sdm + offs_e[None, :] * sdd,
                 mask=ok, other=0.0).to(tl.float32)  # fmt: skip
    dlt = tl.reduce(o * do, 1, _SUM)
    row = pid_bh * Sq + offs_m
    if HAS_DLSE:
        dlt = dlt - tl.load(DLSE + row, mask=m_ok, other=0.0)
    tl.store(DLT + row, dlt, mask=m_ok)


def default_configs(spec: Spec, dtype: torch.dtype) -> tuple[Config, Config]:
    """The (dK/dV pass, dQ pass) launches. fp16/bf16 with D ≤ 128: 64 × 64 blocks, 4 warps,
    2 stages for both, the fastest of six for dK/dV and within 1 % of the fastest for dQ on an
    H200 in bf16 (benchmarks/triton_tune.py, RESULTS.md). The others are chosen by what ptxas
    for sm_90 reports (`benchmarks/triton_build.py`), not yet timed:
    - fp16/bf16 past D = 128: 32 × 32, 8 warps (64 × 64, 4 warps spilled 4.5 KB per thread in
      dK/dV at D = 256 and needed 206 KB of shared memory, past an A100's 163 KB);
    - fp32, whose IEEE dots are FMA loops holding their tiles in registers (64 × 64, 4 warps
      spilled 14 KB per thread in dK/dV at D = 64, 200 KB at D = 128): dK/dV at 16 × 32 keys,
      8 warps, 1 stage for D ≤ 64 (no spill), else 16 × 16, 8 warps (0.4 KB at D = 128,
      2 KB at D = 256); dQ at 32 × 64, 8 warps for D ≤ 128, else 16 × 32 (no spill)."""
    if dtype == torch.float32:
        dkdv = _FP32_DKDV_64 if spec.D <= 64 else _FP32_DKDV
        return dkdv, _FP32_DQ if spec.D <= 128 else _FP32_DQ_WIDE
    return (_HALF, _HALF) if spec.D <= 128 else (_HALF_WIDE, _HALF_WIDE)


_HALF, _HALF_WIDE = Config(), Config(32, 32, 8, 2)
_FP32_DKDV_64, _FP32_DKDV = Config(16, 32, 8, 1), Config(16, 16, 8, 2)
_FP32_DQ, _FP32_DQ_WIDE = Config(32, 64, 8, 2), Config(16, 32, 8, 2)


def _launch(config: Config) -> dict:
    return dict(BLOCK_M=config.block_m, BLOCK_N=config.block_n, num_warps=config.num_warps,
                num_stages=config.num_stages)  # fmt: skip


def backward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    spec: Spec,
    out: Tensor,
    lse: Tensor,
    dout: Tensor | None,
    dlse: Tensor | None,
    config: Config | None = None,
    interpreted: bool = False,
    dq_config: Config | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) in the inputs' dtypes for the triton forward's (out, lse); see the module
    docstring. No host sync: a Δ kernel, then the two passes.
    `config` launches the dK/dV pass, `dq_config` (default: `config`) the dQ pass; both None:
    `default_configs`."""
    s = spec
    if s.Sq == 0 or s.Sk == 0 or s.B * s.Hq == 0 or (dout is None and dlse is None):
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    dout = torch.zeros_like(out) if dout is None else dout.contiguous()
    dlt = torch.empty(s.B, s.Hq, s.Sq, dtype=torch.float32, device=q.device)
    block_d = head_dim_class(s.Dv)
    dlse_ = None if dlse is None else dlse.float().contiguous()
    _delta_kernel[(cdiv(s.Sq, 64), s.B * s.Hq)](
        out, dout, dlt if dlse_ is None else dlse_, dlt, *out.stride(), *dout.stride(),
        s.Hq, s.Sq, s.Dv, HAS_DLSE=dlse_ is not None, BLOCK_M=64, BLOCK_D=block_d,
    )  # fmt: skip
    grads = (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v))
    passes(q, k, v, s, lse.contiguous(), dlt, dout, grads, config, interpreted, dq_config)
    return grads


def passes(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    spec: Spec,
    lse: Tensor,
    dlt: Tensor,
    dout: Tensor,
    grads: tuple[Tensor | None, Tensor | None, Tensor | None],
    config: Config | None = None,
    interpreted: bool = False,
    dq_config: Config | None = None,
    gate: Tensor | None = None,
) -> None:
    """The dK/dV and dQ passes, written into `grads` (dq, dk, dv: tensors of q's, k's, v's
    shapes, any float dtype and strides; each value rounded once). A None dq skips its pass;
    a None dk or dv is computed into scratch. `lse`, `dlt` (b h i) fp32 contiguous.
    `gate` (int32 (1,) on the device): when it holds 0 every program returns at once, and
    `grads` keep what they held (no host sync decides it). Configs as `backward`'s."""
    s = spec
    if config is None:
        config, dq_default = default_configs(s, q.dtype)
        dq_config = dq_config or dq_default
    dq_config = dq_config or config
    dq, dk, dv = grads
    dk = torch.empty_like(k) if dk is None else dk
    dv = torch.empty_like(v) if dv is None else dv
    block_d = head_dim_class(s.D)
    mods, qk_scale, mod_tail = mod_args(s, dlt)
    common = dict(
        HAS_LEFT=s.left is not None, HAS_RIGHT=s.right is not None,
        DOT_PREC="ieee" if q.dtype == torch.float32 else "tf32",
        DOT_F32=interpreted and q.dtype == torch.bfloat16, HAS_GATE=gate is not None,
        MODS=mods, BLOCK_D=block_d,
    )  # fmt: skip
    band = (s.left or 0, s.right or 0, qk_scale, s.scale, dlt if gate is None else gate,
            *mod_tail)  # fmt: skip
    _dkdv_kernel[(cdiv(s.Sk, config.block_n), s.B * s.Hk)](
        q, k, v, dout, lse, dlt, dk, dv,
        *q.stride(), *k.stride(), *v.stride(), *dout.stride(), *dk.stride(), *dv.stride(),
        s.Hq, s.Hk, s.G, s.Sq, s.Sk, s.D, *band, **common, **_launch(config),
    )  # fmt: skip
    if dq is None:
        return
    for repair in (False, True):  # plain, then rows that came back NaN/inf again, cleaning
        _dq_kernel[(cdiv(s.Sq, dq_config.block_m), s.B * s.Hq)](
            q, k, v, dout, lse, dlt, dq,
            *q.stride(), *k.stride(), *v.stride(), *dout.stride(), *dq.stride(),
            s.Hq, s.G, s.Sq, s.Sk, s.D, *band, **common, REPAIR=repair, **_launch(dq_config),
        )  # fmt: skip
