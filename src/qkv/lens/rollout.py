"""Propagating one query row through the layers, exact and without N×N: attention rollout
(Abnar & Zuidema 2020) and the contribution flow (norm-based, Kobayashi et al. 2020/2021).

Both multiply per-layer mixing matrices Ã_l (rows sum to 1) through the layers,
R = Ã_L ⋯ Ã_1, and report row i of R,

    r = e_iᵀ Ã_L Ã_{L−1} ⋯ Ã_1

computed right to left as a row vector: u ← uᵀÃ_l. Layer L needs only row i; every lower
layer needs the rows of all tokens that u reaches (for a causal model, tokens 0..i; for an
encoder, all of them). Those rows are recomputed exactly from the captured q, k in chunks with
`qkv.attention_weights`, so memory stays O(chunk·H·N); time is that of the q·kᵀ half of one
attention forward per layer, O(L·H·N²·d). (The papers' full matrices would be L·N² floats.)

The two mixings (row r = token t, column j = key):

* rollout: Ã[t, j] = ½·mean_h w_htj + ½·δ_tj. Weights only: a key's value norm is ignored, so
  on a model whose heads park weight on a sink the product converges to that sink (see
  `rollout_caveat`).
* flow: Ã[t, j] ∝ ‖Σ_h w_htj v_gj W_O^h‖ + δ_tj ‖x_t‖, normalised over j. The first term is the
  layer-level contribution norm the lens reports for the query (Kobayashi et al. 2020), the
  second the residual stream x_t entering the block (their 2021 residual-aware variant; GlobEnc
  and ALTI, Ferrando et al. 2022, refine the same idea). MLPs, layer norms and b_O are not
  modelled: they act on each token alone or on none.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import torch
from torch import Tensor

from .lookup import AttentionRecordLike, rows

CHUNK_ELEMENTS = 1 << 23  # floats of a (h, rows, j) weight chunk: 32 MiB in fp32
DOMINANT = 0.9  # a rollout that puts more than this on one token carries the caveat

Mixing = Callable[[AttentionRecordLike, list[int]], tuple[Tensor, int]]


def propagate(
    records: Sequence[AttentionRecordLike], i: int, mixing: Mixing, progress=None
) -> np.ndarray:
    """Row i (Sk,) of Ã_L ⋯ Ã_1, the Ã_l given row-wise by `mixing(rec, idx)` → ((r j'), j')
    over keys 0..j'-1 (rows summing to 1). `progress`, if given, is called once per layer."""
    if not records:
        raise ValueError("propagation needs at least one captured layer")
    Sk = records[0].k.shape[2]
    u = torch.zeros(Sk, dtype=torch.float64)
    u[i] = 1.0
    for rec in reversed(records):
        H = rec.q.shape[1]
        support = torch.nonzero(u).flatten().tolist()
        chunk = max(1, CHUNK_ELEMENTS // max(1, H * Sk))
        acc = torch.zeros(Sk, dtype=torch.float64)
        for s in range(0, len(support), chunk):
            idx = support[s : s + chunk]
            a, stop = mixing(rec, idx)  # (r j')
            acc[:stop] += (u[idx].to(a.device, a.dtype) @ a).double().cpu()
        u = acc
        if progress is not None:
            progress()
    return u.numpy()


def rollout_row(records: Sequence[AttentionRecordLike], i: int, progress=None) -> np.ndarray:
    """The rollout row (Sk,) of query `i` through `records` (ordered by layer, bottom first).

    Rows sum to 1 (for a query with at least one visible key per layer)."""
    return propagate(records, i, _rollout_mixing, progress)


def _rollout_mixing(rec: AttentionRecordLike, idx: list[int]) -> tuple[Tensor, int]:
    a, stop = _weight_rows(rec, idx)  # (h r j')
    a = 0.5 * a.double().mean(0)
    a[torch.arange(len(idx)), torch.as_tensor(idx)] += 0.5
    return a, stop


@dataclass
class FlowLayer:
    """What the flow keeps of one captured layer once its v, z are dropped: q, k, the LSE and
    the masks (for exact rows), the Gram matrices of the per-head value vectors and the
    residual norms. O(N·H²) beside q and k."""

    layer: int
    q: Tensor
    k: Tensor
    lse: Tensor | None
    attn_kwargs: dict
    gram: Tensor  # (j h h'): ⟨v_gj W_O^h, v_g'j W_O^h'⟩, float64
    residual: Tensor  # (j,) ‖x_j‖, the residual stream entering the block, float64


def value_gram(v: Tensor, W_O: Tensor, chunk: int = 512) -> Tensor:
    """(j h h') Gram of u_hj = v_gj W_O^h, g = h // (H // G), from v (g j e) and W_O (h e m):
    ‖Σ_h w_h u_hj‖² = wᵀ G_j w for any weights w. Costs j·H·e·m + j·H²·m, in chunks of j."""
    H, G = W_O.shape[0], v.shape[0]
    vh = v[torch.arange(H, device=v.device) // (H // G)]  # (h j e)
    out = []
    for s in range(0, vh.shape[1], chunk):
        u = (vh[:, s : s + chunk] @ W_O).double()  # (h j m)
        out.append(torch.einsum("hjm,kjm->jhk", u, u).cpu())
    return torch.cat(out)


def flow_layer(rec: AttentionRecordLike, residual: Tensor) -> FlowLayer:
    """Reduce a captured layer (batch item 0) to what `flow_row` needs; `residual` (j,) holds
    ‖x_j‖ of the block's input."""
    lse = getattr(rec, "lse", None)
    return FlowLayer(
        layer=int(rec.layer),
        q=rec.q[:1],
        k=rec.k[:1],
        lse=None if lse is None else lse[:1],
        attn_kwargs=rec.attn_kwargs,
        gram=value_gram(rec.v[0], rec.W_O),
        residual=residual.double().cpu(),
    )


def flow_row(records: Sequence[FlowLayer], i: int, progress=None) -> np.ndarray:
    """The contribution flow row (Sk,) of query `i` through `records` (bottom first): how the
    norm-based mixing of every layer, residual included, routes token j into token i.

    Rows sum to 1. See the module docstring for the mixing and what it leaves out."""
    return propagate(records, i, _flow_mixing, progress)


def _flow_mixing(rec: FlowLayer, idx: list[int]) -> tuple[Tensor, int]:
    w, stop = _weight_rows(rec, idx)  # (h r j')
    w = w.double().cpu()
    g = rec.gram[:stop]  # (j' h h')
    a = torch.einsum("hrj,jhk,krj->rj", w, g, w).clamp_min(0).sqrt()  # ‖Σ_h w u‖ (r j')
    a[torch.arange(len(idx)), torch.as_tensor(idx)] += rec.residual[idx]
    return a / a.sum(-1, keepdim=True).clamp_min(1e-300), stop


def _weight_rows(rec: AttentionRecordLike, idx: list[int]) -> tuple[Tensor, int]:
    """Softmax rows (h r j') for query rows `idx` (fp32). For a plain causal record the rows
    only reach keys ≤ max(idx), so the prefix of q and k up to there is enough (same alignment,
    Sq = Sk): about half the work over a whole causal matrix."""
    kw = rec.attn_kwargs or {}
    plain = (
        bool(kw.get("causal"))
        and all(kw.get(x) is None for x in ("mask", "window", "mask_mod"))
        and rec.q.shape[2] == rec.k.shape[2]
    )
    if not plain:
        return rows(rec, idx), rec.k.shape[2]
    stop = max(idx) + 1
    lse = getattr(rec, "lse", None)
    prefix = SimpleNamespace(
        q=rec.q[:, :, :stop],
        k=rec.k[:, :, :stop],
        lse=None if lse is None else lse[:, :, :stop],
        attn_kwargs=kw,
    )
    return rows(prefix, idx), stop


def rollout_caveat(values: np.ndarray, name: str, what: str = "rollout") -> str | None:
    """The caveat a propagation (`what`: "rollout" or "contribution flow") carries when one
    token holds more than DOMINANT of it."""
    j = int(np.argmax(values))
    if values[j] <= DOMINANT:
        return None
    how = (
        "multiplies attention weights alone"
        if what == "rollout"
        else "multiplies per-layer shares of contribution norms (MLPs and layer norms left out)"
    )
    return (
        f"The {what} puts {values[j]:.3f} on {name} (token {j}). It {how} through every layer: "
        "where heads park weight on one token (a sink), the product converges to that token "
        "whatever the text, so this says little about what the query read. The per-layer "
        "tables show where each layer looked."
    )
