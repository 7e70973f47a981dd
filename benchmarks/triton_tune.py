"""Launch configurations of the Triton kernels on issue 15's cases: time and correctness per config.

    python benchmarks/triton_tune.py                 # on a CUDA machine (≈ 2–3 minutes)
    TRITON_INTERPRET=1 python benchmarks/triton_tune.py --device cpu --quick   # smoke test

For each case (bf16 on a GPU) and each candidate `Config(block_m, block_n, num_warps,
num_stages)` (the forward's also with K/V read by TMA, `tma=True`, sm_90+, and with a
register cap, `maxnreg`): the forward kernel's median time and SDPA time / ours; the
backward's two passes (dK/dV over key blocks, dQ over query blocks) timed apart, each against
SDPA's whole backward.
Every config's output (or gradients) is compared with SDPA's in the same dtype: a config that
miscompiles shows as "WRONG" instead of a time. Triton's compile errors and out-of-resources
show as the error's name. The chosen defaults go into `triton_kernel.default_config`.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from qkv.attention import triton_backward as tb
from qkv.attention import triton_kernel as tk
from qkv.attention.spec import make_spec

FWD = [  # (block_m, block_n, num_warps, num_stages[, tma[, maxnreg]]): Config's fields
    (64, 64, 4, 2),
    (64, 64, 4, 3),
    (128, 64, 4, 3),
    (128, 64, 8, 3),
    (128, 64, 8, 4),
    (128, 128, 8, 2),
    (128, 32, 4, 4),
    (64, 128, 4, 3),
    (64, 64, 4, 3, True),
    (64, 64, 4, 4, True),
    (128, 64, 8, 3, True),
    (128, 128, 8, 3, True),
    (64, 64, 4, 2, False, 128),  # at most 128 registers: four programs per SM at D ≤ 64
]
DKDV = [(64, 64, 4, 2), (32, 128, 4, 3), (32, 128, 4, 5), (64, 128, 8, 3), (32, 64, 4, 3),
        (64, 128, 4, 2)]  # fmt: skip
DQ = [(64, 64, 4, 2), (128, 32, 4, 3), (128, 32, 4, 5), (128, 64, 8, 3), (64, 32, 4, 3),
      (128, 64, 4, 2)]  # fmt: skip

# (B, H, N, D, kwargs): issue 15's forward cases and its window
FWD_CASES = [
    (4, 16, 1024, 128, {}),
    (4, 16, 1024, 128, {"causal": True}),
    (2, 16, 4096, 128, {"causal": True}),
    (1, 16, 16384, 128, {"causal": True}),
    (1, 32, 16384, 64, {"causal": True}),
    (1, 16, 32768, 128, {"window": (255, 0)}),
]
BWD_CASES = [
    (2, 16, 4096, 128, {"causal": True}),
    (1, 16, 16384, 128, {"causal": True}),
    (1, 16, 32768, 128, {"window": (255, 0)}),
]


def bench(fn: Callable[[], object], device: str) -> float:
    """Median ms: CUDA events via triton.testing.do_bench on a GPU (no host sync between
    runs), perf_counter on the CPU."""
    if device == "cuda":
        from triton.testing import do_bench

        return do_bench(fn, warmup=10, rep=40, return_mode="median")
    fn()
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def window_mask(n: int, left: int, device: str) -> torch.Tensor:
    i = torch.arange(n, device=device)
    d = i[:, None] - i[None, :]
    return (d >= 0) & (d <= left)


def sdpa_call(q, k, v, kw):
    if "window" in kw:
        return lambda: F.scaled_dot_product_attention(
            q, k, v, attn_mask=window_mask(q.shape[2], kw["window"][0], q.device.type)
        )
    return lambda: F.scaled_dot_product_attention(q, k, v, is_causal=kw.get("causal", False))


def name_of(b, h, n, d, kw) -> str:
    kind = "window 256" if "window" in kw else ("causal" if kw.get("causal") else "dense")
    return f"B{b} H{h} N{n} D{d} {kind}"


def cell(fn, check, device) -> str:
    try:
        got = fn()
        if not check(got):
            return "WRONG"
        return f"{bench(fn, device):.3f}"
    except Exception as e:  # a config this GPU cannot build: named, and the sweep goes on
        return type(e).__name__


def _label(c: tuple) -> str:
    """A config's column: its four numbers, then "TMA" (K/V read by TMA), "≤n regs"."""
    extra = (" TMA" if c[4:5] == (True,) else "") + (f" ≤{c[5]} regs" if c[5:] else "")
    return f"{c[:4]}{extra}"


def sweep_forward(device, dtype, cases, configs, tol) -> list[str]:
    rows = ["| case | SDPA ms | " + " | ".join(_label(c) for c in configs) + " |",
            "|---|---|" + "---|" * len(configs)]  # fmt: skip
    for b, h, n, d, kw in cases:
        q, k, v = (torch.randn(b, h, n, d, device=device, dtype=dtype) for _ in range(3))
        spec = make_spec(q, k, v, **kw)
        ref = sdpa_call(q, k, v, kw)
        want = ref().float()
        s = bench(ref, device)
        cells = []
        for c in configs:
            cfg = tk.Config(*c)
            if cfg.tma and not tk.tma_ready(k, v):  # it would time the pointer loads again
                cells.append("no TMA")
                continue
            if cfg.maxnreg and d > 64:  # written for D ≤ 64; D = 128 needs ~250 registers
                cells.append("—")
                continue
            t = cell(
                lambda cfg=cfg: tk.forward(q, k, v, spec, cfg, clean=False)[0],
                lambda out: (out.float() - want).abs().max().item() <= tol,
                device,
            )
            cells.append(t if not t[0].isdigit() else f"{t} ({s / float(t):.2f}×)")
        rows.append(f"| {name_of(b, h, n, d, kw)} | {s:.3f} | " + " | ".join(cells) + " |")
    return rows


def sweep_backward(device, dtype, cases, tol) -> list[str]:
    rows = []
    for b, h, n, d, kw in cases:
        q, k, v = (
            torch.randn(b, h, n, d, device=device, dtype=dtype).requires_grad_() for _ in range(3)
        )
        dout = torch.randn(b, h, n, d, device=device, dtype=dtype)
        spec = make_spec(q, k, v, **kw)
        ref = sdpa_call(q, k, v, kw)
        o = ref()
        want = torch.autograd.grad(o, (q, k, v), dout)
        s_fwd = bench(ref, device)
        s_all = bench(lambda: torch.autograd.grad(ref(), (q, k, v), dout), device)
        qd, kd, vd = (t.detach() for t in (q, k, v))
        out, lse, _ = tk.forward(qd, kd, vd, spec, tk.Config(), clean=False,
                                 out_dtype=torch.float32)  # fmt: skip

        def close(grads, which) -> bool:
            return all(
                (grads[i].float() - want[i].float()).abs().max().item() <= tol for i in which
            )

        rows += [
            f"#### {name_of(b, h, n, d, kw)}: SDPA fwd {s_fwd:.3f} ms, fwd+bwd {s_all:.3f} ms, "
            f"so its backward ≈ {s_all - s_fwd:.3f} ms",
            "",
            "| pass (its configs, in order) | "
            + " | ".join(map(str, range(1, len(DKDV) + 1)))
            + " |",
            "|---|" + "---|" * len(DKDV),
        ]
        for part, configs, which in (("dK/dV", DKDV, (1, 2)), ("dQ", DQ, (0,))):
            cells = []
            for c in configs:
                cfg = tk.Config(*c)
                kw_cfg = {"config": cfg} if part == "dK/dV" else {"dq_config": cfg}
                if part == "dQ":
                    kw_cfg["config"] = tk.Config()

                def run(kw_cfg=kw_cfg):
                    return tb.backward(qd, kd, vd, spec, out, lse, dout, None, **kw_cfg)

                cells.append(cell(run, lambda g, which=which: close(g, which), device))
            rows.append(
                f"| {part} ({', '.join(str(c) for c in configs)}) | " + " | ".join(cells) + " |"
            )
        rows.append("")
    return rows


def device_args(doc: str, quick: str) -> argparse.Namespace:
    """--device (default cuda) and --quick (help `quick`) from the command line; exits with
    how to run where CUDA is asked for and missing."""
    ap = argparse.ArgumentParser(description=doc,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--quick", action="store_true", help=quick)
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit(
            "no CUDA device here: run on a GPU, or TRITON_INTERPRET=1 … --device cpu --quick"
        )
    return args


def main() -> None:
    args = device_args(__doc__, "tiny sizes, two configs: a smoke test")
    dev = args.device
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    fwd_cases, bwd_cases, fwd_cfg = FWD_CASES, BWD_CASES, FWD
    if args.quick:
        fwd_cases = [(1, 2, 64, 32, {"causal": True}), (1, 2, 128, 32, {"window": (31, 0)})]
        bwd_cases = fwd_cases[:1]
        fwd_cfg = [FWD[0], FWD[-1]]
        DKDV[:] = DKDV[:2]
        DQ[:] = DQ[:2]
    tol = 3e-2 if dtype == torch.bfloat16 else 2e-3
    name = torch.cuda.get_device_name() if dev == "cuda" else "CPU (interpreter)"
    print(f"device: {name}, torch {torch.__version__}, {dtype}\n", flush=True)
    print(
        "### forward kernel: median ms (SDPA / ours) per Config(block_m, block_n, warps, stages)\n"
    )
    print("\n".join(sweep_forward(dev, dtype, fwd_cases, fwd_cfg, tol)) + "\n", flush=True)
    print("### backward passes: median ms of the whole backward with one pass's config varied\n")
    print("\n".join(sweep_backward(dev, dtype, bwd_cases, 10 * tol)), flush=True)


if __name__ == "__main__":
    main()
