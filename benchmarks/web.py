"""The explorer's latency (issue 14): on CPU, smollm2, a 512-token text, the first result of
`qkv serve` (run + first lookup + grid, over HTTP on 127.0.0.1) ≤ 1.3× the lens' own `explain`
of that text's last token, and each later click (another token, layer or head) ≤ 100 ms server
time. Interleaved repeats in one process (the server runs in a thread of it), medians.

    .venv/bin/python benchmarks/web.py --n 512 --repeat 3 --clicks 20
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))

from lens import text_of, threads


def rss_gib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20
    return float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=512)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--clicks", type=int, default=20)
    a = ap.parse_args()
    import httpx
    import torch

    threads()
    import qkv
    from qkv.lens import explain
    from qkv.web import Explorer, Limits, Server

    m = qkv.load("smollm2")
    text = text_of(m.tokenizer, a.n)
    n = len(m.tokenizer.encode(text).ids)
    assert n == a.n, n
    srv = Server(Explorer(["smollm2"], Limits(), loaded={"smollm2": m}), port=0).start()
    c = httpx.Client(base_url=srv.url, timeout=600)
    rng = random.Random(0)
    t_explain, t_first, s_first = [], [], []
    s_lookup, s_grid, s_layerhead, w_click = [], [], [], []
    explain(text, n - 1, model=m, progress=False)  # warm-up
    for _ in range(a.repeat):
        t = time.perf_counter()
        explain(text, n - 1, model=m, progress=False)
        t_explain.append(time.perf_counter() - t)

        t = time.perf_counter()  # what the page does after Run: the forward, then the last token
        run = c.post("/api/run", json={"model": "smollm2", "text": text, "client": "bench"}).json()
        look = c.post(
            "/api/lookup", json={"id": run["id"], "query": n - 1, "layer": 0, "head": 0}
        ).json()
        key = look["neuron"]["key"]["index"]
        grid = c.post("/api/grid", json={"id": run["id"], "query": n - 1, "key": key}).json()
        t_first.append(time.perf_counter() - t)
        s_first.append((run["server_ms"] + look["server_ms"] + grid["server_ms"]) / 1e3)

        def lookup(q: int) -> dict:  # query q at a random layer and head
            body = {
                "id": run["id"],
                "query": q,
                "layer": rng.randrange(30),
                "head": rng.randrange(9),
            }
            return c.post("/api/lookup", json=body).json()

        for _ in range(a.clicks):  # another token: its lookup and its grid
            q = rng.randrange(n)
            t = time.perf_counter()
            look = lookup(q)
            grid = c.post(
                "/api/grid",
                json={"id": run["id"], "query": q, "key": look["neuron"]["key"]["index"]},
            ).json()
            w_click.append(time.perf_counter() - t)
            s_lookup.append(look["server_ms"])
            s_grid.append(grid["server_ms"])
            s_layerhead.append(lookup(q)["server_ms"])  # another layer or head: a lookup only
    srv.stop()
    med = statistics.median
    e = med(t_explain)
    print(f"smollm2, {n} tokens, torch threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f}, peak RSS {rss_gib():.2f} GiB")  # fmt: skip
    print(
        f"explain (last token, lens, no HTTP): median {e:.2f} s; runs {[round(x, 2) for x in t_explain]}"
    )
    print(f"first result (run + lookup + grid, HTTP): median {med(t_first):.2f} s = {med(t_first) / e:.2f}× explain "
          f"(server time {med(s_first):.2f} s); runs {[round(x, 2) for x in t_first]}")  # fmt: skip
    q = statistics.quantiles
    for what, xs in (("another token: lookup", s_lookup), ("another token: grid", s_grid),
                     ("another layer/head: lookup", s_layerhead)):  # fmt: skip
        print(
            f"{what}: server ms median {med(xs):.1f}, p90 {q(xs, n=10)[-1]:.1f}, max {max(xs):.1f} ({len(xs)} clicks)"
        )
    ms = [x * 1e3 for x in w_click]
    print(
        f"another token, lookup + grid as the page sees it (HTTP round trips): median {med(ms):.1f} ms, max {max(ms):.1f} ms"
    )


if __name__ == "__main__":
    main()
