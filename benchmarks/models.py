"""Real-model benchmarks: qkv vs transformers on the same weights, ratios from one run.

    python benchmarks/models.py --model minilm|smollm2|all [--runs N]

Speed: both implementations are loaded in one process and run alternately (same machine
state), median of `--runs` timed runs after one warm-up, under torch.inference_mode().
Memory and load time: one fresh subprocess per implementation (`--worker`), which loads the
model, runs the same forward once and reports
    load_s      wall time of the load call (imports excluded)
    peak_rss    the process's peak resident set (ru_maxrss): imports (both workers import
                torch, qkv and transformers, so the baseline is the same) + weights + forward
    fwd_extra   peak_rss after the forward minus the resident set just before it
                (the forward's own peak working memory)
Each model has a `bench_<model>(args)` function and a `worker_<model>_<impl>(args)`
entry registered in BENCHES / WORKERS.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def rss_now() -> int:
    """Current resident set size in bytes (Linux /proc)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def rss_peak() -> int:
    """Peak resident set size of this process in bytes (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def median_time(fn: Callable[[], object], runs: int) -> list[float]:
    out = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def run_worker(name: str, extra: list[str]) -> dict:
    """Run `--worker name` in a fresh interpreter and parse its JSON line."""
    cmd = [sys.executable, __file__, "--worker", name, *extra]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"worker {name} failed:\n{res.stderr[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def mib(n: float) -> str:
    return f"{n / 2**20:,.0f} MiB"


def table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [
        "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in rows
    ]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


# ---------------------------------------------------------------- minilm

MINILM_B, MINILM_S = 8, 512


def minilm_inputs(padded: bool):
    import torch

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 30000, (MINILM_B, MINILM_S), generator=g)
    ids[:, 0], ids[:, -1] = 101, 102
    keep = torch.ones(MINILM_B, MINILM_S, dtype=torch.bool)
    if padded:  # lengths 512, 448, ..., 64: a realistic ragged batch
        for b in range(MINILM_B):
            n = MINILM_S - 64 * b
            keep[b, n:] = False
            ids[b, n:] = 0
            ids[b, n - 1] = 102
    return ids, keep


def load_minilm_qkv():
    import qkv

    return qkv.load("minilm")


def load_minilm_hf():
    from transformers import BertModel

    from qkv.models.bert import package_dir

    return BertModel.from_pretrained(str(package_dir()), attn_implementation="sdpa").eval()


def minilm_forward(impl: str, model, ids, keep):
    if impl == "qkv":
        return lambda: model(ids, attention_mask=keep)
    return lambda: model(input_ids=ids, attention_mask=keep.long()).last_hidden_state


def minilm_worker(impl: str, args) -> dict:
    import torch

    torch.manual_seed(0)
    ids, keep = minilm_inputs(args.padded)
    import transformers  # noqa: F401

    import qkv  # noqa: F401  (imports are excluded from load_s for both sides)

    t = time.perf_counter()
    model = load_minilm_qkv() if impl == "qkv" else load_minilm_hf()
    load_s = time.perf_counter() - t
    before = rss_now()
    with torch.inference_mode():
        minilm_forward(impl, model, ids, keep)()
    peak = rss_peak()
    return {"load_s": load_s, "peak_rss": peak, "fwd_extra": peak - before}


def bench_minilm(args) -> str:
    import torch

    ours, theirs = load_minilm_qkv(), load_minilm_hf()
    rows = [["minilm B×S = 8×512", "qkv", "transformers (sdpa)", "ratio (speed-up)"]]
    for padded in (False, True):
        ids, keep = minilm_inputs(padded)
        f_ours = minilm_forward("qkv", ours, ids, keep)
        f_hf = minilm_forward("hf", theirs, ids, keep)
        with torch.inference_mode():
            a, b = f_ours(), f_hf()
            err = float((a - b)[keep].abs().max())
            t_ours, t_hf = [], []
            for _ in range(args.runs):  # alternate so both see the same machine state
                t_ours += median_time(f_ours, 1)
                t_hf += median_time(f_hf, 1)
        mo, mh = statistics.median(t_ours), statistics.median(t_hf)
        label = "forward, ragged (512…64)" if padded else "forward, full"
        rows.append([f"{label} median s", f"{mo:.3f}", f"{mh:.3f}", f"{mh / mo:.2f}×"])
        rows.append([f"  max |Δ| hidden vs transformers: {err:.1e}", "", "", ""])
    w = {impl: run_worker(f"minilm-{impl}", []) for impl in ("qkv", "hf")}
    rows.append(
        ["load s (fresh process)", f"{w['qkv']['load_s']:.2f}", f"{w['hf']['load_s']:.2f}", ""]
    )
    rows.append(["peak RSS of process", mib(w["qkv"]["peak_rss"]), mib(w["hf"]["peak_rss"]), ""])
    rows.append(
        ["forward's extra peak RSS", mib(w["qkv"]["fwd_extra"]), mib(w["hf"]["fwd_extra"]), ""]
    )
    return table(rows)


# ---------------------------------------------------------------- registry

BENCHES: dict[str, Callable] = {"minilm": bench_minilm}
WORKERS: dict[str, Callable] = {
    "minilm-qkv": lambda a: minilm_worker("qkv", a),
    "minilm-hf": lambda a: minilm_worker("hf", a),
}


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", default="all", help=f"one of {[*BENCHES, 'all']}")
    p.add_argument("--runs", type=int, default=5, help="timed runs per implementation (median)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--padded", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker:
        print(json.dumps(WORKERS[args.worker](args)))
        return
    names = list(BENCHES) if args.model == "all" else [args.model]
    for name in names:
        if name not in BENCHES:
            raise SystemExit(f"unknown model {name!r}: choose one of {[*BENCHES, 'all']}")
        print(f"\n## {name}  (torch {torch.__version__}, {torch.get_num_threads()} threads)\n")
        print(BENCHES[name](args))


if __name__ == "__main__":
    main()
