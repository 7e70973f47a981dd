"""What each rank runs in the distributed tests (imported by name in spawned processes).

The oracle is plain softmax attention written here, on the full (gathered) tensors: no qkv
code. Each rank cuts its own shard of the oracle's tensors by the layout rule written here
too, and reports max |ring − oracle| per quantity.
"""

from __future__ import annotations

import contextlib
import math
import time
import zlib

import torch
import torch.distributed as dist

from qkv.distributed import ring_attention

from .memory_workers import calls_of

# One group per world size inside a 4-process launch: [1, 3] makes local rank 0 global rank 1.
GROUPS = {1: [0], 2: [1, 3], 3: [0, 1, 2], 4: [0, 1, 2, 3]}
# "uneven" contiguous shards (N = 29): rank 1 of world 3 holds nothing
UNEVEN = {1: [29], 2: [20, 9], 3: [4, 0, 25], 4: [13, 3, 9, 4]}

CASES = {  # name: N, (Hq, Hk), D, Dv, layout, ring kwargs, extra mask / score
    "full_gqa": (37, (4, 2), 16, 8, "contiguous", {}, None),
    "causal_zigzag": (37, (4, 2), 16, 8, "zigzag", {"causal": True}, None),
    "causal_uneven": (29, (2, 1), 8, 8, "uneven", {"causal": True}, None),
    "window_across": (37, (2, 2), 8, 8, "contiguous", {"causal": True, "window": (6, 0)}, None),
    "window_2sided_zigzag": (40, (2, 1), 8, 4, "zigzag", {"window": (3, 5)}, None),
    "window_narrow": (64, (2, 1), 8, 8, "contiguous", {"causal": True, "window": (2, 0)}, None),
    "softcap_scale": (33, (4, 2), 16, 8, "zigzag", {"causal": True, "softcap": 1.5, "scale": 0.3}, None),
    "mqa_d40": (23, (6, 1), 40, 40, "contiguous", {"causal": True}, None),
    "empty_row": (31, (2, 1), 8, 8, "contiguous", {"causal": True}, "row7"),
    "alibi_global": (31, (2, 2), 8, 8, "zigzag", {"causal": True}, "alibi"),
    # split_*: every inner call covers at most 3 positions (runs cut into pieces)
    "split_causal_zigzag": (37, (4, 2), 16, 8, "zigzag", {"causal": True}, None),
    "split_window_uneven": (29, (2, 1), 8, 8, "uneven", {"window": (4, 2)}, "row7"),
    # learned sinks (gpt-oss): folded in after the merge; with an empty row (out 0, LSE σ)
    "sinks_zigzag": (37, (4, 2), 16, 8, "zigzag", {"causal": True}, "sinks"),
    "sinks_window_empty_row": (31, (2, 1), 8, 8, "contiguous", {"causal": True, "window": (4, 0)},
                               "sinks+row7"),
}  # fmt: skip
FP32 = ("full_gqa", "causal_zigzag", "window_across", "softcap_scale", "empty_row",
        "split_causal_zigzag", "sinks_zigzag")  # fmt: skip
HALF = ("causal_zigzag", "window_across")  # also in bf16 and fp16 (K/V travel in half)


def dtypes(name: str) -> tuple[torch.dtype, ...]:
    return ((torch.float64,) + ((torch.float32,) if name in FP32 else ())
            + ((torch.bfloat16, torch.float16) if name in HALF else ()))  # fmt: skip


def oracle(q, k, v, causal=False, window=None, softcap=None, scale=None, extra=None, sinks=None):
    """Plain softmax attention on whole sequences (any float dtype, differentiable).
    Empty rows: out 0, lse −inf. `sinks` (h,): exp(σ_h) added to each row's total."""
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    N = q.shape[2]
    s = (q @ k.transpose(-1, -2)) * (1 / math.sqrt(q.shape[-1]) if scale is None else scale)
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    i, j = torch.arange(N)[:, None], torch.arange(N)[None, :]
    if extra == "alibi":
        s = s - 0.25 * (i - j).abs()
    keep = torch.ones(N, N, dtype=torch.bool)
    if causal:
        keep &= j <= i
    if window is not None:
        if window[0] is not None:
            keep &= j >= i - window[0]
        if window[1] is not None:
            keep &= j <= i + window[1]
    if extra and "row7" in extra:
        keep &= i != 7
    s = s.masked_fill(~keep, float("-inf"))
    m = s.amax(-1, keepdim=True)
    if sinks is not None:
        m = torch.maximum(m, sinks.detach().view(1, -1, 1, 1))
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m)).detach()
    p = torch.exp(s - m)
    l = p.sum(-1, keepdim=True)
    if sinks is not None:
        l = l + torch.exp(sinks.view(1, -1, 1, 1) - m)
    out = (p @ v) / torch.where(l == 0, torch.ones_like(l), l)
    lse = torch.where(l == 0, float("-inf"), m + torch.log(torch.where(l == 0, 1.0, l)))
    return out, lse.squeeze(-1)


def mine(x, rank, world, layout, dim=2):
    """This rank's shard of x, by the layout rules (written out here, not qkv's)."""
    if layout == "uneven":
        n = UNEVEN[world]
        return x.narrow(dim, sum(n[:rank]), n[rank])
    if layout == "contiguous":
        return x.tensor_split(world, dim)[rank]
    c = x.tensor_split(2 * world, dim)
    return torch.cat((c[rank], c[2 * world - 1 - rank]), dim)


def _mods(extra):
    if extra and "row7" in extra:
        return {"mask_mod": lambda b, h, qi, kj: qi != 7}
    if extra == "alibi":
        return {"score_mod": lambda s, b, h, qi, kj: s - 0.25 * (qi - kj).abs()}
    return {}


def err(a, b) -> float:
    """max |a − b|, equal infinities counting as 0 and NaN as inf."""
    a, b = a.detach().double(), b.detach().double()
    d = torch.where(a == b, torch.zeros_like(a), (a - b).abs())
    d = torch.nan_to_num(d, nan=math.inf)
    return float(d.max()) if d.numel() else 0.0


def _run_case(name, dtype, rank, world, group):
    N, (Hq, Hk), D, Dv, layout, kw, extra = CASES[name]
    gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))  # same on every rank
    B = 2
    full = [torch.randn(B, H, N, d, generator=gen, dtype=torch.float64)
            for H, d in ((Hq, D), (Hk, D), (Hk, Dv))]  # fmt: skip
    go = torch.randn(B, Hq, N, Dv, generator=gen, dtype=torch.float64)
    gl = torch.randn(B, Hq, N, generator=gen, dtype=torch.float64)
    has_sinks = bool(extra) and "sinks" in extra
    if has_sinks:  # around the rows' LSE, so the sink holds a real share
        full.append(1.5 + torch.randn(Hq, generator=gen, dtype=torch.float64))

    def grads(dt, fn):
        xs = [t.to(dt).clone().requires_grad_() for t in full]
        out, lse = fn(*xs)
        torch.autograd.backward([out, lse], [go.to(dt), gl.to(lse.dtype)])
        return [out, lse, *(x.grad for x in xs)]

    def whole(q, k, v, sinks=None):
        return oracle(q, k, v, extra=extra, sinks=sinks, **kw)

    ref = grads(torch.float64, whole)
    lay = "contiguous" if layout == "uneven" else layout

    xs = [mine(t, rank, world, layout).to(dtype).clone().requires_grad_() for t in full[:3]]
    if has_sinks:  # the same (Hq,) sinks on every rank
        xs.append(full[3].to(dtype).clone().requires_grad_())
    grads_r = [mine(go, rank, world, layout).to(dtype), mine(gl, rank, world, layout)]
    with calls_of(3) if name.startswith("split") else contextlib.nullcontext():
        out, lse = ring_attention(*xs[:3], group=group, layout=lay, return_lse=True, **kw,
                                  sinks=xs[3] if has_sinks else None, **_mods(extra))  # fmt: skip
        torch.autograd.backward([out, lse], [grads_r[0], grads_r[1].to(lse.dtype)])
    got = [out, lse, *(x.grad for x in xs[:3])]
    names = ("out", "lse", "dq", "dk", "dv")
    res = {n: err(g, mine(r, rank, world, layout))
           for n, g, r in zip(names, got, ref[:5], strict=True)}  # fmt: skip
    if has_sinks:  # each rank holds its rows' share of dsinks: their sum is the whole
        total = xs[3].grad.clone()
        dist.all_reduce(total, group=group)
        res["dsinks"] = err(total, ref[5])
    res["lse_dtype"] = str(lse.dtype)
    if dtype != torch.float64:  # the plain formula in this dtype, whole tensors: the budget
        plain = grads(dtype, whole)
        names += ("dsinks",) if has_sinks else ()
        res["plain"] = {n: err(p, r) for n, p, r in zip(names, plain, ref, strict=True)}
    return res


def ring_cases(rank: int, world: int) -> dict:
    """Every case at every world size 1–4 (subgroups of one 4-process launch), fp64 and fp32;
    then the errors every rank must raise alike."""
    assert world == 4
    groups = {w: dist.new_group(GROUPS[w]) for w in (1, 2, 3)}
    groups[4] = None  # the default group
    report = {}
    for w, ranks in GROUPS.items():
        if rank not in ranks:
            continue
        local = ranks.index(rank)
        for name in CASES:
            for dt in dtypes(name):
                key = f"w{w}/{name}/{str(dt)[6:]}"
                report[key] = _run_case(name, dt, local, w, groups[w])
    dist.barrier()
    report["errors"] = _agreed_errors(rank, world)
    report["mislabeled"] = _mislabeled(rank, world)
    return report


def _mislabeled(rank: int, world: int) -> float:
    """Zigzag shards declared contiguous: the ring then applies the causal mask at the wrong
    positions, and the comparison must see it (the check can fail)."""
    gen = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(1, 2, 40, 8, generator=gen, dtype=torch.float64) for _ in range(3))
    want = mine(oracle(q, k, v, causal=True)[0], rank, world, "zigzag")
    got = ring_attention(*(mine(t, rank, world, "zigzag") for t in (q, k, v)), causal=True)
    return err(got, want)


def _agreed_errors(rank: int, world: int) -> dict:
    """Inputs that some rank gets wrong: every rank must raise the same ValueError."""
    out = {}
    q = torch.randn(1, 4 if rank != 3 else 2, 9, 8)
    k = torch.randn(1, 2, 9, 8)
    try:
        ring_attention(q, k, k, causal=True)
    except ValueError as e:
        out["heads"] = str(e)
    x = torch.randn(1, 2, 37, 8).tensor_split(4, 2)[rank]  # contiguous cut, called zigzag
    try:
        ring_attention(x, x, x, layout="zigzag", causal=True)
    except ValueError as e:
        out["zigzag"] = str(e)
    try:
        ring_attention(x, x, x, causal=rank == 0)
    except ValueError as e:
        out["causal"] = str(e)
    q = torch.randn(1, 2, 5, 8, requires_grad=True)  # a gradient penalty needs create_graph
    try:
        torch.autograd.grad(ring_attention(q, q, q, causal=True).sum(), q, create_graph=True)
    except RuntimeError as e:
        out["second"] = str(e)
    q = torch.randn(1, 2, 5, 8)  # the group still works after those errors
    out["after"] = tuple(ring_attention(q, q, q, causal=True).shape)
    return out


def fault_raise(rank: int, world: int, when: str) -> dict:
    """The last rank raises (and its process exits) `when` = "before" the call, or "backward":
    after the forward, instead of the backward the others run."""
    q = torch.randn(1, 2, 64, 8, requires_grad=True)
    if when == "before" and rank == world - 1:
        raise RuntimeError(f"rank {rank} fails on purpose")
    t0 = time.monotonic()
    try:
        out = ring_attention(q, q, q, causal=True)
        if when == "backward" and rank == world - 1:
            raise RuntimeError(f"rank {rank} fails on purpose")
        out.sum().backward()
    except RuntimeError as e:
        if "on purpose" in str(e):
            raise
        return {"error": str(e), "seconds": time.monotonic() - t0}
    return {"error": None}


def fault_hang(rank: int, world: int) -> dict:
    """Rank 1 never calls ring_attention (sleeps past the group timeout, then leaves)."""
    if rank == 1:
        time.sleep(4)
        return {"slept": True}
    q = torch.randn(1, 2, 16, 8)
    t0 = time.monotonic()
    try:
        ring_attention(q, q, q, causal=True)
    except RuntimeError as e:
        return {"error": str(e), "seconds": time.monotonic() - t0}
    return {"error": None}
