"""`torchrun --nproc-per-node W -m qkv.distributed`: ring attention on this machine's ranks,
checked against one process's `qkv.attention` on the gathered tensors.

    torchrun --nproc-per-node 4 -m qkv.distributed --tokens 4096 --layout zigzag

Random q, k, v (B=1, 4 query heads, 2 kv heads, d=64, fp32) of N tokens, the same on every
rank; each rank runs `ring_attention` on its shard, gathers the result and prints its time and
max |ring − qkv.attention on the whole sequence|. Wiring is torchrun's (MASTER_ADDR,
MASTER_PORT, RANK, WORLD_SIZE); gloo on CPU, NCCL (one GPU per rank) with --nccl.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.distributed as dist

from ..attention import attention
from .layout import LAYOUTS, gather_sequence, shard_sequence
from .ring import ring_attention


def _attention(n: int, layout: str, causal: bool, device: torch.device) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    gen = torch.Generator().manual_seed(0)  # the same full tensors on every rank
    q, k, v = (torch.randn(1, h, n, 64, generator=gen).to(device) for h in (4, 2, 2))
    mine = [shard_sequence(t, rank, world, layout) for t in (q, k, v)]
    t0 = time.perf_counter()
    out = ring_attention(*mine, causal=causal, layout=layout)
    seconds = time.perf_counter() - t0
    got = gather_sequence(out, layout=layout)
    want = attention(q, k, v, causal=causal)
    line = (f"rank {rank}/{world}: {mine[0].shape[2]} of {n} tokens ({layout}), ring "
            f"{seconds:.3f} s, max |ring − one process| = {(got - want).abs().max():.2e}")  # fmt: skip
    for r in range(world):
        dist.barrier()
        if r == rank:
            print(line, flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m qkv.distributed", description=__doc__)
    ap.add_argument("--tokens", type=int, default=4096, help="tokens in the whole sequence")
    ap.add_argument("--layout", choices=LAYOUTS, default="zigzag")
    ap.add_argument("--no-causal", dest="causal", action="store_false")
    ap.add_argument("--nccl", action="store_true", help="NCCL on one GPU per rank")
    a = ap.parse_args(argv)
    if a.tokens < 1:
        ap.error(f"--tokens must be ≥ 1, got {a.tokens}")
    dist.init_process_group("nccl" if a.nccl else "gloo")
    device = torch.device("cpu")
    if a.nccl:
        device = torch.device("cuda", dist.get_rank() % torch.cuda.device_count())
        torch.cuda.set_device(device)
    try:
        _attention(a.tokens, a.layout, a.causal, device)
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
