"""The engine on a GPU: correctness of `tiled` against PyTorch SDPA, then timing and memory tables.

    python benchmarks/gpu.py                  # on a CUDA machine (≈ 2–4 minutes)
    python benchmarks/gpu.py --only targets   # issue 15's tables only (section 0)
    python benchmarks/gpu.py --only rest      # sections 1–6
    python benchmarks/gpu.py --device cpu --quick   # smoke test of the script itself

CUDA times are medians over CUDA events around back-to-back calls with no host sync between
them, as in a training loop (a host sync inside a call shows as time).

Sections: (0) issue 15's cases in bf16 (B4 H16 N1024 D128 … a window of 256 at 32k), SDPA time
over `auto`'s, `triton`'s and `tiled`'s, and what `auto`'s K/V finiteness check costs (auto
with it skipped; SDPA over nan_to_num'd K/V, a sync-free alternative), then each target
met / NOT met; NaN/inf in masked K/V (rows SDPA alone leaks into; whether `auto`, with no K/V
check, gives the reference's NaN pattern); the Triton backward's builds per dtype and head
dim; (1) max |ours − SDPA| for the output and dQ/dK/dV, per dtype and case; (2) the
output and LSE of `return_lse=True` (the lens' call) vs float64, with the backend `auto` picks;
(3) forward time, tiled and auto vs SDPA; (4) causal forward+backward time and peak CUDA
memory; (5) a sliding window of 256 vs SDPA with the equivalent boolean mask and vs compiled
flex_attention; (6) learned sinks: qkv vs SDPA with a sink key; (7) softcap and ALiBi: `auto`
(the Triton kernels on CUDA), tiled, SDPA with an ALiBi bias and compiled flex_attention.
Ratios are peer time / our time (> 1 means we are faster), all measured in the same run.

(Not named cuda.py: a script of that name in benchmarks/ shadows the `cuda` package that
torch imports at start-up, and breaks every sibling script.)

Prints the card's name; paste the tables into benchmarks/RESULTS.md under "CUDA".
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

import qkv
from qkv.attention import auto_backend

TOL = {torch.float32: 2e-3, torch.bfloat16: 3e-2, torch.float16: 5e-3}  # vs SDPA, same dtype
GRAD_FACTOR = 10  # gradients are sums over Sq rows: allow 10× the output tolerance
D = 64


def kernels() -> list[str]:
    """Our kernels under test: `tiled`, and the opt-in `triton` where triton imports."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return ["tiled"]
    return ["tiled", "triton"]


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def median_ms(fn: Callable[[], object], device: str, repeats: int = 10) -> float:
    """Median ms of `fn`. On CUDA, CUDA events around each call, the calls back to back with no
    host sync between them (as in a training loop): a host sync inside `fn` shows as the GPU
    waiting, Python overhead only where it outlasts the kernels. On the CPU, wall time."""
    fn()
    sync(device)
    if device == "cuda":
        ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
              for _ in range(repeats)]  # fmt: skip
        for start, end in ev:
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize()
        return statistics.median(start.elapsed_time(end) for start, end in ev)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def peak_mib(fn: Callable[[], object], device: str) -> float:
    """Peak CUDA memory allocated while `fn` runs, above what was allocated before (MiB)."""
    if device != "cuda":
        return float("nan")
    sync(device)
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    sync(device)
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def qkv_tensors(
    device: str, dtype, b: int, hq: int, hk: int, n: int, grad: bool, seed: int = 0, d: int = D
):
    g = torch.Generator(device=device).manual_seed(seed)
    shapes = ((b, hq, n, d), (b, hk, n, d), (b, hk, n, d))
    return [
        torch.randn(s, device=device, dtype=dtype, generator=g).requires_grad_(grad) for s in shapes
    ]


def window_mask(n: int, w: int, device: str) -> torch.Tensor:  # (n n) bool, True = keep
    i = torch.arange(n, device=device)
    d = i[:, None] - i[None, :]
    return (d >= 0) & (d < w)


def correctness(device: str, dtypes, n: int) -> list[str]:
    rows = [
        "| kernel | dtype | case | max abs Δ out | Δ dq | Δ dk | Δ dv | ok |",
        "|---|---|---|---|---|---|---|---|",
    ]
    mask = window_mask(n, 256, device)
    cases = (
        ("causal mha 8/8", 8, 8, dict(causal=True), dict(is_causal=True)),
        ("causal gqa 8/2", 8, 2, dict(causal=True), dict(is_causal=True, enable_gqa=True)),
        ("dense mqa 8/1", 8, 1, {}, dict(enable_gqa=True)),
        ("window 256 8/8", 8, 8, dict(window=(255, 0)), dict(attn_mask=mask)),
    )
    for kernel, dtype in ((b, d) for b in kernels() for d in dtypes):
        for name, hq, hk, kw, skw in cases:
            q, k, v = qkv_tensors(device, dtype, 2, hq, hk, n, grad=True)
            try:
                ours = qkv.attention(q, k, v, backend=kernel, **kw)
                g_ours = torch.autograd.grad(ours.float().sum(), (q, k, v))
            except Exception as e:  # report and go on: one broken kernel must not hide the rest
                rows.append(f"| {kernel} | {dtype} | {name} | {type(e).__name__}: {e} | | | | NO |")
                continue
            want = F.scaled_dot_product_attention(q, k, v, **skw)
            g_want = torch.autograd.grad(want.float().sum(), (q, k, v))
            e_o = (ours.float() - want.float()).abs().max().item()
            e_g = [
                (a.float() - b.float()).abs().max().item()
                for a, b in zip(g_ours, g_want, strict=True)
            ]
            ok = e_o <= TOL[dtype] and max(e_g) <= GRAD_FACTOR * TOL[dtype]
            cells = " | ".join(f"{e:.2e}" for e in (e_o, *e_g))
            rows.append(f"| {kernel} | {dtype} | {name} | {cells} | {'yes' if ok else 'NO'} |")
    return rows


def lse_check(device: str, dtypes, n: int) -> list[str]:
    """`attention(..., return_lse=True)` without gradients (what the lens' capture calls) vs a
    float64 reference, with the backend `auto` picked and its time next to `tiled`'s."""
    from qkv.attention.api import choose_backend
    from qkv.attention.spec import make_spec

    rows = [
        "| dtype | case | auto picks | max abs Δ out vs f64 | Δ lse | auto | tiled |",
        "|---|---|---|---|---|---|---|",
    ]
    for dtype in dtypes:
        for name, hq, hk, causal in (
            ("causal mha 8/8", 8, 8, True),
            ("dense gqa 8/2", 8, 2, False),
        ):
            q, k, v = qkv_tensors(device, dtype, 2, hq, hk, n, grad=False)
            picked = choose_backend(q, k, v, make_spec(q, k, v, causal=causal), True)
            with torch.no_grad():
                out, lse = qkv.attention(q, k, v, causal=causal, return_lse=True)
                ref = qkv.reference_attention(q.double(), k.double(), v.double(), causal=causal)
                a = median_ms(
                    lambda: qkv.attention(q, k, v, causal=causal, return_lse=True), device
                )
                t = median_ms(
                    lambda: qkv.attention(q, k, v, causal=causal, return_lse=True, backend="tiled"),
                    device,
                )
            e_o = (out.double() - ref.out).abs().max().item()
            e_l = (lse.double() - ref.lse).abs().max().item()
            rows.append(
                f"| {dtype} | {name} | {picked} | {e_o:.2e} | {e_l:.2e} | {a:.2f} ms | {t:.2f} ms |"
            )
    return rows


def forward_timing(device: str, dtype, sizes) -> list[str]:
    rows = [
        "| N | case | tiled | triton | auto | SDPA | SDPA/tiled | SDPA/triton | SDPA/auto |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for n in sizes:
        q, k, v = qkv_tensors(device, dtype, 1, 8, 8, n, grad=False)
        for causal in (False, True):
            ms = {}
            for b in (*kernels(), "auto"):
                try:
                    ms[b] = median_ms(
                        lambda: qkv.attention(q, k, v, causal=causal, backend=b), device
                    )
                except Exception:
                    ms[b] = float("nan")
            s = median_ms(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal), device)
            t, tr, a = ms["tiled"], ms.get("triton", float("nan")), ms["auto"]
            case = "causal" if causal else "dense"
            rows.append(
                f"| {n} | {case} | {t:.2f} ms | {tr:.2f} ms | {a:.2f} ms | {s:.2f} ms "
                f"| {s / t:.2f}× | {s / tr:.2f}× | {s / a:.2f}× |"
            )
    return rows


def backward_timing(device: str, dtype, sizes) -> list[str]:
    rows = [
        "| N | causal fwd+bwd | tiled | SDPA | SDPA/tiled | peak tiled | peak SDPA |",
        "|---|---|---|---|---|---|---|",
    ]
    for n in sizes:
        q, k, v = qkv_tensors(device, dtype, 1, 8, 8, n, grad=True)

        def step(fn):
            return lambda: torch.autograd.grad(fn().sum(), (q, k, v))

        ours = step(lambda: qkv.attention(q, k, v, causal=True, backend="tiled"))
        peer = step(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True))
        t, s = median_ms(ours, device, 5), median_ms(peer, device, 5)
        mt, ms = peak_mib(ours, device), peak_mib(peer, device)
        rows.append(
            f"| {n} | B=1 H=8 | {t:.1f} ms | {s:.1f} ms | {s / t:.2f}× | {mt:.0f} MiB | {ms:.0f} MiB |"
        )
    return rows


def window_timing(device: str, dtype, n: int, w: int = 256) -> list[str]:
    rows = [
        f"| N={n}, window {w}, causal | forward | fwd+bwd | peak fwd+bwd |",
        "|---|---|---|---|",
    ]
    q, k, v = qkv_tensors(device, dtype, 1, 8, 8, n, grad=True)
    mask = window_mask(n, w, device)

    def both(fn):
        fwd = lambda: fn()  # noqa: E731
        bwd = lambda: torch.autograd.grad(fn().sum(), (q, k, v))  # noqa: E731
        return fwd, bwd

    def inference():
        with torch.no_grad():  # `auto` without a gradient: the Triton forward where it runs
            return qkv.attention(q, k, v, window=(w - 1, 0))

    runs = {
        "qkv tiled (banded)": both(
            lambda: qkv.attention(q, k, v, window=(w - 1, 0), backend="tiled")
        ),
        f"qkv auto, no grad ({auto_backend(q.detach(), k.detach(), v.detach(), window=(w - 1, 0))})": (
            inference,
            None,
        ),
        "SDPA + bool mask": both(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask)),
    }
    if "triton" in kernels():
        runs["qkv triton"] = both(
            lambda: qkv.attention(q, k, v, window=(w - 1, 0), backend="triton")
        )
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        def keep(b, h, qi, ki):
            return (qi >= ki) & (qi - ki < w)

        bm = create_block_mask(keep, None, None, n, n, device=device)
        flex = torch.compile(flex_attention)
        runs["flex_attention (compiled)"] = both(lambda: flex(q, k, v, block_mask=bm))
    except Exception as e:  # report, keep measuring the rest
        rows.append(f"| flex_attention unavailable: {type(e).__name__}: {e} | | | |")
    times = {}
    for name, (fwd, bwd) in runs.items():
        try:
            if bwd is None:  # forward only
                times[name] = (median_ms(fwd, device), float("nan"), float("nan"))
                continue
            times[name] = (median_ms(fwd, device), median_ms(bwd, device, 5), peak_mib(bwd, device))
        except Exception as e:
            rows.append(f"| {name} failed: {type(e).__name__}: {str(e)[:120]} | | | |")

    def shown(x: float, fmt: str) -> str:
        return "—" if x != x else format(x, fmt)  # NaN: not measured (forward only)

    for name, (f, b, m) in times.items():
        rows.append(f"| {name} | {f:.2f} ms | {shown(b, '.2f')} ms | {shown(m, '.0f')} MiB |")
    ours = times.get("qkv tiled (banded)")
    for name, (f, b, _) in times.items():
        if ours and name != "qkv tiled (banded)":
            rows.append(
                f"| ratio {name} / qkv | {f / ours[0]:.2f}× | {shown(b / ours[1], '.2f')}× | |"
            )
    return rows


def mods_table(device: str, dtype, n: int, cap: float = 50.0) -> list[str]:
    """Softcap (Gemma 2's 50) and ALiBi (BLOOM's slopes), causal: each way's max |out − float64|
    and its forward and fwd+bwd time. `auto` is the Triton kernels on CUDA (tiled before), the
    peers SDPA with ALiBi as an (H, N, N) float bias (it cannot softcap) and compiled
    flex_attention with the same score_mod."""
    h = 8
    q, k, v = qkv_tensors(device, dtype, 1, h, h, n, grad=True)
    slopes = qkv.alibi_slopes(h).to(device)
    i = torch.arange(n, device=device)
    dist = (i[:, None] - i[None, :]).abs().to(torch.float32)
    bias = (-slopes[:, None, None] * dist).masked_fill(i[None, :] > i[:, None], float("-inf"))
    mods = {
        "softcap": (dict(softcap=cap), lambda s, b, hh, qi, ki: cap * torch.tanh(s / cap)),
        "alibi": (
            dict(score_mod=qkv.alibi(slopes)),
            lambda s, b, hh, qi, ki: s - slopes[hh] * (qi - ki).abs(),
        ),
    }
    rows = [
        f"| N={n}, H{h} D{D}, causal | max abs Δ out vs f64 | forward | fwd+bwd |",
        "|---|---|---|---|",
    ]
    flex = block = None
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        block = create_block_mask(lambda b, hh, qi, ki: qi >= ki, None, None, n, n, device=device)
        flex = torch.compile(flex_attention)
    except Exception as e:  # report, keep measuring the rest
        rows.append(f"| flex_attention unavailable: {type(e).__name__}: {str(e)[:120]} | | | |")
    for name, (kw, score_mod) in mods.items():
        x64 = [t.detach().double() for t in (q, k, v)]
        truth = qkv.attention(*x64, causal=True, backend="reference", **kw)
        runs = {
            f"qkv auto ({auto_backend(q.detach(), k.detach(), v.detach(), causal=True, **kw)})": (
                lambda kw=kw: qkv.attention(q, k, v, causal=True, **kw)
            ),
            "qkv tiled": lambda kw=kw: qkv.attention(q, k, v, causal=True, backend="tiled", **kw),
        }
        if name == "alibi":
            runs["SDPA + float bias"] = lambda: F.scaled_dot_product_attention(
                q, k, v, attn_mask=bias.to(dtype)
            )
        if flex is not None:
            runs["flex_attention (compiled)"] = lambda sm=score_mod: flex(
                q, k, v, score_mod=sm, block_mask=block
            )
        for way, fn in runs.items():
            try:
                err = (fn().detach().double() - truth).abs().max().item()
                fwd = median_ms(fn, device)
                bwd = median_ms(lambda fn=fn: torch.autograd.grad(fn().sum(), (q, k, v)), device, 5)
            except Exception as e:  # report, keep measuring the rest
                rows.append(f"| {name}: {way} failed: {type(e).__name__}: {str(e)[:100]} | | | |")
                continue
            rows.append(f"| {name}: {way} | {err:.1e} | {fwd:.2f} ms | {bwd:.2f} ms |")
    return rows


def sinks_table(device: str, dtype, n: int) -> list[str]:
    """Learned sinks (gpt-oss), causal: each way's max |out − float64| and its forward and
    fwd+bwd time (sinks' gradient included) against SDPA with one extra key whose float bias
    is the sink (the usual workaround: an (H, N, N+1) mask)."""
    from sinks import sdpa_sink_key  # benchmarks/sinks.py: the same peer as the CPU table

    rows = [
        f"| N={n}, causal, learned sinks | max abs Δ out vs float64 | forward | fwd+bwd |",
        "|---|---|---|---|",
    ]
    q, k, v = qkv_tensors(device, dtype, 1, 8, 8, n, grad=True)
    sk = 1.5 + torch.randn(8, device=device, generator=torch.Generator(device).manual_seed(1))
    sk = sk.requires_grad_()
    q64, k64, v64, s64 = (t.detach().double() for t in (q, k, v, sk))
    truth = sdpa_sink_key(q64, k64, v64, s64)
    runs = {
        "qkv auto": lambda: qkv.attention(q, k, v, causal=True, sinks=sk),
        "qkv tiled": lambda: qkv.attention(q, k, v, causal=True, sinks=sk, backend="tiled"),
        "SDPA + sink key": lambda: sdpa_sink_key(q, k, v, sk),
    }
    if "triton" in kernels() and device == "cuda":
        runs["qkv triton"] = lambda: qkv.attention(q, k, v, causal=True, sinks=sk, backend="triton")
    times = {}
    for name, fn in runs.items():
        try:
            with torch.no_grad():
                err = (fn().double() - truth).abs().max().item()
                fwd = median_ms(fn, device)
            bwd = median_ms(lambda fn=fn: torch.autograd.grad(fn().sum(), (q, k, v, sk)), device, 5)
            times[name] = (fwd, bwd)
            rows.append(f"| {name} | {err:.1e} | {fwd:.2f} ms | {bwd:.2f} ms |")
        except Exception as e:  # report, keep measuring the rest
            rows.append(f"| {name} failed: {type(e).__name__}: {str(e)[:120]} | | | |")
    peer = times.get("SDPA + sink key")
    for name, (f, b) in times.items():
        if peer and name != "SDPA + sink key":
            rows.append(
                f"| ratio SDPA + sink key / {name} | | {peer[0] / f:.2f}× | {peer[1] / b:.2f}× |"
            )
    return rows


def grad_builds(device: str) -> list[str]:
    """Which head dims and dtypes the Triton backward builds for (`auto` sends gradients to it
    for D ≤ 128), each with its max |Δ| against the float64 reference's gradients."""
    rows = ["| dtype | D | triton fwd+bwd, window (31, 0) | max abs Δ grads vs f64 |",
            "|---|---|---|---|"]  # fmt: skip
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for d in (64, 96, 128, 256):
            q, k, v = qkv_tensors(device, dtype, 1, 4, 2, 300, grad=True, d=d)
            kw = dict(window=(31, 0))
            try:
                got = torch.autograd.grad(
                    qkv.attention(q, k, v, backend="triton", **kw).float().sum(), (q, k, v)
                )
            except Exception as e:  # report: which sizes auto may send a gradient to
                rows.append(f"| {dtype} | {d} | {type(e).__name__}: {str(e)[:80]} | |")
                continue
            x64 = [t.detach().double().requires_grad_() for t in (q, k, v)]
            want = torch.autograd.grad(qkv.reference_attention(*x64, **kw).out.sum(), x64)
            e = max((a.double() - b).abs().max().item() for a, b in zip(got, want, strict=True))
            rows.append(f"| {dtype} | {d} | builds | {e:.2e} |")
    return rows


def nan_guarantee(device: str, dtype, quick: bool) -> list[str]:
    """NaN/inf in masked-out K/V at issue 15's smallest causal case: how many rows SDPA alone
    leaks them into, and whether `auto` (SDPA, then the Triton repair, no K/V check) gives the
    engine's contract: NaN exactly where the float64 reference has it, the rest within 3e-2."""
    b, h, n, d = (1, 2, 128, 32) if quick else (4, 16, 1024, 128)
    q, k, v = qkv_tensors(device, dtype, b, h, h, n, grad=False, d=d)
    k[:, :, n // 2, 1] = float("nan")  # kept by rows ≥ n/2 only
    v[:, :, n // 3, 2] = float("inf")
    v[:, :, n - 5, 3] = float("nan")
    raw = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    ref = qkv.reference_attention(q.double(), k.double(), v.double(), causal=True).out
    got = qkv.attention(q, k, v, causal=True)
    leaked = (raw.isnan() & ~ref.isnan()).any(-1).sum().item()
    same = torch.equal(got.isnan(), ref.isnan())
    ok = ~ref.isnan()
    e = (got.double()[ok] - ref[ok]).abs().max().item()
    rows = [
        "| B H N D, causal | rows SDPA leaks into | auto's NaN where the reference's | "
        "max abs Δ elsewhere |",
        "|---|---|---|---|",
        f"| {b} {h} {n} {d} | {leaked} | {'yes' if same else 'NO'} | {e:.2e} |",
    ]
    return [*rows, "", *_nan_guarantee_grad(q, k, v, n)]


def _nan_guarantee_grad(q, k, v, n: int) -> list[str]:
    """The same with a gradient (`auto`: SDPA's backward, checked on the device, redone by
    the Triton backward): dq of the rows that mask every bad entry (rows < n/3), against the
    float64 reference's on K/V with the bad entries zeroed."""
    xs = [t.detach().requires_grad_() for t in (q, k, v)]
    do = torch.randn_like(q)
    raw = torch.autograd.grad(F.scaled_dot_product_attention(*xs, is_causal=True), xs[0], do)[0]
    got = torch.autograd.grad(qkv.attention(*xs, causal=True), xs[0], do)[0]
    x64 = [t.detach().double() for t in (q, k, v)]
    x64 = [torch.where(torch.isfinite(t), t, 0.0).requires_grad_() for t in x64]
    ref = torch.autograd.grad(qkv.reference_attention(*x64, causal=True).out, x64[0], do.double())
    rows = slice(0, n // 3)
    leaked = (~torch.isfinite(raw[:, :, rows])).any(-1).sum().item()
    fine = torch.isfinite(got[:, :, rows]).all().item()
    e = (got[:, :, rows].double() - ref[0][:, :, rows]).abs().max().item()
    return [
        "| with a gradient: rows < N/3 | dq rows SDPA leaks into | auto's dq finite | "
        "max abs Δ dq vs float64 |",
        "|---|---|---|---|",
        f"| {tuple(q.shape)} | {leaked} | {'yes' if fine else 'NO'} | {e:.2e} |",
    ]


# issue 15's cases, bf16 on an H200: (B, Hq, N, D, causal, with backward)
TARGET_CASES = (
    (4, 16, 1024, 128, False, False),
    (4, 16, 1024, 128, True, False),
    (2, 16, 4096, 128, True, False),
    (1, 16, 16384, 128, True, False),
    (1, 32, 16384, 64, True, False),
    (2, 16, 4096, 128, True, True),
    (1, 16, 16384, 128, True, True),
)


def _no_kv_check():
    """`auto` with the K/V finiteness check (its host sync) skipped: what the check costs."""
    from unittest import mock

    from qkv.attention import scoring

    return mock.patch.object(scoring, "all_finite", lambda *xs: True)


def triton_tma(q, k, v, **kw) -> torch.Tensor:
    """The Triton forward at its default launch with K/V read by TMA (`Config(tma=True)`, not
    yet a default: this measures it; no gradient). Raises where Triton is missing; NaN in the
    table where the GPU has no TMA (`tma_ready`: it would time the pointer loads)."""
    import dataclasses

    from qkv.attention import triton_kernel as tk
    from qkv.attention.spec import make_spec

    if not tk.tma_ready(k, v):
        raise RuntimeError("no TMA on this GPU or for these strides")
    spec = make_spec(q, k, v, **kw)
    config = dataclasses.replace(tk.default_config(spec, q.dtype), tma=True)
    return tk.forward(q.detach(), k.detach(), v.detach(), spec, config)[0]


def target_timing(device: str, dtype, quick: bool) -> tuple[list[str], list[str]]:
    """Issue 15's table, measured in one run: each case's time for SDPA and for `auto`,
    `triton` (and its forward reading K/V by TMA, `triton_tma`) and `tiled`, as SDPA time /
    ours (> 1: we are faster). Two more columns for the
    K/V finiteness check that keeps NaN in masked K/V out of `auto`'s output: `auto` with the
    check skipped (its cost), and SDPA over K and V cleaned by nan_to_num (a sync-free way to
    keep the guarantee, paying one pass over K and V). Returns (table, verdicts)."""
    rows = [
        "| case | SDPA | auto | triton | triton, TMA | tiled | auto, no K/V check "
        "| SDPA on cleaned K/V |",
        "|---|---|---|---|---|---|---|---|",
    ]
    ratios: dict[str, dict[str, float]] = {}
    kinds: dict[str, tuple[int, bool]] = {}  # name → (the issue's N, with backward)
    for b, h, n, d, causal, backward in TARGET_CASES:
        full_n = n
        if quick:
            b, h, n, d = min(b, 2), h // 8, n // 16, min(d, 64)  # distinct, small
        name = f"B{b} H{h} N{n} D{d}, {'causal' if causal else 'dense'}"
        name += " fwd+bwd" if backward else ""
        kinds[name] = (full_n, backward)
        q, k, v = qkv_tensors(device, dtype, b, h, h, n, grad=backward, d=d)

        def timed(fn: Callable[[], torch.Tensor]) -> float:
            call = (lambda: torch.autograd.grad(fn().sum(), (q, k, v))) if backward else fn
            try:
                return median_ms(call, device, 5 if backward else 10)
            except Exception:  # a kernel that cannot run this case: shown as nan
                return float("nan")

        def clean() -> torch.Tensor:
            kk, vv = torch.nan_to_num(k, 0.0, 0.0, 0.0), torch.nan_to_num(v, 0.0, 0.0, 0.0)
            return F.scaled_dot_product_attention(q, kk, vv, is_causal=causal)

        def unchecked() -> torch.Tensor:
            with _no_kv_check():
                return qkv.attention(q, k, v, causal=causal)

        ms = {"SDPA": timed(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal))}
        for backend in ("auto", "triton", "tiled"):
            ms[backend] = timed(lambda b=backend: qkv.attention(q, k, v, causal=causal, backend=b))
        ms["tma"] = float("nan") if backward else timed(lambda: triton_tma(q, k, v, causal=causal))
        ms["unchecked"], ms["cleaned"] = timed(unchecked), timed(clean)
        ratios[name] = {x: ms["SDPA"] / t for x, t in ms.items() if x != "SDPA"}
        cells = " | ".join(
            x_(ratios[name][x]) for x in ("auto", "triton", "tma", "tiled", "unchecked", "cleaned")
        )
        rows.append(f"| {name} | {ms_(ms['SDPA'], 3)} | {cells} |")
    w_rows, w_ratio = window_target(device, dtype, quick)
    rows += ["", *w_rows]
    return rows, verdicts(ratios, kinds, w_ratio)


def window_target(
    device: str, dtype, quick: bool
) -> tuple[list[str], dict[str, tuple[float, float]]]:
    """A sliding window of 256 at N = 32768, H16 D128, vs compiled flex_attention: forward and
    forward+backward of `auto` (no compile step for the user), `triton` and `tiled`."""
    h, n, d, w = (2, 512, 64, 64) if quick else (16, 32768, 128, 256)
    q, k, v = qkv_tensors(device, dtype, 1, h, h, n, grad=True, d=d)
    rows = [
        f"| window {w}, N={n}, H{h} D{d} | forward | fwd+bwd | flex / ours, fwd | fwd+bwd |",
        "|---|---|---|---|---|",
    ]
    runs: dict[str, Callable[..., torch.Tensor]] = {
        x: (lambda q, k, v, x=x: qkv.attention(q, k, v, window=(w - 1, 0), backend=x))
        for x in ("auto", "triton", "tiled")
    }
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        bm = create_block_mask(lambda b, hh, i, j: (i >= j) & (i - j < w), None, None, n, n,
                               device=device)  # fmt: skip
        flex = torch.compile(flex_attention)
        runs["flex (compiled)"] = lambda q, k, v: flex(q, k, v, block_mask=bm)
    except Exception as e:  # report, keep measuring the rest
        rows.append(f"| flex_attention unavailable: {type(e).__name__}: {str(e)[:120]} | | | | |")
    runs["triton, TMA"] = lambda q, k, v: triton_tma(q, k, v, window=(w - 1, 0))  # fwd only
    plain = [t.detach() for t in (q, k, v)]  # the forward: no gradient asked (auto: Triton)
    ms: dict[str, tuple[float, float]] = {}
    for name, fn in runs.items():
        got = []
        for part, call, repeats in (
            ("forward", lambda fn=fn: fn(*plain), 10),
            ("fwd+bwd", lambda fn=fn: torch.autograd.grad(fn(q, k, v).sum(), (q, k, v)), 5),
        ):
            if part == "fwd+bwd" and name == "triton, TMA":
                got.append(float("nan"))
                continue
            try:
                got.append(median_ms(call, device, repeats))
            except Exception as e:  # report, keep measuring the rest
                got.append(float("nan"))
                rows.append(f"| {name} {part} failed: {type(e).__name__}: {str(e)[:100]} | | | | |")
        ms[name] = (got[0], got[1])
    flex_ms = ms.get("flex (compiled)", (float("nan"), float("nan")))
    ratio = {x: (flex_ms[0] / f, flex_ms[1] / b) for x, (f, b) in ms.items()}
    for name, (f, b) in ms.items():
        rf, rb = ratio[name]
        rows.append(f"| {name} | {ms_(f)} | {ms_(b)} | {x_(rf)} | {x_(rb)} |")
    return rows, ratio


def x_(r: float) -> str:
    """A ratio, or — where it was not measured (NaN)."""
    return "—" if r != r else f"{r:.2f}×"


def ms_(t: float, digits: int = 2) -> str:
    return "—" if t != t else f"{t:.{digits}f} ms"


def verdicts(
    ratios: dict[str, dict[str, float]],
    kinds: dict[str, tuple[int, bool]],
    window: dict[str, tuple[float, float]],
) -> list[str]:
    """Issue 15's four targets, each case against its bar: met, NOT met, or not measured."""

    def said(x: float, bar: float) -> str:
        return "not measured" if x != x else ("met" if x >= bar else "NOT met")

    rows = ["| target | case | measured | verdict |", "|---|---|---|---|"]
    for name, r in ratios.items():
        rows.append(f"| auto ≥ 0.95× SDPA | {name} | {x_(r['auto'])} | {said(r['auto'], 0.95)} |")
    for name, r in ratios.items():
        n, backward = kinds[name]
        if n >= 4096 and not backward:
            for x, label in (("triton", "triton"), ("tma", "triton, TMA")):
                rows.append(
                    f"| {label} forward ≥ 0.9× SDPA | {name} | {x_(r[x])} | {said(r[x], 0.9)} |"
                )
    for name, r in ratios.items():
        if kinds[name][1]:
            for x in ("triton", "auto"):
                rows.append(
                    f"| {x} fwd+bwd ≥ 0.8× SDPA | {name} | {x_(r[x])} | {said(r[x], 0.8)} |"
                )
    for x in ("auto", "triton"):
        f, b = window.get(x, (float("nan"), float("nan")))
        rows.append(f"| {x} ≥ 1.0× compiled flex, window | forward | {x_(f)} | {said(f, 1.0)} |")
        rows.append(f"| {x} ≥ 1.0× compiled flex, window | fwd+bwd | {x_(b)} | {said(b, 1.0)} |")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--quick", action="store_true", help="tiny sizes: checks the script runs")
    ap.add_argument("--dtypes", default=None, help="comma list, e.g. float32,bfloat16")
    ap.add_argument("--only", choices=("targets", "rest"), default=None,
                    help="targets: issue 15's tables only (about a minute on an H200); "
                         "rest: every other section")  # fmt: skip
    args = ap.parse_args()
    dev = args.device
    if dev == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here: run on a GPU machine, or pass --device cpu --quick")
    name = torch.cuda.get_device_name() if dev == "cuda" else "CPU"
    print(f"device: {name}, torch {torch.__version__}\n", flush=True)
    default = "float32" if dev == "cpu" else "float32,bfloat16,float16"
    dtypes = [getattr(torch, d) for d in (args.dtypes or default).split(",")]
    dtype = torch.float32 if dev == "cpu" else torch.bfloat16
    if args.only != "rest":
        targets(dev, dtype, args.quick)
    if args.only == "targets":
        return
    rest(dev, dtype, dtypes, args.quick)


def targets(dev: str, dtype, quick: bool) -> None:
    print(f"#### issue 15's targets, {dtype}: SDPA time / ours (> 1: we are faster)\n", flush=True)
    table, verdict = target_timing(dev, dtype, quick)
    print("\n".join(table) + "\n", flush=True)
    print("\n".join(verdict) + "\n", flush=True)
    print("#### NaN/inf in masked K/V: SDPA alone, and auto without a K/V check\n", flush=True)
    print("\n".join(nan_guarantee(dev, dtype, quick)) + "\n", flush=True)
    if "triton" in kernels() and dev == "cuda":
        print("#### the Triton backward's builds\n", flush=True)
        print("\n".join(grad_builds(dev)) + "\n", flush=True)


def rest(dev: str, dtype, dtypes, quick: bool) -> None:
    print("#### correctness: tiled vs SDPA, B=2, D=64\n", flush=True)
    print("\n".join(correctness(dev, dtypes, 128 if quick else 1024)) + "\n", flush=True)
    print("#### return_lse without gradients (the lens' capture) vs float64, B=2, D=64\n")
    print("\n".join(lse_check(dev, dtypes, 128 if quick else 2048)) + "\n", flush=True)
    sizes = [256] if quick else [1024, 4096, 16384]
    print(f"#### forward, {dtype}, B=1 H=8 D=64, median of 10\n", flush=True)
    print("\n".join(forward_timing(dev, dtype, sizes)) + "\n", flush=True)
    print(f"#### causal forward+backward, {dtype}, median of 5\n", flush=True)
    print("\n".join(backward_timing(dev, dtype, sizes)) + "\n", flush=True)
    print(f"#### sliding window, {dtype}, B=1 H=8 D=64\n", flush=True)
    print("\n".join(window_timing(dev, dtype, 512 if quick else 16384)), flush=True)
    print(f"\n#### learned sinks (gpt-oss), {dtype}, B=1 H=8 D=64\n", flush=True)
    print("\n".join(sinks_table(dev, dtype, 256 if quick else 4096)), flush=True)
    print(f"\n#### softcap and ALiBi, {dtype}, B=1 H=8 D=64\n", flush=True)
    print("\n".join(mods_table(dev, dtype, 256 if quick else 4096)), flush=True)


if __name__ == "__main__":
    main()
