"""The PNG view of an `ExplainResult` (matplotlib, Agg backend; written atomically).

One head: its kept keys as two bar charts, weight beside contribution; past `MAX_BARS` keys
(every key of a long text) the top MAX_BARS/2 by weight ∪ by contribution, and the title says
how many of how many are drawn (the JSON holds every key). Several layers: two
heatmaps (layers × keys) of the head-mean weight and the layer-level contribution, each row
scaled to its maximum, so sinks (weight without content) show as columns bright on the left
and dark on the right; with a chosen key, a third panel: its weight by layer × head. With a
neuron view (`--neuron`), a second figure is stacked below: the signed q_d·k_d of its top
dimensions, with q_d and k_d beside each bar and Σ q_d k_d · scale = score in the title.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .io import check_writable, write_atomic
from .record import ExplainResult

if TYPE_CHECKING:
    from .neuron import NeuronView

MAX_COLUMNS = 48
MAX_BARS = 100  # keys in one head's chart: ≤ 3,300 px tall (5,261 keys drew 162,170 px in 62 s)
NEURON_DIMS = 16  # dimensions drawn in the neuron figure


def draw_neuron(ax: Any, v: NeuronView, n: int = NEURON_DIMS) -> Any:
    """The signed bars q_d·k_d of the top `n` dims of `v` by |q_d k_d|, largest on top, each
    labelled with d, q_d and k_d; returns matplotlib's BarContainer (bar r = dim v.top(n)[r])."""
    top = v.top(n)
    p = v.product[top]
    y = np.arange(len(top))
    bars = ax.barh(y, p, color=np.where(p < 0, "#4c78a8", "#e45756"))
    ax.axvline(0, color="#888", lw=0.8)
    labels = [f"d {d}  q {v.q[d]:+.3f}  k {v.k[d]:+.3f}" for d in top]
    ax.set_yticks(y, labels, fontsize=8, family="monospace")
    ax.invert_yaxis()
    for r, x in enumerate(p):
        ax.annotate(f"{x:+.3f}", (x, r), xytext=(3 if x >= 0 else -3, 0), textcoords="offset points",
                    ha="left" if x >= 0 else "right", va="center", fontsize=7)  # fmt: skip
    lo, hi = min(0.0, p.min()), max(0.0, p.max())
    pad = 0.18 * (hi - lo or 1.0)
    ax.set_xlim(lo - (pad if lo < 0 else 0), hi + pad)
    share = v.share(n)[-1]
    ax.set_xlabel(
        f"q_d·k_d (red +, blue −) · the top {len(top)} of {len(v.q)} dims hold {share:.3g} of Σ"
    )
    rope = f"after RoPE ({v.rope_dims} of {len(v.q)} dims rotated)" if v.rope_dims else "no RoPE"
    qt, kt = v.query.text.strip() or v.query.text, v.key.text.strip() or v.key.text
    ax.set_title(
        f"Q·K neuron view · layer {v.layer} head {v.head} (kv {v.kv_head}) · {qt!r}@{v.query.index}"
        f" · {kt!r}@{v.key.index} · q, k {rope}\n"
        f"Σ q_d·k_d = {v.dot:.6g} × scale {v.scale:.6g} = score {v.score:.6g}",
        fontsize=9,
    )
    return bars


def _pixels(fig: Any, dpi: int) -> np.ndarray:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    buf.seek(0)
    return plt.imread(buf, format="png")  # (rows, cols, 4) floats in 0..1


def _stack(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """`a` above `b`, the narrower padded with white on the right."""
    w = max(a.shape[1], b.shape[1])
    pad = [np.pad(x, ((0, 0), (0, w - x.shape[1]), (0, 0)), constant_values=1.0) for x in (a, b)]
    return np.concatenate(pad, 0)


def drawn(weight: np.ndarray, contribution: np.ndarray, most: int = MAX_BARS) -> np.ndarray:
    """Positions of the keys a bar chart draws: all of them up to `most`; beyond, the top
    most/2 by weight ∪ the top most/2 by contribution (a key that carries content without
    weight stays in), in the record's order (by weight)."""
    n = len(weight)
    if n <= most:
        return np.arange(n)
    by_w = np.argsort(-np.asarray(weight, dtype=float), kind="stable")[: most // 2]
    by_c = np.argsort(-np.nan_to_num(np.asarray(contribution, float), nan=-np.inf), kind="stable")
    keep = np.union1d(by_w, by_c[: most // 2])
    return keep[np.argsort(-np.asarray(weight, dtype=float)[keep], kind="stable")]


def _label(r: ExplainResult, j: int) -> str:
    t = r.tokens[j].text.strip() or repr(r.tokens[j].text)
    return f"{t[:12]}·{j}" if len(r.tokens) > 40 else t[:12]


def to_png(r: ExplainResult, path: str | os.PathLike, dpi: int = 110) -> Path:
    check_writable(path)  # fail before drawing
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    heads = [(lay.layer, h) for lay in r.layers for h in lay.heads]
    qtxt = r.query.text.strip() or r.query.text
    title = f"{r.model.name}: what {qtxt!r} (token {r.query.index}) looks up"
    if len(heads) == 1:
        layer, h = heads[0]
        keep = drawn(h.weight, h.contribution)
        n = len(keep)
        fig, axes = plt.subplots(1, 2, figsize=(10, 1.2 + 0.28 * n), sharey=True)
        y = np.arange(n)
        labels = [_label(r, int(j)) for j in h.index[keep]]
        axes[0].barh(y, h.weight[keep], color="#4c78a8")
        axes[0].set_title("weight (softmax)")
        axes[1].barh(y, h.contribution[keep], color="#f58518")
        axes[1].set_title("contribution ‖w·v W_O‖")
        axes[0].set_yticks(y, labels)
        axes[0].invert_yaxis()
        cut = (
            f"\nthe {n} of its {len(h.index)} keys with most weight or contribution "
            f"(top {MAX_BARS // 2} of each; at most {MAX_BARS} drawn, the JSON holds every key)"
            if n < len(h.index)
            else ""
        )
        fig.suptitle(f"{title} — layer {layer} head {h.head}{cut}")
    else:
        # one head per layer, the same one (explain(head=H)): draw that head, as the terminal's
        # per-layer table does; otherwise each layer's own numbers over every head
        one = {h.head for lay in r.layers for h in lay.heads}
        per_head = all(len(lay.heads) == 1 for lay in r.layers) and len(one) == 1
        rows = [lay.heads[0] if per_head else lay for lay in r.layers]
        cols: dict[int, float] = {}
        for x in rows:
            for j, w in zip(x.index, x.weight, strict=True):
                cols[int(j)] = max(cols.get(int(j), 0.0), float(w))
        best = sorted(cols, key=lambda j: -cols[j])[:MAX_COLUMNS]
        keep = sorted(set(best) | {x.top_contribution for x in rows if x.top_contribution in cols})
        pos = {j: c for c, j in enumerate(keep)}
        W = np.zeros((len(r.layers), len(keep)))
        C = np.zeros_like(W)
        for row, x in enumerate(rows):
            for j, w, c in zip(x.index, x.weight, x.contribution, strict=True):
                if int(j) in pos:
                    W[row, pos[int(j)]], C[row, pos[int(j)]] = w, c
        C = C / np.maximum(C.max(1, keepdims=True), 1e-12)
        W = W / np.maximum(W.max(1, keepdims=True), 1e-12)
        panels = 3 if r.key is not None else 2
        width = max(8.0, 0.25 * len(keep) * 2 + 3) + (3 if panels == 3 else 0)
        fig, axes = plt.subplots(
            1, panels, figsize=(width, 1.5 + 0.22 * len(r.layers)), squeeze=False
        )
        axes = axes[0]
        labels = [_label(r, j) for j in keep]
        names = (
            (f"head {min(one)}: weight", f"head {min(one)}: contribution ‖w·v W_O‖")
            if per_head
            else ("mean weight over heads", "content carried ‖Σ_h w·v W_O‖")
        )
        for ax, M, name, cmap in (
            (axes[0], W, names[0], "Blues"),
            (axes[1], C, names[1], "Oranges"),
        ):
            im = ax.imshow(M, aspect="auto", cmap=cmap, vmin=0, vmax=1, interpolation="nearest")
            ax.set_title(f"{name}\n(each layer scaled to its max)", fontsize=9)
            if len(r.layers) >= 4:  # a scale beside a strip of one to three rows is noise
                fig.colorbar(
                    im, ax=ax, fraction=0.05, pad=0.02, aspect=40, label="÷ the layer's max"
                )
            ax.set_xticks(range(len(keep)), labels, rotation=90, fontsize=7)
            ax.set_yticks(range(len(r.layers)), [str(lay.layer) for lay in r.layers], fontsize=7)
            ax.set_ylabel("layer")
        if r.key is not None:
            L = [lay.layer for lay in r.layers]
            M = np.zeros((len(L), r.model.n_heads))
            for layer, head, k in r.heads_to(r.key.index):
                M[L.index(layer), head] = k.weight
            im = axes[2].imshow(
                M, aspect="auto", cmap="Reds", vmin=0, vmax=1, interpolation="nearest"
            )
            axes[2].set_title(f"weight on {r.key.text.strip()!r} by layer × head", fontsize=9)
            axes[2].set_xlabel("head")
            axes[2].set_xticks(range(r.model.n_heads), [str(h) for h in range(r.model.n_heads)],
                               fontsize=7)  # fmt: skip
            axes[2].set_yticks(range(len(L)), [str(x) for x in L], fontsize=7)
            fig.colorbar(im, ax=axes[2], label="weight")
        fig.suptitle(title)
    fig.tight_layout()
    buf = io.BytesIO()
    if r.neuron is None:
        fig.savefig(buf, format="png", dpi=dpi)
        plt.close(fig)
        return write_atomic(path, buf.getvalue())
    n = min(NEURON_DIMS, len(r.neuron.q))
    nfig, ax = plt.subplots(figsize=(10, 1.6 + 0.3 * n))
    draw_neuron(ax, r.neuron, n)
    nfig.tight_layout()
    plt.imsave(buf, _stack(_pixels(fig, dpi), _pixels(nfig, dpi)), format="png", dpi=dpi)
    return write_atomic(path, buf.getvalue())
