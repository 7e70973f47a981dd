"""The fused CPU backend's backward: FlashAttention-2's two passes over the forward's block mask,
each tile recomputed from q, k and the saved LSE, its products as BLAS sgemms (numba `np.dot`).

With Δ_i = Σ_e dO_ie·O_ie − dLSE_i (fp32, from the forward's fp32 O) and, per kept (i, j):

    s_ij = scale·q_i·k_j → softcap → score mods → logit ℓ_ij    (the forward's pipeline)
    P_ij = exp(ℓ_ij − LSE_i)          0 where masked, and in a row with LSE −inf
    dP_ij = dO_i·v_j                  dS_ij = P_ij (dP_ij − Δ_i) · ∂ℓ_ij/∂s_ij
    dV_j = Σ_i P_ij dO_i    dK_j = scale Σ_i dS_ij q_i    dQ_i = scale Σ_j dS_ij k_j

    for each (b, h, query block)        dQ: key blocks as the forward lists them
    for each (b, kv head, key block)    dK, dV: the query heads of its GQA group × the query
                                        blocks that list this key block (the CSR transposed)

Each task writes its own rows, so no atomics, and the result does not depend on the thread
count. ∂ℓ/∂s is 1 but for softcap (1 − tanh², for the argument and the ready `softcap` mod
both); ALiBi adds a constant. fp32 throughout; gradients are rounded to the inputs' dtypes.
K or V holding NaN/inf takes `tiled.backward` instead (0·NaN in a product would leak a masked
one), as do requests the forward kernel does not compute.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .._jit import Kernels
from . import blockmask
from .fused_cpu import BK, BQ, LOG2E, _pad, _score_mod_params, make_exp2, run_tasks
from .spec import Spec


def _build(flags: dict) -> dict[str, tuple]:
    import numba
    from numba import njit

    jit = njit(**flags)
    inline = njit(inline="always", **flags)
    exp2 = make_exp2(flags)

    @inline
    def tile(S, Dc, qblk, kth, lse2, pi, masks, qpos0, ks, mods, cap1, cap2, slope, alibi):
        """S ← P (i j) of one tile, Dc ← ∂ℓ/∂s when `mods`; qblk (i d) pre-scaled, kth (d j),
        lse2 (i) the rows' LSE in base 2 (+inf for a row with no key)."""
        np.dot(qblk, kth, S)
        log2e = np.float32(LOG2E)
        for r in range(BQ):
            for c in range(BK):
                s = S[r, c]
                if mods:  # natural scores here: softcap, its mod, ALiBi, then base 2
                    d = np.float32(1.0)
                    if cap1 > 0:
                        t = np.tanh(s / cap1)
                        s = cap1 * t
                        d = d * (np.float32(1.0) - t * t)
                    if cap2 > 0:
                        t = np.tanh(s / cap2)
                        s = cap2 * t
                        d = d * (np.float32(1.0) - t * t)
                    if alibi:
                        s = s - slope * np.float32(abs(qpos0 + r - (ks + c)))
                    Dc[r, c] = d
                    s = s * log2e
                S[r, c] = exp2(s - lse2[r])
        if pi >= 0:
            mk = masks[pi]
            for r in range(BQ):
                for c in range(BK):
                    if mk[r, c] == 0:
                        S[r, c] = 0

    @inline
    def dscores(S, dP, Dc, dlt, mods):
        """S ← dS = P (dP − Δ) (· ∂ℓ/∂s)."""
        for r in range(BQ):
            for c in range(BK):
                ds = S[r, c] * (dP[r, c] - dlt[r])
                S[r, c] = ds * Dc[r, c] if mods else ds

    @jit
    def dq(qp, kt, kp, vt, do, lse2, dlt, dqo, ptr, kblk, part, masks, Bm, Hm, delta,
           cap1, cap2, slopes, alibi, worker, workers):  # fmt: skip
        """dQ·(1/scale) (b h i d) for tasks worker, worker + workers, … of B·Hq·NQ."""
        B, Hq, Sqp = qp.shape[:3]
        Hk, D = kt.shape[1], kp.shape[3]
        G = Hq // Hk
        NQ = Sqp // BQ
        mods = cap1 > 0 or cap2 > 0 or alibi
        S = np.empty((BQ, BK), np.float32)
        Dc = np.empty((BQ, BK), np.float32)
        dP = np.empty((BQ, BK), np.float32)
        acc = np.empty((BQ, D), np.float32)
        tmp = np.empty((BQ, D), np.float32)
        for t in range(worker, B * Hq * NQ, workers):
            qb = t % NQ
            h = (t // NQ) % Hq
            b = t // (NQ * Hq)
            hk = h // G
            qs = qb * BQ
            row = ((b if Bm > 1 else 0) * Hm + (h if Hm > 1 else 0)) * NQ + qb
            slope = slopes[b if slopes.shape[0] > 1 else 0, h]
            acc[:] = 0
            for idx in range(ptr[row], ptr[row + 1]):
                kb = kblk[idx]
                ks = kb * BK
                tile(S, Dc, qp[b, h, qs : qs + BQ], kt[b, hk, kb], lse2[b, h, qs : qs + BQ],
                     part[idx], masks, qs + delta, ks, mods, cap1, cap2, slope, alibi)  # fmt: skip
                np.dot(do[b, h, qs : qs + BQ], vt[b, hk, kb], dP)  # (i e)·(e j)
                dscores(S, dP, Dc, dlt[b, h, qs : qs + BQ], mods)
                np.dot(S, kp[b, hk, ks : ks + BK], tmp)  # (i j)·(j d)
                acc += tmp
            dqo[b, h, qs : qs + BQ] = acc

    @jit
    def dkdv(qp, kt, vt, do, lse2, dlt, dko, dvo, tptr, tqblk, tpart, masks, Bm, Hm, delta,
             cap1, cap2, slopes, alibi, worker, workers):  # fmt: skip
        """dK·(unit/scale) and dV (b g j ·) for tasks worker, worker + workers, … of B·Hk·NK."""
        B, Hq = qp.shape[:2]
        Hk, NK, D = kt.shape[1], kt.shape[2], kt.shape[3]
        Dv = vt.shape[3]
        G = Hq // Hk
        mods = cap1 > 0 or cap2 > 0 or alibi
        S = np.empty((BQ, BK), np.float32)
        Dc = np.empty((BQ, BK), np.float32)
        dP = np.empty((BQ, BK), np.float32)
        dka = np.empty((BK, D), np.float32)
        dva = np.empty((BK, Dv), np.float32)
        tk = np.empty((BK, D), np.float32)
        tv = np.empty((BK, Dv), np.float32)
        for t in range(worker, B * Hk * NK, workers):
            kb = t % NK
            hk = (t // NK) % Hk
            b = t // (NK * Hk)
            ks = kb * BK
            dka[:] = 0
            dva[:] = 0
            for g in range(G):
                h = hk * G + g
                row = ((b if Bm > 1 else 0) * Hm + (h if Hm > 1 else 0)) * NK + kb
                slope = slopes[b if slopes.shape[0] > 1 else 0, h]
                for idx in range(tptr[row], tptr[row + 1]):
                    qs = tqblk[idx] * BQ
                    tile(S, Dc, qp[b, h, qs : qs + BQ], kt[b, hk, kb], lse2[b, h, qs : qs + BQ],
                         tpart[idx], masks, qs + delta, ks, mods, cap1, cap2, slope, alibi)  # fmt: skip
                    np.dot(S.T, do[b, h, qs : qs + BQ], tv)  # (j i)·(i e)
                    dva += tv
                    np.dot(do[b, h, qs : qs + BQ], vt[b, hk, kb], dP)
                    dscores(S, dP, Dc, dlt[b, h, qs : qs + BQ], mods)
                    np.dot(S.T, qp[b, h, qs : qs + BQ], tk)  # (j i)·(i d)
                    dka += tk
            dko[b, hk, ks : ks + BK] = dka
            dvo[b, hk, ks : ks + BK] = dva

    f32, i64, i32 = numba.float32, numba.int64, numba.int32
    a5, a4, a3 = f32[:, :, :, :, ::1], f32[:, :, :, ::1], f32[:, :, ::1]
    tail = (numba.uint8[:, :, ::1], i64, i64, i64, f32, f32, f32[:, ::1], numba.boolean, i64, i64)
    sig_dq = (a4, a5, a4, a5, a4, a3, a3, a4, i64[::1], i32[::1], i32[::1], *tail)
    sig_dkdv = (a4, a5, a5, a4, a3, a3, a4, a4, i64[::1], i32[::1], i32[::1], *tail)
    return {"dq": (dq, sig_dq), "dkdv": (dkdv, sig_dkdv)}


KERNELS = Kernels(_build, wide=False)


def transposed(bm: blockmask.BlockMask) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The block mask by key block: row (bm·Hm + hm)·NK + kb lists the query blocks (ascending)
    whose row lists kb, with the same `part` entries: (tptr, tqblk, tpart)."""
    R = bm.Bm * bm.Hm
    rows = np.repeat(np.arange(R * bm.NQ, dtype=np.int64), np.diff(bm.ptr))  # (nnz,)
    key = rows // bm.NQ * bm.NK + bm.kblk  # the transposed row of each entry
    order = np.argsort(key, kind="stable")  # ascending query block within a row
    tptr = np.zeros(R * bm.NK + 1, np.int64)
    np.cumsum(np.bincount(key, minlength=R * bm.NK), out=tptr[1:])
    return tptr, (rows[order] % bm.NQ).astype(np.int32), bm.part[order]


def backward(
    q: Tensor, k: Tensor, v: Tensor, spec: Spec, out: Tensor, lse: Tensor, dout, dlse
) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) in the inputs' dtypes for the fused forward's fp32 (out, lse); see the
    module docstring. K and V must be finite (the caller checks)."""
    s = spec
    B, Hq, Hk, Sq, Sk, D, Dv = s.B, s.Hq, s.Hk, s.Sq, s.Sk, s.D, s.Dv
    zeros = (torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v))
    if Sq == 0 or Sk == 0 or (dout is None and dlse is None):
        return zeros
    bm = blockmask.block_mask(spec, BQ, BK)
    cap2, slopes = _score_mod_params(spec)
    mods = spec.softcap is not None or cap2 > 0 or slopes is not None
    unit = spec.scale * (1.0 if mods else LOG2E)
    NQ, NK = bm.NQ, bm.NK
    with torch.no_grad():
        dout = torch.zeros_like(out) if dout is None else dout.to(torch.float32)
        dlt = (dout * out).sum(-1)  # (b h i) Δ = rowsum(dO∘O), O fp32
        if dlse is not None:
            dlt = dlt - dlse.to(torch.float32)
        lse2 = torch.where(lse == float("-inf"), float("inf"), lse * LOG2E)  # P = 0 there
        qp = _pad(q.to(torch.float32) * unit, 2, NQ * BQ).contiguous()
        kf = _pad(k.to(torch.float32), 2, NK * BK)
        vf = _pad(v.to(torch.float32), 2, NK * BK)
        kt = kf.unflatten(2, (NK, BK)).transpose(-1, -2).contiguous()  # (b g blk d j)
        vt = vf.unflatten(2, (NK, BK)).transpose(-1, -2).contiguous()  # (b g blk e j)
        dop = _pad(dout, 2, NQ * BQ).contiguous()
        lse2 = F.pad(lse2, (0, NQ * BQ - Sq), value=float("inf")).contiguous()
        dlt = F.pad(dlt, (0, NQ * BQ - Sq)).contiguous()
        dq = torch.empty(B, Hq, NQ * BQ, D)
        dk = torch.empty(B, Hk, NK * BK, D)
        dv = torch.empty(B, Hk, NK * BK, Dv)
    tptr, tqblk, tpart = transposed(bm)
    tail = [bm.masks, bm.Bm, bm.Hm, spec.delta, np.float32(spec.softcap or 0.0), np.float32(cap2)]
    tail += [slopes if slopes is not None else np.zeros((1, Hq), np.float32), slopes is not None]
    n = lambda t: t.numpy()  # noqa: E731
    jobs = [
        (KERNELS["dq"], [n(qp), n(kt), n(kf.contiguous()), n(vt), n(dop), n(lse2), n(dlt), n(dq),
                         bm.ptr, bm.kblk, bm.part, *tail], B * Hq * NQ),
        (KERNELS["dkdv"], [n(qp), n(kt), n(vt), n(dop), n(lse2), n(dlt), n(dk), n(dv),
                           tptr, tqblk, tpart, *tail], B * Hk * NK),
    ]  # fmt: skip
    for kernel, args, tasks in jobs:
        run_tasks(kernel, args, tasks)
    dq = dq[:, :, :Sq] * spec.scale
    dk = dk[:, :, :Sk] * (spec.scale / unit)
    return dq.to(q.dtype), dk.to(k.dtype), dv[:, :, :Sk].to(v.dtype)
