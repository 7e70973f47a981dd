"""Forward and backward of every backend against a float64 oracle, on awkward sizes."""

from __future__ import annotations

import pytest
import torch

import qkv
from qkv.attention import document_mask

from .conftest import GRAD_FACTOR, assert_within_budget, make_qkv, naive, oracle, same_dtype

SIZES = [(1, 1), (1, 239), (113, 203), (203, 113), (511, 513), (1023, 1024)]
HEAD_DIMS = [16, 40, 59, 64, 111, 128]
LAYOUTS = {"mha": (8, 8), "gqa": (8, 2), "mqa": (8, 1)}


def mask_kwargs(name: str, B: int, Sq: int, Sk: int) -> dict:
    if name == "none":
        return {}
    if name == "causal":
        return {"causal": True}
    if name == "window":
        return {"window": (17, 5)}
    if name == "key_padding":
        keep = torch.arange(Sk).view(1, 1, 1, Sk) < torch.tensor([Sk, max(1, Sk // 2)]).view(
            B, 1, 1, 1
        )
        return {"mask": keep}
    if name == "document":
        return {"mask_mod": document_mask(torch.arange(Sk) // 37)}
    if name == "custom":
        return {"mask_mod": lambda b, h, q, kv: ((q + 2 * kv + h) % 5 != 0) | (kv == 0)}
    raise AssertionError(name)


def mod_kwargs(name: str) -> dict:
    return {"none": {}, "alibi": {"score_mod": qkv.alibi(8)}, "softcap": {"softcap": 3.0}}[name]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("backend", ["tiled", "auto", "sdpa"])
def test_causal_forward_sizes_layouts_dtypes(backend, size, layout, dtype):
    Sq, Sk = size
    Hq, Hk = LAYOUTS[layout]
    D = HEAD_DIMS[(Sq + Sk) % len(HEAD_DIMS)]
    q, k, v = make_qkv(1, Hq, Hk, Sq, Sk, D, dtype=dtype)
    truth = oracle(q, k, v, causal=True).out
    plain = same_dtype(q, k, v, causal=True).out
    got = qkv.attention(q, k, v, causal=True, backend=backend)
    assert got.dtype == dtype and got.shape == (1, Hq, Sq, D)
    assert_within_budget(got, plain, truth, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("D", HEAD_DIMS)
def test_head_dims(D, dtype):
    q, k, v = make_qkv(2, 4, 2, 113, 203, D, Dv=D + 3, dtype=dtype)
    truth = oracle(q, k, v).out
    plain = same_dtype(q, k, v).out
    for backend in ("tiled", "auto"):
        assert_within_budget(
            qkv.attention(q, k, v, backend=backend), plain, truth, dtype, what=backend
        )


@pytest.mark.parametrize("mod", ["none", "alibi", "softcap"])
@pytest.mark.parametrize("mask", ["none", "causal", "window", "key_padding", "document", "custom"])
@pytest.mark.parametrize("size", [(113, 203), (203, 113)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_masks_and_score_mods(size, mask, mod):
    Sq, Sk = size
    q, k, v = make_qkv(2, 8, 2, Sq, Sk, 40)
    kw = {**mask_kwargs(mask, 2, Sq, Sk), **mod_kwargs(mod)}
    truth = oracle(q, k, v, **kw)
    plain = same_dtype(q, k, v, **kw)
    for backend in ("tiled", "auto"):
        out, lse = qkv.attention(q, k, v, return_lse=True, backend=backend, **kw)
        assert_within_budget(out, plain.out, truth.out, torch.float32, what=f"{backend} out")
        assert_within_budget(lse, plain.lse, truth.lse, torch.float32, what=f"{backend} lse")
    # small tiles: many blocks, partial band blocks and skipped blocks on the same inputs
    from qkv.attention.spec import make_spec
    from qkv.attention.tiled import tiled

    out, _ = tiled(q, k, v, make_spec(q, k, v, **kw), block_q=16, block_k=24)
    assert_within_budget(out, plain.out, truth.out, torch.float32, what="tiled 16x24")


GRAD_CASES = [
    ((113, 203), "gqa", "causal", "none"),
    ((203, 113), "mqa", "causal", "softcap"),
    ((1, 239), "mha", "none", "none"),
    ((511, 513), "gqa", "window", "alibi"),
    ((113, 203), "gqa", "key_padding", "none"),
    ((203, 113), "mha", "document", "softcap"),
    ((113, 203), "gqa", "custom", "alibi"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", GRAD_CASES, ids=lambda c: "-".join(map(str, c)))
@pytest.mark.parametrize("backend", ["tiled", "auto"])
def test_gradients(backend, case, dtype):
    (Sq, Sk), layout, mask, mod = case
    Hq, Hk = LAYOUTS[layout]
    q, k, v = make_qkv(2, Hq, Hk, Sq, Sk, 40, dtype=dtype, requires_grad=True)
    kw = {**mask_kwargs(mask, 2, Sq, Sk), **mod_kwargs(mod)}
    do = torch.randn(2, Hq, Sq, 40, generator=torch.Generator().manual_seed(1)).to(dtype)

    def grads(fn, *xs):
        xs = [x.detach().clone().requires_grad_() for x in xs]
        (fn(*xs) * do.to(xs[0].dtype)).sum().backward()
        return [x.grad for x in xs]

    truth = grads(lambda *x: naive(*x, **kw).out, q.double(), k.double(), v.double())
    plain = grads(lambda *x: naive(*x, **kw).out, q, k, v)
    got = grads(lambda *x: qkv.attention(*x, backend=backend, **kw), q, k, v)
    for name, g, p, t in zip("qkv", got, plain, truth, strict=True):
        assert g.dtype == dtype
        assert_within_budget(g, p, t, dtype, factor=GRAD_FACTOR, what=f"d{name}")


def test_lse_gradient_flows():
    """d(lse)/d(logits) = softmax: a loss on the LSE gets exact gradients from the tiled backend."""
    q, k, v = make_qkv(1, 4, 2, 7, 9, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda q, k, v: qkv.attention(q, k, v, causal=True, return_lse=True, backend="tiled")[1],
        (q, k, v),
    )
