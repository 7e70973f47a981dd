"""The PNG view of an `ExplainResult` (matplotlib, Agg backend; written atomically).

One head: its kept keys as two bar charts, weight beside contribution. Several layers: two
heatmaps (layers × keys) of the head-mean weight and the layer-level contribution, each row
scaled to its maximum, so sinks (weight without content) show as columns bright on the left
and dark on the right; with a chosen key, a third panel: its weight by layer × head.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np

from .io import check_writable, write_atomic
from .record import ExplainResult

MAX_COLUMNS = 48


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
        n = len(h.index)
        fig, axes = plt.subplots(1, 2, figsize=(10, 1.2 + 0.28 * n), sharey=True)
        y = np.arange(n)
        labels = [_label(r, int(j)) for j in h.index]
        axes[0].barh(y, h.weight, color="#4c78a8")
        axes[0].set_title("weight (softmax)")
        axes[1].barh(y, h.contribution, color="#f58518")
        axes[1].set_title("contribution ‖w·v W_O‖")
        axes[0].set_yticks(y, labels)
        axes[0].invert_yaxis()
        fig.suptitle(f"{title} — layer {layer} head {h.head}")
    else:
        cols: dict[int, float] = {}
        for lay in r.layers:
            for j, w in zip(lay.index, lay.weight, strict=True):
                cols[int(j)] = max(cols.get(int(j), 0.0), float(w))
        best = sorted(cols, key=lambda j: -cols[j])[:MAX_COLUMNS]
        keep = sorted(
            set(best) | {lay.top_contribution for lay in r.layers if lay.top_contribution in cols}
        )
        pos = {j: c for c, j in enumerate(keep)}
        W = np.zeros((len(r.layers), len(keep)))
        C = np.zeros_like(W)
        for row, lay in enumerate(r.layers):
            for j, w, c in zip(lay.index, lay.weight, lay.contribution, strict=True):
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
        for ax, M, name, cmap in (
            (axes[0], W, "mean weight over heads", "Blues"),
            (axes[1], C, "content carried ‖Σ_h w·v W_O‖", "Oranges"),
        ):
            ax.imshow(M, aspect="auto", cmap=cmap, vmin=0, vmax=1, interpolation="nearest")
            ax.set_title(f"{name}\n(each layer scaled to its max)", fontsize=9)
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
            axes[2].set_yticks(range(len(L)), [str(x) for x in L], fontsize=7)
            fig.colorbar(im, ax=axes[2])
        fig.suptitle(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    return write_atomic(path, buf.getvalue())
