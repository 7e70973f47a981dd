"""The lens across ranks: explain a token of a text whose sequence is sharded over a process
group, so that no single process holds the whole run.

    dist.init_process_group("gloo")                    # torchrun: MASTER_ADDR, RANK, ...
    r = explain_sharded(text, "it", model="smollm2")   # every rank calls it, every rank gets r

The model runs sharded (`qkv.distributed.shard`): each rank keeps its own positions' q, k, v,
z and LSE per layer. Per layer, the rank holding the query broadcasts the query's q, z and LSE
(H·(d + e + 1) numbers); every rank computes the query's row against its own keys — score,
softmax weight from the global LSE, contribution ‖w·v W_O‖, and the layer-level norm
‖Σ_h w v W_O‖ — and the rows (O(H·N) numbers, what a record with every key holds) are gathered
into one `Row`, from which `lookup.layer_from_row` builds the same `Layer` a single-process
`explain` builds. The record equals a single-process run on a text that fits, up to the float
rounding of the sharded forward.

Letters: h query head, g kv head, j key position (this rank's), d head dim, e value dim,
m model dim.
"""

from __future__ import annotations

import math
import os
import sys
from typing import Any

import torch
import torch.distributed as dist

from qkv.attention import attention_weights
from qkv.distributed import shard, shard_sequence, unshard
from qkv.distributed.layout import collective_device

from .explain import (
    DEFAULT_TOP,
    _check_range,
    _encode,
    make_result,
    pick_query_key,
    resolve_model,
    run_capture,
    summarize,
)
from .lookup import Row, layer_from_row, sink_weights, value_norms, widen
from .record import ExplainResult
from .tokens import make_tokens, sink_tokens


def explain_sharded(
    text: str,
    token: str | int,
    *,
    model: Any = "smollm2",
    group: dist.ProcessGroup | None = None,
    layout: str = "contiguous",
    occurrence: int = 1,
    layer: int | None = None,
    head: int | None = None,
    top: int = DEFAULT_TOP,
    key: str | int | None = None,
    key_occurrence: int = 1,
    truncate: bool = False,
    progress: bool | None = None,
) -> ExplainResult:
    """`qkv.explain` with the text's tokens sharded over `group` (a collective: every rank
    calls it with the same arguments and gets the same record). Arguments as `explain`;
    `layout` as `qkv.distributed.ring_attention`. Not available here: flow and rollout (they
    need every row the query depends on). Causal models run tokens 0..query only, as
    `explain` does. The model must be shardable (`qkv.distributed.shard`: RoPE or no
    positions)."""
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    if not text.strip():
        raise ValueError("text is empty: pass the text whose token you want explained")
    if isinstance(top, bool) or not isinstance(top, int) or top < 0:
        raise ValueError(f"top must be an int ≥ 0 (0 keeps every key), got {top!r}")
    rank = dist.get_rank(group)
    if progress is None:
        progress = sys.stderr.isatty() and rank == 0
    m = resolve_model(model)
    info = summarize(m, model if isinstance(model, str) and not os.path.isdir(model) else None)
    layer = _check_range("layer", layer, info.n_layers, info.name)
    head = _check_range("head", head, info.n_heads, info.name)
    enc, cut = _encode(m.tokenizer, text, info, truncate)
    tokens = make_tokens(text, enc.tokens, enc.offsets)
    qpick, kpick = pick_query_key(tokens, text, info, cut, token, occurrence, key, key_occurrence)
    i, j = qpick.index, None if kpick is None else kpick.index
    n = i + 1 if info.causal else len(tokens)
    wanted = list(range(info.n_layers)) if layer is None else [layer]
    heads = None if head is None else [head]
    pins = sink_tokens(tokens, i) + ([] if j is None else [j])
    world = dist.get_world_size(group)
    ids = shard_sequence(torch.tensor(enc.ids[:n]), rank, world, layout, dim=0).tolist()
    if not ids:
        raise ValueError(
            f"the query's text has {n} tokens to run, fewer than the {world} ranks: rank "
            f"{rank} would hold none; run it on fewer ranks or on one process"
        )
    layers: list = []

    def reduce(rec: Any) -> None:
        layers.append(_layer(rec, i, n, top=top, keep=pins, heads=heads))

    shard(m, group, layout)
    try:
        with torch.inference_mode():
            run_capture(m, ids, layers=wanted, progress=progress, on_layer=reduce)
    finally:
        unshard(m)
    return make_result(info, text, tokens, layers, top, qpick, kpick, cut)


# the attention arguments `_layer` reproduces (a record holding others is refused, not misread)
_ROW_KWARGS = ("causal", "scale", "window", "softcap", "score_mod", "sinks", "sequence")


def _layer(rec: Any, i: int, n: int, *, top: int, keep: list[int], heads: list[int] | None):
    """One layer's `Layer` for query i: the query broadcast, rows against every rank's keys,
    gathered (every rank gets the whole row)."""
    group, lay, rank = rec.attn_kwargs["sequence"]
    kw = rec.attn_kwargs
    if extra := sorted(n for n, a in kw.items() if a is not None and n not in _ROW_KWARGS):
        raise ValueError(
            f"the sharded lens cannot compute rows of attention with {extra} yet; run the lens "
            "on one process"
        )
    # (h i d) (g j d) (g j e); float16/bfloat16 in float32, as `lookup.query_row` reads them
    q, k, v, z, W_O = (widen(t) for t in (rec.q[0], rec.k[0], rec.v[0], rec.z[0], rec.W_O))
    H, G, D, E = q.shape[0], k.shape[0], q.shape[-1], v.shape[-1]
    f64 = torch.float64
    # the query's q, z and LSE, from the rank that holds position i
    owner = next(r for r in range(lay.world) for _, s, c in lay.runs(r) if s <= i < s + c)
    dev = collective_device(group, q.device)
    buf = torch.empty(H * (D + E + 1), dtype=f64, device=dev)
    if rank == owner:
        li = next(loc + i - s for loc, s, c in lay.runs(rank) if s <= i < s + c)
        buf = torch.cat((q[:, li].reshape(-1), z[:, li].reshape(-1), rec.lse[0, :, li])).to(
            dev, f64
        )
    src = owner if group is None else dist.get_global_rank(group, owner)
    dist.broadcast(buf, src, group=group)
    buf = buf.to(q.device)
    qi = buf[: H * D].view(H, D).to(q.dtype)
    zi = buf[H * D : H * (D + E)].view(H, E)
    lse_i = buf[H * (D + E) :].to(rec.lse.dtype)
    # this rank's keys, at their global positions
    kpos = lay.positions(rank, q.device)
    keep_j = torch.ones(len(kpos), dtype=torch.bool, device=q.device)
    if kw.get("causal"):
        keep_j &= kpos <= i
    left, right = kw.get("window") or (None, None)
    if left is not None:
        keep_j &= kpos >= i - left
    if right is not None:
        keep_j &= kpos <= i + right
    scale = float(kw["scale"]) if kw.get("scale") is not None else 1.0 / math.sqrt(D)
    kv = torch.arange(H, device=q.device) // (H // G)  # (h,) kv head of each query head
    mod = kw.get("score_mod")
    if mod is not None:  # (ALiBi) at global positions: the one row is query i, key j kpos[j]
        mod = lambda s, b, h, qj, kj, f=mod: f(s, b, h, torch.full_like(qj, i), kpos[kj])  # noqa: E731
    w = attention_weights(
        qi[None, :, None], k[None], lse_i[None, :, None], rows=[0], mask=keep_j.view(1, 1, 1, -1),
        scale=scale, softcap=kw.get("softcap"), score_mod=mod,
    )[0, :, 0].to(f64)  # (h j), exp(logit − global LSE)  # fmt: skip
    s = (torch.einsum("hd,hjd->hj", qi, k[kv]) * scale).to(f64)  # (h j)
    vh = v[kv]  # (h j e)
    contrib = w * value_norms(vh, W_O).to(f64)  # (h j)
    Wf = W_O.reshape(-1, W_O.shape[-1])  # ((h e) m)
    x = (w.to(vh.dtype).unsqueeze(-1) * vh).permute(1, 0, 2).reshape(len(kpos), -1)
    lc = (x @ Wf).double().norm(dim=-1)  # (j,) every local key (split over the ranks)
    lc = torch.where(keep_j, lc, torch.full_like(lc, math.nan))
    vis = keep_j.expand(H, -1).to(f64)
    local = torch.cat((s, w, contrib, vis, lc[None]))  # (4h+1, j)
    full = _gather_rows(local.to(dev), lay, group, n).cpu()  # (4h+1, n) in global order
    w_all = full[H : 2 * H].numpy()
    row = Row(
        score=full[:H].numpy(),
        weight=w_all,
        contribution=full[2 * H : 3 * H].numpy(),
        visible=full[3 * H : 4 * H].numpy() > 0,
        output_norm=torch.einsum("he,hem->hm", zi, W_O.to(f64)).norm(dim=-1).cpu().numpy(),
        layer_weight=w_all.mean(0),
        layer_contribution=full[4 * H].numpy(),
        sink=None if (sk := kw.get("sinks")) is None else sink_weights(sk, lse_i),  # ring LSE
    )
    return layer_from_row(row, int(rec.layer), G, top=top, keep=keep, heads=heads)


def _gather_rows(local: torch.Tensor, lay: Any, group: Any, n: int) -> torch.Tensor:
    """Every rank's (c, j_r) columns → (c, n), columns at their global positions."""
    world = lay.world
    top = max(lay.lengths)
    pad = torch.zeros(local.shape[0], top, dtype=local.dtype, device=local.device)
    pad[:, : local.shape[1]] = local
    parts = [torch.empty_like(pad) for _ in range(world)]
    dist.all_gather(parts, pad, group=group)
    out = torch.empty(local.shape[0], n, dtype=local.dtype, device=local.device)
    for r in range(world):
        for loc, s, c in lay.runs(r):
            out[:, s : s + c] = parts[r][:, loc : loc + c]
    return out
