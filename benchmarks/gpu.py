"""The engine on a GPU: correctness of `tiled` against PyTorch SDPA, then a timing table.

    python benchmarks/gpu.py                  # on a CUDA machine (≈ 1–2 minutes)
    python benchmarks/gpu.py --device cpu --quick   # smoke test of the script itself

(Not named cuda.py: a script of that name in benchmarks/ shadows the `cuda` package that
torch imports at start-up, and breaks every sibling script.)

Prints the card's name; paste the tables into benchmarks/RESULTS.md under "CUDA".
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import qkv

TOL = {torch.float32: 2e-3, torch.bfloat16: 3e-2, torch.float16: 5e-3}  # vs SDPA, same dtype


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def median_ms(fn, device: str, repeats: int = 10) -> float:
    fn()
    sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def correctness(device: str, dtypes, n: int) -> list[str]:
    rows = [
        "| dtype | case | max |out − SDPA| | max |dq − SDPA dq| | ok |",
        "|---|---|---|---|---|",
    ]
    for dtype in dtypes:
        for name, hq, hk, kw, skw in (
            ("causal mha", 8, 8, dict(causal=True), dict(is_causal=True)),
            ("causal gqa 8/2", 8, 2, dict(causal=True), dict(is_causal=True, enable_gqa=True)),
            ("dense mqa 8/1", 8, 1, {}, dict(enable_gqa=True)),
        ):
            g = torch.Generator(device=device).manual_seed(0)
            q = torch.randn(
                2, hq, n, 64, device=device, dtype=dtype, generator=g, requires_grad=True
            )
            k = torch.randn(
                2, hk, n, 64, device=device, dtype=dtype, generator=g, requires_grad=True
            )
            v = torch.randn(
                2, hk, n, 64, device=device, dtype=dtype, generator=g, requires_grad=True
            )
            ours = qkv.attention(q, k, v, backend="tiled", **kw)
            (dq,) = torch.autograd.grad(ours.float().sum(), q)
            want = F.scaled_dot_product_attention(q, k, v, **skw)
            (dq_want,) = torch.autograd.grad(want.float().sum(), q)
            e_o = (ours.float() - want.float()).abs().max().item()
            e_g = (dq.float() - dq_want.float()).abs().max().item()
            ok = "yes" if e_o <= TOL[dtype] and e_g <= 10 * TOL[dtype] else "NO"
            rows.append(f"| {dtype} | {name} | {e_o:.2e} | {e_g:.2e} | {ok} |")
    return rows


def timing(device: str, dtype, sizes) -> list[str]:
    rows = ["| N | case | tiled | auto | SDPA | tiled/SDPA |", "|---|---|---|---|---|---|"]
    for n in sizes:
        q, k, v = (torch.randn(1, 8, n, 64, device=device, dtype=dtype) for _ in range(3))
        for causal in (False, True):
            t = median_ms(lambda: qkv.attention(q, k, v, causal=causal, backend="tiled"), device)
            a = median_ms(lambda: qkv.attention(q, k, v, causal=causal), device)
            s = median_ms(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal), device)
            rows.append(
                f"| {n} | {'causal' if causal else 'dense'} fwd | {t:.2f} ms | {a:.2f} ms | {s:.2f} ms | {s / t:.2f}× |"
            )
        t = median_ms(lambda: qkv.attention(q, k, v, window=(255, 0), backend="tiled"), device)
        rows.append(f"| {n} | window 256 fwd | {t:.2f} ms | | | |")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here: run on a GPU machine, or pass --device cpu --quick")
    name = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    print(f"device: {name}, torch {torch.__version__}\n")
    dtypes = (
        [torch.float32] if args.device == "cpu" else [torch.float32, torch.bfloat16, torch.float16]
    )
    print("\n".join(correctness(args.device, dtypes, 128 if args.quick else 1024)) + "\n")
    sizes = [256] if args.quick else [1024, 4096, 16384]
    dtype = torch.float32 if args.device == "cpu" else torch.bfloat16
    print(f"timing, {dtype}, B=1 H=8 D=64, median of 10:\n")
    print("\n".join(timing(args.device, dtype, sizes)))


if __name__ == "__main__":
    main()
