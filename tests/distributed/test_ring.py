"""ring_attention against plain float64 softmax on the gathered tensors, at world sizes 1–4
(one 4-process gloo launch on 127.0.0.1; see workers.py for the cases and the oracle)."""

from __future__ import annotations

import pytest
import torch

from qkv.distributed.layout import make_layout
from qkv.distributed.ring import band_pair

from .workers import CASES, GROUPS, dtypes

# fp64: absolute; fp32/bf16/fp16: at most 2× the plain same-dtype formula's own error vs
# float64 (over the whole gathered tensor), plus this
ATOL = {"float64": 1e-12, "float32": 3e-7, "bfloat16": 1e-3, "float16": 1e-4}
QUANTITIES = ("out", "lse", "dq", "dk", "dv")


@pytest.fixture(scope="module")
def report(four_rank_report):
    return [r["ring"] for r in four_rank_report]


KEYS = [f"w{w}/{n}/{str(dt)[6:]}" for w in GROUPS for n in CASES for dt in dtypes(n)]


@pytest.mark.parametrize("key", KEYS)
def test_ring_equals_gathered_oracle(report, key):
    w = int(key[1])
    dtype = key.rsplit("/", 1)[1]
    ranks = [r for r in GROUPS[w]]
    for r in ranks:
        res = report[r][key]
        assert res["lse_dtype"] == ("torch.float64" if dtype == "float64" else "torch.float32")
        for q in QUANTITIES + (("dsinks",) if "dsinks" in res else ()):
            budget = ATOL[dtype] + (2 * res["plain"][q] if dtype != "float64" else 0.0)
            assert res[q] <= budget, f"rank {r} {key} {q}: {res[q]:.3g} > {budget:.3g}"


def test_the_check_can_fail(report):
    """A wrong layout (zigzag shards declared contiguous) is caught by the same comparison."""
    assert max(report[r]["mislabeled"] for r in range(4)) > 0.1


def test_every_rank_raises_the_same_clear_error(report):
    for r in range(4):
        e = report[r]["errors"]
        assert "every rank must pass the same Hq" in e["heads"] and "rank 3 has 2" in e["heads"]
        assert "zigzag layout of N=37 tokens over 4 ranks holds [9, 9, 9, 10]" in e["zigzag"]
        assert "got [10, 9, 9, 9]" in e["zigzag"]
        assert "same causal" in e["causal"]
        # was silent: the gradient came back detached, so a penalty on it had no gradient
        assert "first derivatives only" in e["second"] and "create_graph=True" in e["second"]
        assert e["after"] == [1, 2, 5, 8]
    assert len({report[r]["errors"]["heads"] for r in range(4)}) == 1


def _brute(qa, nq, kc, nk, L, R):
    i = torch.arange(qa, qa + nq)[:, None]
    j = torch.arange(kc, kc + nk)[None, :]
    keep = torch.ones(nq, nk, dtype=torch.bool)
    if L is not None:
        keep &= j >= i - L
    if R is not None:
        keep &= j <= i + R
    return keep


def _from_pair(qa, nq, kc, nk, got):
    """The keep matrix a trimmed pair's qkv.attention call applies, mapped back to the runs."""
    keep = torch.zeros(nq, nk, dtype=torch.bool)
    if got is None:
        return keep
    q0, n_q, k0, n_k, left, right = got
    assert n_q > 0 and n_k > 0 and (left is None or left >= 0) and (right is None or right >= 0)
    d = n_k - n_q  # qkv.attention's bottom-right alignment: row i at i + d
    i, j = torch.arange(n_q)[:, None], torch.arange(n_k)[None, :]
    sub = torch.ones(n_q, n_k, dtype=torch.bool)
    if left is not None:
        sub &= j >= i + d - left
    if right is not None:
        sub &= j <= i + d + right
    keep[q0 - qa : q0 - qa + n_q, k0 - kc : k0 - kc + n_k] = sub
    return keep


def test_band_pair_keeps_exactly_the_global_band():
    """Every (query run, key run, band) of small sizes: the trimmed call keeps what the
    global band keeps, and trims nothing the band connects."""
    sides = (None, 0, 1, 3, 7)
    n = 0
    for qa, nq, kc, nk in [(0, 5, 0, 5), (8, 4, 0, 3), (0, 3, 8, 4), (5, 6, 2, 9), (10, 1, 3, 12),
                           (3, 9, 10, 2), (0, 7, 7, 7)]:  # fmt: skip
        for L in sides:
            for R in sides:
                want = _brute(qa, nq, kc, nk, L, R)
                got = _from_pair(qa, nq, kc, nk, band_pair(qa, nq, kc, nk, L, R))
                assert torch.equal(got, want), (qa, nq, kc, nk, L, R)
                n += 1
    assert n == 175


def test_band_pair_check_can_fail():
    """Reading the trimmed window on the wrong diagonal (δ = 0) breaks a case the test meets."""
    q0, n_q, k0, n_k, left, right = band_pair(5, 6, 2, 9, 3, 1)
    assert n_k - n_q != 0
    i, j = torch.arange(n_q)[:, None], torch.arange(n_k)[None, :]
    wrong = (j >= i - left) & (j <= i + right)
    want = _brute(q0, n_q, k0, n_k, 3, 1)
    assert not torch.equal(wrong, want)


def test_make_layout_zigzag_and_errors():
    lay = make_layout("zigzag", (5, 5, 6))
    # zigzag of N=16 over 3 ranks: 6 chunks 3,3,3,3,2,2 → rank r holds chunks r and 5−r
    assert make_layout("zigzag", (5, 5, 6)).segments == (
        ((0, 3), (14, 2)), ((3, 3), (12, 2)), ((6, 3), (9, 3)))  # fmt: skip
    assert lay.positions(2).tolist() == [6, 7, 8, 9, 10, 11]
    assert make_layout("contiguous", (4, 0, 2)).runs(2) == ((0, 4, 2),)
    with pytest.raises(ValueError, match=r"holds \[5, 5, 6\] tokens per rank.*got \[6, 5, 5\]"):
        make_layout("zigzag", (6, 5, 5))
    with pytest.raises(ValueError, match="layout must be one of"):
        make_layout("striped", (1, 1))


def _kept(p, L, R) -> int:
    """Scores the global band keeps inside one planned pair (brute force)."""
    return int(_brute(p.qg, p.nq, p.kg, p.nk, L, R).sum())


def test_plan_skips_empty_steps_and_balances_zigzag():
    from qkv.distributed.ring import make_plan

    def plans(kind, lengths, L, R):
        lay = make_layout(kind, lengths)
        return [make_plan(None, r, len(lengths), lay, L, R, 1.0, None, None, None)
                for r in range(len(lengths))]  # fmt: skip

    # contiguous causal: rank 0 needs no later block, the last rank needs every one
    ps = plans("contiguous", (8, 8, 8, 8), None, 0)
    assert [len(s) for s in ps[0].steps] == [1, 0, 0, 0]
    assert [len(s) for s in ps[3].steps] == [1, 1, 1, 1]
    # a window narrower than a shard: the ring stops after one hop
    assert all(len(p.steps) == 2 for p in plans("contiguous", (16,) * 4, 2, 0))
    # zigzag causal: every rank scores the same number of keys at every step
    ps = plans("zigzag", (16,) * 4, None, 0)
    per_step = [[sum(_kept(p, None, 0) for p in plan.steps[t]) for plan in ps] for t in range(4)]
    assert per_step == [[136] * 4, [128] * 4, [128] * 4, [128] * 4]
    total = sum(map(sum, per_step))
    assert total == 64 * 65 // 2  # together: exactly the causal triangle of N = 64


def _cells(pairs, L, R) -> list[tuple[int, int]]:
    """Every (query position, key position) the band keeps inside the planned pairs."""
    out = []
    for p in pairs:
        i, j = torch.nonzero(_brute(p.qg, p.nq, p.kg, p.nk, L, R), as_tuple=True)
        out += list(zip((i + p.qg).tolist(), (j + p.kg).tolist(), strict=True))
    return out


def test_plan_pieces_cover_each_score_once():
    """Runs cut into pieces of at most 5 positions (each inner call that small): the calls of
    every step keep exactly the scores whole runs keep, each once."""
    from qkv.distributed.ring import make_plan

    for kind, lengths in (("zigzag", (16,) * 4), ("contiguous", (13, 3, 9, 4))):
        lay = make_layout(kind, lengths)
        for L, R in ((None, 0), (3, 2), (None, None)):
            for r in range(4):
                whole = make_plan(None, r, 4, lay, L, R, 1.0, None, None, None)
                cut = make_plan(None, r, 4, lay, L, R, 1.0, None, None, None, chunk=5)
                assert len(cut.steps) == len(whole.steps)
                for a, b in zip(whole.steps, cut.steps, strict=True):
                    assert all(p.nq <= 5 and p.nk <= 5 for p in b)
                    got = _cells(b, L, R)
                    assert len(got) == len(set(got)) and set(got) == set(_cells(a, L, R))


def test_call_size_bounds_memory_on_cpu_and_stays_large_on_gpus():
    """One call's q slice: ≤ 2^18 elements on CPU (≥ 1024 positions), ≤ 2^26 off the CPU, where
    small calls would be launch-bound."""
    from qkv.distributed.ring import call_tokens

    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert call_tokens(1, 2, 64, 64, cpu) == 2048  # 2^18 / (2·64)
    assert call_tokens(1, 32, 128, 128, cpu) == 1024  # the floor
    assert call_tokens(1, 32, 128, 128, gpu) == 16384  # 2^26 / (32·128)
    assert call_tokens(4, 64, 256, 128, gpu) == 1024
