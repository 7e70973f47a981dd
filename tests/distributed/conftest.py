"""One 2-process launch shared by the sharded-model and lens-across-ranks tests, and one
4-process launch shared by the ring's cases and its memory count (each launch costs seconds of
process start-up on a small machine: 7 s for four)."""

from __future__ import annotations

import importlib

import pytest

from . import spawn


def in_turn(rank: int, world: int, targets: dict[str, str]) -> dict:
    """Each `module:function` of `targets`, in order, on this rank: {key: its result}."""
    out = {}
    for key, target in targets.items():
        module, name = target.rsplit(":", 1)
        out[key] = getattr(importlib.import_module(module), name)(rank, world)
    return out


def launch(world: int, **targets: str) -> list[dict]:
    """Every rank's {key: result} of `in_turn` on one launch of `world` processes."""
    results, _ = spawn.run("tests.distributed.conftest:in_turn", world, targets, timeout=300)
    return spawn.ok(results)


@pytest.fixture(scope="session")
def two_rank_report():
    return launch(2, model="tests.distributed.model_workers:sharded_decoder",
                  lens="tests.distributed.lens_workers:lens_across_ranks")  # fmt: skip


@pytest.fixture(scope="session")
def four_rank_report():
    # the memory count is relative to each measured call's start: the cases before it do not
    # change it
    return launch(4, ring="tests.distributed.workers:ring_cases",
                  memory="tests.distributed.memory_workers:ring_memory")  # fmt: skip
