"""Decode steps on one thread or on all of PyTorch's: tokens/s after the prompt, both in one
process, alternating (`qkv.models.generate.STEP_THREADS` = 1 vs None), with the same tokens.

    python benchmarks/decode_threads.py --model smollm2 --threads 2 --prompt 7 2048 --rounds 6

Prints one table row per prompt length: medians over the rounds of each mode, their ratio, and
the load average before and after (a busy machine is what one thread is for: say so). `--peer`
(smollm2) adds a row against `transformers.generate` on the same threads: whole calls of 32 + 64
greedy tokens, prefill included, alternating, the same tokens.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

import qkv
from qkv.models import generate

TEXT = "The history of the city begins with a small village by the river. " * 250


def rate(model, prompt: list[int], new: int) -> tuple[float, list[int]]:
    """tok/s of the `new` cached steps after the prompt's, and every token."""
    it = model.generate_ids(prompt, new + 1, stop_ids=())
    first = next(it)  # the prompt's step, on the caller's threads in both modes
    t = time.perf_counter()
    rest = list(it)
    return new / (time.perf_counter() - t), [first, *rest]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--threads", type=int, default=2, help="torch threads of the caller")
    p.add_argument("--prompt", type=int, nargs="+", default=[7, 2048], help="prompt tokens")
    p.add_argument("--new", type=int, default=32, help="tokens decoded after the prompt")
    p.add_argument("--rounds", type=int, default=6, help="runs of each mode, alternating")
    p.add_argument("--peer", action="store_true", help="also time transformers (smollm2)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model = qkv.load(args.model)
    ids = model.tokenizer.encode(TEXT).ids
    print(f"{args.model}, {args.threads} torch threads, {args.new} tokens, {args.rounds} rounds")
    print(
        "| prompt | one-thread steps tok/s (median) | all-thread steps | ratio | runs (one / all) | load before → after |"
    )
    print("|---|---|---|---|---|---|")
    for n in args.prompt:
        prompt = ids[:n]
        load0 = os.getloadavg()[0]
        rates: dict[str, list[float]] = {"one": [], "all": []}
        tokens: dict[str, list[int]] = {}
        rate(model, prompt, 2)  # warm-up
        for r in range(args.rounds):
            for mode in ("one", "all") if r % 2 == 0 else ("all", "one"):
                generate.STEP_THREADS = 1 if mode == "one" else None
                got, toks = rate(model, prompt, args.new)
                rates[mode].append(got)
                if tokens.setdefault(mode, toks) != toks:
                    raise SystemExit(f"{mode}: the tokens changed between runs")
        generate.STEP_THREADS = 1
        if tokens["one"] != tokens["all"]:
            raise SystemExit("one-thread and all-thread steps gave different tokens")
        one, all_ = (statistics.median(rates[m]) for m in ("one", "all"))
        runs = " / ".join(" ".join(f"{x:.1f}" for x in rates[m]) for m in ("one", "all"))
        print(f"| {n} | {one:.1f} | {all_:.1f} | {one / all_:.2f}× | {runs} | "
              f"{load0:.1f} → {os.getloadavg()[0]:.1f} |", flush=True)  # fmt: skip
    if args.peer:
        peer(model, args)


def peer(model, args) -> None:
    """qkv (one-thread steps) vs transformers.generate, 32 + 64 greedy tokens, whole calls."""
    sys.path.insert(0, str(Path(__file__).parent))
    import models as bench  # benchmarks/models.py: the same loaders and calls as its tables

    ids = bench.smollm2_ids(bench.SMOL_PROMPT)
    ours = bench.smollm2_decode("qkv", model, ids, bench.SMOL_DECODE)
    theirs = bench.smollm2_decode("hf", bench.load_smollm2_hf(), ids, bench.SMOL_DECODE)
    with torch.inference_mode():
        same = ours() == theirs()
        load0 = os.getloadavg()[0]
        r = bench.alternate(ours, theirs, args.rounds)
    n = bench.SMOL_DECODE
    print(f"\n| greedy {bench.SMOL_PROMPT}+{n} tokens, {args.threads} threads, tok/s (median) | qkv | "
          f"transformers | ratio | load before → after |\n|---|---|---|---|---|\n"
          f"| same tokens: {same} | {n / r.a:.1f} | {n / r.b:.1f} | {r.speedup()} | "
          f"{load0:.1f} → {os.getloadavg()[0]:.1f} |")  # fmt: skip


if __name__ == "__main__":
    main()
