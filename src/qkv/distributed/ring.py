"""Ring attention: exact attention over a sequence sharded across the ranks of a process group.

Each rank holds q, k, v for its shard of the positions (see `layout.py`). K/V blocks travel
around the ring (rank r sends to r+1 and receives from r−1, `batch_isend_irecv`, the next
block in flight while this one is computed); at step t rank r holds the block of rank
src = r − t. Each (query piece, key piece) pair — a shard's runs cut into pieces of at most
`call_tokens` positions — is one `qkv.attention` call on the part of the pieces the band can
connect, with its window expressed on that call's own diagonal, so causal, window, mask_mod
and score_mod see global positions. The partial (out, lse) pairs merge
exactly:

    lse = logaddexp(lse, lse_p);  out = out·exp(lse_old − lse) + out_p·exp(lse_p − lse)

The backward runs the ring again: every pair's dq, dk, dv come from the global out and LSE
(`qkv.attention.tiled.backward`, FlashAttention's backward given (O, LSE)), and dK/dV travel
with their block (in fp32, fp64 for fp64) until they return to its owner. A step whose pairs
the band empties entirely is not computed; when no rank needs a block beyond t hops (a
sliding window), the ring stops after t steps and the gradients go home directly.

Memory per rank (S tokens held; "a block" = one rank's K+V, "its dK/dV" the same in the
compute dtype). Besides the caller's q, k, v, dO and the results: the forward holds the block
in hand and the one arriving; the backward holds at most two blocks and one dK/dV, or one
block and two dK/dV (the accumulator of the block in hand is the very buffer that travels
and finally comes home as this rank's dk, dv: it is received, added to in place and sent on,
and the K/V prefetch for the next step is posted only once the previous dK/dV has arrived, so
the two kinds of buffer are never both doubled). Nothing of the gathered sequence exists on a
rank. As each call covers at most `call_tokens` positions, what `qkv.attention` and the tiled
backward allocate for one call (widened slices, partial out, the call's dq/dk/dv, tiles) is
bounded by a constant, not by S.

Letters: b batch, h query head, k kv head, i query position, j key position, d head dim,
e value dim.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from ..attention import attention, scoring
from ..attention.spec import MaskMod, ScoreMod, _window, check_qkv, make_spec
from ..attention.tiled import backward as tiled_backward
from .layout import LAYOUTS, Layout, collective_device, make_layout

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

# One call (a pair's `qkv.attention` or tiled backward) covers at most this many elements of
# q (b·h·i·d) and at least MIN_CALL_TOKENS positions: its temporaries are then a constant, not
# O(S). On CPU 2^18 fp32 elements = 1 MiB per call-sized tensor; B=1, Hq=2, D=64 → 2048
# positions (measured, RESULTS.md). On a GPU a call that small is launch-bound (a Llama-8B
# layer would make 1024-position calls), so there the bound is 2^26 elements (256 MiB fp32):
# whole runs for usual shards, as before the split (not yet measured on a device).
# Module-level so that tests can make calls tiny and exercise the split.
CALL_ELEMENTS = 1 << 18
GPU_CALL_ELEMENTS = 1 << 26
MIN_CALL_TOKENS = 1024


def call_tokens(B: int, Hq: int, D: int, Dv: int, device: torch.device) -> int:
    """Positions per query or key run of one call (see CALL_ELEMENTS)."""
    elements = CALL_ELEMENTS if device.type == "cpu" else GPU_CALL_ELEMENTS
    return max(MIN_CALL_TOKENS, elements // max(1, B * Hq * max(D, Dv)))


@dataclass(frozen=True)
class Pair:
    """One attention call of a step: query rows [ql, ql+nq) of this rank against key rows
    [kl, kl+nk) of the block in hand (local indices), at global positions qg…, kg…, with the
    window (left, right) on the call's own diagonal that keeps exactly the global band."""

    ql: int
    kl: int
    nq: int
    nk: int
    qg: int
    kg: int
    left: int | None
    right: int | None


def band_pair(qa: int, nq: int, kc: int, nk: int, L: int | None, R: int | None):
    """The pair of query run [qa, qa+nq) and key run [kc, kc+nk) (global positions) under the
    band keep qpos−L ≤ kpos ≤ qpos+R (None = unbounded), trimmed to the queries and keys the
    band connects, or None if it connects none.

    After trimming, the call's own window (left, right) = (L + k1 − q1, R + q1 − k1) with q1,
    k1 the last kept query and key positions: both ≥ 0, as qkv.attention requires, and with
    δ = nk' − nq' it keeps i+δ−left ≤ j ≤ i+δ+right ⇔ the global band."""
    if nq <= 0 or nk <= 0:
        return None
    k0 = kc if L is None else max(kc, qa - L)
    k1 = kc + nk - 1 if R is None else min(kc + nk - 1, qa + nq - 1 + R)
    if k0 > k1:
        return None
    q0 = qa if R is None else max(qa, k0 - R)
    q1 = qa + nq - 1 if L is None else min(qa + nq - 1, k1 + L)
    left = None if L is None else L + k1 - q1
    right = None if R is None else R + q1 - k1
    return q0, q1 - q0 + 1, k0, k1 - k0 + 1, left, right


@dataclass(frozen=True)
class Plan:
    """Everything both passes need: the ring, the layout, each step's pairs."""

    group: dist.ProcessGroup | None
    rank: int
    world: int
    layout: Layout
    steps: tuple[tuple[Pair, ...], ...]  # steps[t]: pairs against the block of rank − t
    scale: float
    softcap: float | None
    mask_mod: MaskMod | None
    score_mod: ScoreMod | None

    def src(self, t: int) -> int:
        return (self.rank - t) % self.world


def _pieces(runs, chunk: int | None):
    """Runs (local start, global start, length) cut into pieces of at most `chunk`."""
    for local, start, n in runs:
        step = n if chunk is None else chunk
        for o in range(0, n, step):
            yield local + o, start + o, min(step, n - o)


def make_plan(
    group, rank, world, layout, L, R, scale, softcap, mask_mod, score_mod,
    chunk: int | None = None,
) -> Plan:  # fmt: skip
    """Pairs for every step; the ring runs as many steps as the farthest block any rank
    needs (all W for causal or full attention, fewer for a window narrower than a shard).
    `chunk`: cut every run into pieces of at most that many positions (None: whole runs)."""

    def pairs(r: int, src: int) -> tuple[Pair, ...]:
        out = []
        for ql, qg, nq in _pieces(layout.runs(r), chunk):
            for kl, kg, nk in _pieces(layout.runs(src), chunk):
                got = band_pair(qg, nq, kg, nk, L, R)
                if got is not None:
                    q0, n_q, k0, n_k, left, right = got
                    out.append(Pair(ql + q0 - qg, kl + k0 - kg, n_q, n_k, q0, k0, left, right))
        return tuple(out)

    far = 0
    for r in range(world):
        for t in range(1, world):
            if t > far and pairs(r, (r - t) % world):
                far = t
    steps = tuple(pairs(rank, (rank - t) % world) for t in range(far + 1))
    return Plan(group, rank, world, layout, steps, scale, softcap, mask_mod, score_mod)


def _global_mods(plan: Plan, p: Pair) -> dict:
    """mask_mod/score_mod seeing global positions: within a pair's call q_idx = i + δ
    (δ = nk − nq, qkv.attention's alignment) and kv_idx = j, so shift both to global."""
    dq, dk = p.qg - (p.nk - p.nq), p.kg
    kw = {}
    if plan.mask_mod is not None:
        fm = plan.mask_mod
        kw["mask_mod"] = lambda b, h, qi, kj: fm(b, h, qi + dq, kj + dk)
    if plan.score_mod is not None:
        fs = plan.score_mod
        kw["score_mod"] = lambda s, b, h, qi, kj: fs(s, b, h, qi + dq, kj + dk)
    return kw


def _call_kwargs(plan: Plan, p: Pair) -> dict:
    return {"window": (p.left, p.right), "scale": plan.scale, "softcap": plan.softcap,
            **_global_mods(plan, p)}  # fmt: skip


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


class _Exchange:
    """Tensors in flight between ranks (`batch_isend_irecv`); `wait()` returns those received
    and lets go of every tensor of the exchange (gloo's work objects hold the sent ones until
    they are destroyed), so a sent buffer is freed as soon as the caller drops it. A failed or
    timed-out wait names the ring step and the likely cause."""

    def __init__(self, plan: Plan, send: list[Tensor], recv: list[Tensor], hops: int, what: str):
        self.recv, self.plan, self.what = recv, plan, what
        self.works = []
        W, r = plan.world, plan.rank
        if W == 1 or hops % W == 0:
            self.recv = send
            return
        to, frm = (r + hops) % W, (r - hops) % W
        g = plan.group
        if g is not None and g is not dist.group.WORLD:
            to, frm = dist.get_global_rank(g, to), dist.get_global_rank(g, frm)
        ops = [dist.P2POp(dist.isend, t.contiguous(), to, g) for t in send]
        ops += [dist.P2POp(dist.irecv, t, frm, g) for t in recv]
        try:
            self.works = dist.batch_isend_irecv(ops)
        except RuntimeError as e:
            raise _peer_error(plan, what, e) from e

    def wait(self) -> list[Tensor]:
        try:
            for w in self.works:
                w.wait()
        except RuntimeError as e:
            raise _peer_error(self.plan, self.what, e) from e
        got, self.recv, self.works = self.recv, [], []
        return got


def _peer_error(plan: Plan, what: str, e: BaseException) -> RuntimeError:
    return RuntimeError(
        f"ring_attention on rank {plan.rank} of {plan.world}: {what} failed ({e}). Another rank "
        "most likely raised or exited before reaching this call — its own error is the cause; "
        "the wait is bounded by the process group's timeout (init_process_group(timeout=...))"
    )


def _blocks_like(plan: Plan, src: int, shapes: list[tuple], dtype, device) -> list[Tensor]:
    n = plan.layout.lengths[src]
    return [torch.empty(*s[:2], n, s[3], dtype=dtype, device=device) for s in shapes]


def _pass_on(plan: Plan, t: int, kv: list[Tensor], what: str) -> _Exchange | None:
    """Post step t+1's K/V: send the block in hand on, receive the block of rank − (t+1)."""
    if t + 1 >= len(plan.steps):
        return None
    buf = _blocks_like(plan, plan.src(t + 1), [x.shape for x in kv], kv[0].dtype, kv[0].device)
    return _Exchange(plan, kv, buf, 1, f"{what} step {t + 1}: receiving K/V")


def _slices(p: Pair, q: Tensor, kv: list[Tensor], cdt: torch.dtype):
    """(rows, cols, q (b h i d), k (b k j d), v (b k j e)) of one pair, in the compute dtype
    (a copy of the pair's slice only for fp16/bf16)."""
    rows, cols = slice(p.ql, p.ql + p.nq), slice(p.kl, p.kl + p.nk)
    return rows, cols, q[:, :, rows].to(cdt), kv[0][:, :, cols].to(cdt), kv[1][:, :, cols].to(cdt)


def ring_forward(q: Tensor, k: Tensor, v: Tensor, plan: Plan) -> tuple[Tensor, Tensor]:
    """(out (b h i e), lse (b h i)) of this rank's queries over the whole sequence, both in the
    compute dtype (fp32; fp64 for fp64). No autograd. Holds the block in hand and the next."""
    B, Hq, S, _ = q.shape
    cdt = _compute_dtype(q.dtype)
    out = torch.zeros(B, Hq, S, v.shape[3], dtype=cdt, device=q.device)
    lse = torch.full((B, Hq, S), float("-inf"), dtype=cdt, device=q.device)
    kv = [k, v]
    for t, pairs in enumerate(plan.steps):
        nxt = _pass_on(plan, t, kv, "forward")
        for p in pairs:
            rows, _, qb, kb, vb = _slices(p, q, kv, cdt)
            o_p, l_p = attention(qb, kb, vb, **_call_kwargs(plan, p), return_lse=True)
            _merge(out[:, :, rows], lse[:, :, rows], o_p, l_p.to(cdt))
        if nxt is not None:
            kv = nxt.wait()  # the block just computed is sent: dropped here
    return out, lse


def _merge(out: Tensor, lse: Tensor, o_p: Tensor, l_p: Tensor) -> None:
    """In place: (out, lse) ← the exact softmax over both key sets; o_p is scaled in place.
    Rows empty in both stay (0, −inf); never NaN."""
    new = torch.logaddexp(lse, l_p)
    safe = torch.where(new == float("-inf"), torch.zeros_like(new), new)
    a, b = torch.exp(lse - safe), torch.exp(l_p - safe)
    out.mul_(a.unsqueeze(-1)).add_(o_p.mul_(b.unsqueeze(-1)))
    lse.copy_(new)


def ring_backward(q, k, v, out, lse, dout, dlse, plan: Plan) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) in the inputs' dtypes; dK/dV accumulate in the compute dtype as they travel.

    At step t the rank holds K/V of block src(t) and `acc`, that block's dK/dV summed over the
    ranks it visited before. acc travels on at the end of the step (`moving`: ours out, the
    next block's in); it is awaited just before this step's first gradient is added, and only
    then is step t+1's K/V posted — so at any time the rank holds two K/V blocks and one acc,
    or one block and two acc, never both doubled."""
    cdt = _compute_dtype(q.dtype)
    dq = torch.zeros(q.shape, dtype=cdt, device=q.device)
    do = torch.zeros_like(out) if dout is None else dout
    kv = [k, v]
    shapes = [tuple(k.shape), tuple(v.shape)]
    acc = [torch.zeros(s, dtype=cdt, device=k.device) for s in shapes]  # own block, step 0
    moving, nxt = None, None
    n = len(plan.steps)
    for t, pairs in enumerate(plan.steps):
        if t == 0:
            nxt = _pass_on(plan, t, kv, "backward")
        for p in pairs:
            rows, cols, qb, kb, vb = _slices(p, q, kv, cdt)
            spec = make_spec(qb, kb, vb, **_call_kwargs(plan, p))
            dl = None if dlse is None else dlse[:, :, rows].to(cdt)
            g = tiled_backward(
                qb, kb, vb, spec, out[:, :, rows], lse[:, :, rows], do[:, :, rows].to(cdt), dl
            )
            del qb, kb, vb
            if moving is not None:  # this block's dK/dV from the ranks before; ours is sent
                acc, moving = moving.wait(), None
                nxt = _pass_on(plan, t, kv, "backward")
            dq[:, :, rows].add_(g[0])
            acc[0][:, :, cols].add_(g[1])
            acc[1][:, :, cols].add_(g[2])
            del g
        if moving is not None:  # a step with nothing to compute
            acc, moving = moving.wait(), None
            nxt = _pass_on(plan, t, kv, "backward")
        if nxt is not None:
            kv, nxt = nxt.wait(), None  # block src(t+1); src(t) was sent on and is dropped
            buf = _blocks_like(plan, plan.src(t + 1), shapes, cdt, k.device)
            moving = _Exchange(plan, acc, buf, 1, f"backward step {t + 1}: receiving dK/dV")
            acc = None
    del kv  # the last block in hand
    if n > 1:  # the block in hand belongs to rank − (n−1): send its gradients home
        buf = _blocks_like(plan, plan.rank, shapes, cdt, k.device)
        acc = _Exchange(plan, acc, buf, -(n - 1), "backward: receiving this shard's dK/dV").wait()
    return dq.to(q.dtype), acc[0].to(k.dtype), acc[1].to(v.dtype)


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, sinks, plan: Plan):
        out, lse = ring_forward(q, k, v, plan)
        if sinks is not None:  # folded into the merged fp32 out and LSE, as tiled does
            out, lse = scoring.add_sinks(out, lse, sinks)
        ctx.save_for_backward(q, k, v, out, lse, sinks)
        ctx.plan = plan
        ctx.set_materialize_grads(False)
        return out.to(q.dtype), lse

    @staticmethod
    def backward(ctx, dout, dlse):
        if torch.is_grad_enabled():  # create_graph=True: every rank stops here, before the ring
            raise RuntimeError(
                "ring_attention has first derivatives only: its backward cannot be "
                "differentiated again (create_graph=True: gradient penalties, Hessian-vector "
                "products); gather the sequence and use qkv.attention for those"
            )
        q, k, v, out, lse, sinks = ctx.saved_tensors
        dq, dk, dv = ring_backward(q, k, v, out, lse, dout, dlse, ctx.plan)
        dsinks = None
        if ctx.needs_input_grad[3]:  # this shard's rows' share; ranks' shares add up
            do = torch.zeros_like(out) if dout is None else dout
            dsinks = scoring.sink_grad(out, lse, do, dlse, sinks)
        return dq, dk, dv, dsinks, None


_SHOW = {
    "dtype": lambda x: _DTYPES[int(x)],
    "causal": lambda x: bool(x),
    "left": lambda x: None if x < 0 else int(x),
    "right": lambda x: None if x < 0 else int(x),
    "softcap": lambda x: None if math.isnan(x) else x,
    "sinks (their sum)": lambda x: None if math.isnan(x) else x,
}


def _agree(q: Tensor, k: Tensor, v: Tensor, group, settings: list[float]) -> list[int]:
    """All-gather each rank's shard length with its shapes, dtype and settings; raise the
    same ValueError on every rank if any of them differ. Returns the lengths."""
    B, Hq, S, D = q.shape
    mine = [S, B, Hq, k.shape[1], D, v.shape[3], _DTYPES.index(q.dtype), *settings]
    t = torch.tensor(mine, dtype=torch.float64, device=collective_device(group, q.device))
    world = dist.get_world_size(group)
    got = [torch.empty_like(t) for _ in range(world)]
    try:
        dist.all_gather(got, t, group=group)
    except RuntimeError as e:
        rank = dist.get_rank(group)
        raise RuntimeError(
            f"ring_attention on rank {rank} of {world}: exchanging shard shapes failed ({e}). "
            "Another rank most likely raised or exited before reaching this call — its own "
            "error is the cause; the wait is bounded by init_process_group(timeout=...)"
        ) from e
    rows = [[float(x) for x in g.tolist()] for g in got]
    names = ("B", "Hq", "Hk", "D", "Dv", "dtype", "causal", "left", "right", "scale", "softcap",
             "sinks (their sum)")  # fmt: skip
    for r, row in enumerate(rows):
        for name, a, b in zip(names, rows[0][1:], row[1:], strict=True):
            if not (a == b or (math.isnan(a) and math.isnan(b))):
                show = _SHOW.get(name, lambda x: int(x) if x.is_integer() else x)
                raise ValueError(
                    f"ring_attention: every rank must pass the same {name}; rank 0 has "
                    f"{show(a)} but rank {r} has {show(b)}"
                )
    return [int(row[0]) for row in rows]


def ring_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    group: dist.ProcessGroup | None = None,
    layout: str | Layout = "contiguous",
    causal: bool = False,
    window: tuple[int | None, int | None] | None = None,
    mask_mod: MaskMod | None = None,
    score_mod: ScoreMod | None = None,
    softcap: float | None = None,
    scale: float | None = None,
    sinks: Tensor | None = None,
    return_lse: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Exact attention of a sequence sharded over the ranks of `group`; a collective (every
    rank calls it with its own shard).

    Shapes (this rank's shard of S positions): q (B, Hq, S, D), k (B, Hk, S, D),
    v (B, Hk, S, Dv) → out (B, Hq, S, Dv); with `return_lse` also lse (B, Hq, S), fp32 (fp64
    for fp64), natural log. GQA as `qkv.attention` (only the Hk kv heads travel).
    `layout`: "contiguous" (rank r holds one run, ranks in order; uneven lengths allowed),
    "zigzag" (rank r holds chunks r and 2W−1−r of 2W: causal load balance), or a `Layout`;
    `shard_sequence` cuts a full tensor either way. Positions are global: `causal`, `window`
    (left, right) and the mods' q_idx/kv_idx are those of the gathered sequence, whose
    alignment is plain (Sq = Sk = N, δ = 0): causal keeps j ≤ i, window i−left ≤ j ≤ i+right.

    Equals, on this rank's rows, single-process attention on the gathered tensors::

        Q, K, V = (gather_sequence(t, group, layout) for t in (q, k, v))
        out = qkv.attention(Q, K, V, causal=..., window=..., mask_mod=..., score_mod=...,
                            softcap=..., scale=...)[:, :, positions of this rank]

    with the same empty-row rule (a row with no key left: 0, LSE −inf, zero gradients) and
    gradients dq, dk, dv for this rank's shard. `sinks` (Hq,), the same on every rank: learned
    attention sinks as in `qkv.attention`, folded into each row once its partial results are
    merged; their gradient on a rank is its rows' share (sum it over the ranks, as for any
    replicated parameter). Differentiable (a custom autograd Function; the
    LSE too). Memory per rank: O(S), never the gathered sequence: besides the inputs and
    results, the fp32 out and LSE saved for the backward, and in flight at most two K/V blocks
    and one dK/dV block, or one and two (see the module docstring); each inner call's
    temporaries are bounded by a constant (`CALL_ELEMENTS`). Every rank must pass the same
    shapes but S, dtype and settings: a mismatch raises the same ValueError on every rank. A
    rank that fails before or during the call makes the others raise RuntimeError once the
    transport notices (at once when its process exits, else after the process group's
    timeout).
    """
    check_qkv(q, k, v)
    if q.shape[2] != k.shape[2]:
        raise ValueError(
            f"ring_attention is self-attention over one sharded sequence: q, k, v hold the same "
            f"positions, got Sq={q.shape[2]} and Sk={k.shape[2]}"
        )
    if not isinstance(layout, Layout) and layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS} or a Layout, got {layout!r}")
    # validate window, scale, softcap and the mods as qkv.attention does (same messages)
    spec = make_spec(q, k, v, causal=causal, window=window, mask_mod=mask_mod,
                     score_mod=score_mod, softcap=softcap, scale=scale, sinks=sinks)  # fmt: skip
    L, R = _window(window)
    if causal:
        R = 0 if R is None else min(R, 0)
    settings = [float(causal), -1.0 if L is None else L, -1.0 if R is None else R, spec.scale,
                math.nan if softcap is None else float(softcap),
                math.nan if sinks is None else float(sinks.detach().double().sum())]  # fmt: skip
    lengths = _agree(q, k, v, group, settings)
    world, rank = len(lengths), dist.get_rank(group)
    if isinstance(layout, Layout):
        if list(layout.lengths) != lengths:
            raise ValueError(
                f"layout holds {list(layout.lengths)} tokens per rank but the ranks hold {lengths}"
            )
        lay = layout
    else:
        lay = make_layout(layout, lengths)
    chunk = call_tokens(q.shape[0], q.shape[1], q.shape[3], v.shape[3], q.device)
    plan = make_plan(group, rank, world, lay, L, R, spec.scale, spec.softcap, mask_mod, score_mod,
                     chunk)  # fmt: skip
    out, lse = _RingAttention.apply(q, k, v, spec.sinks, plan)
    return (out, lse) if return_lse else out
