"""The fused CPU backend against the float64 oracle of conftest (plain code, no engine code),
with the tiled tests' error budget, at awkward sizes; its block mask and its cache; thread
count independence; a silent compile."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import qkv
from qkv.attention import blockmask, fused_cpu
from qkv.attention.api import choose_backend
from qkv.attention.spec import make_spec

from .conftest import (
    GRAD_FACTOR,
    assert_within_budget,
    check_masked_nonfinite_grads,
    err,
    make_qkv,
    naive,
    oracle,
    same_dtype,
)

# block edges ± 1 (blocks are 64 × 64), Sq ≠ Sk both ways, one query against many keys
SIZES = [(64, 64), (63, 65), (129, 128), (1, 239), (113, 203), (203, 113)]


def combos(B: int, Sk: int) -> dict[str, dict]:
    doc = torch.arange(Sk) * 3 // Sk  # three documents
    lengths = torch.tensor([Sk, max(1, Sk // 2)])[:B]
    keep = torch.arange(Sk).expand(B, Sk) % 3 != 1
    return {
        "causal": dict(causal=True),
        "window": dict(window=(17, 3)),
        "window_left_only": dict(window=(40, None)),
        "window_causal": dict(window=(70, 9), causal=True),
        "sliding_window_mask": dict(mask_mod=qkv.sliding_window_mask(20, 2)),
        "causal_mask": dict(mask_mod=qkv.causal_mask),
        "document_causal": dict(mask_mod=qkv.document_mask(doc), causal=True),
        "prefix_lm": dict(mask_mod=qkv.prefix_lm_mask(Sk // 3)),
        "key_padding_lengths": dict(mask_mod=qkv.key_padding_mask(lengths)),
        "key_padding_keep": dict(mask_mod=qkv.key_padding_mask(keep), window=(30, 30)),
        "and_or": dict(
            mask_mod=qkv.or_masks(
                qkv.prefix_lm_mask(5), qkv.and_masks(qkv.causal_mask, qkv.document_mask(doc))
            )
        ),
        "alibi_causal": dict(score_mod=qkv.alibi(4), causal=True),
        "alibi_per_batch": dict(score_mod=qkv.alibi(torch.rand(B, 4)), window=(33, 0)),
        "softcap": dict(softcap=2.0, causal=True),
        "softcap_mod_and_arg": dict(softcap=9.0, score_mod=qkv.softcap(3.0)),
        "plain": dict(),
    }


@pytest.mark.parametrize("Sq,Sk", SIZES)
@pytest.mark.parametrize("name", list(combos(2, 64)))
def test_forward_within_budget_fp32(name, Sq, Sk):
    _check(name, Sq, Sk, torch.float32, Hk=2)


@pytest.mark.parametrize("name", list(combos(2, 64)))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_forward_within_budget_half(name, dtype):
    _check(name, 129, 200, dtype, Hk=1)  # MQA


def _check(name, Sq, Sk, dtype, Hk):
    kw = combos(2, Sk)[name]
    q, k, v = make_qkv(2, 4, Hk, Sq, Sk, 40, Dv=24, dtype=dtype)
    spec = make_spec(q, k, v, **kw)
    assert fused_cpu.supported(q, spec) is None, name
    out, lse = qkv.attention(q, k, v, **kw, backend="fused", return_lse=True)
    assert out.dtype == dtype and lse.dtype == torch.float32
    truth, plain = oracle(q, k, v, **kw), same_dtype(q, k, v, **kw)
    assert_within_budget(out, plain.out, truth.out, dtype)
    assert_within_budget(lse, plain.lse, truth.lse, dtype, what="lse")
    empty = truth.lse == float("-inf")
    assert (lse[empty] == float("-inf")).all() and (out[empty] == 0).all()
    assert not out.isnan().any()


def _grads(fn, q, k, v, do, dl):
    """dq, dk, dv of Σ out·do + Σ lse·dl (an empty row's −inf LSE has no gradient)."""
    xs = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out, lse = fn(*xs)
    lse = torch.where(torch.isfinite(lse), lse, 0.0)
    ((out * do.to(out)).sum() + (lse * dl.to(lse)).sum()).backward()
    return [torch.zeros_like(x) if x.grad is None else x.grad for x in xs]


def _check_grads(name, Sq, Sk, dtype, Hk, D=40, Dv=24):
    """The fused backward (dQ pass and dK/dV pass) against float64 autograd through the
    oracle, loss on out and on the LSE, within the tiled tests' budget."""
    kw = combos(2, Sk)[name]
    q, k, v = make_qkv(2, 4, Hk, Sq, Sk, D, Dv=Dv, dtype=dtype)
    g = torch.Generator().manual_seed(1)
    do = torch.randn(2, 4, Sq, Dv, generator=g, dtype=torch.float64)
    dl = torch.randn(2, 4, Sq, generator=g, dtype=torch.float64)

    def ref(*x):
        r = naive(*x, **kw)
        return r.out, r.lse

    def ours(*x):
        return qkv.attention(*x, **kw, backend="fused", return_lse=True)

    truth = _grads(ref, q.double(), k.double(), v.double(), do, dl)
    plain = _grads(ref, q, k, v, do, dl)
    got = _grads(ours, q, k, v, do, dl)
    for what, a, p, t in zip("qkv", got, plain, truth, strict=True):
        assert a.dtype == dtype and not a.isnan().any()
        assert_within_budget(a, p, t, dtype, GRAD_FACTOR, what=f"d{what}")


@pytest.mark.parametrize("Sq,Sk", [(64, 64), (129, 128), (1, 239), (113, 203), (203, 113)])
@pytest.mark.parametrize("name", list(combos(2, 64)))
def test_gradients_within_budget_fp32(name, Sq, Sk):
    _check_grads(name, Sq, Sk, torch.float32, Hk=2)


@pytest.mark.parametrize("name", ["window_causal", "document_causal", "alibi_per_batch",
                                  "softcap_mod_and_arg", "key_padding_keep"])  # fmt: skip
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gradients_within_budget_half(name, dtype):
    _check_grads(name, 129, 200, dtype, Hk=1, D=64, Dv=64)  # MQA


def test_the_backward_is_fused_unless_k_or_v_holds_nan(monkeypatch):
    """Finite K/V: the tiled backward is never called. NaN/inf in keys and values no row
    keeps: tiled takes over, and every gradient is finite and equals the float64 reference's
    with those entries zeroed. (Keys before every row's window never reach a backend at all,
    so here a mask_mod leaves out keys 5 and 12 that the window alone would keep.)"""

    calls = []
    real = fused_cpu.backward
    monkeypatch.setattr(fused_cpu, "backward", lambda *a: calls.append(1) or real(*a))
    # 40 queries at positions 60..99, window 60: keys 0..99; the mask_mod drops keys 0..19
    kw = {"window": (60, 0), "mask_mod": lambda b, h, q_idx, kv_idx: kv_idx >= 20}
    q, k, v = make_qkv(1, 2, 1, 40, 100, 16, requires_grad=True)
    qkv.attention(q, k, v, **kw, backend="fused").sum().backward()
    assert calls == []
    check_masked_nonfinite_grads(q, k, v, kw, lambda *x: qkv.attention(*x, **kw, backend="fused"))
    assert calls == [1]


def test_backward_thread_count_does_not_change_the_result():
    kw = dict(mask_mod=qkv.document_mask(torch.arange(300) * 4 // 300), causal=True)
    q, k, v = make_qkv(2, 4, 2, 300, 300, 32, requires_grad=True)
    saved = torch.get_num_threads()
    got = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            xs = [t.detach().clone().requires_grad_() for t in (q, k, v)]
            qkv.attention(*xs, **kw, backend="fused").square().sum().backward()
            got.append([x.grad for x in xs])
    finally:
        torch.set_num_threads(saved)
    for other in got[1:]:
        for a, b in zip(got[0], other, strict=True):
            assert torch.equal(a, b)  # each task by one worker in a fixed order: bitwise


def test_empty_rows_are_zero_with_lse_minus_inf():
    # causal with more queries than keys: the top Sq − Sk rows see no key; batch 1 pads all
    q, k, v = make_qkv(2, 2, 2, 100, 70, 16)
    lengths = torch.tensor([70, 0])
    out, lse = qkv.attention(q, k, v, causal=True, mask_mod=qkv.key_padding_mask(lengths),
                             backend="fused", return_lse=True)  # fmt: skip
    assert (out[:, :, :30] == 0).all() and (lse[:, :, :30] == float("-inf")).all()
    assert (out[1] == 0).all() and (lse[1] == float("-inf")).all()
    assert torch.isfinite(lse[0, :, 30:]).all() and not out.isnan().any()


@pytest.mark.parametrize("where", ["k", "v", "both"])
def test_nan_and_inf_in_masked_keys_and_values_do_not_leak(where):
    q, k, v = make_qkv(2, 4, 2, 70, 130, 16)
    lengths = torch.tensor([125, 61])
    kw = dict(mask_mod=qkv.key_padding_mask(lengths), window=(80, 2))
    truth = oracle(q, k, v, **kw)
    k2, v2 = k.clone(), v.clone()
    if where in ("k", "both"):
        k2[1, :, 61:, 3] = float("nan")
        k2[0, :, 125:] = float("inf")
    if where in ("v", "both"):
        v2[1, :, 61:] = float("nan")
        v2[0, :, 125:, 2] = float("-inf")
    out, lse = qkv.attention(q, k2, v2, **kw, backend="fused", return_lse=True)
    assert not out.isnan().any() and not lse.isnan().any()
    assert err(out, truth.out) < 1e-5 and err(lse, truth.lse) < 1e-5


def test_a_kept_nan_key_still_poisons_its_rows():
    """Masks are not a NaN filter: a row that keeps a NaN key gets NaN, as plain math."""
    q, k, v = make_qkv(1, 1, 1, 8, 8, 16)
    v[0, 0, 3, 0] = float("nan")
    out = qkv.attention(q, k, v, causal=True, backend="fused")
    assert out[0, 0, :3].isfinite().all() and out[0, 0, 3:, 0].isnan().all()


def test_thread_count_does_not_change_the_result():
    q, k, v = make_qkv(2, 4, 2, 300, 300, 32)
    kw = dict(mask_mod=qkv.document_mask(torch.arange(300) // 70), causal=True)
    threads = torch.get_num_threads()
    outs = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            outs.append(qkv.attention(q, k, v, **kw, backend="fused", return_lse=True))
    finally:
        torch.set_num_threads(threads)
    for out, lse in outs[1:]:
        assert torch.equal(out, outs[0][0]) and torch.equal(lse, outs[0][1])


def test_arbitrary_score_mod_runs_on_tiled_never_dropped():
    q, k, v = make_qkv(1, 2, 2, 90, 90, 16)

    def bump(score, b, h, q_idx, kv_idx):
        return score + (kv_idx % 2) * 3.0

    spec = make_spec(q, k, v, score_mod=bump)
    assert "score_mod" in fused_cpu.supported(q, spec)
    got = qkv.attention(q, k, v, score_mod=bump, backend="fused")
    truth = oracle(q, k, v, score_mod=bump)
    assert err(got, truth.out) < 1e-5
    assert err(got, oracle(q, k, v).out) > 1e-2  # the mod mattered
    assert choose_backend(q, k, v, spec, False) == "tiled"


def test_arbitrary_mask_mod_is_evaluated_into_the_block_mask_uncached():
    q, k, v = make_qkv(1, 2, 2, 90, 150, 16)

    def odd(b, h, q_idx, kv_idx):
        return (kv_idx % 2 == 1) | (kv_idx == q_idx)

    got = qkv.attention(q, k, v, mask_mod=odd, backend="fused")
    assert err(got, oracle(q, k, v, mask_mod=odd).out) < 1e-5
    spec = make_spec(q, k, v, mask_mod=odd)
    assert blockmask.block_mask(spec, 64, 64) is not blockmask.block_mask(spec, 64, 64)


def test_block_mask_is_cached_and_skips_empty_blocks():
    blockmask.clear_cache()
    q, k, v = make_qkv(1, 2, 2, 1000, 1000, 16)
    doc = torch.arange(1000) // 250
    mk = lambda: qkv.and_masks(qkv.causal_mask, qkv.document_mask(doc))  # noqa: E731
    a = blockmask.block_mask(make_spec(q, k, v, mask_mod=mk()), 64, 64)
    b = blockmask.block_mask(make_spec(q, k, v, mask_mod=mk()), 64, 64)  # a new closure
    assert a is b
    full, partial, empty = a.counts
    assert empty > full + partial and partial > 0 and full > 0
    # every listed block holds a kept entry, no unlisted block does, a full block keeps all
    # its real rows, a partial one's mask is the mask (checked against the plain mask)
    i, j = torch.arange(1000).view(-1, 1), torch.arange(1000).view(1, -1)
    dense = (j <= i) & (doc.view(-1, 1) == doc.view(1, -1))
    pad = torch.zeros(16 * 64, 16 * 64, dtype=torch.bool)
    pad[:1000, :1000] = dense
    blocks = pad.view(16, 64, 16, 64).transpose(1, 2)
    listed = torch.zeros(16, 16, dtype=torch.bool)
    for qb in range(16):
        for idx in range(a.ptr[qb], a.ptr[qb + 1]):
            listed[qb, a.kblk[idx]] = True
            if a.part[idx] >= 0:
                assert torch.equal(
                    torch.from_numpy(a.masks[a.part[idx]]).bool(), blocks[qb, a.kblk[idx]]
                )
            else:
                real = torch.arange(qb * 64, qb * 64 + 64) < 1000
                assert blocks[qb, a.kblk[idx]][real].all()
    assert torch.equal(listed, blocks.any(-1).any(-1))
    doc[:10] = 7  # changed in place: a new structure
    c = blockmask.block_mask(make_spec(q, k, v, mask_mod=mk()), 64, 64)
    assert c is not a


@pytest.mark.parametrize("how", ["in place", "numpy view"])
@pytest.mark.parametrize("mod", ["key_padding", "document", "prefix_lm"])
def test_one_mod_whose_tensor_changes_between_calls_is_never_served_a_stale_mask(mod, how):
    """A serving loop reuses one lengths (or doc-id) buffer across batches and keeps its mod:
    the second call must see the new contents. Before, the key was read when the mod was made,
    so auto/fused reused the first call's block mask (max error 1.09 on padding). Oracle: the
    float64 naive attention with a fresh mod over a copy of the new contents."""
    blockmask.clear_cache()
    q, k, v = make_qkv(2, 2, 2, 128, 128, 16)
    t, make = {
        "key_padding": (torch.tensor([100, 128]), qkv.key_padding_mask),
        "document": (torch.arange(128) // 40, qkv.document_mask),
        "prefix_lm": (torch.tensor([90, 20]), qkv.prefix_lm_mask),
    }[mod]
    mm = make(t)
    for backend in ("auto", "fused"):
        qkv.attention(q, k, v, mask_mod=mm, backend=backend)
    (t if how == "in place" else torch.from_numpy(t.numpy()))[0] = 30 if mod != "document" else 3
    truth = oracle(q, k, v, mask_mod=make(t.clone()))
    for backend in ("auto", "fused"):
        got = qkv.attention(q, k, v, mask_mod=mm, backend=backend)
        assert err(got, truth.out) < 1e-5, backend


def test_auto_picks_fused_for_windows_and_mods_but_not_plain_or_fp64():
    q, _, _ = make_qkv(1, 2, 2, 200, 200, 16)
    pick = lambda t, **kw: choose_backend(t, t, t, make_spec(t, t, t, **kw), False)  # noqa: E731
    assert pick(q, window=(31, 0)) == "fused"
    assert pick(q, mask_mod=qkv.prefix_lm_mask(40)) == "fused"
    assert pick(q, softcap=5.0, causal=True) == "fused"
    assert pick(q, causal=True) == "sdpa"
    assert pick(q.double(), window=(31, 0)) == "tiled"


def test_compiling_from_an_empty_cache_prints_nothing_and_the_next_process_compiles_nothing(
    tmp_path,
):
    """The forward and backward kernels compile silently into numba's disk cache, and a second
    process loads every one of them from it. They close over their helpers (exp2, the tile),
    which numba keyed by a pickle that differs in every process: each process compiled them
    again (3 s + 9 s here) and added one more entry to the cache."""
    code = (
        "import json, torch, qkv\n"
        "from qkv.attention import fused_cpu, fused_cpu_backward\n"
        "q, k, v = (torch.randn(1, 2, 70, 16, requires_grad=True) for _ in range(3))\n"
        "qkv.attention(q, k, v, window=(9, 0), softcap=3.0, backend='fused').sum().backward()\n"
        "kernels = {**fused_cpu.KERNELS._compiled, **fused_cpu_backward.KERNELS._compiled}\n"
        "stats = {n: [sum(k.stats.cache_hits.values()), sum(k.stats.cache_misses.values())]\n"
        "         for n, k in kernels.items()}\n"
        "print(json.dumps(stats), end='')\n"
    )
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path)}
    runs = []
    for _ in range(2):
        res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             env=env, timeout=600)  # fmt: skip
        assert res.returncode == 0, res.stderr[-3000:]
        assert res.stderr == "", res.stderr[-3000:]
        runs.append((json.loads(res.stdout), sorted(p.name for p in tmp_path.rglob("*.nbc"))))
    (first, cached), (second, cached_after) = runs
    assert set(first) == {"forward", "dq", "dkdv"}, first
    assert all(hits == 0 and misses == 1 for hits, misses in first.values()), first
    assert all(hits == 1 and misses == 0 for hits, misses in second.values()), second
    assert len(cached) == 3 and cached_after == cached, (cached, cached_after)


@pytest.mark.parametrize(
    "kw", [dict(causal=True), dict(window=(255, 0)), dict(window=(None, 3)), dict()], ids=str
)
def test_block_mask_builds_in_bounded_steps(kw):
    """The build evaluates at most ~CHUNK mask elements a step, measured at each step's own
    rows: a causal band widens down the rows, and sizing every step by the first block's span
    had evaluated the whole 16384 × 16384 causal mask at once (1.1 GB peak RSS)."""
    n, BQ, BK = 16384, 64, 64
    x = torch.empty(1, 1, n, 1)
    spec = make_spec(x, x, x, **kw)
    steps = blockmask.chunks(spec, BQ, BK)
    assert [qb for qb, _ in steps] == [sum(m for _, m in steps[:i]) for i in range(len(steps))]
    assert sum(m for _, m in steps) == n // BQ  # consecutive, covering every query block
    for qb, m in steps:  # keys the band reaches for rows lo..hi, written out (δ = 0 here)
        lo, hi = qb * BQ, (qb + m) * BQ - 1
        start = 0 if spec.left is None else max(0, lo - spec.left)
        stop = n if spec.right is None else min(n, hi + spec.right + 1)
        assert m == 1 or m * BQ * (stop - start) <= blockmask.CHUNK, (qb, m, start, stop)


def test_workers_hold_blas_to_one_thread():
    """The kernels' np.dot tiles call scipy's OpenBLAS from our worker threads: its own threads
    on top of ours oversubscribed the cores (a window-512 call took 11–16 s instead of 0.1 s on
    a busy machine), so `run_tasks` holds every BLAS to one thread while the workers run."""
    import numpy as np
    from threadpoolctl import threadpool_info

    np.dot(np.ones((2, 2), np.float32), np.ones((2, 2), np.float32))  # BLAS loaded
    seen = []

    def kernel(worker, workers):
        seen.append(
            (
                worker,
                workers,
                {i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"},
            )
        )

    saved = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            fused_cpu.run_tasks(kernel, [], tasks=5)
    finally:
        torch.set_num_threads(saved)
    assert sorted((w, n) for w, n, _ in seen) == [(0, 1), (0, 2), (1, 2)]
    assert all(threads == {1} for _, _, threads in seen), seen


def _forked_fused(q, k, v, queue) -> None:
    """In a forked child: the fused backend on 2 threads, its answer on `queue`."""
    torch.set_num_threads(2)
    queue.put(qkv.attention(q, k, v, window=(9, 0), backend="fused").numpy())  # plain pickle


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork (POSIX)")
def test_threads_kept_across_calls_and_a_fork():
    """Worker threads are kept between calls (a pool per call cost ~3 ms), and a child forked
    after the parent used them (a DataLoader worker) starts its own instead of waiting on
    threads it did not inherit; both answers within the float64 oracle's budget."""
    import multiprocessing as mp

    q, k, v = make_qkv(1, 4, 4, 70, 70, 16)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        first = qkv.attention(q, k, v, window=(9, 0), backend="fused")
        pool = fused_cpu._POOL[0]
        qkv.attention(q, k, v, window=(9, 0), backend="fused")
        assert fused_cpu._POOL == [pool]
        ctx = mp.get_context("fork")
        queue = ctx.Queue()
        child = ctx.Process(target=_forked_fused, args=(q, k, v, queue))
        child.start()
        try:
            got = torch.from_numpy(queue.get(timeout=120))
            child.join(timeout=60)
            assert child.exitcode == 0
        finally:
            if child.is_alive():  # it hung: do not leave it behind
                child.kill()
    finally:
        torch.set_num_threads(threads)
    x64 = [t.double() for t in (q, k, v)]
    truth, plain = naive(*x64, window=(9, 0)).out, naive(q, k, v, window=(9, 0)).out
    for out in (first, got):
        assert_within_budget(out, plain, truth, torch.float32)
