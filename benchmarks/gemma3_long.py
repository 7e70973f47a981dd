"""gemma3 prefill at 8192 tokens on CPU (issue 16: its window-512 layers on the fused kernel)
against transformers (sdpa) on the same GGUF weights: the last position's logits, paired runs
in one process, medians; and which backend `auto` picks for the local and the global layers.

    .venv/bin/python benchmarks/gemma3_long.py --n 8192 --runs 3
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))

from models import gemma3_ids, gemma3_prefill, load_gemma3_hf, load_gemma3_qkv


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=8192)
    ap.add_argument("--runs", type=int, default=3)
    a = ap.parse_args()
    import torch

    from qkv.attention.api import choose_backend
    from qkv.attention.spec import make_spec

    ours, theirs = load_gemma3_qkv(), load_gemma3_hf()
    ids = gemma3_ids(a.n)
    f_ours, f_hf = gemma3_prefill("qkv", ours, ids), gemma3_prefill("hf", theirs, ids)
    x = torch.empty(1, 4, a.n, 256)
    kv = torch.empty(1, 1, a.n, 256)
    local = choose_backend(x, kv, kv, make_spec(x, kv, kv, causal=True, window=(511, 0)), False)
    glob = choose_backend(x, kv, kv, make_spec(x, kv, kv, causal=True), False)
    ts: dict[str, list[float]] = {"qkv": [], "hf": []}
    with torch.inference_mode():
        lo, lh = f_ours(), f_hf()
        rel = ((lo - lh).abs().max() / lh.abs().max()).item()
        for _ in range(a.runs):
            for name, f in (("qkv", f_ours), ("hf", f_hf)):
                t = time.perf_counter()
                f()
                ts[name].append(time.perf_counter() - t)
    med = {k: sorted(v)[len(v) // 2] for k, v in ts.items()}
    print(f"gemma3 prefill {a.n} tokens → last logits, torch threads {torch.get_num_threads()}, "
          f"load average {os.getloadavg()[0]:.1f}")  # fmt: skip
    print(f"auto picks: local (window 512) layers → {local}, global layers → {glob}")
    print(f"max |Δlogit| / max |logit| vs transformers: {rel:.2e}")
    print(f"qkv {med['qkv']:.2f} s, transformers {med['hf']:.2f} s: {med['hf'] / med['qkv']:.2f}× "
          f"(runs qkv {[round(x, 2) for x in ts['qkv']]}, hf {[round(x, 2) for x in ts['hf']]})")  # fmt: skip


if __name__ == "__main__":
    main()
