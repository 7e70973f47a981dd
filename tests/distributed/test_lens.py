"""The lens across ranks: `explain_sharded` over 2 gloo ranks gives the record a single-process
`explain` gives on the same text (a random RoPE/GQA decoder; see lens_workers.py)."""

from __future__ import annotations

import pytest

from . import spawn

TOL = 1e-5  # numbers: |sharded − single| / max(1, |single|); indices and texts: equal


@pytest.fixture(scope="module")
def report(two_rank_report):
    return [r["lens"] for r in two_rank_report]


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
@pytest.mark.parametrize(("token", "top"), [("slept", 3), ("tired", 0), ("excited", 10)])
def test_sharded_record_equals_single_process(report, layout, token, top):
    for r, rep in enumerate(report):
        got = rep[f"{layout}/{token}/{top}"]
        assert got["mismatch"] == [], f"rank {r}: {got['mismatch']}"
        assert got["diff"] <= TOL, f"rank {r}: {got['diff']:.3g}"


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
def test_sharded_record_with_alibi_equals_single_process(report, layout):
    """ALiBi is a score_mod of the query's and key's positions: the sharded rows must apply it
    at global positions (before, they left it out: every weight was off)."""
    for r, rep in enumerate(report):
        got = rep[f"alibi:{layout}/slept/0"]
        assert got["mismatch"] == [], f"rank {r}: {got['mismatch']}"
        assert got["diff"] <= TOL, f"rank {r}: {got['diff']:.3g}"


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
def test_sharded_record_with_sinks_equals_single_process(report, layout):
    """Learned sinks: the ring's LSE includes them, so its rows sum to 1 − each head's sink,
    and the record's "sink" of every head equals one process's."""
    for r, rep in enumerate(report):
        got = rep[f"sinks:{layout}/slept/0"]
        assert got["mismatch"] == [], f"rank {r}: {got['mismatch']}"
        assert got["diff"] <= TOL, f"rank {r}: {got['diff']:.3g}"
        assert got["sinks"] > 0, "every head has a sink share"


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
def test_sharded_bf16_record_is_as_exact_as_single_process(report, layout):
    """A bfloat16 model's sharded record, against the float64 record of the same weights, is
    within flash-attn's criterion (tests/test_flash_attn.py): error ≤ 2 × the single-process
    bf16 record's own error + 1e-3. Same keys, indices and texts; the record says bfloat16, and
    its weights are the float64 softmax of its scores within 1e-5 (seen 1.7e-7; 2.3e-3 without `widen`)."""
    for r, rep in enumerate(report):
        got = rep[f"bf16:{layout}"]
        assert got["mismatch"] == [], f"rank {r}: {got['mismatch']}"
        assert got["dtype"] == "bfloat16"
        assert 0 < got["single"] < 0.1, f"rank {r}: single-process bf16 error {got['single']}"
        assert got["sharded"] <= 2 * got["single"] + 1e-3, (
            f"rank {r}: sharded {got['sharded']:.3g} vs single {got['single']:.3g}"
        )
        assert got["softmax"] <= 1e-5, f"rank {r}: softmax(score) vs weight {got['softmax']:.3g}"


def test_the_check_can_fail(report):
    assert all(rep["other"] > 0 for rep in report)


@pytest.mark.slow
def test_smollm2_record_across_two_ranks():
    """smollm2, 290 tokens, every key of every head: the same keys per head as one process;
    score/weight/contribution within the float rounding of a sharded forward (seen 5.3e-5,
    2.6e-6, 6.3e-5; bounds 10× those, rounded up)."""
    results, _ = spawn.run("tests.distributed.lens_workers:smollm2_lens", 2, timeout=400,
                           pg_timeout=300)  # fmt: skip
    for r, got in enumerate(spawn.ok(results)):
        assert got["tokens"] == 290 and got["n_keys"] > 70_000
        assert got["same_sets"], f"rank {r}: a head kept other keys"
        for what, worst, bound in zip(("score", "weight", "contribution"), got["worst"],
                                      (1e-3, 3e-5, 1e-3), strict=True):  # fmt: skip
            assert worst <= bound, f"rank {r} {what}: {worst:.3g} > {bound}"
