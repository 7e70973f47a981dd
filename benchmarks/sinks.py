"""Learned attention sinks (gpt-oss): `qkv.attention(sinks=)` vs the peers' ways, one run.

    .venv/bin/python benchmarks/sinks.py            # ~3 min on 2 cores
    .venv/bin/python benchmarks/sinks.py --n 2048   # a smaller sequence

PyTorch SDPA and FlexAttention have no sink term. The peers here:
- "SDPA + sink key": one extra key per head whose score is the sink (q·0 = 0, plus a float
  bias σ_h in an (H, N, N+1) attn_mask that also carries the causal −inf), value 0; exact,
  but the mask costs O(H·N²) memory;
- "transformers eager": gpt-oss's `eager_attention_forward` (the sink as a concatenated score
  column, softmax, column dropped): the (H, N, N+1) scores and weights in memory.
CPU, float32, B=1, H=8 query heads over 8 kv heads, D=64, causal. Ratios are throughput ratios
(peer time / our time, > 1 = we are faster), medians of alternating runs; the error is the
max |out − float64| of each; peak memory the peak RSS of a fresh subprocess running fwd+bwd.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

import qkv

H, D = 8, 64


def paired(fns: dict, repeats: int) -> dict[str, float]:
    """Median seconds of each callable, run in turn (a, b, c, a, b, c, …) after one warm-up:
    on a shared machine every side sees the same background load."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def sdpa_sink_key(q, k, v, sinks, causal=True):
    """Sinks through SDPA: a zero key and value appended, the sink as that key's float bias."""
    B, Hq, Sq, _ = q.shape
    Sk = k.shape[2]
    k1 = torch.cat([k, k.new_zeros(B, k.shape[1], 1, k.shape[3])], 2)
    v1 = torch.cat([v, v.new_zeros(B, v.shape[1], 1, v.shape[3])], 2)
    bias = q.new_zeros(1, Hq, Sq, Sk + 1)
    if causal:
        keep = torch.ones(Sq, Sk, dtype=torch.bool).tril(Sk - Sq)
        bias[..., :Sk] = bias[..., :Sk].masked_fill(~keep, float("-inf"))
    bias[..., Sk] = sinks.view(1, Hq, 1)
    return F.scaled_dot_product_attention(q, k1, v1, attn_mask=bias)


def hf_eager(q, k, v, sinks, causal=True):
    """transformers' gpt-oss eager attention (its mask: finfo.min where dropped)."""
    from transformers.models.gpt_oss import modeling_gpt_oss as m

    class Module(torch.nn.Module):
        num_key_value_groups = q.shape[1] // k.shape[1]
        training = False

    mod = Module()
    mod.sinks = sinks
    Sq, Sk = q.shape[2], k.shape[2]
    mask = None
    if causal:
        keep = torch.ones(Sq, Sk, dtype=torch.bool).tril(Sk - Sq)
        mask = torch.zeros(Sq, Sk).masked_fill(~keep, torch.finfo(q.dtype).min).view(1, 1, Sq, Sk)
    return m.eager_attention_forward(mod, q, k, v, mask, scaling=q.shape[-1] ** -0.5)[0].transpose(
        1, 2
    )


PEERS = {
    "qkv": lambda q, k, v, s: qkv.attention(q, k, v, causal=True, sinks=s),
    "SDPA + sink key": sdpa_sink_key,
    "transformers eager": hf_eager,
}


def inputs(n: int, sq: int | None = None, grad: bool = False):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, H, sq or n, D, generator=g)
    k, v = (torch.randn(1, H, n, D, generator=g) for _ in range(2))
    sinks = 2.0 + torch.randn(H, generator=g)
    return [t.requires_grad_(grad) for t in (q, k, v, sinks)]


def error(name: str, n: int, sq: int | None) -> float:
    """max |out − float64 truth| (the truth: the sink as a column, in float64)."""
    q, k, v, s = inputs(n, sq)
    got = PEERS[name](q, k, v, s)
    q, k, v, s = (t.double() for t in (q, k, v, s))
    sc = q @ k.transpose(-1, -2) / D**0.5
    keep = torch.ones(q.shape[2], n, dtype=torch.bool).tril(n - q.shape[2])
    sc = sc.masked_fill(~keep, float("-inf"))
    col = s.view(1, H, 1, 1).expand(1, H, q.shape[2], 1)
    truth = torch.softmax(torch.cat([sc, col], -1), -1)[..., :-1] @ v
    return float((got.double() - truth).abs().max())


def time_table(n: int, repeats: int) -> list[str]:
    out = [
        "| case | qkv | peer | ratio (peer/qkv) | max error vs float64, qkv / peer |",
        "|---|---|---|---|---|",
    ]
    for what, sq, grad in (("forward", None, False), ("fwd+bwd", None, True),
                           ("decode step (Sq=1)", 1, False)):  # fmt: skip
        q, k, v, s = inputs(n, sq, grad)

        def run(fn):
            if not grad:
                return lambda: fn(q, k, v, s)

            def step():
                for t in (q, k, v, s):
                    t.grad = None
                fn(q, k, v, s).sum().backward()

            return step

        with torch.no_grad() if not grad else torch.enable_grad():
            t = paired({name: run(fn) for name, fn in PEERS.items()}, repeats)
        e = error("qkv", n, sq)
        for peer in ("SDPA + sink key", "transformers eager"):
            out.append(
                f"| {what} N={n} vs {peer} | {t['qkv'] * 1e3:.2f} ms | {t[peer] * 1e3:.2f} ms "
                f"| {t[peer] / t['qkv']:.2f}× | {e:.1e} / {error(peer, n, sq):.1e} |"
            )
    return out


MEMORY_CHILD = """
import sys, torch
sys.path.insert(0, sys.argv[3])
import sinks as b
n, name = int(sys.argv[1]), sys.argv[2]
q, k, v, s = b.inputs(n, grad=True)
b.PEERS[name](q, k, v, s).sum().backward()
print(next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM')) / 1024)
"""


def memory_table(n: int) -> list[str]:
    from pathlib import Path

    here = str(Path(__file__).parent)
    out = ["| causal fwd+bwd with sinks | peak RSS |", "|---|---|"]
    for name in PEERS:
        res = subprocess.run([sys.executable, "-c", MEMORY_CHILD, str(n), name, here],
                             capture_output=True, text=True, check=True)  # fmt: skip
        out.append(f"| {name}, N={n} | {float(res.stdout):.0f} MiB |")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--n", type=int, default=4096, help="sequence length (default 4096)")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU float32, "
          f"B=1 H={H} D={D}, causal, learned sinks\n")  # fmt: skip
    print("\n".join(memory_table(args.n)) + "\n", flush=True)
    print("\n".join(time_table(args.n, args.repeats)) + "\n", flush=True)


if __name__ == "__main__":
    main()
