"""The tiled backend: exact attention by online softmax over key blocks, O(N) memory.

For each block of query rows, keys are visited in blocks; a running max `m`, running sum `l`
and accumulator `acc` are rescaled as each block arrives (Milakov & Gimelshein 2018; Dao et al.
2022). Only the keys the band (causal/window) can keep are visited, and a block that a mask
empties is skipped. The backward pass recomputes each tile from q, k and the saved LSE, so no
(i j) matrix is ever stored; it is a custom autograd Function.

GQA without copying K/V: the g query heads that share kv head h are laid out as rows of one
matrix, q (b, hk, g, i, d) → (b·hk, g·i, d), so `q_blk @ kᵀ` serves the whole group and dK/dV
sum over the group inside the matmul. Pure PyTorch: runs on any device torch does.

Fewer passes over each tile (fp32/fp64). Once a row has a reference max m, later tiles need no
max: the offset rides inside the matmul as one extra column, [q·scale, −m]·[k, 1] = s − m, and
the row sum rides in the second, p·[v, 1] = [p·v, Σp]. A tile is then three passes: matmul, exp,
matmul. The reference max need not be the true max (any common offset cancels in acc / l);
should a later tile exceed it (its row sum Σp > 7.4·j, i.e. a score may be more than ~log(j)+2
above m, where exp's argument would start to lose digits), the tile is redone with a new max,
exactly as plain online softmax would. The backward uses the same trick: [q·scale, −lse]·[k, 1]
gives s − lse, and [dO, −Δ]·[v, 1] gives dP − Δ.

Base 2 inside. Tiles hold scores × log2(e) and use exp2: PyTorch's CPU `exp` falls off its
vector path for arguments below about −87 (−inf of a masked key included) and runs 20–150×
slower there, while `exp2` does not. log2(e) folds into the q scale for free; m and l are kept
in base 2 and the LSE is returned in natural log. Mods and float biases act on natural scores.

Sync-free loops off the CPU. On a GPU the host only queues kernels: any `bool(tensor)` inside a
tile loop waits for the device to drain, and each op costs ~5–10 µs of Python and launch time
however small its tile. So on a non-CPU device (`sync_free`) the loops branch on nothing the
device computed: plain online softmax (no accept test, so no shifted-max fast mode), no skip of
a tile the masks empty (it adds exact zeros: p = exp2(−inf − m) = 0 and `safe_max` keeps m
finite), a plain window on bf16/fp16 takes the banded forward too, and tiles are large
(`default_blocks`). Index tensors and band masks are built once per call (`scoring.positions`).
The only syncs are the NaN/inf checks of K and V when a pass sets up (`_Tiles`).

Half precision. fp16/bf16 q, k, v are widened to fp32 once per call (exact; an O(N) copy), so
every tile runs the fp32 code above: scores q·k are summed in fp32 and never rounded to the input
dtype, and so are the softmax, P·V, the LSE and the backward's dP and dP − Δ (FlashAttention
keeps all of these in fp32 too, and rounds P to half before P·V, which is not done here). Only the
outputs and gradients are rounded to the input dtype. The price is fp32 matmuls where half ones
would round: see benchmarks/RESULTS.md for what it costs on a CPU.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn.functional as F
from torch import Tensor

from . import scoring
from .reference import double_backward_vjp, reference
from .spec import Spec

BLOCK_Q = 256
BLOCK_K = 512
GPU_TILE = 1 << 24  # scores per tile off the CPU: 64 MB of fp32, well past launch-bound sizes
LOG2E = math.log2(math.e)
LN2 = math.log(2.0)


def key_blocks(spec: Spec, qs: int, qe: int, block_k: int) -> list[tuple[int, int]]:
    start, stop = scoring.band_range(spec, qs, qe - 1)
    return [(j, min(j + block_k, stop)) for j in range(start, stop, block_k)]


def _dropout_keep(
    seed: int, qs: int, ks: int, shape: torch.Size, p: float, device: torch.device
) -> Tensor:
    """The dropout keep-mask of one tile, a pure function of (seed, tile): forward and backward
    regenerate the very same mask without storing it."""
    g = torch.Generator(device=device)
    g.manual_seed((seed * 1_000_003 + qs * 65_537 + ks) % (2**63))
    return torch.rand(shape, generator=g, device=device) >= p


# Test hook: None decides by device (sync-free loops on any non-CPU device); True/False forces
# the GPU-style (or CPU-style) loops on any device, so CPU tests can cover both.
SYNC_FREE: bool | None = None


def sync_free(device: torch.device) -> bool:
    """Whether tile loops must avoid host syncs and data-dependent branches (off the CPU)."""
    return device.type != "cpu" if SYNC_FREE is None else SYNC_FREE


def n_workers(n_blocks: int, device: torch.device) -> int:
    """How many workers `each_block` uses for n_blocks query blocks (1 = run inline)."""
    cpu = device.type == "cpu" and not sync_free(device)
    workers = min(torch.get_num_threads(), n_blocks) if cpu else 1
    return max(1, workers)


def each_block(fn: Callable[[int, int], None], starts: Iterable[int], device: torch.device) -> None:
    """Run fn(qs, worker) for every query block, worker in range(n_workers(len(starts))).

    On CPU with several threads, blocks go to single-threaded workers (coarse parallelism over
    query blocks, like FlashAttention's grid) instead of splitting every small op across
    threads: one fork/join per call rather than per op, which also keeps a loaded machine from
    stalling on each op's barrier. Worker w takes blocks w, w+W, w+2W, … — a fixed assignment,
    so per-worker partial sums (dK, dV) add up in the same order every run: deterministic.
    Intra-op threads are restored afterwards.
    """
    starts = list(starts)
    workers = n_workers(len(starts), device)
    if workers < 2:
        for qs in starts:
            fn(qs, 0)
        return
    grad = torch.is_grad_enabled()

    def run(w: int) -> None:
        with torch.set_grad_enabled(grad):
            for qs in starts[w::workers]:
                fn(qs, w)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            list(pool.map(run, range(workers)))
    finally:
        torch.set_num_threads(threads)


def _ones_column(x: Tensor) -> Tensor:  # (n r c) → (n r c+1) with a trailing column of ones
    return torch.cat([x, torch.ones_like(x[..., :1])], dim=-1)


class _Tiles:
    """Per-call state and tile arithmetic shared by forward and backward.

    Tensors are 3-D `(b·hk, rows, cols)` in the compute dtype (fp16/bf16 widened to fp32);
    `k3`/`v3` carry a trailing ones column when `fast`. `sync_free`: no host sync or
    data-dependent branch per tile (see the module docstring).
    """

    def __init__(
        self, q: Tensor, k: Tensor, v: Tensor, spec: Spec, seed: int, block_q: int, block_k: int
    ):
        self.spec, self.seed, self.block_q, self.block_k = spec, seed, block_q, block_k
        self.cdt = scoring.compute_dtype(q.dtype)
        q, k, v = scoring.widen(q), scoring.widen(k), scoring.widen(v)  # fp32 scores, P·V, dP
        self.q = q
        self.kbad = scoring.bad_keys(k, spec.G)
        self.vbad = None if scoring.all_finite(v) else ~torch.isfinite(v)
        k = scoring.finite(k) if self.kbad is not None else k
        v = scoring.finite(v) if self.vbad is not None else v
        self.sync_free = sync_free(q.device)
        self.pos = scoring.positions(spec, q.device)
        self.fast = spec.dropout_p == 0 and self.vbad is None and not self.sync_free
        self.base2 = not spec.has_mods and spec.bias is None  # raw scores already × log2(e)
        self.unit = spec.scale * (LOG2E if self.base2 else 1.0)
        self.qmul = self.unit if self.fast else 1.0  # what q_block multiplied q by
        n = spec.B * spec.Hk
        k3, v3 = k.reshape(n, spec.Sk, spec.D), v.reshape(n, spec.Sk, spec.Dv)
        self.k3 = _ones_column(k3) if self.fast else k3.contiguous()
        self.v3 = _ones_column(v3) if self.fast else v3.contiguous()
        self.q5 = q.unflatten(1, (spec.Hk, spec.G))  # (b hk g i d)
        self.masked = spec.mask is not None or spec.mask_mod is not None or self.kbad is not None
        self.vbad3 = None if self.vbad is None else self.vbad.reshape(n, spec.Sk, spec.Dv)

    # ---- layout helpers -------------------------------------------------------------------
    def q_block(self, qs: int, qe: int) -> Tensor:
        """(b·hk, g·i, d+1): q × `qmul` with a free last column for the offset (`fast`);
        else (b·hk, g·i, d): q itself, contiguous (aligned rows for the matmuls)."""
        s = self.spec
        qb = self.q5[:, :, :, qs:qe].reshape(s.B * s.Hk, s.G * (qe - qs), s.D)
        if not self.fast:
            return qb.contiguous()
        out = torch.zeros(qb.shape[0], qb.shape[1], s.D + 1, dtype=qb.dtype, device=qb.device)
        out[..., : s.D] = qb * self.qmul
        return out

    def rows3(self, t: Tensor) -> Tensor:  # (b h i ...) → (b·hk, g·i, ...)
        return t.reshape(self.spec.B * self.spec.Hk, -1, *t.shape[3:])

    def heads4(self, t: Tensor) -> Tensor:  # (b·hk, g·i, j) → (b h i j)
        return t.view(self.spec.B, self.spec.Hq, -1, t.shape[-1])

    # ---- scores ---------------------------------------------------------------------------
    def raw(self, qe3: Tensor, ks: int, ke: int) -> Tensor:
        """Scores × `unit` (b h i j) in the compute dtype, from the q block's first d columns:
        base-2 logits when `base2`, natural scale·q·k otherwise."""
        s = self.spec
        t = qe3[..., : s.D] @ self.k3[:, ks:ke, : s.D].transpose(-1, -2)
        return self.heads4(t if self.fast else t.to(self.cdt) * self.unit)

    def block(self, qs: int, qe: int, ks: int, ke: int, device) -> scoring.Block:
        return scoring.block(self.spec, slice(qs, qe), ks, ke, device, self.pos)

    def pipeline(self, s: Tensor, blk: scoring.Block) -> tuple[Tensor, Tensor | None, bool]:
        """Masks/mods on raw tile scores: (base-2 logits, keep, empty). `empty` (the masks drop
        the whole tile, so the caller may skip it) costs a host sync: never set when sync-free."""
        if not (self.masked or self.spec.has_mods) and blk.band_full and self.spec.bias is None:
            return s, None, False
        logits, keep = scoring.scores(s, self.spec, blk, self.kbad, inplace=not s.requires_grad)
        if not self.base2:
            logits = logits * LOG2E
        if keep is None or self.sync_free:
            return logits, keep, False
        return logits, keep, not bool(keep.any())

    def shifted(
        self, qe3: Tensor, blk: scoring.Block, shift4: Tensor
    ) -> tuple[Tensor, Tensor | None, bool]:
        """base-2 logits − shift for a tile (fast mode): the shift is already in q's last column
        unless a mod or bias needs the natural scores first."""
        if not self.base2:
            logits, keep, empty = self.pipeline(self.raw(qe3, blk.ks, blk.ke), blk)
            return logits.sub_(shift4), keep, empty
        s = self.heads4(qe3 @ self.k3[:, blk.ks : blk.ke].transpose(-1, -2))
        return self.pipeline(s, blk)

    def dropout(self, shape: torch.Size, qs: int, ks: int, device) -> Tensor | None:
        d = self.spec.dropout_p
        if d == 0:
            return None
        return _dropout_keep(self.seed, qs, ks, shape, d, device).to(self.cdt) / (1.0 - d)


def _forward(t: _Tiles) -> tuple[Tensor, Tensor]:
    """(out, lse) in the compute dtype: fp32 output is kept for the backward's rowsum(dO∘O),
    which would lose digits from a bf16-rounded O."""
    s, cdt, dev = t.spec, t.cdt, t.q.device
    out = torch.zeros(s.B, s.Hq, s.Sq, s.Dv, dtype=cdt, device=dev)  # (b h i e)
    lse = torch.full((s.B, s.Hq, s.Sq), float("-inf"), dtype=cdt, device=dev)
    out5 = out.view(s.B, s.Hk, s.G, s.Sq, s.Dv)
    ev = s.Dv + 1 if t.fast else s.Dv  # acc carries Σp as its last column in fast mode

    def one(qs: int, worker: int) -> None:
        qe = min(qs + t.block_q, s.Sq)
        n = qe - qs
        qe3 = t.q_block(qs, qe)
        m = torch.full((s.B, s.Hq, n), float("-inf"), dtype=cdt, device=dev)
        acc = torch.zeros(s.B * s.Hk, s.G * n, ev, dtype=cdt, device=dev)
        l = torch.zeros_like(m)  # used outside fast mode
        hit = torch.zeros_like(acc) if t.vbad3 is not None else None
        ready = False  # every row has a finite reference max, written into qe3[..., -1]
        for ks, ke in key_blocks(s, qs, qe, t.block_k):
            blk = t.block(qs, qe, ks, ke, dev)
            if ready:
                p, _, empty = t.shifted(qe3, blk, m.unsqueeze(-1))
                if empty:
                    continue
                at = p.exp2_().view(s.B * s.Hk, -1, ke - ks) @ t.v3[:, ks:ke]
                # accept while no score exceeds the reference max by more than ~log(j)+2:
                # exp's argument then stays small, so its rounding matches plain softmax.
                # (inf and NaN fail this test too, and take the plain path below.)
                if bool((at[..., -1] <= (ke - ks) * 7.4).all()):
                    acc += at
                    continue
            logits, _, empty = t.pipeline(t.raw(qe3, ks, ke), blk)
            if empty:
                continue
            m_new = scoring.safe_max(torch.maximum(m, logits.amax(-1)))
            alpha = torch.exp2(m - m_new)  # (b h i)
            p = logits.sub_(m_new.unsqueeze(-1)).exp2_()  # (b h i j), in place
            drop = t.dropout(p.shape, qs, ks, dev)
            if drop is None:
                pd = t.rows3(p)
            else:
                l = l * alpha + p.sum(-1)
                pd = t.rows3(p * drop)
            acc.mul_(t.rows3(alpha.unsqueeze(-1))).add_(pd @ t.v3[:, ks:ke])
            if drop is None and not t.fast:
                l = l * alpha + p.sum(-1)
            if hit is not None:
                hit.add_((pd != 0).to(cdt) @ t.vbad3[:, ks:ke].to(cdt))
            m = m_new
            if t.fast:
                qe3[..., -1] = -t.rows3(m.unsqueeze(-1)).squeeze(-1)
                ready = bool((m != float("-inf")).all())
        if t.fast:
            l = acc[..., -1].reshape(s.B, s.Hq, n)
            acc = acc[..., :-1]
        l_safe = torch.where(l == 0, torch.ones_like(l), l)
        o = acc / t.rows3(l_safe.unsqueeze(-1))
        if hit is not None:
            o = o.masked_fill(hit > 0, float("nan"))
        out5[:, :, :, qs:qe] = o.view(s.B, s.Hk, s.G, n, s.Dv)
        lse[:, :, qs:qe] = (scoring.safe_max(m) + torch.log2(l)) * LN2

    each_block(one, range(0, s.Sq, t.block_q), dev)
    return out, lse


def banded_ok(t: _Tiles) -> bool:
    """The banded forward applies to a plain sliding window (no other mask, mod or dropout).
    On CPU only in `fast` mode (no dropout, V finite); sync-free too, V finite."""
    return (
        (t.fast or (t.sync_free and t.vbad is None))
        and not t.masked  # K holds no NaN/inf either
        and plain_window(t.spec)
    )


def plain_window(s: Spec) -> bool:
    """A sliding window at most half as wide as the keys, with no other mask, mod or dropout."""
    if s.left is None or s.right is None or s.mask is not None or s.mask_mod is not None:
        return False
    if s.has_mods or s.dropout_p > 0:
        return False
    return s.Sq > 0 and s.Sk > 0 and s.left + s.right + 1 <= s.Sk // 2


def _forward_banded(t: _Tiles) -> tuple[Tensor, Tensor]:
    """Sliding-window forward with no per-tile Python: every query block's key span is a strided
    view (`unfold`) of zero-padded K/V, so a handful of batched ops cover many blocks at once.

    Block b holds rows b·n … b·n+n−1 and reads keys from s_b = b·n + δ − left, L = n+left+right
    of them; inside a span the band is the same for every block: keep c ≥ r and c ≤ r+left+right
    (row r, span column c), and keys outside 0..Sk−1 are padding. Memory O(Sq·L), not O(Sq·Sk).
    In `fast` mode q is pre-scaled and Σp rides in V's ones column; otherwise (bf16/fp16, GPU)
    scores are scaled after the matmul and Σp is summed apart, as in `_forward`.
    """
    s, cdt, dev = t.spec, t.cdt, t.q.device
    n = t.block_q
    L = n + s.left + s.right
    nblk = -(-s.Sq // n)
    first = s.delta - s.left  # key index where block 0's span starts
    lo = max(0, -first)
    hi = max(0, (nblk - 1) * n + first + L - s.Sk)
    kp = F.pad(t.k3, (0, 0, lo, hi))  # (b·hk, lo+Sk+hi, d+1)
    vp = F.pad(t.v3, (0, 0, lo, hi))  # (b·hk, lo+Sk+hi, e+1)
    ks = kp[:, first + lo :].unfold(1, L, n)[:, :nblk]  # (b·hk, blk, d+1, L)
    vs = vp[:, first + lo :].unfold(1, L, n)[:, :nblk]  # (b·hk, blk, e+1, L)
    r = torch.arange(n, device=dev).view(-1, 1)
    c = torch.arange(L, device=dev).view(1, -1)
    band = (c >= r) & (c <= r + s.left + s.right)  # (i, L), the same for every block
    j = torch.arange(nblk, device=dev).view(-1, 1) * n + first + c  # (blk, L) key index
    drop = ~(band.unsqueeze(0) & ((j >= 0) & (j < s.Sk)).unsqueeze(1))  # (blk, i, L)
    pad_q = nblk * n - s.Sq
    q5 = F.pad(t.q5, (0, 0, 0, pad_q)) * t.qmul  # (b hk g blk·n d)
    qb = q5.unflatten(3, (nblk, n)).permute(0, 1, 3, 2, 4, 5)  # (b hk blk g n d)
    qb = qb.reshape(s.B * s.Hk, nblk, s.G * n, s.D)
    out = torch.empty(s.B * s.Hk, nblk, s.G * n, s.Dv, dtype=cdt, device=dev)
    lse = torch.empty(s.B * s.Hk, nblk, s.G * n, dtype=cdt, device=dev)
    step = max(1, (1 << 24) // max(1, s.B * s.Hq * n * L))  # ≤ 16M scores per chunk
    for b0 in range(0, nblk, step):
        b1 = min(nblk, b0 + step)
        sc = qb[:, b0:b1] @ ks[:, b0:b1, : s.D]  # (b·hk, blk, g·n, L)
        if not t.fast:
            sc = sc.to(cdt).mul_(t.unit)
        sc5 = sc.unflatten(2, (s.G, n))  # base-2 logits
        sc5.masked_fill_(drop[b0:b1].unsqueeze(1), float("-inf"))
        m = scoring.safe_max(sc.amax(-1, keepdim=True))
        p = sc.sub_(m).exp2_()
        if t.fast:
            pv = p @ vs[:, b0:b1].transpose(-1, -2)  # [p·v, Σp]
            l, pv = pv[..., -1:], pv[..., :-1]
        else:
            l = p.sum(-1, keepdim=True)
            pv = p @ vs[:, b0:b1].transpose(-1, -2)
        out[:, b0:b1] = pv / torch.where(l == 0, 1.0, l)
        lse[:, b0:b1] = ((m + torch.log2(l)) * LN2).squeeze(-1)
    out = (
        out.view(s.B, s.Hk, nblk, s.G, n, s.Dv)
        .permute(0, 1, 3, 2, 4, 5)
        .reshape(s.B, s.Hq, -1, s.Dv)
    )
    lse = lse.view(s.B, s.Hk, nblk, s.G, n).permute(0, 1, 3, 2, 4).reshape(s.B, s.Hq, -1)
    return out[:, :, : s.Sq].contiguous(), lse[:, :, : s.Sq].contiguous()


def _backward(t: _Tiles, out: Tensor, lse: Tensor, dout: Tensor, dlse: Tensor | None):
    """(dq, dk, dv) in the compute dtype; `dout` is in it too (widened by `backward`)."""
    s, cdt, dev = t.spec, t.cdt, t.q.device
    nb = s.B * s.Hk
    dq = torch.zeros(s.B, s.Hq, s.Sq, s.D, dtype=cdt, device=dev)
    dq5 = dq.view(s.B, s.Hk, s.G, s.Sq, s.D)
    do5 = dout.unflatten(1, (s.Hk, s.G))
    o5 = out.unflatten(1, (s.Hk, s.G))
    workers = n_workers(len(range(0, s.Sq, t.block_q)), dev)
    # per worker: (dk, dv) partial sums, added in worker order at the end
    grads = [
        (
            torch.zeros(nb, s.Sk, s.D, dtype=cdt, device=dev),
            torch.zeros(nb, s.Sk, s.Dv, dtype=cdt, device=dev),
        )
        for _ in range(workers)
    ]

    def one(qs: int, worker: int) -> None:
        dk, dv = grads[worker]
        qe = min(qs + t.block_q, s.Sq)
        n = qe - qs
        qe3 = t.q_block(qs, qe)
        dob = do5[:, :, :, qs:qe].reshape(nb, s.G * n, s.Dv)
        ob = o5[:, :, :, qs:qe].reshape(nb, s.G * n, s.Dv)
        delta = (dob.to(cdt) * ob.to(cdt)).sum(-1)  # (b·hk, g·i) rowsum(dO∘O)
        if dlse is not None:
            delta = delta - t.rows3(dlse[:, :, qs:qe].unsqueeze(-1)).squeeze(-1).to(cdt)
        lse_b = lse[:, :, qs:qe] * LOG2E  # base 2
        lse_b = scoring.empty_rows_to_inf(lse_b)
        if t.fast:
            qe3[..., -1] = -t.rows3(lse_b.unsqueeze(-1)).squeeze(-1)
            dob = torch.cat([dob, -delta.unsqueeze(-1)], dim=-1)  # [dO, −Δ]·[v, 1] = dP − Δ
        dqb = torch.zeros(nb, s.G * n, s.D, dtype=cdt, device=dev)
        for ks, ke in key_blocks(s, qs, qe, t.block_k):
            blk = t.block(qs, qe, ks, ke, dev)
            if s.has_mods:
                raw = t.raw(qe3, ks, ke).detach().requires_grad_()
                with torch.enable_grad():
                    logits, keep, empty = t.pipeline(raw, blk)
                if empty:
                    continue
                p = torch.exp2(logits.detach() - lse_b.unsqueeze(-1))
            elif t.fast:
                p, keep, empty = t.shifted(qe3, blk, lse_b.unsqueeze(-1))
                if empty:
                    continue
                p = p.exp2_()
            else:
                logits, keep, empty = t.pipeline(t.raw(qe3, ks, ke), blk)
                if empty:
                    continue
                p = torch.exp2(logits - lse_b.unsqueeze(-1))
            p3 = t.rows3(p)  # (b·hk, g·i, j)
            drop = t.dropout(p.shape, qs, ks, dev)
            pd = p3 if drop is None else p3 * t.rows3(drop)
            # add_ on the slice: `dv[:, ks:ke] += x` would also copy the slice onto itself
            dv[:, ks:ke].add_(pd.transpose(-1, -2) @ dob[..., : s.Dv])
            dp = dob @ t.v3[:, ks:ke].transpose(-1, -2)  # fp32 for fp16/bf16 inputs too
            if t.fast:
                ds = p3.mul_(dp)  # p·(dP − Δ), in place
            else:
                if drop is not None:
                    dp = dp * t.rows3(drop)
                ds = p3 * (dp - delta.unsqueeze(-1))
            if s.has_mods:  # ∂L/∂logits₂ = ln2·p(dP − Δ); autograd carries it back to raw
                (ds4,) = torch.autograd.grad(logits, raw, t.heads4(ds) * LN2)
                if keep is not None:
                    ds4 = ds4.masked_fill(~keep, 0.0)
                ds = t.rows3(ds4)
            # ds = ∂L/∂s for s = scale·q·k; qe3 holds q·qmul: dq = scale·ds·k, dk = scale·dsᵀ·q
            dqb += ds @ t.k3[:, ks:ke, : s.D]
            dk_t = ds.transpose(-1, -2) @ qe3[..., : s.D]
            dk[:, ks:ke].add_(dk_t, alpha=s.scale / t.qmul)
        dqb *= s.scale
        dq5[:, :, :, qs:qe] = dqb.view(s.B, s.Hk, s.G, n, s.D)

    each_block(one, range(0, s.Sq, t.block_q), dev)
    dk, dv = grads[0]
    for pdk, pdv in grads[1:]:
        dk += pdk
        dv += pdv
    return dq, dk.view(s.B, s.Hk, s.Sk, s.D), dv.view(s.B, s.Hk, s.Sk, s.Dv)


class _TiledAttention(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, q, k, v, sinks, spec: Spec, blocks: tuple[int, int], blocks_bwd: tuple[int, int]
    ):
        """`blocks_bwd` may differ from `blocks` only without dropout (whose masks are drawn
        per tile, so forward and backward must tile alike). `sinks` is `spec.sinks`, passed
        again so autograd sees it."""
        seed = 0
        if spec.dropout_p > 0:
            seed = int(torch.randint(0, 2**62, (1,), generator=spec.generator))
        t = _Tiles(q, k, v, spec, seed, *blocks)
        out_c, lse = _forward_banded(t) if banded_ok(t) else _forward(t)
        if sinks is not None:
            out_c, lse = scoring.add_sinks(out_c, lse, sinks)
        ctx.save_for_backward(q, k, v, out_c, lse)
        ctx.spec, ctx.seed, ctx.blocks = spec, seed, blocks_bwd
        return out_c.to(q.dtype), lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: a backward that differentiates again
            grads = double_backward_vjp(
                q, k, v, ctx.spec, dout, dlse, ctx.needs_input_grad[:4], "tiled"
            )
            return *grads, None, None, None
        dq, dk, dv = backward(q, k, v, ctx.spec, out, lse, dout, dlse, ctx.seed, ctx.blocks)
        return dq, dk, dv, sink_grad(ctx, out, lse, dout, dlse), None, None, None


def sink_grad(ctx, out: Tensor, lse: Tensor, dout: Tensor, dlse: Tensor | None) -> Tensor | None:
    """∂L/∂sinks for an autograd Function whose 4th input is `spec.sinks` and that saved the
    finished fp32 out and LSE (see `scoring.sink_grad`); None when no gradient is asked."""
    if not ctx.needs_input_grad[3]:
        return None
    return scoring.sink_grad(out, lse, dout, dlse, ctx.spec.sinks)


def backward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    spec: Spec,
    out: Tensor,
    lse: Tensor,
    dout: Tensor | None,
    dlse: Tensor | None,
    seed: int = 0,
    blocks: tuple[int, int] | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) in the inputs' dtypes from any exact forward's out (b h i e) and lse (b h i)
    (natural log, −inf for an empty row), recomputing each tile: the backward of every backend
    that has none of its own. `seed`/`blocks` must be the forward's when it used dropout."""
    t = _Tiles(q, k, v, spec, seed, *(blocks or default_blocks(spec, q.device, backward=True)))
    dout = torch.zeros_like(out) if dout is None else dout
    dq, dk, dv = _backward(t, out, lse, scoring.widen(dout).contiguous(), dlse)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def default_blocks(spec: Spec, device: torch.device, backward: bool = False) -> tuple[int, int]:
    """Tile sizes. CPU: 256×512, but for a narrow band (sliding window) query blocks of a
    quarter of its width, so a tile is mostly kept keys rather than masked ones.

    Sync-free (GPU): a tile of ~`GPU_TILE` scores over all b·h, block_k = 2·block_q, powers of
    two (B=1, H=8: 1024×2048). A tile costs ~15 launches whatever its size, so small tiles
    leave the GPU idle; at this size each elementwise pass moves ~64 MB and outlasts its
    launch. A plain window's forward keeps the band rule's block_q: the banded forward batches
    many query blocks per op, so there block_q only sets how much of each key span is masked;
    its backward (no dropout, so free to tile differently) takes the large tiles.
    """
    banded = spec.left is not None and spec.right is not None
    band_q = max(32, min(BLOCK_Q, (spec.left + spec.right + 1) // 4)) if banded else BLOCK_Q
    if not sync_free(device):
        return band_q, BLOCK_K
    per_head = max(1, GPU_TILE // max(1, spec.B * spec.Hq))  # block_q · block_k
    block_k = min(4096, max(128, 1 << ((2 * per_head).bit_length() - 1) // 2))
    block_q = min(2048, max(64, per_head // block_k))
    return (band_q if plain_window(spec) and not backward else block_q), block_k


def tiled_refuses_bias(spec: Spec) -> bool:
    """Whether a gradient for a float `mask` is asked, which tiled (and fused, which runs such
    a call on tiled) cannot give: the mask requires grad and autograd is recording."""
    return spec.mask is not None and spec.mask.requires_grad and torch.is_grad_enabled()


def tiled(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    spec: Spec,
    block_q: int | None = None,
    block_k: int | None = None,
) -> tuple[Tensor, Tensor]:
    """(out (b h i e), lse (b h i)) by online softmax; differentiable in q, k, v."""
    fq, fk = default_blocks(spec, q.device)
    bq, bk = default_blocks(spec, q.device, backward=True)
    if tiled_refuses_bias(spec):
        raise ValueError(
            "the tiled backend does not differentiate through a float mask; "
            "pass mask.detach(), or backend='auto', 'reference' or 'sdpa' to learn the bias"
        )
    if 0 in (spec.B, spec.Hq, spec.D, spec.Dv):  # no rows to tile, or scores/outputs of width
        r = reference(q, k, v, spec)  # 0 (the tiles' layout needs both): the reference's graph
        return r.out, r.lse
    blocks = (block_q or fq, block_k or fk)
    blocks_bwd = (block_q or bq, block_k or bk)
    if min(blocks) < 1:
        raise ValueError(f"block sizes must be ≥ 1, got block_q={blocks[0]}, block_k={blocks[1]}")
    return _TiledAttention.apply(q, k, v, spec.sinks, spec, blocks, blocks_bwd)
