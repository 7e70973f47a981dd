"""qkv.nn.quant: block-quantised weights against the `gguf` library (the format's reference
dequantiser) and a float64 matmul, and the rules for when `linear` may use them."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from qkv.nn import quant
from qkv.nn.quant import BlockWeight, Mirror, linear

gguf = pytest.importorskip("gguf", reason="the gguf library is the blocks' reference dequantiser")

KINDS = ("q4_1", "q8_0", "q5_0", "q4_k", "q6_k")  # ggml types BlockWeight.from_ggml reads
LAYOUT = {"q4_1": "q4_1", "q8_0": "q8_0", "q5_0": "q8_0", "q4_k": "q4_1", "q6_k": "q8_16"}
# the block kernel's error vs float64 may be this many times dense float32's (F.linear), plus a
# floor for outputs where both are near zero
ERR_RATIO, ERR_FLOOR = 2.0, 1e-6
SHAPES = [(1, 1), (7, 2), (33, 3), (257, 18)]  # (n, blocks per row): k = blocks · block size


def qtype(kind: str):
    return gguf.GGMLQuantizationType[kind.upper()]


def width(kind: str, blocks: int) -> int:
    return blocks * gguf.GGML_QUANT_SIZES[qtype(kind)][0]


def ggml(kind: str, n: int, k: int, seed: int = 0) -> tuple[np.ndarray, torch.Tensor]:
    """Random (n, k) weights quantised → (raw blocks, gguf's dequantisation). By the gguf library
    where it can; the K-quants, which it only dequantises, by `quantize_k` here."""
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((n, k)) * rng.uniform(0.01, 1, (n, 1))).astype(np.float32)
    try:
        raw = gguf.quants.quantize(w, qtype(kind))
    except NotImplementedError:
        raw = quantize_k(kind, w)
    return raw, torch.from_numpy(gguf.quants.dequantize(raw, qtype(kind)).astype(np.float32))


def quantize_k(kind: str, w: np.ndarray) -> np.ndarray:
    """A plain Q4_K / Q6_K quantiser (llama.cpp's block layouts, simple round-to-nearest
    scales) writing the bytes of ggml-common.h's block_q4_K / block_q6_K: (n, k) → (n, bytes)."""
    n, k = w.shape
    f16 = lambda a: a.astype(np.float16)[..., None].view(np.uint8)  # noqa: E731  (… 2)
    if kind == "q4_k":  # per 32: w ≈ d·sc·q − dmin·m, 6-bit sc and m, q 0..15
        x = w.reshape(n, k // 256, 8, 32).astype(np.float64)
        lo = np.minimum(x.min(-1), 0)  # (n s 8)
        step = (x.max(-1) - lo) / 15
        d, dmin = step.max(-1) / 63, -lo.min(-1) / 63  # (n s)
        sc = np.rint(step / np.where(d == 0, 1, d)[..., None]).astype(np.uint8)  # (n s 8)
        m = np.rint(-lo / np.where(dmin == 0, 1, dmin)[..., None]).astype(np.uint8)
        dd = d.astype(np.float16).astype(np.float64)[..., None] * sc
        mm = dmin.astype(np.float16).astype(np.float64)[..., None] * m
        q = np.rint((x + mm[..., None]) / np.where(dd == 0, 1, dd)[..., None])
        q = np.clip(q, 0, 15).astype(np.uint8).reshape(n, k // 256, 4, 2, 32)
        scales = np.concatenate(
            (
                sc[..., :4] | (sc[..., 4:] >> 4 << 6),
                m[..., :4] | (m[..., 4:] >> 4 << 6),
                (sc[..., 4:] & 15) | ((m[..., 4:] & 15) << 4),
            ),
            -1,
        )  # (n s 12)
        qs = (q[..., 0, :] | (q[..., 1, :] << 4)).reshape(n, k // 256, 128)
        raw = np.concatenate((f16(d), f16(dmin), scales, qs), -1)
    else:  # q6_k, per 16: w ≈ d·sc·q, int8 sc, q −32..31
        x = w.reshape(n, k // 256, 16, 16).astype(np.float64)
        step = np.abs(x).max(-1) / 31  # (n s 16)
        d = step.max(-1) / 127
        sc = np.rint(step / np.where(d == 0, 1, d)[..., None]).astype(np.int8)
        dd = d.astype(np.float16).astype(np.float64)[..., None] * sc
        q = np.rint(x / np.where(dd == 0, 1, dd)[..., None])
        q = (np.clip(q, -32, 31) + 32).astype(np.uint8).reshape(n, k // 256, 2, 4, 32)
        ql = (q[..., 0:2, :] & 15) | ((q[..., 2:4, :] & 15) << 4)  # (n s half 2 32)
        qh = sum((q[..., j, :] >> 4) << (2 * j) for j in range(4)).astype(np.uint8)
        raw = np.concatenate(
            (ql.reshape(n, k // 256, 128), qh.reshape(n, k // 256, 64), sc.view(np.uint8), f16(d)),
            -1,
        )
    return raw.reshape(n, -1)


def test_the_k_quantiser_quantises():
    """quantize_k's bytes mean what it meant (read by gguf): each weight within about a step
    (a misplaced bit or nibble would be off by ~1)."""
    w = np.random.default_rng(0).standard_normal((5, 512)).astype(np.float32)
    for kind, tol in (("q4_k", 0.4), ("q6_k", 0.12)):  # ~ a step (range / 15, / 31)
        got = gguf.quants.dequantize(quantize_k(kind, w), qtype(kind))
        assert np.abs(got - w).max() < tol, kind


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n, blocks", SHAPES)
def test_dequantize_equals_gguf_exactly(kind, n, blocks):
    k = width(kind, blocks)
    raw, ref = ggml(kind, n, k)
    b = BlockWeight.from_ggml(kind.upper(), raw, (n, k))
    assert b.shape == (n, k) and b.kind == LAYOUT[kind]
    assert torch.equal(b.dequantize(), ref)


@pytest.mark.parametrize("kind", KINDS)
def test_every_byte_pattern_dequantizes_as_gguf(kind):
    """Blocks of random bytes (any fp16 scale: subnormal, inf, NaN): the same float32 bits as
    gguf's dequantisation, or NaN where it gives NaN."""
    per, size = gguf.GGML_QUANT_SIZES[qtype(kind)]
    raw = np.random.default_rng(7).integers(0, 256, (64, 4 * size), dtype=np.uint8)
    with np.errstate(invalid="ignore"):  # inf · 0
        ref = gguf.quants.dequantize(raw, qtype(kind)).astype(np.float32)
        got = BlockWeight.from_ggml(kind, raw, (64, 4 * per)).dequantize().numpy()
    nan = np.isnan(ref)
    assert np.array_equal(np.isnan(got), nan)
    assert np.array_equal(got.view(np.int32)[~nan], ref.view(np.int32)[~nan])
    assert np.isfinite(ref).mean() > 0.8  # mostly ordinary blocks


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n, blocks", [*SHAPES, (576, 6)])
@pytest.mark.parametrize("rows", [1, 2, 3])
def test_matmul_matches_float64(kind, n, blocks, rows):
    k = width(kind, blocks)
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
    k = width(kind, 2)
    raw, _ = ggml(kind, 5, k)
    x = torch.randn(1, k)
    x[0, 3] = float("nan")
    assert torch.isnan(BlockWeight.from_ggml(kind, raw, (5, k)).matmul(x)).all()


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


def test_rows_and_cat_of_each_layout_match_dense():
    """Q5_0 and Q8_0 share a layout (gemma3's Q|K|V fuse), Q6_K's groups of 16 do not."""
    (ra, wa), (rb, wb) = ggml("q5_0", 9, 256, 1), ggml("q8_0", 4, 256, 2)
    a, b = BlockWeight.from_ggml("q5_0", ra, (9, 256)), BlockWeight.from_ggml("q8_0", rb, (4, 256))
    both = BlockWeight.cat([a.rows([8, 0, 3]), b])
    assert both.kind == "q8_0" and torch.equal(both.dequantize(), torch.cat((wa[[8, 0, 3]], wb)))
    (rk, wk), (r6, w6) = ggml("q4_k", 6, 512, 3), ggml("q6_k", 6, 256, 4)
    k4, k6 = (
        BlockWeight.from_ggml("q4_k", rk, (6, 512)),
        BlockWeight.from_ggml("q6_k", r6, (6, 256)),
    )
    assert torch.equal(BlockWeight.cat([k4, k4.rows([5])]).dequantize(), torch.cat((wk, wk[[5]])))
    assert torch.equal(k6.rows([2, 2]).dequantize(), w6[[2, 2]])
    assert (k6.group, k6.data.shape, k6.nbytes) == (16, (16, 16, 6), 6 * 256 * 5 // 4)
    with pytest.raises(ValueError, match="cannot concatenate"):
        BlockWeight.cat([b, k6])


def test_bad_blocks_are_named():
    raw, _ = ggml("q4_1", 4, 64)
    with pytest.raises(ValueError, match=r"unsupported block format 'q5_k'"):
        BlockWeight.from_ggml("q5_k", raw, (4, 64))
    with pytest.raises(ValueError, match=r"need k % 32 == 0 and 240 bytes, got k=64 and 160"):
        BlockWeight.from_ggml("q4_1", raw, (6, 64))
    with pytest.raises(ValueError, match=r"q6_k blocks for a \(4, 640\) weight need k % 256 == 0"):
        BlockWeight.from_ggml("Q6_K", np.zeros(4 * 640 // 256 * 210, np.uint8), (4, 640))
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
