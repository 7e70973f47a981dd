"""Ranks' side of the lens-across-ranks test: `explain_sharded` on 2 ranks against the
single-process `explain` of the same text and model (the record as JSON, field by field)."""

from __future__ import annotations

import math

import torch

from qkv.lens import explain
from qkv.lens.distributed import explain_sharded

TEXT = ("The dog chased the ball because it was excited . The cat watched the dog and the ball "
        "from the wall , and then it slept because it was tired .")  # fmt: skip


def diff(a, b, path="", out=None) -> tuple[float, list[str]]:
    """(max |number difference|, structural mismatches) between two JSON values."""
    out = out if out is not None else [0.0, []]
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            out[1].append(f"{path}: keys {sorted(a)} != {sorted(b)}")
        for k in a.keys() & b.keys():
            diff(a[k], b[k], f"{path}.{k}", out)
    elif isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            out[1].append(f"{path}: length {len(a)} != {len(b)}")
        for n, (x, y) in enumerate(zip(a, b, strict=False)):
            diff(x, y, f"{path}[{n}]", out)
    elif isinstance(a, float) or isinstance(b, float):
        if isinstance(a, int | float) and isinstance(b, int | float) and not isinstance(a, bool):
            if not (math.isnan(a) and math.isnan(b)):
                out[0] = max(out[0], abs(a - b) / max(1.0, abs(b)))
        else:
            out[1].append(f"{path}: {a!r} != {b!r}")
    elif a != b:
        out[1].append(f"{path}: {a!r} != {b!r}")
    return out[0], out[1]


def lens_across_ranks(rank: int, world: int) -> dict:
    from tests.lens.conftest import TinyModel  # the lens tests' random RoPE/GQA decoder

    model = TinyModel(causal=True, n_layers=3, seed=3)
    report = {}
    for layout in ("contiguous", "zigzag"):
        for token, top in (("slept", 3), ("tired", 0), ("excited", 10)):
            want = explain(TEXT, token, model=model, top=top, progress=False).to_dict()
            got = explain_sharded(TEXT, token, model=model, top=top, layout=layout,
                                  progress=False).to_dict()  # fmt: skip
            d, bad = diff(got, want)
            report[f"{layout}/{token}/{top}"] = {"diff": d, "mismatch": bad[:5]}
    # ALiBi (a score_mod of positions) instead of RoPE: the rows see global positions
    from qkv.attention import alibi, alibi_slopes

    model = TinyModel(causal=True, n_layers=2, seed=4)
    for b in model.blocks:
        b.attn.rope, b.attn.score_mod = None, alibi(alibi_slopes(b.attn.n_heads))
    for layout in ("contiguous", "zigzag"):
        want = explain(TEXT, "slept", model=model, top=0, progress=False).to_dict()
        got = explain_sharded(TEXT, "slept", model=model, top=0, layout=layout,
                              progress=False).to_dict()  # fmt: skip
        d, bad = diff(got, want)
        report[f"alibi:{layout}/slept/0"] = {"diff": d, "mismatch": bad[:5]}
    # learned attention sinks (gpt-oss): the rows leave each head's sink its share
    model = TinyModel(causal=True, n_layers=2, seed=5)
    gen = torch.Generator().manual_seed(6)
    with torch.no_grad():
        for b in model.blocks:
            b.attn.sinks = torch.nn.Parameter(1.0 + torch.randn(b.attn.n_heads, generator=gen))
    for layout in ("contiguous", "zigzag"):
        want = explain(TEXT, "slept", model=model, top=0, progress=False).to_dict()
        got = explain_sharded(TEXT, "slept", model=model, top=0, layout=layout,
                              progress=False).to_dict()  # fmt: skip
        d, bad = diff(got, want)
        sinks = [h.get("sink", 0.0) for lay in got["layers"] for h in lay["heads"]]
        report[f"sinks:{layout}/slept/0"] = {"diff": d, "mismatch": bad[:5],
                                             "sinks": min(sinks)}  # fmt: skip
    report.update(half_precision_lens())
    model = TinyModel(causal=True, n_layers=3, seed=3)
    # the comparison can fail: another query's record differs
    other = explain(TEXT, "it", occurrence=-1, model=model, top=3, progress=False).to_dict()
    got = explain_sharded(TEXT, "slept", model=model, top=3, progress=False).to_dict()
    report["other"] = len(diff(got, other)[1])
    return report


def half_precision_lens(rank: int = 0, world: int = 1) -> dict:
    """The bf16 model's record, sharded and single-process, each against the float64 record of
    the same weights: {layout: {"sharded", "single": max relative error, "mismatch"}}. In bf16
    the two forwards round differently (the ring merges partial softmaxes), so the sharded one
    is held to flash-attn's criterion against float64, not to equality with the single one."""
    from qkv.nn import cast
    from tests.lens.conftest import TinyModel

    report = {}
    model64 = cast(TinyModel(causal=True, n_layers=3, seed=3), torch.float64)
    model16 = cast(TinyModel(causal=True, n_layers=3, seed=3), torch.bfloat16)
    want = explain(TEXT, "slept", model=model64, top=0, progress=False).to_dict()
    single = explain(TEXT, "slept", model=model16, top=0, progress=False).to_dict()
    for layout in ("contiguous", "zigzag"):
        got = explain_sharded(TEXT, "slept", model=model16, top=0, layout=layout,
                              progress=False).to_dict()  # fmt: skip
        d_got, bad = keyed_diff(got, want)
        d_single, _ = keyed_diff(single, want)
        report[f"bf16:{layout}"] = {"sharded": d_got, "single": d_single, "mismatch": bad[:5],
                                    "dtype": got["model_config"].get("dtype"),
                                    "softmax": softmax_gap(got)}  # fmt: skip
    return report


def softmax_gap(rec: dict) -> float:
    """max |softmax(scores) − weights| over a record's heads, the softmax in float64 here: the
    record's own numbers must agree (a score column rounded to bf16 would not, by ~1e-3)."""
    gap = 0.0
    for lay in rec["layers"]:
        for h in lay["heads"]:
            s = torch.tensor([k["score"] for k in h["keys"]], dtype=torch.float64)
            w = torch.tensor([k["weight"] for k in h["keys"]], dtype=torch.float64)
            gap = max(gap, (torch.softmax(s, 0) - w).abs().max().item())
    return gap


def keyed_diff(got: dict, want: dict) -> tuple[float, list[str]]:
    """(max relative difference of (score, weight, contribution) per (layer, head, key index),
    mismatches of the key sets and the tokens). Keys compared by index, not rank: rounding
    reorders near-tied weights."""
    (g, g_sets), (w, w_sets) = by_key(got), by_key(want)
    bad = [f"{a} != {b}" for a, b in zip(g_sets, w_sets, strict=True) if a != b]
    if got["tokens"] != want["tokens"]:
        bad.append("tokens differ")
    d = max(abs(x - y) / max(1.0, abs(y)) for k in w for x, y in zip(g[k], w[k], strict=True))
    return d, bad


def by_key(rec: dict) -> tuple[dict, list[str]]:
    """{(layer, head, key index): (score, weight, contribution)} of a record, and its per-head
    key sets (to compare as sets: near-tied keys may swap places under float rounding)."""
    vals, sets = {}, []
    for lay in rec["layers"]:
        for h in lay["heads"]:
            idx = sorted(k["index"] for k in h["keys"])
            sets.append(f"{lay['layer']}/{h['head']}:{idx}")
            for k in h["keys"]:
                vals[(lay["layer"], h["head"], k["index"])] = (k["score"], k["weight"],
                                                               k["contribution"])  # fmt: skip
    return vals, sets


def smollm2_lens(rank: int, world: int) -> dict:
    """smollm2 on a 290-token text, 2 ranks vs one process, every key of every head (top=0)."""
    import qkv

    model = qkv.load("smollm2")
    text = ("The dog chased the ball across the garden until the sun went down. " * 20
            + "The dog chased the ball because it was excited.")  # fmt: skip
    want = explain(text, "excited", model=model, top=0, progress=False).to_dict()
    got = explain_sharded(text, "excited", model=model, top=0, layout="zigzag",
                          progress=False).to_dict()  # fmt: skip
    (gv, gs), (wv, ws) = by_key(got), by_key(want)
    worst = [0.0, 0.0, 0.0]
    for key, w in wv.items():
        g = gv.get(key, (math.inf,) * 3)
        worst = [max(a, abs(x - y)) for a, x, y in zip(worst, g, w, strict=True)]
    return {"same_sets": gs == ws, "n_keys": len(wv), "worst": worst,
            "tokens": len(want["tokens"])}  # fmt: skip
