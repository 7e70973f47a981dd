"""RotaryEmbedding against an independent complex-number float64 formulation."""

import math

import pytest
import torch

from qkv.nn import RotaryEmbedding

TOL = {torch.float64: 1e-12, torch.float32: 2e-5}


def complex_rope(
    x: torch.Tensor, pos: torch.Tensor, base: float, interleaved: bool
) -> torch.Tensor:
    """Pair p as a + ib, multiplied by exp(i·pos·base^(−2p/d)); float64 throughout."""
    d = x.shape[-1]
    theta = torch.tensor([base ** (-2.0 * p / d) for p in range(d // 2)], dtype=torch.float64)
    ang = pos.double()[:, None] * theta[None, :]  # (i p)
    rot = torch.polar(torch.ones_like(ang), ang)
    x = x.double()
    if interleaved:
        c = torch.complex(x[..., 0::2], x[..., 1::2]) * rot
        return torch.stack((c.real, c.imag), dim=-1).flatten(-2)
    c = torch.complex(x[..., : d // 2], x[..., d // 2 :]) * rot
    return torch.cat((c.real, c.imag), dim=-1)


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("d,base", [(64, 10000.0), (40, 100000.0), (2, 10.0)])
def test_matches_complex_formula(interleaved, dtype, d, base):
    g = torch.Generator().manual_seed(d)
    x = torch.randn(2, 3, 37, d, generator=g, dtype=torch.float64)
    pos = torch.arange(5, 42)
    rope = RotaryEmbedding(d, base=base, interleaved=interleaved)
    got = rope(x.to(dtype), pos)
    assert got.dtype == dtype and got.shape == x.shape
    want = complex_rope(x.to(dtype), pos, base, interleaved)
    assert (got.double() - want).abs().max() <= TOL[dtype] * want.abs().max()
    # an int start means the contiguous positions start … start+S−1 (the slice fast path)
    sliced = rope(x.to(dtype), 5)
    assert (sliced.double() - want).abs().max() <= TOL[dtype] * want.abs().max()


@pytest.mark.parametrize("interleaved", [False, True])
def test_batched_positions_and_large_positions(interleaved):
    x = torch.randn(2, 1, 3, 16, dtype=torch.float64)
    pos = torch.tensor([[0, 1, 2], [5000, 5001, 9000]])
    rope = RotaryEmbedding(16, interleaved=interleaved)
    got = rope(x, pos)
    for b in range(2):
        torch.testing.assert_close(
            got[b : b + 1], complex_rope(x[b : b + 1], pos[b], 10000.0, interleaved)
        )


@pytest.mark.parametrize("interleaved", [False, True])
def test_scores_depend_only_on_offset(interleaved):
    rope = RotaryEmbedding(32, interleaved=interleaved)
    q = torch.randn(1, 1, 1, 32, dtype=torch.float64)
    k = torch.randn(1, 1, 1, 32, dtype=torch.float64)

    def score(i: int, j: int) -> float:
        return float(rope(q, torch.tensor([i])) @ rope(k, torch.tensor([j])).transpose(-1, -2))

    assert math.isclose(score(7, 3), score(107, 103), rel_tol=1e-10)
    assert not math.isclose(score(7, 3), score(7, 4), rel_tol=1e-6)


def test_layouts_differ_and_norm_preserved():
    x = torch.randn(1, 2, 9, 8, dtype=torch.float64)
    pos = torch.arange(9)
    a = RotaryEmbedding(8)(x, pos)
    b = RotaryEmbedding(8, interleaved=True)(x, pos)
    assert not torch.allclose(a, b)
    torch.testing.assert_close(a.norm(dim=-1), x.norm(dim=-1))
    torch.testing.assert_close(b.norm(dim=-1), x.norm(dim=-1))


def test_bad_input():
    with pytest.raises(ValueError, match="even"):
        RotaryEmbedding(7)
    with pytest.raises(ValueError, match="base"):
        RotaryEmbedding(8, base=0.5)
    rope = RotaryEmbedding(8)
    with pytest.raises(ValueError, match="d_head=8"):
        rope(torch.randn(1, 1, 4, 6), torch.arange(4))
    with pytest.raises(ValueError, match="S=4"):
        rope(torch.randn(1, 1, 4, 8), torch.arange(3))
    with pytest.raises(TypeError, match="int64"):
        rope(torch.randn(1, 1, 4, 8), torch.arange(4.0))
    with pytest.raises(ValueError, match="≥ 0"):
        rope(torch.randn(1, 1, 2, 8), torch.tensor([-1, 0]))
