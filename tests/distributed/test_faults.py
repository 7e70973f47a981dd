"""Faults across ranks end in a clear error on every rank, within a bounded time, never a hang."""

from __future__ import annotations

import pytest

from . import spawn


@pytest.mark.parametrize(("when", "world", "what"), [
    ("before", 3, "exchanging shard shapes failed"),
    ("backward", 2, "backward step 1: receiving K/V failed"),
])  # fmt: skip
def test_a_rank_that_raises_fails_the_others_clearly(when, world, what):
    results, elapsed = spawn.run("tests.distributed.workers:fault_raise", world, when,
                                 timeout=60, pg_timeout=20)  # fmt: skip
    assert f"rank {world - 1} fails on purpose" in results[-1]["error"]
    for r in range(world - 1):
        e = results[r]["ok"]["error"]
        assert e is not None and f"ring_attention on rank {r} of {world}: {what}" in e, e
        assert "Another rank most likely raised or exited" in e
        assert results[r]["ok"]["seconds"] < 20  # the peer's exit is noticed, no timeout wait
    assert elapsed < 60  # every rank exited on its own (the launcher killed nothing)


def test_a_rank_that_never_arrives_times_the_others_out():
    results, _ = spawn.run("tests.distributed.workers:fault_hang", 2, timeout=60, pg_timeout=2)
    got = spawn.ok(results)
    assert got[1] == {"slept": True}
    e = got[0]["error"]
    assert e is not None and "ring_attention on rank 0 of 2: exchanging shard shapes failed" in e
    assert "init_process_group(timeout=...)" in e
    assert got[0]["seconds"] < 30  # bounded by the group's timeout (2 s), not hung
