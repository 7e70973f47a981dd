"""The tiled backend's sync-free (GPU-style) loops, forced on CPU tensors.

Off the CPU the tiled loops run without host syncs or data-dependent branches: plain online
softmax, no skipping of tiles a mask empties, large tiles, a banded forward for bf16 windows.
`qkv.attention.tiled.SYNC_FREE = True` selects those loops on any device, so here they are
checked against the float64 oracle (error budget of conftest), proven free of syncs with a
dispatch mode that fails on every op that reads device data back to the host, and held to a
small number of kernel launches per tile.
"""

from __future__ import annotations

import importlib
from collections import Counter
from contextlib import contextmanager

import pytest
import torch
from hypothesis import given, settings
from torch.utils._python_dispatch import TorchDispatchMode

import qkv
from qkv.attention import document_mask, reference_attention
from qkv.attention.spec import make_spec

from .conftest import GRAD_FACTOR, assert_within_budget, err, make_qkv, naive, oracle, same_dtype
from .test_property import check_tiled_against_reference, problems

T = importlib.import_module("qkv.attention.tiled")

LAYOUTS = {"mha": (8, 8), "gqa": (8, 2), "mqa": (8, 1)}
# ops whose result the host must read (a device sync on GPU), or whose output shape is data
SYNC_OPS = {
    "aten._local_scalar_dense",  # .item(), bool(t), int(t), float(t), `if t:`
    "aten.nonzero",
    "aten.masked_select",
    "aten._unique2",
    "aten.unique_consecutive",
    "aten.equal",
    "aten._assert_async",
}
LOOPS = ("_forward", "_forward_banded", "_backward")


@pytest.fixture
def sync_free(monkeypatch):
    monkeypatch.setattr(T, "SYNC_FREE", True)


def _row_mask(B, Sq, Sk):
    keep = torch.rand(B, 1, Sq, Sk, generator=torch.Generator().manual_seed(5)) > 0.3
    keep[..., 7, :] = False  # row 7 keeps no key at all
    return keep


def case_kwargs(name: str, B: int, Sq: int, Sk: int) -> dict:
    pad = torch.arange(Sk).view(1, 1, 1, Sk) < torch.tensor([Sk, Sk // 2]).view(B, 1, 1, 1)
    return {
        "dense": {},
        "causal": {"causal": True},
        "window": {"window": (17, 5)},  # a plain window: the banded forward
        "causal_window": {"causal": True, "window": (31, None)},
        "key_padding": {"mask": pad},
        "masked_row": {"mask": _row_mask(B, Sq, Sk)},
        "bias": {"mask": torch.randn(B, 1, Sq, Sk, generator=torch.Generator().manual_seed(6))},
        "document": {"mask_mod": document_mask(torch.arange(Sk) // 37)},
        "custom": {"mask_mod": lambda b, h, q, kv: ((q + 2 * kv + h) % 5 != 0) | (kv == 0)},
        "alibi_causal": {"causal": True, "score_mod": qkv.alibi(8)},
        "softcap_window": {"softcap": 3.0, "window": (20, 20)},
    }[name]


CASES = [
    ("dense", (113, 203), "gqa"),
    ("causal", (200, 200), "mha"),
    ("causal", (113, 203), "gqa"),
    ("causal", (203, 113), "mqa"),  # Sq > Sk: the top rows see no key
    ("window", (113, 203), "gqa"),
    ("causal_window", (203, 203), "mha"),
    ("key_padding", (113, 203), "gqa"),
    ("masked_row", (40, 90), "gqa"),
    ("bias", (113, 203), "mha"),
    ("document", (203, 203), "gqa"),
    ("custom", (113, 203), "mqa"),
    ("alibi_causal", (113, 203), "mha"),
    ("softcap_window", (203, 113), "gqa"),
]
case_id = "{0[0]}-{0[1][0]}x{0[1][1]}-{0[2]}".format


def _inputs(case, dtype, requires_grad=False):
    name, (Sq, Sk), layout = case
    Hq, Hk = LAYOUTS[layout]
    q, k, v = make_qkv(2, Hq, Hk, Sq, Sk, 40, dtype=dtype, requires_grad=requires_grad)
    return q, k, v, case_kwargs(name, 2, Sq, Sk)


@pytest.mark.parametrize("blocks", [(16, 24), (None, None)], ids=["16x24", "default"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_forward_matches_oracle(sync_free, case, dtype, blocks):
    q, k, v, kw = _inputs(case, dtype)
    truth, plain = oracle(q, k, v, **kw), same_dtype(q, k, v, **kw)
    out, lse = T.tiled(q, k, v, make_spec(q, k, v, **kw), *blocks)
    assert out.dtype == dtype and out.shape == truth.out.shape
    assert_within_budget(out, plain.out, truth.out, dtype)
    assert_within_budget(lse, plain.lse, truth.lse, torch.float32, what="lse")
    if case[0] == "masked_row":
        assert torch.all(out[:, :, 7] == 0) and torch.all(lse[:, :, 7] == float("-inf"))


GRAD_CASES = [CASES[i] for i in (2, 3, 4, 6, 7, 8, 9, 11, 12)]


@pytest.mark.parametrize("blocks", [(16, 24), (None, None)], ids=["16x24", "default"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", GRAD_CASES, ids=case_id)
def test_gradients_match_oracle(sync_free, case, dtype, blocks):
    q, k, v, kw = _inputs(case, dtype, requires_grad=True)
    do = torch.randn(q.shape[:3] + v.shape[3:], generator=torch.Generator().manual_seed(1))

    def grads(fn, *xs):
        xs = [x.detach().clone().requires_grad_() for x in xs]
        (fn(*xs) * do.to(xs[0].dtype)).sum().backward()
        return [x.grad for x in xs]

    def tiled(q, k, v):
        return T.tiled(q, k, v, make_spec(q, k, v, **kw), *blocks)[0]

    truth = grads(lambda *x: naive(*x, **kw).out, q.double(), k.double(), v.double())
    plain = grads(lambda *x: naive(*x, **kw).out, q, k, v)
    got = grads(tiled, q, k, v)
    for name, g, p, t in zip("qkv", got, plain, truth, strict=True):
        assert g.dtype == dtype and torch.isfinite(g).all()
        assert_within_budget(g, p, t, dtype, factor=GRAD_FACTOR, what=f"d{name}")


def test_float64_gradcheck_with_dropout_and_mods(sync_free):
    """Backward recomputes the forward's dropout masks tile by tile: exact Jacobians."""
    cases = [
        dict(causal=True, dropout_p=0.3),
        dict(window=(3, 2)),
        dict(softcap=1.5, score_mod=qkv.alibi(4), causal=True),
        dict(mask_mod=lambda b, h, q, kv: (q + kv) % 3 != 1),
    ]
    for kw in cases:
        q, k, v = make_qkv(1, 4, 2, 9, 11, 4, Dv=3, dtype=torch.float64, requires_grad=True)

        def f(q, k, v, kw=kw):
            spec = make_spec(q, k, v, generator=torch.Generator().manual_seed(3), **kw)
            return T.tiled(q, k, v, spec, block_q=4, block_k=3)[0]

        assert torch.autograd.gradcheck(f, (q, k, v), fast_mode=True), kw


def test_dropout_is_reproducible_and_unbiased(sync_free):
    def run(qkv_, seed, p):
        gen = torch.Generator().manual_seed(seed)
        return qkv.attention(*qkv_, dropout_p=p, generator=gen, backend="tiled")

    x = make_qkv(1, 2, 2, 64, 64, 16)
    assert torch.equal(run(x, 7, 0.3), run(x, 7, 0.3))
    assert not torch.equal(run(x, 7, 0.3), run(x, 8, 0.3))
    x = make_qkv(1, 1, 1, 8, 16, 8, dtype=torch.float64)
    runs = torch.stack([run(x, s, 0.5) for s in range(400)])  # E[dropout(w)/(1−p)] = w
    plain = reference_attention(*x).out
    z = ((runs.mean(0) - plain).abs() / (runs.std(0) / 20).clamp_min(1e-12)).max()
    assert z < 5.0, f"mean of dropout runs is {z:.1f} standard errors from the plain output"


@pytest.mark.parametrize("what", ["key", "value"])
def test_nan_and_inf_in_masked_entries_do_not_leak(sync_free, what):
    q, k, v = make_qkv(2, 4, 2, 30, 30, 16)
    t = k if what == "key" else v
    t[:, :, 20] = float("nan")
    t[:, :, 25, 3] = float("inf")
    out = T.tiled(q, k, v, make_spec(q, k, v, causal=True), 8, 8)[0]
    assert torch.isfinite(out[:, :, :20]).all() and not torch.isfinite(out[:, :, 25:]).all()
    clean = oracle(q[:, :, :20], k[:, :, :20], v[:, :, :20], causal=True).out
    assert err(out[:, :, :20], clean) < 1e-5


@given(problems())
@settings(max_examples=60, deadline=None)
def test_property_equals_float64_reference(problem):
    saved, T.SYNC_FREE = T.SYNC_FREE, True  # hypothesis forbids function-scoped fixtures
    try:
        check_tiled_against_reference(problem)
    finally:
        T.SYNC_FREE = saved


# ---- no host sync, few launches ------------------------------------------------------------
class _Ops(TorchDispatchMode):
    """Counts the kernels run (views excluded); raises on any op that syncs with the host."""

    def __init__(self, forbid_sync: bool):
        super().__init__()
        self.forbid_sync, self.ops = forbid_sync, Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket._qualified_op_name.replace("::", ".")
        if self.forbid_sync and name in SYNC_OPS:
            raise AssertionError(f"host sync inside a tile loop: {func}")
        if not func.is_view and name != "aten._unsafe_view":
            self.ops[name] += 1
        return func(*args, **(kwargs or {}))


@contextmanager
def watch_loops(forbid_sync=True):
    """Run every tile loop (forward, banded forward, backward) under `_Ops`; setup outside."""
    mode, loops = _Ops(forbid_sync), {name: getattr(T, name) for name in LOOPS}

    def watched(loop):
        def run(*args):
            with mode:
                return loop(*args)

        return run

    for name, loop in loops.items():
        setattr(T, name, watched(loop))
    try:
        yield mode
    finally:
        for name, loop in loops.items():
            setattr(T, name, loop)


NO_SYNC_CASES = {
    "causal": dict(causal=True),
    "masked_rows": dict(mask=_row_mask(1, 64, 80)),
    "mask_mod": dict(mask_mod=document_mask(torch.arange(80) // 9), window=(20, 3)),
    "mods": dict(causal=True, softcap=2.0, score_mod=qkv.alibi(4)),
    "bias": dict(mask=torch.randn(1, 4, 64, 80)),
    "dropout": dict(causal=True, dropout_p=0.2, generator=torch.Generator().manual_seed(0)),
    "window": dict(window=(9, 0)),  # banded forward
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", list(NO_SYNC_CASES))
def test_loops_never_sync_with_the_host(monkeypatch, name, dtype):
    monkeypatch.setattr(T, "SYNC_FREE", True)
    kw = NO_SYNC_CASES[name]
    q, k, v = make_qkv(1, 4, 2, 64, 80, 16, dtype=dtype, requires_grad=True)
    with watch_loops() as mode:
        out, lse = T.tiled(q, k, v, make_spec(q, k, v, **kw), 16, 24)
        (out.float().sum() + lse.nan_to_num(0, 0, 0).sum()).backward()
    assert mode.ops["aten.bmm"] > 0, "the loops ran under the watch"
    assert torch.isfinite(q.grad).all() and torch.isfinite(k.grad).all()


def test_loops_never_sync_with_nan_values(monkeypatch):
    monkeypatch.setattr(T, "SYNC_FREE", True)
    q, k, v = make_qkv(1, 4, 2, 64, 80, 16)
    v[:, :, 70] = float("nan")  # setup syncs to find it; the loops must not
    with watch_loops():
        out, _ = T.tiled(q, k, v, make_spec(q, k, v, causal=True), 16, 24)
    assert torch.isnan(out[:, :, 70 - 16 :]).all() and torch.isfinite(out[:, :, : 70 - 16]).all()


def test_the_sync_watch_can_fail(monkeypatch):
    """The CPU loops test each tile's max and skip fully masked tiles (syncs): the watch must
    catch that. One thread, so the blocks run inline (the dispatch mode is thread-local)."""
    monkeypatch.setattr(T, "SYNC_FREE", False)
    q, k, v = make_qkv(1, 4, 2, 64, 80, 16)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with pytest.raises(AssertionError, match="host sync"), watch_loops():
            T.tiled(q, k, v, make_spec(q, k, v, causal=True), 16, 24)
    finally:
        torch.set_num_threads(threads)


def _loop_ops(Sk, dtype, backward, kw):
    q, k, v = make_qkv(1, 4, 2, 64, Sk, 16, dtype=dtype, requires_grad=backward)
    with watch_loops(forbid_sync=False) as mode:
        out, _ = T.tiled(q, k, v, make_spec(q, k, v, **kw), 16, 16)
        if backward:
            mode.ops.clear()
            out.float().sum().backward()
    return mode.ops


# kernels per extra tile, as measured (torch 2.13) + 2: plain online softmax takes 16 (fp32)
# and 19 (bf16: dtype casts) forward, 13 and 20 backward
@pytest.mark.parametrize(
    ("backward", "dtype", "budget"),
    [
        (False, torch.float32, 18),
        (False, torch.bfloat16, 21),
        (True, torch.float32, 15),
        (True, torch.bfloat16, 22),
    ],
)
@pytest.mark.parametrize("kw", [{}, {"causal": True}], ids=["dense", "causal"])
def test_launches_per_tile(sync_free, kw, backward, dtype, budget):
    """Doubling Sk adds 4 × 4 tiles of 16 × 16; the kernels they add, per tile, stay few, and
    index tensors and band masks are never rebuilt per tile."""
    small = _loop_ops(64, dtype, backward, kw)
    large = _loop_ops(128, dtype, backward, kw)
    extra = large - small
    assert sum(extra.values()) / 16 <= budget, dict(extra)
    for op in ("aten.arange", "aten.tril_", "aten.triu_", "aten.ones", "aten.logical_not"):
        assert extra[op] == 0, (op, dict(extra))


def test_default_blocks(monkeypatch):
    q, k, v = make_qkv(1, 8, 8, 4, 4, 8)
    spec = make_spec(q, k, v, causal=True)
    window = make_spec(q, k, v, window=(255, 0))
    cpu = torch.device("cpu")
    assert T.default_blocks(spec, cpu) == (T.BLOCK_Q, T.BLOCK_K) == (256, 512)
    monkeypatch.setattr(T, "SYNC_FREE", True)
    # B·H = 8: 2^24 scores per tile as 1024 × 2048
    assert T.default_blocks(spec, cpu) == (1024, 2048)
    assert T.default_blocks(spec, cpu, backward=True) == (1024, 2048)
    # a plain window's banded forward keeps the narrow query blocks; its backward does not
    # (make_spec drops a window side that keeps every key, so use a long key axis)
    q, k, v = make_qkv(1, 8, 8, 4, 2048, 8)
    window = make_spec(q, k, v, window=(255, 0))
    assert T.default_blocks(window, cpu)[0] == 64
    assert T.default_blocks(window, cpu, backward=True) == (1024, 2048)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_bf16_window_takes_the_banded_forward(monkeypatch, sync_free, dtype):
    calls = []
    banded = T._forward_banded
    monkeypatch.setattr(T, "_forward_banded", lambda *a: calls.append(1) or banded(*a))
    q, k, v = make_qkv(2, 4, 2, 300, 300, 24, dtype=dtype)
    kw = {"window": (40, 3)}
    out = qkv.attention(q, k, v, backend="tiled", **kw)
    assert calls, "a plain window must take the banded forward when sync-free"
    truth, plain = oracle(q, k, v, **kw).out, same_dtype(q, k, v, **kw).out
    assert_within_budget(out, plain, truth, dtype)


CUDA_CASES = ["causal", "masked_rows", "bias", "window", "document"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", CUDA_CASES)
def test_cuda_loops_never_sync(monkeypatch, name, dtype):
    """On a real GPU, CUDA's own sync detector watches the loops (forward and backward)."""
    cpu_kw = dict(NO_SYNC_CASES.get(name, {}))
    if name == "document":
        cpu_kw = {"mask_mod": document_mask(torch.arange(80) // 9), "causal": True}
    kw = {key: val.cuda() if isinstance(val, torch.Tensor) else val for key, val in cpu_kw.items()}
    if name == "document":
        kw["mask_mod"] = document_mask(torch.arange(80, device="cuda") // 9)
    x = make_qkv(1, 4, 2, 64, 80, 16, dtype=dtype)
    q, k, v = (t.cuda().requires_grad_() for t in x)

    def watched(loop):
        def run(*args):
            torch.cuda.set_sync_debug_mode("error")
            try:
                return loop(*args)
            finally:
                torch.cuda.set_sync_debug_mode("default")

        return run

    for name_ in LOOPS:
        monkeypatch.setattr(T, name_, watched(getattr(T, name_)))
    out, _ = T.tiled(q, k, v, make_spec(q, k, v, **kw), 16, 24)
    out.float().sum().backward()
    truth, plain = oracle(*x, **cpu_kw), same_dtype(*x, **cpu_kw)
    assert_within_budget(out.cpu(), plain.out, truth.out, dtype)
    assert torch.isfinite(q.grad).all()
