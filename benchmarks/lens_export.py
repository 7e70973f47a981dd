"""Whole-sequence export vs one plain forward (issue 13: exporting all rows of a 512-token text
takes ≤ 2× one forward). smollm2, the prose-like text of benchmarks/lens.py, interleaved
repeats in one process, medians. "dense"/"top-k": `capture_text` then `export_rows`;
"qkv export": `export_text` (dense, rows written from the forward's layer hooks).

    .venv/bin/python benchmarks/lens_export.py --n 512 --repeat 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(__file__))

from lens import text_of, threads


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=512)
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args()
    import torch

    threads()
    import qkv
    from qkv.lens.export import capture_text, export_rows, export_text

    m = qkv.load("smollm2")
    text = text_of(m.tokenizer, a.n)
    ids = torch.tensor([m.tokenizer.encode(text).ids])
    assert ids.shape[1] == a.n, ids.shape
    times: dict[str, list[float]] = {"forward": [], "dense": [], "top-k": [], "qkv export": []}
    size: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as d, torch.inference_mode():
        m(ids)  # warm-up
        for _ in range(a.repeat):
            t = time.perf_counter()
            m(ids)
            times["forward"].append(time.perf_counter() - t)
            for what, top in (("dense", 0), ("top-k", 32)):
                t = time.perf_counter()
                cap = capture_text(text, model=m, progress=False)
                rows, _ = export_rows(cap, os.path.join(d, f"{what}.npz"), top=top)
                times[what].append(time.perf_counter() - t)
                size[what] = rows.nbytes / 2**20
                del cap, rows
            # what `qkv export` runs: dense rows written from the forward's layer hooks
            t = time.perf_counter()
            rows, _ = export_text(text, os.path.join(d, "cli.npz"), model=m, top=0, progress=False)
            times["qkv export"].append(time.perf_counter() - t)
            size["qkv export"] = rows.nbytes / 2**20
            del rows
    f = statistics.median(times["forward"])
    print(f"smollm2, {a.n} tokens, torch threads {torch.get_num_threads()}, "
          f"load average {os.getloadavg()[0]:.1f}")  # fmt: skip
    for what, xs in times.items():
        extra = f", {size[what]:.0f} MiB of rows" if what in size else ""
        print(f"{what}: median {statistics.median(xs):.2f} s ({statistics.median(xs) / f:.2f}× "
              f"forward){extra}; runs {[round(x, 2) for x in xs]}")  # fmt: skip


if __name__ == "__main__":
    main()
