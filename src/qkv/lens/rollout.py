"""Attention rollout (Abnar & Zuidema 2020) for one query row, exact and without N×N.

Each layer's head-mean attention A_l, mixed with the residual stream, Ã_l = ½A_l + ½I, is
multiplied through the layers: R = Ã_L ⋯ Ã_1 and the query's rollout is row i of R,

    r = e_iᵀ Ã_L Ã_{L−1} ⋯ Ã_1

computed right to left as a row vector: u ← ½u + ½ uᵀA_l. Layer L needs only row i; every
lower layer needs the rows of all tokens that u reaches (for a causal model, tokens 0..i; for
an encoder, all of them). Those rows are recomputed exactly from the captured q, k in chunks
with `qkv.attention_weights`, so memory stays O(chunk·H·N); time is that of the q·kᵀ half of
one attention forward per layer, O(L·H·N²·d). (The paper's full matrix would be L·H·N² floats.)
"""

from __future__ import annotations

from collections.abc import Sequence
from types import SimpleNamespace

import numpy as np
import torch

from .lookup import AttentionRecordLike, rows

CHUNK_ELEMENTS = 1 << 23  # floats of a (h, rows, j) weight chunk: 32 MiB in fp32


def rollout_row(records: Sequence[AttentionRecordLike], i: int, progress=None) -> np.ndarray:
    """The rollout row (Sk,) of query `i` through `records` (ordered by layer, bottom first).

    `progress`, if given, is called once per layer done. Rows sum to 1 (for a query with at
    least one visible key per layer)."""
    if not records:
        raise ValueError("rollout needs at least one captured layer")
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
            a, stop = _mean_rows(rec, idx)  # (r j'): head-mean rows over keys 0..stop-1
            acc[:stop] += (u[idx].to(a.device, a.dtype) @ a).double().cpu()
        u = 0.5 * u + 0.5 * acc
        if progress is not None:
            progress()
    return u.numpy()


def _mean_rows(rec: AttentionRecordLike, idx: list[int]) -> tuple[torch.Tensor, int]:
    """Head-mean softmax rows for query rows `idx` (fp32). For a plain causal record the rows
    only reach keys ≤ max(idx), so the prefix of q and k up to there is enough (same alignment,
    Sq = Sk): about half the work over a whole causal matrix."""
    kw = rec.attn_kwargs or {}
    plain = (
        bool(kw.get("causal"))
        and all(kw.get(x) is None for x in ("mask", "window", "mask_mod"))
        and rec.q.shape[2] == rec.k.shape[2]
    )
    if not plain:
        return rows(rec, idx).mean(0), rec.k.shape[2]
    stop = max(idx) + 1
    lse = getattr(rec, "lse", None)
    prefix = SimpleNamespace(
        q=rec.q[:, :, :stop],
        k=rec.k[:, :, :stop],
        lse=None if lse is None else lse[:, :, :stop],
        attn_kwargs=kw,
    )
    return rows(prefix, idx).mean(0), stop
