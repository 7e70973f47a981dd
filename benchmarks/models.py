"""Real-model benchmarks: qkv vs transformers on the same weights, ratios from one run.

    python benchmarks/models.py --model minilm|smollm2|gemma3|load|all [--runs N]

Speed: both implementations are loaded in one process and run alternately (same machine
state), median of `--runs` timed runs after one warm-up, under torch.inference_mode().
Memory and load time: one fresh subprocess per implementation (`--worker`), which imports
only what that implementation needs (torch and qkv; transformers' modeling code, which pulls
triton and scipy, only on the transformers side), loads the model, runs the same forward once
and reports
    load_s      wall time of loading model + tokenizer (imports excluded; qkv.load returns
                both, so the transformers side loads BertModel and AutoTokenizer)
    peak_rss    the process's peak resident set (VmHWM): each side's own imports + weights +
                forward, what a process using that library holds
    first_s     load_s plus the first 1×8-token forward (what lazy weight loading defers)
    anon, file  resident set after the forward, anonymous vs file-backed (mmap'd weights)
    fwd_extra   peak_rss after the forward minus the resident set just before it, after a
                1×8-token warm-up forward (kernels initialised) and a sum over every
                parameter (every weight paged in, mmap'd or not): the forward's own
                peak working memory
`--model load` times the loads alone: `--runs` fresh processes per model and side (transformers'
gemma3, ~40 s a load, once), the qkv side from its disk caches (made first), median and min.
Each model has a `bench_<model>(args)` function and a `worker_<model>_<impl>(args)`
entry registered in BENCHES / WORKERS.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def rss_now() -> int:
    """Current resident set size in bytes (Linux /proc)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def rss_peak() -> int:
    """Peak resident set size of this process in bytes: VmHWM from /proc/self/status.
    (Not ru_maxrss: after fork+exec it starts from the parent's peak, not this process's.)"""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def rss_split() -> tuple[int, int]:
    """(anonymous, file-backed) resident bytes now: weights mapped from a file count as file."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key = line.split(":")[0]
            if key in ("RssAnon", "RssFile"):
                out[key] = int(line.split()[1]) * 1024
    return out["RssAnon"], out["RssFile"]


def median_time(fn: Callable[[], object], runs: int) -> list[float]:
    out = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


@dataclass(frozen=True)
class Paired:
    """Medians of two alternately timed calls, and in how many of the pairs `a` was faster."""

    a: float
    b: float
    wins: int
    runs: int

    def speedup(self) -> str:
        """b/a (a's speed-up over b), with the pairs a won: "1.04× (5/5)"."""
        return f"{self.b / self.a:.2f}× ({self.wins}/{self.runs})"


def alternate(fa: Callable[[], object], fb: Callable[[], object], runs: int) -> Paired:
    """`fa` and `fb` timed in `runs` alternating pairs, so that both see the same machine state."""
    ta, tb = [], []
    for _ in range(runs):
        ta += median_time(fa, 1)
        tb += median_time(fb, 1)
    wins = sum(a < b for a, b in zip(ta, tb, strict=True))
    return Paired(statistics.median(ta), statistics.median(tb), wins, runs)


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


def load_minilm_hf(tokenizer: bool = False):
    """BertModel (sdpa); with `tokenizer`, also its fast tokenizer, as qkv.load gives both."""
    from transformers import AutoTokenizer, BertModel

    from qkv.models.bert import package_dir

    model = BertModel.from_pretrained(str(package_dir()), attn_implementation="sdpa").eval()
    if tokenizer:
        model.tokenizer = AutoTokenizer.from_pretrained(str(package_dir()))
    return model


def minilm_forward(impl: str, model, ids, keep):
    if impl == "qkv":
        return lambda: model(ids, attention_mask=keep)
    return lambda: model(input_ids=ids, attention_mask=keep.long()).last_hidden_state


def minilm_worker(impl: str, args) -> dict:
    # each side imports its own model code before the clock starts: load_s is the load itself
    import torch

    import qkv.models.bert  # noqa: F401

    if impl == "hf":
        from transformers import AutoTokenizer, BertModel  # noqa: F401

    torch.manual_seed(0)
    ids, keep = minilm_inputs(args.padded)
    t = time.perf_counter()
    model = load_minilm_qkv() if impl == "qkv" else load_minilm_hf(tokenizer=True)
    load_s = time.perf_counter() - t
    with torch.inference_mode():
        minilm_forward(impl, model, ids[:1, :8], keep[:1, :8])()  # init kernels
        first_s = time.perf_counter() - t  # load + first short forward (lazy loading pays here)
        sum(float(p.sum()) for p in model.parameters())  # page in every weight
        before = rss_now()
        minilm_forward(impl, model, ids, keep)()
    peak = rss_peak()
    anon, file = rss_split()
    return {
        "load_s": load_s,
        "first_s": first_s,
        "peak_rss": peak,
        "fwd_extra": peak - before,
        "anon": anon,
        "file": file,
    }


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
            p = alternate(f_ours, f_hf, args.runs)
        label = "forward, ragged (512…64)" if padded else "forward, full"
        rows.append([f"{label} median s", f"{p.a:.3f}", f"{p.b:.3f}", p.speedup()])
        rows.append([f"  max |Δ| hidden vs transformers: {err:.1e}", "", "", ""])
    for padded in (False, True):
        label = "ragged" if padded else "full"
        flag = ["--padded"] if padded else []
        w = {impl: run_worker(f"minilm-{impl}", flag) for impl in ("qkv", "hf")}
        q, h = w["qkv"], w["hf"]
        if not padded:
            rows.append(["load s (fresh process)", f"{q['load_s']:.2f}", f"{h['load_s']:.2f}", ""])
            rows.append(
                ["load + first 1×8 forward s", f"{q['first_s']:.2f}", f"{h['first_s']:.2f}", ""]
            )
        rows.append([f"peak RSS of process, {label}", mib(q["peak_rss"]), mib(h["peak_rss"]), ""])
        if not padded:
            split = [f"{mib(w[i]['anon'])} / {mib(w[i]['file'])}" for i in ("qkv", "hf")]
            rows.append(["  resident after: anon / file-backed", *split, ""])
        ratio = f"{h['fwd_extra'] / q['fwd_extra']:.2f}× less" if q["fwd_extra"] > 0 else ""
        rows.append(
            [f"forward's extra peak RSS, {label}", mib(q["fwd_extra"]), mib(h["fwd_extra"]), ratio]
        )
    return table(rows)


# ---------------------------------------------------------------- smollm2

SMOL_PREFILL, SMOL_PROMPT, SMOL_DECODE = 2048, 32, 64
SMOL_RAGGED = (512, 384, 256, 128)  # a padded batch's text lengths


def smollm2_ids(n: int):
    import torch

    g = torch.Generator().manual_seed(0)
    return torch.randint(17, 49152, (1, n), generator=g)  # ordinary (non-control) tokens


def smollm2_ragged():
    """ids (4, 512) and keep (4, 512): texts of SMOL_RAGGED tokens, right-padded."""
    import torch

    n = max(SMOL_RAGGED)
    ids = smollm2_ids(len(SMOL_RAGGED) * n).view(len(SMOL_RAGGED), n)
    keep = torch.arange(n)[None, :] < torch.tensor(SMOL_RAGGED)[:, None]
    return ids.masked_fill(~keep, 2), keep  # pad id: <|im_end|>


def load_smollm2_qkv(cache: bool = True):
    from qkv.models import llama

    return llama.load_smollm2(cache_dir=None if cache else False)


def load_smollm2_hf(tokenizer: bool = False):
    """LlamaForCausalLM (sdpa) from the GGUF; with `tokenizer`, also its GGUF tokenizer, as
    qkv.load gives both."""
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    from qkv.models import llama

    path = llama.package_file(llama.SMOLLM2_MODULE, llama.SMOLLM2_FILE, llama.SMOLLM2_PACKAGE)
    model = LlamaForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, torch_dtype=torch.float32, attn_implementation="sdpa"
    ).eval()
    if tokenizer:
        model.tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return model


def smollm2_prefill(impl: str, model, ids):
    """Full forward → logits (1, S, 49152), as `model(ids)` / `hf(ids).logits`."""
    if impl == "qkv":
        return lambda: model(ids)
    return lambda: model(input_ids=ids, use_cache=False).logits


def smollm2_decode(impl: str, model, ids, n: int):
    """Greedy generation of exactly n new tokens with the KV cache (prefill of ids included)."""
    if impl == "qkv":
        return lambda: list(model.generate_ids(ids[0].tolist(), n, stop_ids=()))
    mask = ids.new_ones(ids.shape)
    return lambda: model.generate(
        ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
        eos_token_id=None, pad_token_id=2,
    )[0, ids.shape[1] :].tolist()  # fmt: skip


def smollm2_worker(impl: str, args) -> dict:
    import torch

    import qkv.models.llama  # noqa: F401

    if impl == "hf":
        from transformers import LlamaForCausalLM  # noqa: F401

    ids = smollm2_ids(SMOL_PREFILL)
    t = time.perf_counter()
    if impl == "hf":
        model = load_smollm2_hf(tokenizer=True)
    else:
        model = load_smollm2_qkv(cache=impl == "qkv")
    load_s = time.perf_counter() - t
    kind = "hf" if impl == "hf" else "qkv"
    with torch.inference_mode():
        smollm2_prefill(kind, model, ids[:, :8])()  # touch weights, init kernels
        before = rss_now()
        smollm2_prefill(kind, model, ids)()
    peak = rss_peak()
    anon, file = rss_split()
    return {
        "load_s": load_s,
        "peak_rss": peak,
        "fwd_extra": peak - before,
        "anon": anon,
        "file": file,
    }


def bench_smollm2(args) -> str:
    import torch

    extra = ["--threads", str(args.threads)] if args.threads else []
    load_smollm2_qkv()  # make sure the on-disk cache exists before timing a cached load
    w = {impl: run_worker(f"smollm2-{impl}", extra) for impl in ("qkv", "qkv-nocache", "hf")}
    ours, theirs = load_smollm2_qkv(), load_smollm2_hf()
    rows = [["smollm2 (SmolLM2-135M, fp32)", "qkv", "transformers (sdpa)", "ratio (speed-up)"]]
    ids = smollm2_ids(SMOL_PREFILL)
    f_ours, f_hf = smollm2_prefill("qkv", ours, ids), smollm2_prefill("hf", theirs, ids)
    with torch.inference_mode():
        err = float((f_ours() - f_hf()).abs().max())
        p = alternate(f_ours, f_hf, args.runs)
    rows.append(
        [
            f"prefill {SMOL_PREFILL} tokens → logits, median s",
            f"{p.a:.2f}",
            f"{p.b:.2f}",
            p.speedup(),
        ]
    )
    rows.append([f"  max |Δ logit| vs transformers: {err:.1e}", "", "", ""])
    ids, keep = smollm2_ragged()
    f_ours = lambda: ours(ids, attention_mask=keep)  # noqa: E731
    f_hf = lambda: theirs(input_ids=ids, attention_mask=keep.long(), use_cache=False).logits  # noqa: E731
    with torch.inference_mode():
        err = float((f_ours() - f_hf())[keep].abs().max())
        p = alternate(f_ours, f_hf, args.runs)
    label = f"prefill ragged batch {' + '.join(map(str, SMOL_RAGGED))} (right-padded), median s"
    rows.append([label, f"{p.a:.2f}", f"{p.b:.2f}", p.speedup()])
    rows.append([f"  max |Δ logit| vs transformers (real tokens): {err:.1e}", "", "", ""])
    prompt = smollm2_ids(SMOL_PROMPT)
    d_ours = smollm2_decode("qkv", ours, prompt, SMOL_DECODE)
    d_hf = smollm2_decode("hf", theirs, prompt, SMOL_DECODE)
    same = d_ours() == d_hf()
    p = alternate(d_ours, d_hf, args.runs)
    rows.append(
        [
            f"greedy decode {SMOL_PROMPT}+{SMOL_DECODE} tokens, KV cache, tokens/s",
            f"{SMOL_DECODE / p.a:.1f}",
            f"{SMOL_DECODE / p.b:.1f}",
            p.speedup(),
        ]
    )
    rows.append([f"  same {SMOL_DECODE} tokens as transformers.generate: {same}", "", "", ""])
    from qkv.nn import quant

    def d_dense():
        with quant.dense():
            return d_ours()

    same_dense = d_dense() == d_hf()
    p = alternate(d_dense, d_hf, args.runs)
    rows.append(
        [
            "  the same with qkv on dense float32 weights (quant.dense()), tokens/s",
            f"{SMOL_DECODE / p.a:.1f}",
            f"{SMOL_DECODE / p.b:.1f}",
            p.speedup(),
        ]
    )
    rows.append([f"  same {SMOL_DECODE} tokens as transformers.generate: {same_dense}", "", "", ""])
    q, n, h = w["qkv"], w["qkv-nocache"], w["hf"]
    rows.append(
        [
            "load model+tokenizer s, fresh process (qkv: disk cache)",
            f"{q['load_s']:.2f}",
            f"{h['load_s']:.2f}",
            f"{h['load_s'] / q['load_s']:.2f}×",
        ]
    )
    rows.append(
        [
            "load model+tokenizer s, fresh process (qkv: from the GGUF)",
            f"{n['load_s']:.2f}",
            f"{h['load_s']:.2f}",
            f"{h['load_s'] / n['load_s']:.2f}×",
        ]
    )
    rows.append(
        ["peak RSS of process (load + 2048 prefill)", mib(q["peak_rss"]), mib(h["peak_rss"]), ""]
    )
    rows.append(
        [
            "  resident after: anon / file-backed",
            f"{mib(q['anon'])} / {mib(q['file'])}",
            f"{mib(h['anon'])} / {mib(h['file'])}",
            "",
        ]
    )
    ratio = f"{h['fwd_extra'] / q['fwd_extra']:.2f}× less" if q["fwd_extra"] > 0 else ""
    rows.append(["2048 prefill's extra peak RSS", mib(q["fwd_extra"]), mib(h["fwd_extra"]), ratio])
    return table(rows)


# ---------------------------------------------------------------- gemma3

G3_PREFILL, G3_PROMPT, G3_DECODE = 2048, 32, 32


def gemma3_ids(n: int):
    import torch

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(6250, 262000, (1, n), generator=g)  # past the control/unused tokens
    ids[0, 0] = 2  # <bos>
    return ids


def load_gemma3_qkv(cache: bool = True):
    from qkv.models import gemma3

    return gemma3.load_gemma3(cache_dir=None if cache else False)


def load_gemma3_hf(tokenizer: bool = False, attn: str = "sdpa"):
    """Gemma3ForCausalLM from the same GGUF, transformers' own GGUF reader (sdpa)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qkv.models import gemma3

    path = gemma3.gguf_path()
    model = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32, attn_implementation=attn
    ).eval()
    if tokenizer:
        model.tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return model


def gemma3_prefill(impl: str, model, ids):
    """Forward of the whole prompt → the last position's logits (1, 262144): what generation
    needs (all 2048 × 262144 logits would be 2 GiB on each side)."""
    if impl == "qkv":
        return lambda: model.unembed(model.hidden(ids)[:, -1])
    return lambda: model(input_ids=ids, use_cache=False, logits_to_keep=1).logits[:, -1]


def gemma3_decode(impl: str, model, ids, n: int):
    if impl == "qkv":
        return lambda: list(model.generate_ids(ids[0].tolist(), n, stop_ids=()))
    mask = ids.new_ones(ids.shape)
    return lambda: model.generate(
        ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
        eos_token_id=None, pad_token_id=0,
    )[0, ids.shape[1] :].tolist()  # fmt: skip


def gemma3_worker(impl: str, args) -> dict:
    import torch

    import qkv.models.gemma3  # noqa: F401

    if impl == "hf":
        from transformers import AutoModelForCausalLM  # noqa: F401

    ids = gemma3_ids(G3_PREFILL)
    t = time.perf_counter()
    if impl == "hf":
        model = load_gemma3_hf(tokenizer=True)
    else:
        model = load_gemma3_qkv(cache=impl == "qkv")
    load_s = time.perf_counter() - t
    kind = "hf" if impl == "hf" else "qkv"
    with torch.inference_mode():
        gemma3_prefill(kind, model, ids[:, :8])()  # touch weights, init kernels
        before = rss_now()
        gemma3_prefill(kind, model, ids)()
    peak = rss_peak()
    anon, file = rss_split()
    return {"load_s": load_s, "peak_rss": peak, "fwd_extra": peak - before, "anon": anon,
            "file": file}  # fmt: skip


def bench_gemma3(args) -> str:
    import torch

    extra = ["--threads", str(args.threads)] if args.threads else []
    load_gemma3_qkv()  # make sure the on-disk cache exists before timing a cached load
    w = {impl: run_worker(f"gemma3-{impl}", extra) for impl in ("qkv", "qkv-nocache", "hf")}
    ours, theirs = load_gemma3_qkv(), load_gemma3_hf()
    rows = [
        ["gemma3 (Gemma 3 270M, Q4_K_M → fp32)", "qkv", "transformers (sdpa)", "ratio (speed-up)"]
    ]
    ids = gemma3_ids(G3_PREFILL)
    f_ours, f_hf = gemma3_prefill("qkv", ours, ids), gemma3_prefill("hf", theirs, ids)
    with torch.inference_mode():
        a, b = f_ours(), f_hf()
        err = float((a - b).abs().max() / b.abs().max())
        p = alternate(f_ours, f_hf, args.runs)
    rows.append([f"prefill {G3_PREFILL} tokens → last logits, median s", f"{p.a:.2f}",
                 f"{p.b:.2f}", p.speedup()])  # fmt: skip
    rows.append([f"  max |Δ logit| / max |logit| vs transformers: {err:.1e}", "", "", ""])
    prompt = gemma3_ids(G3_PROMPT)
    d_ours = gemma3_decode("qkv", ours, prompt, G3_DECODE)
    d_hf = gemma3_decode("hf", theirs, prompt, G3_DECODE)
    same = d_ours() == d_hf()
    p = alternate(d_ours, d_hf, args.runs)
    rows.append([f"greedy decode {G3_PROMPT}+{G3_DECODE} tokens, KV cache, tokens/s",
                 f"{G3_DECODE / p.a:.1f}", f"{G3_DECODE / p.b:.1f}", p.speedup()])  # fmt: skip
    rows.append([f"  same {G3_DECODE} tokens as transformers.generate: {same}", "", "", ""])
    q, n, h = w["qkv"], w["qkv-nocache"], w["hf"]
    for label, x in (("disk cache", q), ("from the GGUF", n)):
        rows.append([f"load model+tokenizer s, fresh process (qkv: {label})", f"{x['load_s']:.2f}",
                     f"{h['load_s']:.2f}", f"{h['load_s'] / x['load_s']:.2f}×"])  # fmt: skip
    rows.append([f"peak RSS of process (load + {G3_PREFILL} prefill)", mib(q["peak_rss"]),
                 mib(h["peak_rss"]), f"{q['peak_rss'] / h['peak_rss']:.2f}× theirs"])  # fmt: skip
    rows.append(["  resident after: anon / file-backed", f"{mib(q['anon'])} / {mib(q['file'])}",
                 f"{mib(h['anon'])} / {mib(h['file'])}", ""])  # fmt: skip
    rows.append([f"{G3_PREFILL} prefill's extra peak RSS", mib(q["fwd_extra"]),
                 mib(h["fwd_extra"]), ""])  # fmt: skip
    return table(rows)


# ---------------------------------------------------------------- load times

LOADS: dict[str, tuple[str, Callable, Callable]] = {  # model: (qkv module, qkv load, hf load)
    "minilm": ("qkv.models.bert", lambda: load_minilm_qkv(),
               lambda: load_minilm_hf(tokenizer=True)),
    "smollm2": ("qkv.models.llama", lambda: load_smollm2_qkv(),
                lambda: load_smollm2_hf(tokenizer=True)),
    "gemma3": ("qkv.models.gemma3", lambda: load_gemma3_qkv(),
               lambda: load_gemma3_hf(tokenizer=True)),
}  # fmt: skip


def load_worker(model: str, impl: str, args) -> dict:
    """The load alone, in a fresh process: each side's own imports happen before the clock."""
    import importlib

    import torch  # noqa: F401

    if impl == "qkv":
        importlib.import_module(LOADS[model][0])
    else:
        import transformers  # noqa: F401
        from transformers import AutoModelForCausalLM, AutoTokenizer, BertModel  # noqa: F401
    t = time.perf_counter()
    LOADS[model][1 if impl == "qkv" else 2]()
    return {"load_s": time.perf_counter() - t}


def bench_load(args) -> str:
    rows = [["load model + tokenizer, fresh process", "qkv median (min)",
             "transformers median (min)", "ratio (speed-up)"]]  # fmt: skip
    for model in LOADS:
        LOADS[model][1]()  # the qkv side reads its disk caches: make sure they exist
        times = {}
        for impl in ("qkv", "hf"):
            runs = 1 if (model, impl) == ("gemma3", "hf") else args.runs
            times[impl] = [run_worker(f"load-{model}-{impl}", [])["load_s"] for _ in range(runs)]
        q, h = (statistics.median(times[i]) for i in ("qkv", "hf"))
        cell = {i: f"{statistics.median(t):.2f} ({min(t):.2f})" for i, t in times.items()}
        rows.append([f"{model} load s", cell["qkv"], cell["hf"], f"{h / q:.2f}×"])
    return table(rows)


# ---------------------------------------------------------------- registry

BENCHES: dict[str, Callable] = {
    "minilm": bench_minilm,
    "smollm2": bench_smollm2,
    "gemma3": bench_gemma3,
    "load": bench_load,
}
WORKERS: dict[str, Callable] = {
    "minilm-qkv": lambda a: minilm_worker("qkv", a),
    "minilm-hf": lambda a: minilm_worker("hf", a),
    "smollm2-qkv": lambda a: smollm2_worker("qkv", a),
    "smollm2-qkv-nocache": lambda a: smollm2_worker("qkv-nocache", a),
    "smollm2-hf": lambda a: smollm2_worker("hf", a),
    "gemma3-qkv": lambda a: gemma3_worker("qkv", a),
    "gemma3-qkv-nocache": lambda a: gemma3_worker("qkv-nocache", a),
    "gemma3-hf": lambda a: gemma3_worker("hf", a),
    **{
        f"load-{model}-{impl}": lambda a, model=model, impl=impl: load_worker(model, impl, a)
        for model in LOADS
        for impl in ("qkv", "hf")
    },
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
