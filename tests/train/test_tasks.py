"""Tasks generate what they claim: checked by brute force on the decoded strings, independent of
the vectorised generator."""

from __future__ import annotations

import pytest
import torch

from qkv.train.tasks import IGNORE, TASKS, CopyTask, InductionTask, RecallTask, make_task


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def answers(task, batch):
    """(text tokens, {position: target token}) per sequence, as strings."""
    out = []
    for ids, tg in zip(batch.ids.tolist(), batch.targets.tolist(), strict=True):
        toks = [task.vocab[i] for i in ids]
        out.append((toks, {p: task.vocab[t] for p, t in enumerate(tg) if t != IGNORE}))
    return out


@pytest.mark.parametrize(
    "params",
    [
        {},
        {"n_records": 1, "n_keys": 1, "n_values": 1, "n_queries": 1},
        {"n_records": 5, "n_keys": 5, "n_values": 2, "n_queries": 5},
        {"n_records": 3, "n_keys": 40, "n_values": 7, "n_queries": 2, "seq_len": 23},
        {"n_records": 7, "n_keys": 9, "n_values": 11, "n_queries": 1, "seq_len": 16},
    ],
)
def test_recall_brute_force(params):
    task = RecallTask(**params)
    batch = task.sample(64, gen(1))
    assert batch.ids.shape == batch.targets.shape == (64, task.seq_len)
    for toks, want in answers(task, batch):
        sep = toks.index("?")
        assert toks.count("?") == 1
        records = [t for t in toks[:sep] if t != "_"]
        assert len(records) == 2 * task.n_records
        db = {}
        for k, v in zip(records[0::2], records[1::2], strict=True):
            assert k.startswith("k") and v.startswith("v")
            assert k not in db, "keys of one sequence are distinct"
            db[k] = v
        # no filler breaks a record apart: each key is immediately followed by its value
        for i, t in enumerate(toks[:sep]):
            if t.startswith("k"):
                assert toks[i + 1] == db[t]
        queries = toks[sep + 1 :: 2]
        assert len(queries) == task.n_queries and len(set(queries)) == task.n_queries
        for j, q in enumerate(queries):
            p = sep + 1 + 2 * j
            assert want[p] == db[q]
            if p + 1 < len(toks):
                assert toks[p + 1] == db[q], "the answer follows its query (teacher forcing)"
        assert sorted(want) == [sep + 1 + 2 * j for j in range(task.n_queries)]


def test_recall_filler_and_spread():
    task = RecallTask(n_records=4, n_keys=8, n_values=8, n_queries=2, seq_len=30)
    batch = task.sample(500, gen(2))
    toks = answers(task, batch)
    assert all(t.count("_") == 30 - task.min_len for t, _ in toks)
    # filler lands in different gaps, and every key/value id occurs
    assert len({tuple(t) for t, _ in toks}) == 500
    used = set(batch.ids.flatten().tolist())
    assert used == set(range(len(task.vocab)))


@pytest.mark.parametrize(
    "params", [{}, {"n_symbols": 3, "seq_len": 3}, {"n_symbols": 5, "seq_len": 40}]
)
def test_induction_brute_force(params):
    task = InductionTask(**params)
    batch = task.sample(200, gen(3))
    for toks, want in answers(task, batch):
        a = toks[-1]
        earlier = [i for i, t in enumerate(toks[:-1]) if t == a]
        assert len(earlier) == 1, "A occurs exactly once before the end"
        p = earlier[0]
        assert p + 1 < len(toks) - 1
        assert want == {len(toks) - 1: toks[p + 1]}
        assert toks[p + 1] != a


@pytest.mark.parametrize(
    "params", [{}, {"n_symbols": 2, "length": 2}, {"n_symbols": 30, "length": 30}]
)
def test_copy_brute_force(params):
    task = CopyTask(**params)
    batch = task.sample(100, gen(4))
    n = task.length
    for toks, want in answers(task, batch):
        assert len(toks) == 2 * n and toks[:n] == toks[n:]
        assert len(set(toks[:n])) == n
        assert want == {n + j: toks[j + 1] for j in range(n - 1)}


@pytest.mark.parametrize("name", sorted(TASKS))
def test_seeded_and_deterministic(name):
    task = make_task(name)
    a, b = task.sample(32, gen(5)), task.sample(32, gen(5))
    c = task.sample(32, gen(6))
    assert torch.equal(a.ids, b.ids) and torch.equal(a.targets, b.targets)
    assert not torch.equal(a.ids, c.ids)
    assert a.ids.dtype == a.targets.dtype == torch.long


@pytest.mark.parametrize(
    ("name", "params", "match"),
    [
        ("recall", {"n_records": 9, "n_keys": 8}, "n_records=9 .* n_keys=8"),
        ("recall", {"n_queries": 5, "n_records": 4, "n_keys": 8}, "n_queries=5"),
        ("recall", {"seq_len": 10}, "seq_len=10 is too short .* at least"),
        ("recall", {"n_records": 0}, "n_records must be positive"),
        ("recall", {"n_values": -3}, "n_values must be positive"),
        ("induction", {"seq_len": 2}, "seq_len=2 is too short"),
        ("induction", {"n_symbols": 2}, "n_symbols=2"),
        ("induction", {"n_symbols": 0}, "must be positive"),
        ("copy", {"length": 9, "n_symbols": 8}, "n_symbols ≥ 9"),
        ("copy", {"length": 1}, "length=1"),
        ("recall", {"records": 3}, "no parameter.*records.*n_records"),
        ("recal", {}, "unknown task 'recal'.*did you mean 'recall'"),
    ],
)
def test_bad_parameters(name, params, match):
    with pytest.raises(ValueError, match=match):
        make_task(name, **params)


def test_bad_types_and_batch():
    with pytest.raises(TypeError, match=r"n_keys must be an int"):
        RecallTask(n_keys=4.5)
    with pytest.raises(ValueError, match=r"batch_size must be a positive int"):
        RecallTask().sample(0, gen(0))
