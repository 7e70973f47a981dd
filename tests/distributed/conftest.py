"""One 2-process launch shared by the sharded-model and lens-across-ranks tests, and one
4-process launch shared by the ring's cases and its memory count (each launch costs seconds of
process start-up on a small machine: 7 s for four)."""

from __future__ import annotations

import pytest

from . import spawn


def two_ranks(rank: int, world: int) -> dict:
    from .lens_workers import lens_across_ranks
    from .model_workers import sharded_decoder

    return {"model": sharded_decoder(rank, world), "lens": lens_across_ranks(rank, world)}


@pytest.fixture(scope="session")
def two_rank_report():
    results, _ = spawn.run("tests.distributed.conftest:two_ranks", 2, timeout=300)
    return spawn.ok(results)


def four_ranks(rank: int, world: int) -> dict:
    from .memory_workers import ring_memory
    from .workers import ring_cases

    # the memory count is relative to each measured call's start: the cases before it do not
    # change it
    return {"ring": ring_cases(rank, world), "memory": ring_memory(rank, world)}


@pytest.fixture(scope="session")
def four_rank_report():
    results, _ = spawn.run("tests.distributed.conftest:four_ranks", 4, timeout=300)
    return spawn.ok(results)
