"""One 2-process launch shared by the sharded-model and lens-across-ranks tests (each launch
costs seconds of process start-up on a small machine)."""

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
