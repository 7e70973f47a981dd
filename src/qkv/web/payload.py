"""What the explorer sends to the page: the lens' records and views as JSON, nothing recomputed.

Every number here comes from the lens' public API on a kept `Capture` (one forward per text):

* `lookup`  — `Capture.explain(i, layer=l, head=h)` (the `qkv.explain/1` record of one head) with
  its Q·K neuron view `Capture.neuron(i, j, layer=l, head=h)` for the chosen key j, and for a
  mixture-of-experts model the experts token i went to in every sparse layer (its "experts",
  as `qkv.explain(text, i)` records them: `SparseMoE.choose` during the run's one forward);
* `grid`    — per (layer, head) the weight that query i puts on key j and the row's entropy, from
  the exact rows `qkv.lens.lookup.rows` recomputes from the kept q, k and LSE (O(H·N) per layer,
  the same function `explain` uses; no value norms, which the grid does not show);
* `compare` — `qkv.compare(a, b, token)`'s `qkv.compare/1` document and, per head, its
  max |Δweight|.

The page only lays these numbers out. Letters: l layer, h query head, j key position.
"""

from __future__ import annotations

import tempfile
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from qkv.lens import compare as lens_compare
from qkv.lens.lookup import entropy, rows

if TYPE_CHECKING:
    from qkv.lens import Capture, CompareResult, ExplainResult, NeuronView

_PYPLOT = threading.Lock()
NEURON_DIMS = 16  # dimensions listed in the neuron view (by |q_d·k_d|, as the static page)


def summary(cap: Capture, capture_id: str) -> dict:
    """What the page needs to draw a text: its tokens (text, start, end), the model's shape and
    dtype ("float32", "bfloat16", …: what `qkv serve --dtype` loaded)."""
    m = cap.info
    return {
        "id": capture_id,
        "model": m.name,
        "causal": m.causal,
        "layers": m.n_layers,
        "heads": m.n_heads,
        "kv_heads": m.n_kv_heads,
        "context": m.max_positions,
        "dtype": m.dtype,
        "cut": cap.cut,
        "text": cap.text,
        "tokens": [[t.text, t.start, t.end] for t in cap.tokens],
    }


def lookup(
    cap: Capture, query: int, layer: int, head: int, key: int | None, top: int
) -> tuple[ExplainResult, dict]:
    """The record of query `query` through one (layer, head), keys ranked by weight (`top` by
    weight ∪ `top` by contribution, see `qkv.explain`; 0 = every key), with the neuron view of
    `key` (default: the key with most weight in that head). Returns the record and its page
    form: the `qkv.explain/1` document plus "neuron_dims" (the top dims by |q_d·k_d|). A
    mixture-of-experts model's record carries the query's experts in every sparse layer (not
    only `layer`: the page draws them all in a row); a dense model's has no "experts"."""
    r = cap.explain(query, layer=layer, head=head, top=top, key=key)
    if cap.routing is not None:
        r.experts = cap.routing.token(query)
    h = r.layers[0].heads[0]
    j = h.top_weight if key is None else r.key.index
    r.neuron = cap.neuron(query, j, layer=layer, head=head)
    doc = r.to_dict()
    doc["neuron_dims"] = neuron_dims(r.neuron)
    return r, doc


def neuron_dims(v: NeuronView, n: int = NEURON_DIMS) -> dict:
    """The neuron view's top `n` dimensions by |q_d·k_d| with q_d, k_d, q_d·k_d and the running
    share of Σ q_d·k_d (NeuronView.top / .share), and the identity dot × scale = score."""
    top, p = v.top(n), v.product
    return {
        "dims": [int(d) for d in top],
        "q": [float(v.q[d]) for d in top],
        "k": [float(v.k[d]) for d in top],
        "product": [float(p[d]) for d in top],
        "share": [float(x) for x in v.share(n)],
        "d": len(v.q),
        "dot": v.dot,
        "scale": v.scale,
        "score": v.score,
    }


def grid(cap: Capture, query: int, key: int) -> dict:
    """(layers × heads) weight of query row `query` on key `key` and each row's entropy (nats).

    A key a causal query cannot see has weight 0. Equivalent naive code (transformers):
    `out.attentions[l][0, h, query, key]` and `-(w * log w).sum()` over that row."""
    weight, ent = [], []
    with torch.inference_mode():
        for rec in cap.records:
            w = rows(rec, [query])[:, 0].double().cpu().numpy()  # (h j)
            weight.append([float(x) for x in w[:, key]])
            ent.append([entropy(row) for row in w])
    return {"query": query, "key": key, "weight": weight, "entropy": ent}


def compare(model: Any, text_a: str, text_b: str, query: int) -> tuple[CompareResult, dict]:
    """`qkv.compare(text_a, text_b, query)` (query: a token position) and its page form: the
    `qkv.compare/1` document, each head with its "delta_weight" and "delta_contribution" (b − a,
    HeadMove's), plus "moved" (layers × heads) max |Δweight| over matched keys."""
    r = lens_compare(text_a, text_b, query, model=model, progress=False)
    doc = r.to_dict()
    for d, h in zip(doc["heads"], r.heads, strict=True):
        d["delta_weight"] = h.delta_weight.tolist()
        d["delta_contribution"] = h.delta_contribution.tolist()
    L = max(h.layer for h in r.heads) + 1
    H = max(h.head for h in r.heads) + 1
    moved = [[0.0] * H for _ in range(L)]
    for h in r.heads:
        moved[h.layer][h.head] = h.moved
    doc["moved"] = moved
    return r, doc


def png_bytes(r: ExplainResult) -> bytes:
    """The lens' PNG of `r` (`ExplainResult.to_png`), written in a private temporary folder.
    One at a time: pyplot's figure registry is global, and clicks run in several threads."""
    with _PYPLOT, tempfile.TemporaryDirectory(prefix="qkv-web-") as d:
        p = Path(d) / "record.png"
        r.to_png(p)
        return p.read_bytes()
