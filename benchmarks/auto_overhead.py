"""Where `auto`'s time goes on a GPU at issue 15's causal sizes: SDPA, `auto`, its parts.

    python benchmarks/auto_overhead.py          # on a CUDA machine (≈ 30 s)

For B4 H16 N1024 D128 and B2 H16 N4096 D128, bf16: the GPU time of each call by
`triton.testing.do_bench` (CUDA events, median), and the host time per call with no sync
between calls ("cpu-issue": what the Python side costs when the GPU is not the bottleneck).
Rows, forward: SDPA causal and dense, `auto` causal and dense, `triton_kernel.repair` of a
finite answer alone (what replaced the K/V check), `scoring.all_finite(k, v)` (that check, a
host sync), `make_spec`, the Triton forward. Forward+backward: SDPA and `auto` causal, and
`sdpa_checked.redo_if_nonfinite` on finite gradients alone (the device-side check and the
gated launches that replaced the K/V check with a gradient).
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

import qkv
from qkv.attention import scoring
from qkv.attention.spec import make_spec


def host_us(fn, n: int = 200) -> float:
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    return (t1 - t0) / n * 1e6


def main() -> None:
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device here: this script measures GPU time")
    from triton.testing import do_bench

    from qkv.attention import sdpa_checked, triton_kernel

    def row(name, fn) -> None:
        gpu = do_bench(fn, warmup=10, rep=40, return_mode="median") * 1e3
        print(f"| {name} | {gpu:.1f} | {host_us(fn):.1f} |", flush=True)

    for b, h, n, d in ((4, 16, 1024, 128), (2, 16, 4096, 128)):
        q, k, v = (torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        spec = make_spec(q, k, v, causal=True)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        print(f"\nB{b} H{h} N{n} D{d}, bf16\n")
        print("| call | GPU µs | host µs per call |\n|---|---|---|")
        row("sdpa causal", lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True))
        row("auto causal", lambda: qkv.attention(q, k, v, causal=True))
        row("repair of a finite answer", lambda: triton_kernel.repair(q, k, v, spec, out))
        row("all_finite(k, v)", lambda: scoring.all_finite(k, v))
        row("make_spec", lambda: make_spec(q, k, v, causal=True))
        row("triton causal", lambda: qkv.attention(q, k, v, causal=True, backend="triton"))
        row("sdpa dense", lambda: F.scaled_dot_product_attention(q, k, v))
        row("auto dense", lambda: qkv.attention(q, k, v))
        xs = [t.requires_grad_() for t in (q, k, v)]
        do = torch.randn_like(out)

        def sdpa_fb():
            o = F.scaled_dot_product_attention(*xs, is_causal=True)
            return torch.autograd.grad(o, xs, do)

        def auto_fb():
            return torch.autograd.grad(qkv.attention(*xs, causal=True), xs, do)

        row("sdpa causal fwd+bwd", sdpa_fb)
        row("auto causal fwd+bwd", auto_fb)
        grads = sdpa_fb()
        row(
            "redo_if_nonfinite, finite grads",
            lambda: sdpa_checked.redo_if_nonfinite(q, k, v, spec, do, grads),
        )
        for t in xs:
            t.requires_grad_(False)


if __name__ == "__main__":
    main()
