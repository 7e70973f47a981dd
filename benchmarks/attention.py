"""Engine benchmark: qkv vs PyTorch SDPA and FlexAttention, measured side by side in one run.

    .venv/bin/python benchmarks/attention.py            # everything (~10 min on 2 cores)
    .venv/bin/python benchmarks/attention.py --quick    # skip the N=32768 memory run and flex

CPU, float32, B=1, H=8, D=64. Ratios are throughput ratios (peer time / our time, > 1 = we are
faster), from medians of repeated runs; peak memory is the peak RSS of a fresh subprocess.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

import qkv
from qkv.attention.spec import make_spec
from qkv.attention.tiled import tiled

B, H, D = 1, 8, 64


def median_time(fn, repeats: int = 5, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def paired(ours, peer, repeats: int = 5) -> tuple[float, float]:
    """Medians of alternating runs (ours, peer, ours, peer, …): on a shared machine both sides
    see the same background load, so the ratio is fair even when single timings swing."""
    ours(), peer()
    a, b = [], []
    for _ in range(repeats):
        for fn, acc in ((ours, a), (peer, b)):
            t0 = time.perf_counter()
            fn()
            acc.append(time.perf_counter() - t0)
    return statistics.median(a), statistics.median(b)


def inputs(n: int, requires_grad: bool = False):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(B, H, n, D, generator=g).requires_grad_(requires_grad) for _ in range(3)]


def fwd_bwd(fn, q, k, v):
    def run():
        for t in (q, k, v):
            t.grad = None
        fn(q, k, v).sum().backward()

    return run


def row(name, ours, peer, target=None):
    ratio = peer / ours
    ok = "" if target is None else ("yes" if ratio >= target else f"NO (target ≥ {target}×)")
    return f"| {name} | {ours * 1e3:.1f} ms | {peer * 1e3:.1f} ms | {ratio:.2f}× | {ok} |"


def speed_table(repeats: int) -> list[str]:
    out = ["| case | qkv | peer | ratio (peer/qkv) | target met |", "|---|---|---|---|---|"]
    for n in (1024, 4096):
        q, k, v = inputs(n)
        for causal in (False, True):
            ours, sdpa = paired(
                lambda: qkv.attention(q, k, v, causal=causal),
                lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal),
                repeats,
            )
            out.append(
                row(f"auto {'causal' if causal else 'dense'} N={n} vs SDPA", ours, sdpa, 0.95)
            )
    q, k, v = inputs(4096)
    spec = make_spec(q, k, v, causal=True)
    ours, sdpa = paired(
        lambda: tiled(q, k, v, spec),
        lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True),
        repeats,
    )
    out.append(row("tiled causal N=4096 forward vs SDPA", ours, sdpa, 0.5))
    q, k, v = inputs(4096, requires_grad=True)
    ours, sdpa = paired(
        fwd_bwd(lambda q, k, v: qkv.attention(q, k, v, causal=True, backend="tiled"), q, k, v),
        fwd_bwd(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True), q, k, v),
        3,
    )
    out.append(row("tiled causal N=4096 fwd+bwd vs SDPA", ours, sdpa, 0.4))
    return out


def window_table(repeats: int, flex: bool) -> list[str]:
    n, w = 16384, 256
    q, k, v = inputs(n)
    out = ["| case | qkv | peer | ratio (peer/qkv) | target met |", "|---|---|---|---|---|"]
    ours = median_time(lambda: qkv.attention(q, k, v, window=(w - 1, 0)), repeats)
    i = torch.arange(n)
    keep = (i.view(-1, 1) - i.view(1, -1) >= 0) & (i.view(-1, 1) - i.view(1, -1) < w)
    sdpa = median_time(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=keep), 2)
    out.append(row(f"auto window {w} N={n} vs SDPA + bool mask", ours, sdpa, 5.0))
    if flex:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        def mask_mod(b, h, q_idx, kv_idx):
            return (q_idx >= kv_idx) & (q_idx - kv_idx < w)

        t0 = time.perf_counter()
        block_mask = create_block_mask(mask_mod, None, None, n, n, device="cpu")
        compiled = torch.compile(flex_attention)
        compiled(q, k, v, block_mask=block_mask)
        compile_s = time.perf_counter() - t0
        ours, fl = paired(
            lambda: qkv.attention(q, k, v, window=(w - 1, 0)),
            lambda: compiled(q, k, v, block_mask=block_mask),
            repeats,
        )
        out.append(row(f"auto window {w} N={n} vs compiled flex_attention", ours, fl, 1.0))
        out.append(f"\nflex_attention compile + block mask: {compile_s:.1f} s (once per shape)")
    return out


FIRST_CALL_CHILD = """
import sys, time, torch, qkv
n, w = int(sys.argv[1]), int(sys.argv[2])
g = torch.Generator().manual_seed(0)
q, k, v = [torch.randn(1, 8, n, 64, generator=g) for _ in range(3)]
t0 = time.perf_counter()
qkv.attention(q, k, v, window=(w - 1, 0), backend="fused")
print(time.perf_counter() - t0)
"""


def fused_table(repeats: int) -> list[str]:
    """The fused CPU kernel (issue 16) vs compiled flex_attention, forward, compile excluded;
    then the first call of each with compile (ours: numba from an empty cache, in a fresh
    process)."""
    import tempfile

    from torch.nn.attention.flex_attention import and_masks, create_block_mask, flex_attention

    compiled = torch.compile(flex_attention)
    out = ["| case | qkv | peer | ratio (peer/qkv) | target met |", "|---|---|---|---|---|"]
    firsts = []
    w = 256

    def causal(b, h, q_idx, kv_idx):
        return q_idx >= kv_idx

    def window(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (q_idx - kv_idx < w)

    doc = torch.arange(8192) * 8 // 8192  # 8 documents of 1024 tokens

    def same_doc(b, h, q_idx, kv_idx):
        return doc[q_idx] == doc[kv_idx]

    def prefix(b, h, q_idx, kv_idx):
        return kv_idx < 2048

    cases = [
        (f"window {w}", 16384, dict(window=(w - 1, 0)), window),
        ("document mask, 8 docs, causal", 8192,
         dict(causal=True, mask_mod=qkv.document_mask(doc)), and_masks(causal, same_doc)),
        ("prefix-LM, prefix 2048", 8192, dict(mask_mod=qkv.prefix_lm_mask(2048)),
         lambda b, h, q_idx, kv_idx: prefix(b, h, q_idx, kv_idx) | causal(b, h, q_idx, kv_idx)),
    ]  # fmt: skip
    for name, n, kw, mod in cases:
        q, k, v = inputs(n)
        t0 = time.perf_counter()
        bm = create_block_mask(mod, None, None, n, n, device="cpu")
        compiled(q, k, v, block_mask=bm)
        flex_first = time.perf_counter() - t0
        ours, fl = paired(
            lambda: qkv.attention(q, k, v, **kw, backend="fused"),
            lambda: compiled(q, k, v, block_mask=bm),
            repeats,
        )
        out.append(row(f"fused {name} N={n} forward vs compiled flex_attention", ours, fl, 1.0))
        if name.startswith("window"):
            firsts.append(
                f"flex_attention first call (compile + block mask + run): {flex_first:.1f} s"
            )
            with tempfile.TemporaryDirectory() as cache:
                res = subprocess.run(
                    [sys.executable, "-c", FIRST_CALL_CHILD, str(n), str(w)],
                    capture_output=True, text=True, check=True,
                    env={**__import__("os").environ, "NUMBA_CACHE_DIR": cache},
                )  # fmt: skip
            firsts.append(
                f"qkv fused first call (numba compile from an empty cache + block mask + run): "
                f"{float(res.stdout.split()[-1]):.1f} s"
            )
    # forward + backward: FlexAttention has no CPU backward, so the peer is our own tiled path
    q, k, v = (t.requires_grad_() for t in inputs(16384))
    kw = dict(window=(w - 1, 0))

    def step(backend):
        qkv.attention(q, k, v, **kw, backend=backend).sum().backward()
        q.grad = k.grad = v.grad = None

    ours, tl = paired(lambda: step("fused"), lambda: step("tiled"), repeats)
    out.append(row(f"fused window {w} N=16384 forward + backward vs qkv tiled", ours, tl, 1.0))
    firsts.append(
        "forward + backward vs flex: not compared, FlexAttention has no CPU backward in this "
        "torch (NotImplementedError: FlexAttention does not support backward on CPU)"
    )
    return [*out, "", *firsts]


def weights_table(repeats: int) -> list[str]:
    n = 16384
    q, k, v = inputs(n)
    fwd = median_time(lambda: qkv.attention(q, k, v, causal=True), 3)
    _, lse = qkv.attention(q, k, v, causal=True, return_lse=True)
    one = median_time(lambda: qkv.attention_weights(q, k, lse, rows=[n - 1], causal=True), repeats)
    share = one / fwd
    ok = "yes" if share <= 0.05 else "NO (target ≤ 5%)"
    return [
        "| case | time | share of forward | target met |",
        "|---|---|---|---|",
        f"| causal forward N={n} (auto) | {fwd * 1e3:.1f} ms | 100% | |",
        f"| attention_weights, 1 row, N={n} | {one * 1e3:.2f} ms | {share:.2%} | {ok} |",
    ]


MEMORY_CHILD = """
import sys, time, torch, qkv
n, backend = int(sys.argv[1]), sys.argv[2]
q, k, v = [torch.randn(1, 8, n, 64, requires_grad=True) for _ in range(3)]
t0 = time.perf_counter()
qkv.attention(q, k, v, causal=True, backend=backend).sum().backward()
print(next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM')) / 1024, time.perf_counter() - t0)
"""


def memory_table(n: int) -> list[str]:
    out = ["| case | peak RSS | time | target met |", "|---|---|---|---|"]
    for backend in ("tiled", "fused"):
        res = subprocess.run(
            [sys.executable, "-c", MEMORY_CHILD, str(n), backend],
            capture_output=True,
            text=True,
            check=True,
        )
        mib, secs = map(float, res.stdout.split())
        ok = "yes" if mib <= 2048 else "NO (target ≤ 2 GB)"
        gib_scores = 8 * n * n * 4 / 2**30
        out.append(
            f"| {backend} causal fwd+bwd N={n} (score matrix alone: {gib_scores:.0f} GiB) | {mib:.0f} MiB | {secs:.0f} s | {ok} |"
        )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--quick", action="store_true", help="skip flex_attention and the N=32768 memory run"
    )
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", help="also write the tables here")
    ap.add_argument("--only", help="run only this table (memory, speed, window, weights, fused)")
    args = ap.parse_args()
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU float32, B={B} H={H} D={D}\n"
    )
    tables = {}
    # memory first: its subprocess must not inherit what torch.compile sets up for flex
    for name, fn in (
        ("memory", (lambda: memory_table(32768)) if not args.quick else None),
        ("speed", lambda: speed_table(args.repeats)),
        ("window", lambda: window_table(args.repeats, flex=not args.quick)),
        ("weights", lambda: weights_table(args.repeats)),
        ("fused", (lambda: fused_table(args.repeats)) if not args.quick else None),
    ):
        if fn is None or (args.only and name != args.only):
            continue
        tables[name] = fn()
        print("\n".join(tables[name]) + "\n", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(tables, f, indent=1)


if __name__ == "__main__":
    main()
