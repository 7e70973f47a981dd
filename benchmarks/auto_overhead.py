"""Where `auto`'s time goes on a GPU at issue 15's causal sizes: SDPA, `auto`, its parts.

    python benchmarks/auto_overhead.py          # on a CUDA machine (≈ 20 s)

For B4 H16 N1024 D128 and B2 H16 N4096 D128, bf16: the GPU time of each call by
`triton.testing.do_bench` (CUDA events, median), and the host time per call with no sync
between calls ("cpu-issue": what the Python side costs when the GPU is not the bottleneck).
Rows: SDPA causal and dense, `auto` causal and dense, `scoring.all_finite(k, v)` (the K/V check
`auto` made before SDPA on masked calls), `make_spec`, the Triton forward, and `auto` causal with
the check replaced by `True` (what the check cost).
"""

from __future__ import annotations

import time
from unittest import mock

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

    for b, h, n, d in ((4, 16, 1024, 128), (2, 16, 4096, 128)):
        q, k, v = (torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        runs = {
            "sdpa causal": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True),
            "auto causal": lambda: qkv.attention(q, k, v, causal=True),
            "all_finite(k, v)": lambda: scoring.all_finite(k, v),
            "make_spec": lambda: make_spec(q, k, v, causal=True),
            "triton causal": lambda: qkv.attention(q, k, v, causal=True, backend="triton"),
            "sdpa dense": lambda: F.scaled_dot_product_attention(q, k, v),
            "auto dense": lambda: qkv.attention(q, k, v),
        }
        print(f"\nB{b} H{h} N{n} D{d}, bf16\n")
        print("| call | GPU µs | host µs per call |\n|---|---|---|")
        for name, fn in runs.items():
            gpu = do_bench(fn, warmup=10, rep=40, return_mode="median") * 1e3
            print(f"| {name} | {gpu:.1f} | {host_us(fn):.1f} |", flush=True)
        with mock.patch.object(scoring, "all_finite", lambda *xs: True):
            fn = lambda: qkv.attention(q, k, v, causal=True)  # noqa: E731
            gpu = do_bench(fn, warmup=10, rep=40, return_mode="median") * 1e3
            print(f"| auto causal, check skipped | {gpu:.1f} | {host_us(fn):.1f} |", flush=True)


if __name__ == "__main__":
    main()
