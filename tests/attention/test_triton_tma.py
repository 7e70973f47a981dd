"""The Triton forward with K and V read through TMA descriptors (`Config(tma=True)`), and with the
scale folded into the row max and the exponent (no score mod, scale > 0), against the float64
oracle. Runs where test_triton.py runs: Triton's interpreter reads descriptors as a GPU does
(zeros past the sequence and the head dim), so the tails and padded head dims are checked here;
the build for sm_90 is test_triton_build.py's."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from qkv.attention import reference_attention
from qkv.attention.spec import make_spec

from .conftest import assert_within_budget, err, oracle, same_dtype
from .test_triton import (  # noqa: F401 (fixture: the interpreter's env)
    DEVICE,
    SMALL,
    _interpreter_env,
    qkv_on,
    tk,
)

TMA = dataclasses.replace(SMALL, tma=True)

# (B, Hq, Hk, Sq, Sk, D, kwargs): tails (Sk not a multiple of the block), padded head dims
# (40 → 64), GQA, Sq ≠ Sk both ways, empty rows
CASES = {
    "dense-17x100-gqa-D40": (1, 4, 2, 17, 100, 40, {}),
    "causal-100-D64": (2, 2, 2, 100, 100, 64, {"causal": True}),
    "causal-100x17-empty-top": (1, 2, 1, 100, 17, 16, {"causal": True}),
    "window-both-gqa": (1, 8, 2, 70, 70, 32, {"window": (20, 5)}),
    "window-sq<sk": (1, 2, 2, 33, 90, 16, {"window": (None, 2)}),
}


def _run(q, k, v, config, **kw):
    out, lse, _ = tk.forward(q, k, v, make_spec(q, k, v, **kw), config)
    return out, lse


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", list(CASES))
def test_tma_forward_vs_oracle(case, dtype):
    B, Hq, Hk, Sq, Sk, D, kw = CASES[case]
    q, k, v = (t.detach() for t in qkv_on(B, Hq, Hk, Sq, Sk, D, dtype=dtype))
    assert tk.tma_ready(k, v)
    truth = oracle(q.cpu(), k.cpu(), v.cpu(), **kw)
    plain = same_dtype(q.cpu(), k.cpu(), v.cpu(), **kw)
    out, lse = _run(q, k, v, TMA, **kw)
    assert_within_budget(out.cpu(), plain.out, truth.out, dtype, what="out")
    assert_within_budget(lse.cpu(), plain.lse, truth.lse, dtype, what="lse")
    empty = truth.lse == float("-inf")
    assert torch.equal(lse.cpu() == float("-inf"), empty)
    assert (out.cpu()[empty] == 0).all()


def test_tma_reads_the_same_blocks_as_the_pointer_loads():
    """Same blocks, same arithmetic: the two load paths agree on a head dim and a sequence
    that leave both padded; bit for bit in the interpreter, within 1e-6 (fp32, IEEE dots)
    where two compiled kernels may schedule their float operations differently."""
    q, k, v = (t.detach() for t in qkv_on(2, 4, 2, 45, 77, 24))
    for kw in ({"causal": True}, {"window": (9, 3)}, {}):
        tma, pointers = _run(q, k, v, TMA, **kw), _run(q, k, v, SMALL, **kw)
        for a, b in zip(tma, pointers, strict=True):
            if tk.INTERPRETED:
                assert torch.equal(a, b)
            else:
                torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # the interpreter's numpy
def test_tma_keeps_masked_nan_out():
    """The repair launch (pointer loads) after a TMA forward: NaN/inf no row keeps never reach
    the output."""
    q, k, v = (t.detach() for t in qkv_on(1, 2, 1, 40, 40, 16))
    kw = {"window": (3, 0)}
    k[:, :, 5, 2] = float("nan")  # kept by rows 5..8 only
    v[:, :, 30, 0] = float("inf")  # kept by rows 30..33 only
    truth = reference_attention(q.double(), k.double(), v.double(), **kw).out
    out, _ = _run(q, k, v, TMA, **kw)
    assert torch.equal(out.isnan(), truth.isnan())
    ok = torch.isfinite(truth)
    assert err(out[ok], truth[ok]) < 1e-5


def _strided(t: torch.Tensor, pad: int) -> torch.Tensor:
    """`t` (b h s d) as a view whose token stride is d + pad elements."""
    b, h, s, d = t.shape
    wide = torch.zeros(b, h, s, d + pad, dtype=t.dtype, device=t.device)
    wide[..., :d] = t
    return wide[..., :d]


def test_tma_ready_refuses_what_the_tma_unit_cannot_read():
    _, k, v = (t.detach() for t in qkv_on(1, 2, 2, 8, 8, 16, dtype=torch.float16))
    assert tk.tma_ready(k, v)
    assert not tk.tma_ready(k, _strided(v, 1))  # token stride 34 B: not a multiple of 16
    assert tk.tma_ready(k, _strided(v, 8))  # 48 B
    assert not tk.tma_ready(k.transpose(2, 3), v)  # the head dim not contiguous
    assert not tk.tma_ready(k.expand(1, 2, 8, 16).contiguous().expand(3, 2, 8, 16), v)  # stride 0
    odd = torch.zeros(k.numel() + 1, dtype=k.dtype, device=k.device)[1:].view(k.shape)
    assert not tk.tma_ready(odd, v)  # base 2 bytes past a 16-byte boundary


@pytest.mark.parametrize("pad", [1, 8])
def test_tma_config_on_strides_it_cannot_read_loads_through_pointers(pad):
    """A `tma=True` launch on K/V the TMA unit cannot read (pad 1) runs the pointer loads, and
    a strided view it can read (pad 8) is read through the descriptor: both exact."""
    q, k, v = (t.detach() for t in qkv_on(1, 4, 2, 30, 50, 16, dtype=torch.float16))
    ks, vs = _strided(k, pad), _strided(v, pad)
    assert tk.tma_ready(ks, vs) == (pad == 8)
    kw = {"causal": True}
    truth = oracle(q, k, v, **kw)
    plain = same_dtype(q, k, v, **kw)
    out, lse = _run(q, ks, vs, TMA, **kw)
    assert_within_budget(out, plain.out, truth.out, torch.float16, what="out")
    assert_within_budget(lse, plain.lse, truth.lse, torch.float16, what="lse")


@pytest.mark.parametrize("scale", [-0.4, 0.0], ids=["negative", "zero"])
@pytest.mark.parametrize("kw", [{"causal": True}, {"window": (5, 5)}], ids=["causal", "window"])
def test_scale_not_folded_where_the_max_would_change(scale, kw):
    """The fold takes max(c·s) = c·max(s), true for c > 0 only: a negative scale makes the row
    max the minimum score, and 0·(−inf) on a masked score is NaN. Both run unfolded."""
    q, k, v = (t.detach() for t in qkv_on(1, 2, 2, 40, 40, 16))
    kw = {**kw, "scale": scale}
    truth = oracle(q.cpu(), k.cpu(), v.cpu(), **kw)
    plain = same_dtype(q.cpu(), k.cpu(), v.cpu(), **kw)
    out, lse = _run(q, k, v, SMALL, **kw)
    assert_within_budget(out.cpu(), plain.out, truth.out, torch.float32, what="out")
    assert_within_budget(lse.cpu(), plain.lse, truth.lse, torch.float32, what="lse")
