"""qkv.nn.quant: block-quantised weights against the `gguf` library (the format's reference
dequantiser) and a float64 matmul, and the rules for when `linear` may use them."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from qkv.nn import quant
from qkv.nn.quant import BlockWeight, Mirror, linear

gguf = pytest.importorskip("gguf", reason="the gguf library is the blocks' reference dequantiser")

KINDS = ("q4_1", "q8_0")
# the block kernel's error vs float64 may be this many times dense float32's (F.linear), plus a
# floor for outputs where both are near zero
ERR_RATIO, ERR_FLOOR = 2.0, 1e-6


def ggml(kind: str, n: int, k: int, seed: int = 0) -> tuple[np.ndarray, torch.Tensor]:
    """Random (n, k) weights quantised by the gguf library → (raw blocks, gguf's dequantisation)."""
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((n, k)) * rng.uniform(0.01, 1, (n, 1))).astype(np.float32)
    qtype = gguf.GGMLQuantizationType[kind.upper()]
    raw = gguf.quants.quantize(w, qtype)
    return raw, torch.from_numpy(gguf.quants.dequantize(raw, qtype).astype(np.float32))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n, k", [(1, 32), (7, 64), (33, 96), (960, 576)])
def test_dequantize_equals_gguf_exactly(kind, n, k):
    raw, ref = ggml(kind, n, k)
    b = BlockWeight.from_ggml(kind, raw, (n, k))
    assert b.shape == (n, k)
    assert torch.equal(b.dequantize(), ref)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n, k", [(1, 32), (7, 64), (33, 96), (257, 576), (576, 1536)])
@pytest.mark.parametrize("rows", [1, 2, 3])
def test_matmul_matches_float64(kind, n, k, rows):
    raw, w = ggml(kind, n, k, seed=n + k)
    b = BlockWeight.from_ggml(kind, raw, (n, k))
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(rows))
    exact = x.double() @ w.double().T
    got = b.matmul(x)
    assert got.dtype == torch.float32 and got.shape == (rows, n)
    dense_err = float((F.linear(x, w).double() - exact).abs().max())
    err = float((got.double() - exact).abs().max())
    assert err <= ERR_RATIO * dense_err + ERR_FLOOR, f"{kind}: {err:.2e} vs dense {dense_err:.2e}"


@pytest.mark.parametrize("kind", KINDS)
def test_nan_in_x_stays_nan(kind):
    raw, _ = ggml(kind, 5, 64)
    x = torch.randn(1, 64)
    x[0, 3] = float("nan")
    assert torch.isnan(BlockWeight.from_ggml(kind, raw, (5, 64)).matmul(x)).all()


def test_rows_and_cat_match_dense():
    (ra, wa), (rb, wb) = ggml("q4_1", 12, 64, 1), ggml("q4_1", 5, 64, 2)
    a, b = BlockWeight.from_ggml("q4_1", ra, (12, 64)), BlockWeight.from_ggml("q4_1", rb, (5, 64))
    idx = [3, 0, 11, 3, 7]
    assert torch.equal(a.rows(idx).dequantize(), wa[idx])
    assert torch.equal(BlockWeight.cat([a, b]).dequantize(), torch.cat((wa, wb)))
    assert BlockWeight.cat([a, b]).nbytes == a.nbytes + b.nbytes
    (rc, _) = ggml("q8_0", 5, 64)
    with pytest.raises(ValueError, match="cannot concatenate"):
        BlockWeight.cat([a, BlockWeight.from_ggml("q8_0", rc, (5, 64))])


def test_bad_blocks_are_named():
    raw, _ = ggml("q4_1", 4, 64)
    with pytest.raises(ValueError, match=r"unsupported block format 'q5_k'"):
        BlockWeight.from_ggml("q5_k", raw, (4, 64))
    with pytest.raises(ValueError, match=r"need k % 32 == 0 and 240 bytes, got k=64 and 160"):
        BlockWeight.from_ggml("q4_1", raw, (6, 64))
    b = BlockWeight.from_ggml("q4_1", raw, (4, 64))
    with pytest.raises(ValueError, match=r"\(rows, 64\) float32 CPU tensor, got \(1, 32\)"):
        b.matmul(torch.randn(1, 32))
    with pytest.raises(ValueError, match="float64"):
        b.matmul(torch.randn(1, 64, dtype=torch.float64))


# --------------------------------------------------------------------------------------------
# when linear() multiplies by the blocks


@pytest.fixture
def layer():
    """A (40, 64) weight stored as a Parameter, its bias, and a Mirror of its blocks."""
    raw, w = ggml("q4_1", 40, 64, seed=3)
    weight = torch.nn.Parameter(w.clone())
    bias = torch.nn.Parameter(torch.randn(40))
    return weight, bias, Mirror(BlockWeight.from_ggml("q4_1", raw, (40, 64)), weight)


@pytest.fixture
def calls(monkeypatch):
    """Counts BlockWeight.matmul calls (the blocks path)."""
    seen = []
    real = BlockWeight.matmul

    def spy(self, x):
        seen.append(tuple(x.shape))
        return real(self, x)

    monkeypatch.setattr(BlockWeight, "matmul", spy)
    return seen


@pytest.fixture
def threads():
    """Sets torch's thread count for one test and puts it back."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


def test_linear_uses_blocks_for_a_decode_step(layer, calls, threads):
    threads(1)
    weight, bias, mirror = layer
    x = torch.randn(1, 1, 64)
    with torch.no_grad():
        got = linear(x, weight, bias, mirror)
        want = F.linear(x.double(), weight.double(), bias.double())
    assert calls == [(1, 64)] and got.shape == (1, 1, 40)
    torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-5)
    with torch.inference_mode():
        linear(torch.randn(2, 64), weight, None, mirror)
    assert calls[-1] == (2, 64)


@pytest.mark.parametrize(
    "why",
    ["rows", "2 rows, 2 threads", "grad", "float64", "dense()", "edited", "replaced", "shape",
     "inference owner"],
)  # fmt: skip
def test_linear_falls_back_to_dense(layer, calls, threads, why):
    weight, bias, mirror = layer
    x = torch.randn(1, 64)
    ctx = torch.no_grad()
    threads(1)
    if why == "rows":
        x = torch.randn(quant.MAX_ROWS + 1, 64)
    elif why == "2 rows, 2 threads":  # BLAS then uses both cores; the kernels use one
        x = torch.randn(2, 64)
        threads(2)
    elif why == "grad":
        ctx = torch.enable_grad()
    elif why == "float64":
        weight, bias, x = weight.double(), bias.double(), x.double()
    elif why == "dense()":
        ctx = quant.dense()
    elif why == "edited":  # an in-place edit bumps the version counter: the blocks are stale
        with torch.no_grad():
            weight[3].mul_(-2)
    elif why == "replaced":
        weight.data = weight.data.clone()
    elif why == "shape":
        weight, bias = torch.nn.Parameter(weight[:20].detach().clone()), bias[:20]
    elif why == "inference owner":
        with torch.inference_mode():
            owner = weight.detach().clone()
        mirror = Mirror(mirror.blocks, owner)
        assert not mirror.valid()
    with ctx:
        got = linear(x, weight, bias, mirror)
    assert calls == []
    torch.testing.assert_close(got, F.linear(x, weight, bias), rtol=0, atol=0)


def test_mirror_needs_owners(layer):
    with pytest.raises(ValueError, match="needs the parameter"):
        Mirror(layer[2].blocks)
    assert "valid=True" in repr(layer[2])
