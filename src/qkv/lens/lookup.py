"""The lookup math for one query row i of one captured layer — exact, never N×N.

Letters: b batch (always 1 here), h query head, g kv head, j key position, d head dim,
m model dim. For query row i and head h (kv head g = h // (Hq // Hk)):

    score_hj        = scale · q_hi · k_gj                 (after RoPE; the raw scaled dot product)
    weight_hj       = softmax_j(score_h·  + masks)        (recomputed by qkv.attention_weights)
    contribution_hj = ‖weight_hj · v_gj W_O^h‖            (Kobayashi et al. 2020: what key j carried)
    output_norm_h   = ‖z_hi W_O^h‖ = ‖Σ_j weight_hj v_gj W_O^h‖
    entropy_h       = −Σ_j weight_hj log weight_hj        (nats)
    sink_h          = 1 − Σ_j weight_hj = exp(σ_h − lse)   (learned sinks σ only, gpt-oss)

and for the whole layer: mean_h weight_hj, and ‖Σ_h weight_hj v_gj W_O^h‖ (the layer-level norm).
Cost per layer: O(H·Sk·d) for the row plus O(H·Sk·d²) for the value norms (a d×d Gram matrix per
head instead of the d×m product) and O(Sk·H·d·m) for the layer-level norm; memory O(H·Sk + Sk·m).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor

from qkv.attention import attention_weights

from .record import Head, Layer

LAYER_KEYS = 3  # a layer's key list keeps at least its top 3 by weight and by contribution


class AttentionRecordLike(Protocol):
    """What `qkv.nn.capture` records per attention call (see HELPERS contract)."""

    layer: int
    q: Tensor  # (b h i d) after RoPE
    k: Tensor  # (b g j d) after RoPE
    v: Tensor  # (b g j e)
    z: Tensor  # (b h i e) per-head output before W_O
    W_O: Tensor  # (h e m)
    attn_kwargs: dict[str, Any]


@dataclass
class Row:
    """Query row i of one layer, every visible key, every head (float64 numpy, (h j))."""

    score: np.ndarray
    weight: np.ndarray
    contribution: np.ndarray
    visible: np.ndarray  # bool (h j)
    output_norm: np.ndarray  # (h,)
    layer_weight: np.ndarray  # (j,) mean over heads
    layer_contribution: np.ndarray  # (j,), NaN where not needed (see layer_contributions)
    sink: np.ndarray | None = None  # (h,) a learned sink's weight, 1 − Σ_j weight (None: 0)


def weight_kwargs(rec: AttentionRecordLike) -> dict[str, Any]:
    """The keyword arguments of `attention_weights` among the record's `attn_kwargs`."""
    allowed = ("causal", "window", "mask", "mask_mod", "score_mod", "scale", "softcap", "sinks")
    kw = {k: v for k, v in (rec.attn_kwargs or {}).items() if k in allowed}
    if isinstance(kw.get("mask"), Tensor) and kw["mask"].dim() == 4:
        kw["mask"] = kw["mask"][:1]  # batch item 0, like q[:1]
    return kw


def rows(rec: AttentionRecordLike, idx: list[int]) -> Tensor:
    """Exact softmax rows (h, len(idx), j) for query rows `idx` of batch item 0 (fp32/fp64),
    from the captured LSE when the record has one (else the LSE of those rows is computed)."""
    lse = getattr(rec, "lse", None)
    lse = None if lse is None else lse[:1]
    return attention_weights(rec.q[:1], rec.k[:1], lse, rows=idx, **weight_kwargs(rec))[0]


def visible_keys(rec: AttentionRecordLike, i: int) -> Tensor:
    """(h, j) bool: the keys query row i may see under the record's masks (not its scores).

    Computed as the support of the softmax of an all-zero query (uniform over kept keys), with
    float biases reduced to where they are finite; score mods and softcaps change values, not
    which keys are kept, so they are dropped here (and so are learned sinks)."""
    kw = weight_kwargs(rec)
    kw.pop("score_mod", None)
    kw.pop("softcap", None)
    kw.pop("sinks", None)  # a sink takes weight from every kept key, never all of it
    H, Sq, Sk = rec.q.shape[1], rec.q.shape[2], rec.k.shape[2]
    if kw.get("mask") is None and kw.get("mask_mod") is None and kw.get("window") is None:
        j = torch.arange(Sk, device=rec.k.device)
        keep = j <= i + (Sk - Sq) if kw.get("causal") else torch.ones(Sk, dtype=torch.bool)
        return keep.expand(H, Sk)  # the plain cases, without a pass over the keys
    mask = kw.get("mask")
    if isinstance(mask, Tensor) and mask.dtype != torch.bool:
        kw["mask"] = torch.isfinite(mask)
    q0 = torch.zeros_like(rec.q[:1])  # (b h i d); only row i is scored
    return attention_weights(q0, rec.k[:1], None, rows=[i], **kw)[0, :, 0] > 0


def widen(t: Tensor) -> Tensor:
    """A float16/bfloat16 tensor in float32 (the lens' arithmetic); others as they are."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def value_norms(vh: Tensor, W_O: Tensor) -> Tensor:
    """‖v_hj W_O^h‖ for vh (h j e), W_O (h e m) → (h j), without the (h j m) product when long:
    through the Gram matrix M_h = W_O^h W_O^hᵀ (e×e, float64), ‖x W‖² = x M xᵀ. The direct
    product costs h·j·e·m, the Gram route h·e²·m + h·j·e²: cheaper once j > e·m/(m − e)."""
    vh, W_O = widen(vh), widen(W_O)  # float16/bfloat16: norms in float32
    e, m = W_O.shape[-2], W_O.shape[-1]
    if m <= e or vh.shape[1] * (m - e) <= e * m:
        return (vh @ W_O).norm(dim=-1)
    Wo = W_O.double()
    M = Wo @ Wo.transpose(-1, -2)  # (h e e)
    v64 = vh.double()
    return ((v64 @ M) * v64).sum(-1).clamp_min(0).sqrt()


def layer_contributions(
    w: Tensor,
    vh: Tensor,
    W_O: Tensor,
    bound: np.ndarray,
    cand: np.ndarray,
    need: np.ndarray,
    top: int,
) -> np.ndarray:
    """‖Σ_h w_hj v_hj W_O^h‖ (Kobayashi et al.'s layer-level norm) for the keys that matter, NaN
    for the rest: every key of `need`, and enough of `cand` to know its exact top-`top` (all of
    `cand` when top == 0). w (h j), vh (h j e), W_O (h e m), bound (j,) ≥ the norm.

    The full computation costs j·(h·e)·m (a d_model² matmul per key); keys are instead visited
    in decreasing order of the bound Σ_h ‖w_hj v_hj W_O^h‖ (triangle inequality) and the scan
    stops once no unvisited key's bound can reach the k-th largest exact norm."""
    vh, W_O = widen(vh), widen(W_O)  # float16/bfloat16: the blend in float32
    Wf = W_O.reshape(-1, W_O.shape[-1])  # ((h e) m)
    out = np.full(w.shape[1], np.nan)

    def exact(idx: np.ndarray) -> None:
        idx = idx[np.isnan(out[idx])]
        if len(idx):
            t = torch.as_tensor(idx, device=vh.device)
            x = (
                (w[:, t].to(vh.dtype).unsqueeze(-1) * vh[:, t])
                .permute(1, 0, 2)
                .reshape(len(idx), -1)
            )
            out[idx] = (x @ Wf).double().norm(dim=-1).cpu().numpy()  # (s,)

    if not top or len(cand) <= 4 * max(top, 64):
        exact(cand)
        return out
    exact(need)
    order = cand[np.argsort(-bound[cand], kind="stable")]
    step = 4 * max(top, 64)
    for pos in range(0, len(order), step):
        done = out[cand][~np.isnan(out[cand])]
        kth = np.sort(done)[-top] if len(done) >= top else -np.inf
        if bound[order[pos]] * (1 + 1e-5) < kth:
            break  # no key from here on can enter the top-k
        exact(order[pos : pos + step])
    return out


def query_row(
    rec: AttentionRecordLike, i: int, *, top: int = 0, keep: int | Sequence[int] | None = None
) -> Row:
    """Everything the lens reports for query row `i` of one captured layer (batch item 0).

    The layer-level contribution is exact for the keys a record of `top` keys (0 = all) and
    `keep` needs (see `select`), NaN elsewhere (see `layer_contributions`)."""
    # a float16/bfloat16 model's tensors in float32: its scores as the engine sums them (fp32),
    # and value norms and contributions not rounded to 8 or 11 bits on the way
    q, k, v, z, W_O = (widen(t) for t in (rec.q[0], rec.k[0], rec.v[0], rec.z[0], rec.W_O))
    # (h i d) (g j d) (g j e) (h i e) (h e m)
    H, G = q.shape[0], k.shape[0]
    if H % G:
        raise ValueError(f"query heads ({H}) must be a multiple of kv heads ({G})")
    kv = torch.arange(H, device=q.device) // (H // G)  # (h,) kv head of each query head
    scale = rec.attn_kwargs.get("scale") if rec.attn_kwargs else None
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    f64 = torch.float64

    w = rows(rec, [i])[:, 0].to(f64)  # (h j)
    vis = visible_keys(rec, i).cpu().numpy()  # (h j)
    s = (torch.einsum("hd,hjd->hj", q[:, i], k[kv]) * scale).to(f64)  # (h j)
    vh = v[kv]  # (h j e)
    vnorm = value_norms(vh, W_O).to(f64)  # (h j): ‖v_gj W_O^h‖
    contrib = (w * vnorm).cpu().numpy()  # (h j)
    out = torch.einsum("he,hem->hm", z[:, i].to(f64), W_O.to(f64)).norm(dim=-1)  # (h,)
    lw = w.mean(0).cpu().numpy()
    sink = sink_share(rec, i)

    cand = np.nonzero(vis.any(0))[0]
    pins = _pins(keep, vis.any(0))
    by_w = cand[np.argsort(-lw[cand], kind="stable")]
    need = np.concatenate((by_w[: top or None], pins, by_w[~np.isin(by_w, pins)][:1]))
    lc = layer_contributions(w, vh, W_O, contrib.sum(0), cand, need.astype(np.int64), top)
    return Row(
        score=s.cpu().numpy(),
        weight=w.cpu().numpy(),
        contribution=contrib,
        visible=vis,
        output_norm=out.cpu().numpy(),
        layer_weight=lw,
        layer_contribution=lc,
        sink=sink,
    )


def sink_share(rec: AttentionRecordLike, i: int) -> np.ndarray | None:
    """(h,) float64: the weight query row i of batch item 0 gives each head's learned sink
    (`sinks=`, gpt-oss), exp(σ_h − lse_hi), which its keys' weights leave to 1; None without
    sinks. From the captured LSE when the record has one, else the row's LSE is computed."""
    sinks = (rec.attn_kwargs or {}).get("sinks")
    if sinks is None:
        return None
    lse = getattr(rec, "lse", None)
    if lse is None:
        w = rows(rec, [i])[:, 0].double()  # (h j)
        return (1.0 - w.sum(-1)).clamp_min(0).cpu().numpy()
    return sink_weights(sinks, lse[0, :, i])


def sink_weights(sinks: Tensor, lse_row: Tensor) -> np.ndarray:
    """(h,) float64 exp(σ_h − lse_h): each head's sink weight in a row whose LSE includes it."""
    return torch.exp(sinks.detach().double() - lse_row.double()).cpu().numpy()


def _pins(keep: int | Sequence[int] | None, visible: np.ndarray) -> np.ndarray:
    """The kept-whatever-their-rank keys that `visible` (j,) lets the query see."""
    ks = [] if keep is None else [keep] if isinstance(keep, int | np.integer) else list(keep)
    return np.array(
        sorted({int(j) for j in ks if 0 <= int(j) < len(visible) and visible[j]}), dtype=np.int64
    )


def select(
    weight: np.ndarray,
    contrib: np.ndarray,
    candidates: np.ndarray,
    top: int,
    keep: int | Sequence[int] | None = None,
) -> np.ndarray:
    """The kept keys, ranked by weight (desc, ties by index): with `top` > 0 the top-k by weight
    together with the top-k by contribution (so a key that carried much with little weight is
    never cut), every visible key of `keep` (the sinks, the query, a chosen key: kept whatever
    their rank) and the key with most weight outside `keep` (so a view that skips the sinks
    still finds the true next key); with `top` == 0 every candidate."""
    order = candidates[np.argsort(-weight[candidates], kind="stable")]
    if not top or len(order) <= top:
        return order
    c = np.nan_to_num(contrib[candidates], nan=-np.inf)  # NaN: not computed, known to be small
    by_c = candidates[np.argsort(-c, kind="stable")]
    visible = np.zeros(int(candidates.max()) + 1, dtype=bool)
    visible[candidates] = True
    pins = _pins(keep, visible)
    other = order[~np.isin(order, pins)][:1]
    chosen = np.concatenate((order[:top], by_c[:top], pins, other))
    return order[np.isin(order, chosen)]


def entropy(w: np.ndarray) -> float:
    """−Σ w log w in nats, never −0.0 (a head with one key has entropy 0)."""
    p = w[w > 0]
    return max(0.0, float(-(p * np.log(p)).sum()))


def lookup_layer(
    rec: AttentionRecordLike,
    i: int,
    *,
    top: int,
    keep: int | Sequence[int] | None = None,
    heads: list[int] | None = None,
) -> Layer:
    """The record's `Layer` for query row i: every head (or `heads`), keys ranked by weight
    (the top-k by weight and the top-k by contribution, plus `keep`; see `select`; all with
    top=0). The layer's own key list keeps at least the top LAYER_KEYS, whatever `top`, so its
    summary (most weight, most content) does not depend on how many keys a head keeps.
    `heads` restricts the per-head lists only: the layer's numbers are over every head."""
    ltop = max(top, LAYER_KEYS) if top else 0
    r = query_row(rec, i, top=ltop, keep=keep)
    return layer_from_row(r, int(rec.layer), rec.k.shape[1], top=top, keep=keep, heads=heads)


def layer_from_row(
    r: Row,
    layer: int,
    G: int,
    *,
    top: int,
    keep: int | Sequence[int] | None = None,
    heads: list[int] | None = None,
) -> Layer:
    """`lookup_layer`'s record from a query's `Row` (G kv heads), however the row was computed
    (`query_row` on one process; `qkv.lens.distributed` from rows gathered across ranks)."""
    ltop = max(top, LAYER_KEYS) if top else 0
    H = r.weight.shape[0]
    out = []
    for h in range(H) if heads is None else heads:
        vis = np.nonzero(r.visible[h])[0]
        idx = select(r.weight[h], r.contribution[h], vis, top, keep)
        wv, cv = r.weight[h][vis], r.contribution[h][vis]
        out.append(
            Head(
                head=h,
                kv_head=h // (H // G),
                entropy=entropy(wv),
                output_norm=float(r.output_norm[h]),
                n_keys=len(vis),
                top_weight=int(vis[np.argmax(wv)]),
                top_contribution=int(vis[np.argmax(cv)]),
                index=idx,
                score=r.score[h][idx],
                weight=r.weight[h][idx],
                contribution=r.contribution[h][idx],
                sink=0.0 if r.sink is None else float(r.sink[h]),
            )
        )
    anyvis = np.nonzero(r.visible.any(0))[0]
    lidx = select(r.layer_weight, r.layer_contribution, anyvis, ltop, keep)
    return Layer(
        layer=layer,
        heads=out,
        top_weight=int(anyvis[np.argmax(r.layer_weight[anyvis])]),
        top_contribution=int(anyvis[np.nanargmax(r.layer_contribution[anyvis])]),
        index=lidx,
        weight=r.layer_weight[lidx],
        contribution=r.layer_contribution[lidx],
    )
