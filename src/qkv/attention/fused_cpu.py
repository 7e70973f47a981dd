"""The fused CPU backend: one compiled loop per (batch, head, query block), FlashAttention-2
style — score, softcap, ALiBi, mask, online softmax and the value product of each 64×64 tile
in registers and L1, never a pass over memory per op as in `tiled`.

    for each (b, h, query block i)                     # workers take tasks w, w+W, w+2W, …
        m, l, acc = −inf, 0, 0
        for each key block j listed by the block mask   # empty blocks are not listed
            s = q_i·k_jᵀ (fp32) → softcap → score mod → −inf where a partial block's mask is 0
            m' = max(m, rowmax s);  p = 2^(s − m');  l = l·2^(m − m') + Σp
            acc = acc·2^(m − m') + p·v_j
        out = acc / l, lse = (m + log2 l)·ln 2          # empty row: 0 and −inf

What runs inside the loop: the band (causal / window, bottom-right aligned), any `mask_mod`
(evaluated once per (query block, key block) into `blockmask.BlockMask`, cached for the ready
mods, so a model's layers build it once), `softcap=`, and the ready score mods `softcap(c)` and
`alibi(slopes)`. Anything else — an arbitrary Python `score_mod`, a `mask=` tensor, dropout,
fp64 — is not dropped: `supported` names it and the call runs on `tiled`.

Numbers: fp16/bf16 q, k, v are widened to fp32 once (exact), scores, softmax, P·V and the
LSE are fp32, the output is rounded to the input dtype. exp2 is a degree-7 polynomial with
exponent bits set directly (max relative error ~2e-7 on [−126, 0], 0 below): libm's exp2f
does not vectorise and cost 20× more per tile. K/V holding NaN/inf: a masked score is
overwritten with −inf whatever its value, and the value product skips p = 0 terms when V is
not finite, so a masked NaN never reaches the output.

The two products of a tile, q·kᵀ (64×D by D×64) and p·v (64×64 by 64×Dv), are one BLAS
sgemm each (`np.dot` inside numba calls scipy's OpenBLAS): measured 1.9× the hand-unrolled
loops at 1 thread and 1.7× at 2 (window 256; the loops reached ~1/3 of the FMA peak, LLVM kept
the score rows in memory). Everything between them stays in the compiled loop.

Backward: `fused_cpu_backward` (FlashAttention-2's dQ and dK/dV passes over the same block
mask, sgemm tiles, from the fp32 O and the LSE saved here); K or V holding NaN/inf takes
`tiled.backward`. Why numba: it is already a dependency, compiles silently and
caches on disk (`qkv._jit`); a C++ extension would need a compiler at install time.
Threads: each task is computed by one worker in a fixed order, so the result is bitwise the
same for any thread count.
"""

from __future__ import annotations

import contextlib
import math
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .._jit import Kernels
from . import blockmask, scoring
from .mods import fused_score_mod
from .reference import double_backward_vjp
from .spec import Spec
from .tiled import backward, sink_grad, tiled

BQ = 64  # query rows per task
BK = 64  # keys per block
LOG2E = math.log2(math.e)
LN2 = math.log(2.0)


def make_exp2(flags: dict):
    """The kernels' exp2: 2^x in float32, vectorisable (compiled inline where it is called)."""
    import numpy as np
    from llvmlite import ir
    from numba import njit, types
    from numba.extending import intrinsic

    @intrinsic
    def as_f32(typingctx, bits):  # the float32 whose bits are the int32 `bits`
        def codegen(context, builder, signature, args):
            return builder.bitcast(args[0], ir.FloatType())

        return types.float32(types.int32), codegen

    @njit(inline="always", **flags)
    def exp2(x):
        """2^x in float32, vectorisable: 2^round(x) from exponent bits × a Taylor polynomial
        of 2^f on [−½, ½] (degree 7: relative error < 2e-7). 0 below −126 (−inf included),
        NaN stays NaN."""
        lo = np.float32(-126.0)
        xc = min(x, np.float32(126.0)) if x >= lo else lo
        n = np.floor(xc + np.float32(0.5))
        f = xc - n
        p = np.float32(1.5252733804059840e-5)
        p = p * f + np.float32(1.5403530393381609e-4)
        p = p * f + np.float32(1.3333558146428443e-3)
        p = p * f + np.float32(9.6181291076284772e-3)
        p = p * f + np.float32(5.5504108664821580e-2)
        p = p * f + np.float32(2.4022650695910071e-1)
        p = p * f + np.float32(6.9314718055994531e-1)
        p = p * f + np.float32(1.0)
        r = p * as_f32(np.int32((np.int32(n) + 127) << 23))
        return r if x >= lo else (np.float32(0.0) if x < lo else x)

    return exp2


def _build(flags: dict) -> dict[str, tuple]:
    import numba
    from numba import njit

    jit = njit(**flags)
    exp2 = make_exp2(flags)

    @jit
    def forward(
        q, kt, v, out, lse, ptr, kblk, part, masks, Bm, Hm, delta, Sk,
        cap1, cap2, slopes, alibi, v_finite, worker, workers,
    ):  # fmt: skip
        """q (b h i d) scaled, kt (b hk blk d j) (each key block transposed, contiguous: a
        plain (d j) transpose puts K's rows Sk·4 bytes apart and thrashes L1), v (b hk j e),
        out (b h i e), lse (b h i): rows and keys padded to whole blocks. Tasks worker,
        worker + workers, … of B·Hq·NQ."""
        B, Hq, Sqp = q.shape[:3]
        Hk, Dv = kt.shape[1], v.shape[3]
        G = Hq // Hk
        NQ = Sqp // BQ
        mods = cap1 > 0 or cap2 > 0 or alibi
        ninf = np.float32(-np.inf)
        log2e = np.float32(LOG2E)
        S = np.empty((BQ, BK), np.float32)  # (i j) scores, then p
        acc = np.empty((BQ, Dv), np.float32)  # (i e)
        pv = np.empty((BQ, Dv), np.float32)  # (i e) one block's p·v
        m = np.empty(BQ, np.float32)
        l = np.empty(BQ, np.float32)
        pm = np.empty(16, np.float32)
        for t in range(worker, B * Hq * NQ, workers):
            qb = t % NQ
            h = (t // NQ) % Hq
            b = t // (NQ * Hq)
            hk = h // G
            qs = qb * BQ
            qh, vh = q[b, h], v[b, hk]  # (i d), (j e) views
            row = ((b if Bm > 1 else 0) * Hm + (h if Hm > 1 else 0)) * NQ + qb
            slope = slopes[b if slopes.shape[0] > 1 else 0, h]
            for r in range(BQ):
                m[r] = ninf
                l[r] = 0
                for e in range(Dv):
                    acc[r, e] = 0
            for idx in range(ptr[row], ptr[row + 1]):
                ks = kblk[idx] * BK
                pi = part[idx]
                kth = kt[b, hk, kblk[idx]]  # (d j) of this block, contiguous
                np.dot(qh[qs : qs + BQ], kth, S)  # s = q·kᵀ (i j): one sgemm
                if mods:  # natural scores: softcap, score mod, then base 2
                    for r in range(BQ):
                        qpos = qs + r + delta
                        for c in range(BK):
                            s = S[r, c]
                            if cap1 > 0:
                                s = cap1 * np.tanh(s / cap1)
                            if cap2 > 0:
                                s = cap2 * np.tanh(s / cap2)
                            if alibi:
                                s = s - slope * np.float32(abs(qpos - (ks + c)))
                            S[r, c] = s * log2e
                if pi >= 0:  # a partial block: its mask, whatever the score (NaN included)
                    mk = masks[pi]
                    for r in range(BQ):
                        for c in range(BK):
                            if mk[r, c] == 0:
                                S[r, c] = ninf
                # online softmax, row by row
                for r in range(BQ):
                    for u in range(16):
                        pm[u] = m[r]
                    for c0 in range(0, BK, 16):
                        for u in range(16):
                            x = S[r, c0 + u]
                            pm[u] = x if x > pm[u] else pm[u]
                    mx = pm[0]
                    for u in range(1, 16):
                        mx = pm[u] if pm[u] > mx else mx
                    mu = mx if mx != ninf else np.float32(0.0)  # an empty row so far: p = 0
                    alpha = exp2(m[r] - mu)
                    tot = np.float32(0.0)
                    for c in range(BK):
                        p = exp2(S[r, c] - mu)
                        S[r, c] = p
                        tot += p
                    l[r] = l[r] * alpha + tot
                    m[r] = mx
                    for e in range(Dv):
                        acc[r, e] *= alpha
                if v_finite:  # acc += p·v: one sgemm into pv, then added
                    np.dot(S, vh[ks : ks + BK], pv)
                    for r in range(BQ):
                        for e in range(Dv):
                            acc[r, e] += pv[r, e]
                else:  # NaN/inf in V: a term with p = 0 (masked) must not add 0·NaN
                    for r in range(BQ):
                        for c in range(BK):
                            p = S[r, c]
                            if p != 0:
                                for e in range(Dv):
                                    acc[r, e] += p * vh[ks + c, e]
            for r in range(BQ):
                empty = l[r] == 0
                inv = np.float32(0.0) if empty else np.float32(1.0) / l[r]
                for e in range(Dv):
                    out[b, h, qs + r, e] = acc[r, e] * inv
                lse[b, h, qs + r] = ninf if empty else (m[r] + np.log2(l[r])) * np.float32(LN2)

    f32, i64, i32 = numba.float32, numba.int64, numba.int32
    a5, a4, a3 = f32[:, :, :, :, ::1], f32[:, :, :, ::1], f32[:, :, ::1]
    sig = (
        a4, a5, a4, a4, a3, i64[::1], i32[::1], i32[::1], numba.uint8[:, :, ::1],
        i64, i64, i64, i64, f32, f32, f32[:, ::1], numba.boolean, numba.boolean, i64, i64,
    )  # fmt: skip
    return {"forward": (forward, sig)}


KERNELS = Kernels(_build, wide=False)


def _score_mod_params(spec: Spec) -> tuple[float, np.ndarray | None] | None:
    """`mods.fused_score_mod` with the slopes as a numpy array (1|B, Hq)."""
    params = fused_score_mod(spec, torch.device("cpu"))
    if params is None:
        return None
    cap2, slopes = params
    return cap2, None if slopes is None else slopes.numpy()


def supported(q: Tensor, spec: Spec) -> str | None:
    """Why the fused kernel cannot compute this call exactly (None: it can)."""
    if q.device.type != "cpu":
        return f"it runs on CPU, got {q.device}"
    if q.dtype == torch.float64:
        return "it computes in fp32; fp64 runs on tiled"
    if spec.mask is not None:
        return "a mask= tensor (use mask_mod)"
    if spec.dropout_p > 0:
        return "dropout"
    if _score_mod_params(spec) is None:
        return "a score_mod other than the ready softcap(c) and alibi(slopes)"
    return None


def _pad(x: Tensor, dim: int, n: int) -> Tensor:
    extra = n - x.shape[dim]
    if extra == 0:
        return x
    pad = [0, 0] * (x.dim() - 1 - dim) + [0, extra]
    return F.pad(x, pad)


def forward(
    q: Tensor, k: Tensor, v: Tensor, spec: Spec, v_finite: bool | None = None
) -> tuple[Tensor, Tensor]:
    """(out (b h i e) fp32, lse (b h i) fp32) from the fused kernel; no autograd. `v_finite`:
    whether V holds no NaN/inf, if the caller knows (else checked here)."""
    B, Hq, Sq, Sk, Dv = spec.B, spec.Hq, spec.Sq, spec.Sk, spec.Dv
    out = torch.zeros(B, Hq, Sq, Dv)
    lse = torch.full((B, Hq, Sq), float("-inf"))
    if Sq == 0 or Sk == 0:
        return out, lse
    bm = blockmask.block_mask(spec, BQ, BK)
    params = _score_mod_params(spec)
    assert params is not None  # checked by `supported`
    cap2, slopes = params
    mods = spec.softcap is not None or cap2 > 0 or slopes is not None
    unit = spec.scale * (1.0 if mods else LOG2E)  # base-2 logits unless mods need natural ones
    NQ, NK = bm.NQ, bm.NK
    with torch.no_grad():
        qp = _pad(q.to(torch.float32) * unit, 2, NQ * BQ).contiguous()
        kt = _pad(k.to(torch.float32), 2, NK * BK).unflatten(2, (NK, BK))
        kt = kt.transpose(-1, -2).contiguous()  # (b hk blk d j)
        vp = _pad(v.to(torch.float32), 2, NK * BK).contiguous()
        if v_finite is None:
            v_finite = scoring.all_finite(vp)
        outp = torch.empty(B, Hq, NQ * BQ, Dv)
        lsep = torch.empty(B, Hq, NQ * BQ)
    args = [t.numpy() for t in (qp, kt, vp, outp, lsep)]
    args += [bm.ptr, bm.kblk, bm.part, bm.masks, bm.Bm, bm.Hm, spec.delta, Sk]
    args += [np.float32(spec.softcap or 0.0), np.float32(cap2)]
    args += [slopes if slopes is not None else np.zeros((1, Hq), np.float32), slopes is not None]
    args += [v_finite]
    run_tasks(KERNELS["forward"], args, B * Hq * NQ)
    return outp[:, :, :Sq], lsep[:, :, :Sq]


def run_tasks(kernel, args: list, tasks: int) -> None:
    """`kernel(*args, worker, workers)` on min(torch threads, tasks) threads (numba releases
    the GIL; worker w takes tasks w, w + workers, …), with OpenBLAS held to one thread.
    Workers 1… run on `_pool`'s threads, worker 0 on the caller's."""
    workers = max(1, min(torch.get_num_threads(), tasks))
    with _one_blas_thread():
        if workers == 1:
            kernel(*args, 0, 1)
            return
        rest = [_pool(workers - 1).submit(kernel, *args, w, workers) for w in range(1, workers)]
        kernel(*args, 0, workers)
        for f in rest:
            f.result()


_POOL: list = []  # [(ThreadPoolExecutor, its thread count)]: a new pool per call started
# its threads anew


def _pool(n: int) -> ThreadPoolExecutor:
    """A pool of at least `n` threads, kept for the process: starting fresh threads on every
    call cost ~3 ms on a 2-core machine (a 128-token call took 4 ms against tiled's 1.1 ms)."""
    if not _POOL or _POOL[0][1] < n:
        if _POOL:
            _POOL.pop()[0].shutdown(wait=False)
        _POOL.append((ThreadPoolExecutor(max_workers=n, thread_name_prefix="qkv-fused"), n))
    return _POOL[0][0]


# a forked child (a DataLoader worker) inherits the pool but not its threads: start afresh
os.register_at_fork(after_in_child=_POOL.clear)


_BLAS: list = []  # [threadpoolctl.ThreadpoolController or None], made on first use


def _one_blas_thread():
    """OpenBLAS (the kernel's np.dot tiles) held to one thread while our workers run: its own
    threads on top of ours oversubscribe the cores, and on a busy machine a (4 heads, 2048, 256)
    window-512 call took 11–16 s instead of 0.1 s (OPENBLAS_NUM_THREADS=1: 0.09–0.14 s).
    threadpoolctl is a dependency; were it missing, nothing would change."""
    if not _BLAS:
        try:
            from threadpoolctl import ThreadpoolController

            _BLAS.append(ThreadpoolController())
        except ImportError:
            _BLAS.append(None)
    return (
        contextlib.nullcontext() if _BLAS[0] is None else _BLAS[0].limit(limits=1, user_api="blas")
    )


class _FusedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, sinks, spec: Spec):
        v_ok = scoring.all_finite(v)  # one pass over V serves the forward and the backward
        out, lse = forward(q, k, v, spec, v_finite=v_ok)
        if sinks is not None:
            out, lse = scoring.add_sinks(out, lse, sinks)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.spec = spec
        ctx.finite = any(ctx.needs_input_grad[:3]) and v_ok and scoring.all_finite(k)
        return out.to(q.dtype), lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: a backward that differentiates again
            grads = double_backward_vjp(
                q, k, v, ctx.spec, dout, dlse, ctx.needs_input_grad[:4], "fused"
            )
            return *grads, None
        if ctx.finite:
            from .fused_cpu_backward import backward as fused_backward

            dq, dk, dv = fused_backward(q, k, v, ctx.spec, out, lse, dout, dlse)
        else:  # NaN/inf in K or V: tiled keeps the masked ones out of every product
            dq, dk, dv = backward(q, k, v, ctx.spec, out, lse, dout, dlse)
        return dq, dk, dv, sink_grad(ctx, out, lse, dout, dlse), None


def fused(q: Tensor, k: Tensor, v: Tensor, spec: Spec) -> tuple[Tensor, Tensor]:
    """(out (b h i e), lse (b h i)) from the fused kernel, differentiable (the fused backward,
    exact from the saved LSE). A call it cannot compute exactly (`supported`)
    runs on `tiled` instead, never with a mod dropped."""
    if supported(q, spec) is not None:
        return tiled(q, k, v, spec)
    return _FusedAttention.apply(q, k, v, spec.sinks, spec)
