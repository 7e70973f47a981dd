"""Which global positions of a sequence each rank holds: contiguous or zigzag shards.

    lay = make_layout("zigzag", lengths=(5, 5, 6))   # 3 ranks, N = 16
    lay.segments[0]        # ((0, 3), (13, 3)): rank 0 holds positions 0..2 and 13..15
    x_r = shard_sequence(x, rank, world, "zigzag")   # this rank's piece of x (dim 2 = i)
    x = gather_sequence(x_r, group, "zigzag")        # every rank's pieces, back in order

contiguous: rank r holds one run, the r-th of `torch.tensor_split(N, world)` when sharded by
`shard_sequence`; any lengths are accepted (ranks may hold uneven runs, even none).
zigzag (causal load balance): the sequence is cut into 2·world chunks by the same rule
(`tensor_split`: the first N mod 2W chunks get one token more); rank r holds chunk r followed
by chunk 2W−1−r, so every rank owns early and late queries and a causal mask leaves each about
the same work. Its lengths must be the ones this rule gives for N = Σ lengths.

Letters: b batch, h head, i position, d head dim.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

LAYOUTS = ("contiguous", "zigzag")


def _split(n: int, parts: int) -> list[int]:
    """Sizes of `torch.tensor_split` of n items into `parts` (the first n mod parts get +1)."""
    return [n // parts + (1 if p < n % parts else 0) for p in range(parts)]


@dataclass(frozen=True)
class Layout:
    """The global positions each rank's shard holds.

    `segments[r]` lists (global start, length) runs in the order they sit in rank r's local
    tensor along the sequence axis; `lengths[r]` is their total."""

    kind: str
    segments: tuple[tuple[tuple[int, int], ...], ...]

    @property
    def world(self) -> int:
        return len(self.segments)

    @property
    def lengths(self) -> tuple[int, ...]:
        return tuple(sum(n for _, n in segs) for segs in self.segments)

    @property
    def total(self) -> int:
        return sum(self.lengths)

    def runs(self, rank: int) -> tuple[tuple[int, int, int], ...]:
        """(local start, global start, length) of each non-empty run of rank's shard; segments
        that continue each other merge (zigzag's middle rank, or one rank, holds one run)."""
        out: list[tuple[int, int, int]] = []
        local = 0
        for start, n in self.segments[rank]:
            if n and out and out[-1][1] + out[-1][2] == start:
                out[-1] = (out[-1][0], out[-1][1], out[-1][2] + n)
            elif n:
                out.append((local, start, n))
            local += n
        return tuple(out)

    def positions(self, rank: int, device: torch.device | str | None = None) -> Tensor:
        """Global positions (i,) int64 of rank's shard, in local order."""
        parts = [torch.arange(s, s + n, device=device) for s, n in self.segments[rank]]
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long, device=device)


def make_layout(kind: str, lengths: tuple[int, ...] | list[int]) -> Layout:
    """The layout of `kind` whose ranks hold `lengths` tokens (one entry per rank).

    Raises ValueError for an unknown kind, a negative length, or zigzag lengths that are not
    the zigzag split of N = Σ lengths (naming both)."""
    if kind not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {kind!r}")
    lengths = [int(n) for n in lengths]
    if not lengths or min(lengths) < 0:
        raise ValueError(f"lengths must be ≥ 0 for every rank (at least one), got {lengths}")
    world, total = len(lengths), sum(lengths)
    if kind == "contiguous":
        starts = [sum(lengths[:r]) for r in range(world)]
        return Layout(kind, tuple(((s, n),) for s, n in zip(starts, lengths, strict=True)))
    chunks = _split(total, 2 * world)
    starts = [sum(chunks[:c]) for c in range(2 * world)]
    want = [chunks[r] + chunks[2 * world - 1 - r] for r in range(world)]
    if lengths != want:
        raise ValueError(
            f"a zigzag layout of N={total} tokens over {world} ranks holds {want} tokens per "
            f"rank (chunks r and {2 * world - 1}−r of {2 * world}), got {lengths}; shard with "
            "qkv.distributed.shard_sequence(x, rank, world, 'zigzag')"
        )
    segs = []
    for r in range(world):
        a, b = r, 2 * world - 1 - r
        segs.append(((starts[a], chunks[a]), (starts[b], chunks[b])))
    return Layout(kind, tuple(segs))


def collective_device(group: dist.ProcessGroup | None, like: torch.device) -> torch.device:
    """Where a collective's small tensors go: NCCL needs them on the GPU (`like`), gloo takes
    the CPU."""
    return like if dist.get_backend(group) == "nccl" else torch.device("cpu")


def all_lengths(n: int, group: dist.ProcessGroup | None, like: torch.device) -> list[int]:
    """Every rank's `n`, in rank order (one small all_gather)."""
    dev = collective_device(group, like)
    mine = torch.tensor([n], dtype=torch.long, device=dev)
    got = [torch.zeros(1, dtype=torch.long, device=dev) for _ in range(dist.get_world_size(group))]
    dist.all_gather(got, mine, group=group)
    return [int(g) for g in got]


def _check_rank(rank: int, world: int) -> None:
    for name, v in (("world", world), ("rank", rank)):
        if not isinstance(v, int) or isinstance(v, bool):
            raise TypeError(f"{name} must be an int, got {v!r}")
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"need world ≥ 1 and 0 ≤ rank < world, got rank={rank}, world={world}")


def shard_sequence(x: Tensor, rank: int, world: int, layout: str = "contiguous", dim: int = 2):
    """Rank's piece of the full sequence x along `dim` (2 for (b h i d), 1 for ids (b i)).

    contiguous: `x.tensor_split(world, dim)[rank]`; zigzag: chunks rank and 2·world−1−rank of
    `x.tensor_split(2·world, dim)`, concatenated. Uneven N is fine (sizes differ by ≤ 1 per chunk).
    """
    _check_rank(rank, world)
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if layout == "contiguous":
        return x.tensor_split(world, dim)[rank]
    chunks = x.tensor_split(2 * world, dim)
    return torch.cat((chunks[rank], chunks[2 * world - 1 - rank]), dim)


def gather_sequence(
    x: Tensor, group: dist.ProcessGroup | None = None, layout: str | Layout = "contiguous",
    dim: int = 2,
) -> Tensor:  # fmt: skip
    """All ranks' shards of a sequence, reassembled in global order along `dim` (the inverse
    of `shard_sequence`; uneven shards allowed). A collective: every rank of `group` calls it
    and gets the whole sequence. O(N) memory per rank — for checks and small tensors."""
    world = dist.get_world_size(group)
    dim = dim % x.dim()
    lengths = all_lengths(x.shape[dim], group, x.device)
    lay = layout if isinstance(layout, Layout) else make_layout(layout, lengths)
    if list(lay.lengths) != lengths or lay.world != world:
        raise ValueError(
            f"layout holds {list(lay.lengths)} tokens per rank but the ranks hold {lengths}"
        )
    top = max(lengths)
    pad = list(x.shape)
    pad[dim] = top - x.shape[dim]
    xp = torch.cat((x, x.new_zeros(pad)), dim).contiguous()  # all_gather needs equal sizes
    parts = [torch.empty_like(xp) for _ in range(world)]
    dist.all_gather(parts, xp, group=group)
    pieces = sorted(
        (start, parts[r].narrow(dim, local, length))
        for r in range(world)
        for local, start, length in lay.runs(r)
    )  # (global start, piece): sorted by start, which is unique
    return torch.cat([p for _, p in pieces], dim) if pieces else x
