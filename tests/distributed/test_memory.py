"""Per-rank memory of ring_attention: what grows with the shard is the results, the saved
out/LSE and the ring's buffers — two K/V blocks and one dK/dV, never more — counted in bytes
by the allocator (the 4-process gloo launch it shares with test_ring.py; see memory_workers.py)."""

from __future__ import annotations

import pytest

# causal, zigzag, B=1, Hq=2, Hk=1, D=Dv=64, fp32: bytes per position this rank holds
Q_ROW = 2 * 64 * 4  # one row of q, out, dq or dO (b h i d)
KV_ROW = 1 * (64 + 64) * 4  # one row of a K/V block, or of its dK/dV (fp32)
LSE_ROW = 2 * 4
SAVED = Q_ROW + LSE_ROW  # out and LSE kept for the backward
GRADS = Q_ROW + KV_ROW  # dq, dk, dv: the results
BOUND = SAVED + Q_ROW + 3 * KV_ROW  # backward: dq, and 2 blocks + 1 dK/dV (or 1 + 2)


@pytest.fixture(scope="module")
def report(four_rank_report):
    return [r["memory"] for r in four_rank_report]


def _slopes(report, w):
    """Bytes per held position that each rank's peak grows by, from 512 to 1024 positions."""
    return [(r[f"w{w}"]["1024"] - r[f"w{w}"]["512"]) / 512 for r in report[:w]]


@pytest.mark.parametrize("w", [2, 4])
def test_peak_per_rank_grows_only_by_its_buffers(report, w):
    for rank, slope in enumerate(_slopes(report, w)):
        assert slope <= BOUND * 1.02, (
            f"world {w} rank {rank}: {slope:.0f} B per position > {BOUND} (saved out/LSE, dq, "
            "two K/V blocks and one dK/dV): a ring buffer is kept alive longer than it is needed"
        )


@pytest.mark.parametrize("w", [2, 4])
def test_the_count_sees_the_buffers(report, w):
    """The count can fail: it sees at least the results and what the forward saves."""
    for slope in _slopes(report, w):
        assert slope >= SAVED + GRADS
