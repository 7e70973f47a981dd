"""Ring attention benchmark: time and peak memory per rank at world 1, 2, 4 against one process.

    python benchmarks/distributed.py [--n 32768] [--heads 2 1] [--d 64] [--repeat 3]
    python benchmarks/distributed.py --backend nccl --worlds 1 --n 8192   # GPU smoke test

What is measured: causal attention, forward + backward, on one sequence of N tokens, (B=1,
Hq, Hk, D) fp32. "one process" = `qkv.attention(q, k, v, causal=True)` on the whole sequence
plus its backward, in a process of its own (the peer). "world W" = `ring_attention` over W
gloo processes on 127.0.0.1, zigzag layout, each rank holding N/W tokens. Every process runs
one torch thread. Time: per repeat, the slowest rank's wall time between two barriers; the
median over repeats. Memory: each process's peak RSS (`VmHWM`) minus its RSS just before
its tensors were made (after `import torch` and the process group), i.e. what its shard, the
attention and the gradients cost, in MiB. "tensor MiB": the same without the process's fixed
costs and the allocator's slack — the bytes of q, k, v, dO plus the most bytes the CPU
allocator held at once during one more forward + backward, counted from the profiler's
allocation events (that pass is not timed and runs after the RSS is read).

On a machine with fewer cores than W + other load the ranks share cores: their times are
honest wall times of that oversubscribed run, not a speed-up (see the printed load averages
and core count). Memory per rank does not depend on that.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_mib() -> float:
    """This process's peak RSS (VmHWM; ru_maxrss would start from the parent's RSS at fork)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024


def _tensor_peak(fn) -> int:
    """The most bytes the CPU allocator held at once while fn() ran, above its start."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")  # fmt: skip
    live = peak = 0
    for _, n in events:
        live += n
        peak = max(peak, live)
    return peak


def _rank(rank: int, world: int, store: str, outdir: str, args: dict) -> None:
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    torch.set_num_threads(1)
    from qkv import attention
    from qkv.distributed import ring_attention, shard_sequence

    backend, peer = args["backend"], args["peer"]
    dev = torch.device(f"cuda:{rank}" if backend == "nccl" else "cpu")
    if not peer:
        dist.init_process_group(backend, init_method=f"file://{store}", rank=rank,
                                world_size=world, timeout=datetime.timedelta(seconds=600))  # fmt: skip
    N, (Hq, Hk), D = args["n"], args["heads"], args["d"]
    n_local = N if peer else shard_sequence(torch.empty(N), rank, world, "zigzag", 0).shape[0]
    base = _rss_mib()
    gen = torch.Generator().manual_seed(rank)
    q, k, v, go = (
        torch.randn(1, h, n_local, D, generator=gen).to(dev).requires_grad_(g)
        for h, g in ((Hq, True), (Hk, True), (Hk, True), (Hq, False))
    )

    def step():
        if peer:
            out = attention(q, k, v, causal=True)
        else:
            out = ring_attention(q, k, v, causal=True, layout="zigzag")
        out.backward(go)
        if dev.type == "cuda":
            torch.cuda.synchronize()

    times = []
    for _ in range(args["repeat"]):
        if not peer:
            dist.barrier()
        t0 = time.perf_counter()
        step()
        if not peer:
            dist.barrier()
        times.append(time.perf_counter() - t0)
        q.grad = k.grad = v.grad = None
    res = {"rank": rank, "tokens": n_local, "times": times, "mem": _peak_mib() - base}
    if dev.type == "cpu":
        inputs = sum(t.numel() * t.element_size() for t in (q, k, v, go))
        res["tensor_mib"] = (inputs + _tensor_peak(step)) / 2**20
    if dev.type == "cuda":
        res["cuda_peak_mib"] = torch.cuda.max_memory_allocated(dev) / 2**20
    Path(outdir, f"rank{rank}.json").write_text(json.dumps(res))
    if not peer:
        dist.destroy_process_group()


def launch(world: int, args: dict) -> list[dict]:
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp:
        procs = [ctx.Process(target=_rank, args=(r, world, os.path.join(tmp, "store"), tmp, args))
                 for r in range(world)]  # fmt: skip
        for p in procs:
            p.start()
        for p in procs:
            p.join()
        bad = [r for r, p in enumerate(procs) if p.exitcode != 0]
        if bad:
            raise SystemExit(f"ranks {bad} failed (exit codes {[procs[r].exitcode for r in bad]})")
        return [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(world)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=32768)
    ap.add_argument("--heads", type=int, nargs=2, default=(2, 1), metavar=("HQ", "HK"))
    ap.add_argument("--d", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--worlds", type=int, nargs="+", default=(1, 2, 4))
    ap.add_argument("--backend", choices=("gloo", "nccl"), default="gloo")
    a = ap.parse_args()
    args = {"n": a.n, "heads": tuple(a.heads), "d": a.d, "repeat": a.repeat,
            "backend": a.backend}  # fmt: skip
    print(f"N={a.n} B=1 Hq={a.heads[0]} Hk={a.heads[1]} D={a.d} fp32 causal, fwd+bwd, "
          f"{a.backend}, {os.cpu_count()} cores, load average before {os.getloadavg()}")  # fmt: skip
    rows = []
    runs = [("one process", 1, True)] + [(f"world {w}", w, False) for w in a.worlds]
    for name, world, peer in runs:
        if peer and a.backend == "nccl":
            continue
        res = launch(world, {**args, "peer": peer})
        wall = [max(r["times"][i] for r in res) for i in range(a.repeat)]
        rows.append((name, res[0]["tokens"], statistics.median(wall), max(r["mem"] for r in res),
                     max(r.get("tensor_mib", math.nan) for r in res),
                     res[0].get("cuda_peak_mib")))  # fmt: skip
    t1, m1, a1 = rows[0][2], rows[0][3], rows[0][4]
    print(
        "\n| run | tokens per rank | median s (fwd+bwd) | × one process | peak MiB per rank "
        "| × one process | tensor MiB per rank | × one process |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, tok, t, m, a, cuda in rows:
        extra = "" if cuda is None else f" (CUDA peak {cuda:.0f} MiB)"
        print(f"| {name} | {tok} | {t:.2f} | {t / t1:.2f} | {m:.0f}{extra} | {m / m1:.2f} "
              f"| {a:.1f} | {a / a1:.2f} |")  # fmt: skip
    print(f"\nload average after {os.getloadavg()}")


if __name__ == "__main__":
    main()
