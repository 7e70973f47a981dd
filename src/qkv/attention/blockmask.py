"""The block structure of a mask: which (query block, key block) pairs are full, partial or
empty, with the partial blocks' element masks kept (FlexAttention's `BlockMask`, built here by
evaluating the band and `mask_mod` once with PyTorch ops).

    bm = block_mask(spec, 64, 64)    # cached by (mods, shapes): a model's layers build it once
    bm.ptr, bm.kblk, bm.part, bm.masks   # what the fused kernel reads (CSR over query blocks)

Query block `qb` of mask row (bm, hm) visits key blocks `kblk[ptr[r]:ptr[r+1]]` (ascending),
r = (bm·Hm + hm)·NQ + qb; `part` is −1 for a full block (no mask work) or the index of its
(BQ, BK) keep-mask in `masks`. Empty blocks are not listed, so they are never visited.
Bm is B when the mask depends on the batch index (a per-row padding mask), else 1; Hm alike.

Cache: a mask is cached only when every mod in it carries a `_qkv_key` (the ready mods of
`mods.py` do; and_masks/or_masks of them too), so an arbitrary Python mask_mod is evaluated
afresh on every call. A captured tensor's key is read at each call (its contents' digest on
the CPU), so one changed in place, through a NumPy view too, is never served a stale
structure.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from . import scoring
from .mods import live_key
from .spec import Spec

CACHE_SIZE = 16  # block masks kept (one per distinct (mods, shapes) in a forward pass)
CHUNK = 1 << 22  # mask elements evaluated per PyTorch step while building


@dataclass(frozen=True)
class BlockMask:
    BQ: int
    BK: int
    NQ: int  # query blocks
    NK: int  # key blocks
    Bm: int  # 1 or B
    Hm: int  # 1 or Hq
    ptr: np.ndarray  # (Bm·Hm·NQ + 1,) int64: row r lists key blocks kblk[ptr[r]:ptr[r+1]]
    kblk: np.ndarray  # (nnz,) int32 key block index, ascending within a row
    part: np.ndarray  # (nnz,) int32: −1 = full block, else index into masks
    masks: np.ndarray  # (P, BQ, BK) uint8 keep-masks of the partial blocks (1 = keep)

    @property
    def counts(self) -> tuple[int, int, int]:
        """(full, partial, empty) block pairs over all mask rows."""
        partial = int((self.part >= 0).sum())
        full = len(self.part) - partial
        return full, partial, self.Bm * self.Hm * self.NQ * self.NK - full - partial


_cache: OrderedDict[tuple, tuple[object, BlockMask]] = OrderedDict()
_lock = threading.Lock()


def block_mask(spec: Spec, BQ: int, BK: int) -> BlockMask:
    """The block structure of the band (causal/window) AND `spec.mask_mod`, cached when the
    mod is a ready one. `spec.mask` (a tensor) is not part of it."""
    key = None
    mk = None if spec.mask_mod is None else live_key(spec.mask_mod)  # None: not cacheable
    if spec.mask_mod is None or mk is not None:
        key = (mk, spec.B, spec.Hq, spec.Sq, spec.Sk, spec.left, spec.right, BQ, BK)
        with _lock:
            hit = _cache.get(key)
            if hit is not None:
                _cache.move_to_end(key)
                return hit[1]
    bm = build(spec, BQ, BK)
    if key is not None:
        with _lock:  # the entry holds the mod, so the tensors whose ids are in the key live on
            _cache[key] = (spec.mask_mod, bm)
            while len(_cache) > CACHE_SIZE:
                _cache.popitem(last=False)
    return bm


def clear_cache() -> None:
    with _lock:
        _cache.clear()


def _mask_dims(spec: Spec) -> tuple[int, int]:
    """(Bm, Hm): whether the mod's result depends on b and h, from one evaluation at one point
    (a mod's output broadcasts over the axes of the index tensors it uses)."""
    if spec.mask_mod is None:
        return 1, 1
    b = torch.arange(spec.B).view(-1, 1, 1, 1)
    h = torch.arange(spec.Hq).view(1, -1, 1, 1)
    one = torch.full((1, 1, 1, 1), max(0, spec.delta), dtype=torch.long)
    out = _eval(spec, b, h, one, torch.zeros((1, 1, 1, 1), dtype=torch.long))
    return out.shape[0], out.shape[1]


def _eval(spec: Spec, b: Tensor, h: Tensor, qi: Tensor, kj: Tensor) -> Tensor:
    m = scoring.call_mod("mask_mod", spec.mask_mod, b, h, qi, kj)
    if not isinstance(m, Tensor) or m.dtype != torch.bool:
        got = m.dtype if isinstance(m, Tensor) else type(m).__name__
        raise TypeError(f"mask_mod must return a bool tensor (True = keep), got {got}")
    return m


def chunks(spec: Spec, BQ: int, BK: int, rows: int = 1) -> list[tuple[int, int]]:
    """(first query block, number of query blocks) per build step: consecutive, covering all
    query blocks, each evaluating at most ~CHUNK mask elements (`rows` mask rows × its query
    rows × the keys its band reaches, block-aligned) unless one query block alone needs more.
    A band that widens down the rows (causal) is measured at each step's own rows."""
    NQ = -(-spec.Sq // BQ)
    out, qb = [], 0

    def size(n: int) -> int:
        lo, hi = qb * BQ, min(spec.Sq, (qb + n) * BQ)
        start, stop = scoring.band_range(spec, lo, hi - 1)
        return rows * (hi - lo) * (max(0, stop - start) + 2 * BK)

    while qb < NQ:
        n = NQ - qb
        while n > 1 and size(n) > CHUNK:
            n = max(1, min(n // 2, n * CHUNK // size(n)))
        out.append((qb, n))
        qb += n
    return out


def build(spec: Spec, BQ: int, BK: int) -> BlockMask:
    """Evaluate band & mask_mod over the keys the band can reach, a few query blocks at a time,
    and classify every (query block, key block): O(Sq · reachable keys) mask evaluations."""
    NQ, NK = -(-spec.Sq // BQ), -(-spec.Sk // BK)
    Bm, Hm = _mask_dims(spec)
    state = np.zeros((Bm, Hm, NQ, NK), np.int8)  # 0 empty, 1 partial, 2 full
    pidx = np.full((Bm, Hm, NQ, NK), -1, np.int32)
    masks: list[np.ndarray] = []
    n_part = 0
    b = torch.arange(spec.B).view(-1, 1, 1, 1)
    h = torch.arange(spec.Hq).view(1, -1, 1, 1)
    for qb, nqb in chunks(spec, BQ, BK, Bm * Hm):
        lo = qb * BQ
        rows_end = min(spec.Sq, (qb + nqb) * BQ)
        start, stop = scoring.band_range(spec, lo, rows_end - 1)
        if stop <= start:
            continue
        kb0, kb1 = start // BK, -(-stop // BK)
        i = torch.arange(lo, (qb + nqb) * BQ)  # padded rows
        j = torch.arange(kb0 * BK, kb1 * BK)  # padded keys
        valid = (i < spec.Sq).view(-1, 1) & (j < spec.Sk).view(1, -1)  # (i j)
        qpos, kpos = (i + spec.delta).view(-1, 1), j.view(1, -1)
        keep = valid.clone()
        if spec.left is not None:
            keep &= kpos >= qpos - spec.left
        if spec.right is not None:
            keep &= kpos <= qpos + spec.right
        keep = keep.view(1, 1, *keep.shape)
        if spec.mask_mod is not None:
            ii = torch.clamp(i, max=max(0, spec.Sq - 1)) + spec.delta  # padded rows: any real
            jj = torch.clamp(j, max=max(0, spec.Sk - 1))  # index (masked by `valid` anyway)
            m = _eval(spec, b, h, ii.view(1, 1, -1, 1), jj.view(1, 1, 1, -1))
            keep = keep & m.expand(Bm, Hm, -1, -1)
        keep = keep.expand(Bm, Hm, -1, -1)
        blocks = keep.reshape(Bm, Hm, nqb, BQ, kb1 - kb0, BK).transpose(3, 4)  # (.. q k i j)
        some = blocks.any(-1).any(-1)
        # padded rows (i ≥ Sq) do not stop a block being full; padded keys (j ≥ Sk) do: the
        # kernel reads whole blocks, so a block with padding keys is partial, padding masked
        pad_rows = (i >= spec.Sq).view(nqb, 1, BQ, 1)
        every = (blocks | pad_rows).all(-1).all(-1)
        st = torch.where(every, 2, torch.where(some, 1, 0)).to(torch.int8).numpy()
        state[:, :, qb : qb + nqb, kb0:kb1] = st
        where = np.nonzero(st == 1)
        if len(where[0]):
            sel = blocks[torch.from_numpy(np.stack(where)).long().unbind(0)]
            masks.append(sel.to(torch.uint8).numpy())
            ids = np.arange(n_part, n_part + len(where[0]), dtype=np.int32)
            pidx[:, :, qb : qb + nqb, kb0:kb1][where] = ids
            n_part += len(where[0])
    listed = state > 0
    counts = listed.reshape(Bm * Hm * NQ, NK).sum(-1)
    ptr = np.zeros(Bm * Hm * NQ + 1, np.int64)
    np.cumsum(counts, out=ptr[1:])
    kblk = np.nonzero(listed)[3].astype(np.int32)  # C order: rows, then ascending key block
    part = pidx[listed].astype(np.int32)
    all_masks = np.concatenate(masks) if masks else np.zeros((0, BQ, BK), np.uint8)
    return BlockMask(BQ, BK, NQ, NK, Bm, Hm, ptr, kblk, part, np.ascontiguousarray(all_masks))
