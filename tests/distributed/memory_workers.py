"""What each rank runs for the memory test (imported by name in spawned processes).

Live tensor bytes come from the PyTorch profiler's allocator events (every allocation and free
of the CPU allocator, in order): a count of bytes, not of time, so the result does not depend
on the machine's speed or load.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from torch.profiler import ProfilerActivity, profile

from qkv.distributed import ring, ring_attention, shard_sequence


def peak_live_bytes(fn) -> int:
    """The highest number of bytes the CPU allocator held at once while fn() ran, above what
    it held when fn started (fn's own allocations, freed or not)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted(
        (e.start_ns(), e.nbytes())
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]"
    )
    live = peak = 0
    for _, n in events:
        live += n
        peak = max(peak, live)
    return peak


@contextlib.contextmanager
def calls_of(tokens: int):
    """Every inner call of ring_attention covers at most `tokens` positions (a test hook)."""
    saved = ring.CALL_ELEMENTS, ring.MIN_CALL_TOKENS
    ring.CALL_ELEMENTS, ring.MIN_CALL_TOKENS = 0, tokens
    try:
        yield
    finally:
        ring.CALL_ELEMENTS, ring.MIN_CALL_TOKENS = saved


def _causal_step(n: int, rank: int, world: int, group) -> int:
    """Peak live bytes of causal forward + backward over N = n tokens, zigzag, fp32."""
    gen = torch.Generator().manual_seed(rank)
    S = shard_sequence(torch.empty(n), rank, world, "zigzag", 0).shape[0]
    q, k, v, go = (torch.randn(1, h, S, 64, generator=gen).requires_grad_(g)
                   for h, g in ((2, True), (1, True), (1, True), (2, False)))  # fmt: skip

    def run():
        out = ring_attention(q, k, v, group=group, causal=True, layout="zigzag")
        out.backward(go)

    return peak_live_bytes(run)


def ring_memory(rank: int, world: int) -> dict:
    """Peak live bytes per rank at two sizes, at world 4 and world 2 (ranks 0, 1), with inner
    calls of 128 positions so that every call's temporaries are the same at both sizes."""
    assert world == 4
    pair = dist.new_group([0, 1])
    report = {}
    with calls_of(128):
        for w, group in ((4, None), (2, pair)):
            if rank >= w:
                continue
            report[f"w{w}"] = {n: _causal_step(n * w, rank, w, group) for n in (512, 1024)}
        dist.barrier()
    return report
