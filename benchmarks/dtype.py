"""`qkv.load(path, dtype=)`: memory, load time, forward time and error by dtype, against
transformers loading the same checkpoint in the same dtype, one run.

    .venv/bin/python benchmarks/dtype.py                 # ~3 min on 2 cores, ~1.5 GB of disk
    .venv/bin/python benchmarks/dtype.py --layers 8      # a smaller model

A random Llama checkpoint (GQA, untied head; --layers × d=1024, 16 / 4 heads, MLP 2816, vocab
32000: 337M parameters at 24 layers) is saved in bfloat16, as checkpoints on the Hub are. Each
row runs in a fresh subprocess that imports torch and one of qkv / transformers, loads, and runs
forward passes of one --n-token text. Memory, both minus the RSS after the imports: the RSS after
the forwards (what the model holds, every weight read once; file-backed pages included) and the
peak RSS of the whole run (`VmHWM`: the load's copies and the forward's activations). The error
is max |logits − transformers float64| / max |transformers float64|. Ratios are peer / qkv
(> 1: qkv uses less memory or time). Times are medians of --repeats forwards after one
warm-up forward.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = r"""
import json, resource, statistics, sys, time
import torch
who, dtype, folder, n, repeats, out = sys.argv[1:7]
if who == "qkv":
    import qkv
else:
    import transformers
def rss():  # the resident set now (anonymous and file-backed), MiB
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20
def peak():  # the resident set's peak so far, MiB: VmHWM, which exec resets (ru_maxrss keeps
    # the parent's RSS at fork: a child of a parent holding the built model would report it)
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmHWM")) / 1024
base = rss()
dtype, n, repeats = getattr(torch, dtype), int(n), int(repeats)
t0 = time.perf_counter()
if who == "qkv":
    model = qkv.load(folder, dtype=dtype)
    run = lambda ids: model(ids)
else:
    model = transformers.AutoModelForCausalLM.from_pretrained(
        folder, dtype=dtype, attn_implementation="sdpa" if dtype != torch.float64 else "eager").eval()
    run = lambda ids: model(ids).logits
load_s = time.perf_counter() - t0
ids = torch.randint(0, 32000, (1, n), generator=torch.Generator().manual_seed(1))
times = []
with torch.no_grad():
    run(ids)  # warm-up: first-call costs (thread pools, lazily built tables) are not per text
    for _ in range(repeats):
        t = time.perf_counter()
        logits = run(ids)
        times.append(time.perf_counter() - t)
torch.save(logits[0, :, :4096].double(), out)
print(json.dumps({"load_s": load_s, "rss_mib": rss() - base, "peak_mib": peak() - base,
                  "fwd_s": statistics.median(times)}))
"""


def build(folder: Path, layers: int) -> int:
    """A random Llama checkpoint in bfloat16 in `folder`; returns its parameter count."""
    import torch
    import transformers

    cfg = transformers.LlamaConfig(
        hidden_size=1024, num_hidden_layers=layers, num_attention_heads=16,
        num_key_value_heads=4, intermediate_size=2816, vocab_size=32000,
        max_position_embeddings=4096, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    with torch.device("cpu"):
        model = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


def run(who: str, dtype: str, folder: Path, n: int, repeats: int, out: Path) -> dict:
    p = subprocess.run(
        [sys.executable, "-c", CHILD, who, dtype, str(folder), str(n), str(repeats), str(out)],
        capture_output=True, text=True, env={**os.environ, "TRANSFORMERS_VERBOSITY": "error"},
    )  # fmt: skip
    if p.returncode != 0:
        raise SystemExit(f"{who} {dtype} failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--n", type=int, default=512, help="tokens per forward (default 512)")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "llama"
        t = time.perf_counter()
        n_params = build(folder, args.layers)
        size = sum(f.stat().st_size for f in folder.glob("*.safetensors")) / 2**20
        print(f"random Llama, {n_params / 1e6:.0f}M parameters, {size:.0f} MiB of bfloat16 "
              f"safetensors (built in {time.perf_counter() - t:.0f} s); {args.n} tokens, "
              f"{torch.get_num_threads()} threads, torch {torch.__version__}")  # fmt: skip
        res, logits = {}, {}
        for dtype in ("float64", "float32", "bfloat16", "float16"):
            for who in ("transformers", "qkv") if dtype != "float64" else ("transformers",):
                out = Path(tmp) / f"{who}-{dtype}.pt"
                reps = 1 if dtype == "float64" else args.repeats
                res[who, dtype] = run(who, dtype, folder, args.n, reps, out)
                logits[who, dtype] = torch.load(out)
        want = logits["transformers", "float64"]
        print()
        print(
            "| dtype | RSS qkv | transformers | ratio | peak RSS qkv | transformers | "
            "ratio | forward qkv | transformers | ratio | error qkv | transformers |"
        )
        print("|---|---|---|---|---|---|---|---|---|---|---|---|")
        for dtype in ("float32", "bfloat16", "float16"):
            q, t = res["qkv", dtype], res["transformers", dtype]
            err = {w: float((logits[w, dtype] - want).abs().max() / want.abs().max())
                   for w in ("qkv", "transformers")}  # fmt: skip
            print(
                f"| {dtype} | {q['rss_mib']:.0f} MiB | {t['rss_mib']:.0f} MiB | "
                f"{t['rss_mib'] / q['rss_mib']:.2f}× | {q['peak_mib']:.0f} MiB | "
                f"{t['peak_mib']:.0f} MiB | {t['peak_mib'] / q['peak_mib']:.2f}× | "
                f"{q['fwd_s'] * 1e3:.0f} ms | {t['fwd_s'] * 1e3:.0f} ms | "
                f"{t['fwd_s'] / q['fwd_s']:.2f}× | {err['qkv']:.1e} | {err['transformers']:.1e} |"
            )
        print()
        print("load seconds: " + ", ".join(
            f"{w} {d} {res[w, d]['load_s']:.1f}" for (w, d) in res if d != "float64"))  # fmt: skip


if __name__ == "__main__":
    main()
