"""MXFP4 dequantisation (`qkv.models.mxfp4`) against two oracles and a round trip.

1. transformers' own `convert_moe_packed_tensors`, bit for bit, on every byte value under
   every scale byte 0-255 (extremes that overflow to ±inf or underflow to subnormals/±0
   included) and on awkward random shapes, in bfloat16, float16, float32 and float64;
2. a float64 decoder written here from the E2M1 definition (sign, 2 exponent bits with bias
   1, 1 mantissa bit, subnormal at exponent 0) and the E8M0 scale 2^(s − 127), one element at
   a time for the layout: row r of expert e, group g, byte j, nibble n → column
   g·32 + 2j + n of out[e, :, r];
3. a quantiser written here that packs exactly representable values, which `dequantize`
   gives back exactly.

Then chunking (any chunk size gives the same bits; memory stays bounded), the checkpoint
helpers, and bad inputs named.
"""

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from qkv.models.mxfp4 import Dequantized, Packed, dequantize, packed_params

transformers = pytest.importorskip("transformers", reason="transformers is an MXFP4 oracle")
from transformers.integrations.mxfp4 import convert_moe_packed_tensors  # noqa: E402

DTYPES = [torch.bfloat16, torch.float16, torch.float32, torch.float64]
_BITS = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32,
         torch.float64: torch.int64}  # fmt: skip


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal shape, dtype and bits (so −0 ≠ +0, inf = inf)."""
    return (
        a.shape == b.shape
        and a.dtype == b.dtype
        and torch.equal(a.view(_BITS[a.dtype]), b.view(_BITS[b.dtype]))
    )


def every_byte_under_every_scale(seed=0):
    """blocks (1, 256, 16, 16): row r has scale byte r on all 16 groups, and its 256 bytes are
    0-255 in a random order, so each (byte, scale) pair occurs once."""
    g = torch.Generator().manual_seed(seed)
    rows = torch.stack([torch.randperm(256, generator=g) for _ in range(256)])  # (r 256)
    blocks = rows.to(torch.uint8).view(1, 256, 16, 16)
    scales = torch.arange(256, dtype=torch.uint8).view(1, 256, 1).expand(1, 256, 16).contiguous()
    return blocks, scales


def random_pair(shape=(3, 7, 5), seed=1, low=0, high=256):
    g = torch.Generator().manual_seed(seed)
    blocks = torch.randint(0, 256, (*shape, 16), generator=g, dtype=torch.uint8)
    scales = torch.randint(low, high, shape, generator=g, dtype=torch.uint8)
    return blocks, scales


# ---- oracle 1: transformers ---------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_equals_transformers_on_every_byte_and_scale(dtype):
    blocks, scales = every_byte_under_every_scale()
    got = dequantize(blocks, scales, dtype)
    want = convert_moe_packed_tensors(blocks, scales, dtype=dtype)
    assert same_bits(got, want)
    if dtype != torch.float64:  # the extremes are in play: overflow, and (float16) underflow
        assert got.isinf().any() and (got == 0).sum() > (blocks == 0).sum()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 7, 5), (1, 1, 1), (2, 90, 3), (5, 2, 9)])
def test_equals_transformers_on_awkward_shapes(dtype, shape):
    blocks, scales = random_pair(shape, seed=sum(shape))
    want = convert_moe_packed_tensors(blocks, scales, dtype=dtype)
    assert same_bits(dequantize(blocks, scales, dtype), want)
    assert same_bits(dequantize(blocks, scales, dtype, chunk=37), want)


def test_the_check_can_fail():
    """A swapped nibble order, scale bias 128 or untransposed result shows against both."""
    blocks, scales = random_pair(low=100, high=150)
    want = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)
    swapped = ((blocks & 15) << 4) | (blocks >> 4)
    assert not same_bits(dequantize(swapped, scales, torch.float32), want)
    assert not same_bits(dequantize(blocks, scales + 1, torch.float32), want)
    got = dequantize(blocks, scales, torch.float32)
    assert not same_bits(got.transpose(1, 2).contiguous().view(want.shape), want)


# ---- oracle 2: float64 from the E2M1 definition -------------------------------------------


def e2m1(code: int) -> float:
    """An FP4 E2M1 code's value: sign bit 3, exponent bits 2-1 (bias 1), mantissa bit 0;
    exponent 0 is subnormal, 2^(1 − 1) · (m / 2)."""
    sign = -1.0 if code & 0b1000 else 1.0
    exponent, mantissa = (code >> 1) & 0b11, code & 1
    if exponent == 0:
        return sign * (mantissa / 2)
    return sign * 2.0 ** (exponent - 1) * (1 + mantissa / 2)


def decode64(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """out[e, g·32 + 2j + n, r] = e2m1(nibble n of blocks[e, r, g, j]) · 2^(scales[e, r, g] −
    127), n = 0 the low nibble; element by element, float64."""
    E, R, G, J = blocks.shape
    out = torch.empty(E, G * 32, R, dtype=torch.float64)
    b, s = blocks.tolist(), scales.tolist()
    for e in range(E):
        for r in range(R):
            for g in range(G):
                unit = math.ldexp(1.0, s[e][r][g] - 127)
                for j in range(J):
                    byte = b[e][r][g][j]
                    out[e, g * 32 + 2 * j, r] = e2m1(byte & 0xF) * unit
                    out[e, g * 32 + 2 * j + 1, r] = e2m1(byte >> 4) * unit
    return out


def test_e2m1_decoder_gives_the_known_values():
    """The oracle's own premise: the eight magnitudes of FP4 E2M1, then their negatives."""
    assert [e2m1(c) for c in range(8)] == [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
    assert [e2m1(c) for c in range(8, 16)] == [-0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0]


# scale bytes at the edges: float16's underflow (103/104) and overflow (140/141), 1.0 (127),
# bfloat16/float32's overflow (252-254), and 255 (read as 2^128, like transformers; OCP MX
# calls it NaN)
EDGES = [0, 1, 102, 103, 104, 126, 127, 128, 140, 141, 200, 252, 253, 254, 255]


@pytest.mark.parametrize("dtype", DTYPES)
def test_equals_the_float64_definition(dtype):
    """The float64 values rounded once to `dtype`: random bytes and scales on awkward shapes,
    and every byte under each edge scale."""
    blocks, scales = every_byte_under_every_scale(seed=4)
    for b, s in (random_pair((2, 9, 3), seed=3), (blocks[:, EDGES], scales[:, EDGES])):
        want = decode64(b, s)
        assert same_bits(dequantize(b, s, dtype), want.to(dtype))


# ---- oracle 3: a round trip ---------------------------------------------------------------


def quantise(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w (e, k, r), each group of 32 along k exactly some FP4 value times a power of two →
    (blocks (e r k/32 16), scales (e r k/32)). The scale puts the group's largest magnitude at
    4 or 6; a value that does not land on an FP4 value fails the test."""
    magnitudes = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
    E, Kdim, R = w.shape
    blocks = torch.zeros(E, R, Kdim // 32, 16, dtype=torch.uint8)
    scales = torch.zeros(E, R, Kdim // 32, dtype=torch.uint8)
    for e in range(E):
        for r in range(R):
            for g in range(Kdim // 32):
                group = w[e, g * 32 : (g + 1) * 32, r].double().tolist()
                amax = max(abs(v) for v in group)
                s = (math.frexp(amax)[1] - 1 - 2 + 127) if amax else 127  # amax/2^(s−127) ∈ [4, 8)
                assert 0 <= s <= 255
                scales[e, r, g] = s
                codes = []
                for v in group:
                    m = abs(v) / 2.0 ** (s - 127)
                    assert m in magnitudes, f"{v} is not an FP4 value times 2^{s - 127}"
                    codes.append(magnitudes.index(m) | (8 if math.copysign(1, v) < 0 else 0))
                for j in range(16):
                    blocks[e, r, g, j] = codes[2 * j] | (codes[2 * j + 1] << 4)
    return blocks, scales


def representable(shape, seed=5) -> torch.Tensor:
    """(e, k, r) values, each group of 32 along k an FP4 value times 2^t, t per group in
    [-100, 100]; one group all zero and one with −0s."""
    g = torch.Generator().manual_seed(seed)
    E, Kdim, R = shape
    fp4 = torch.tensor([e2m1(c) for c in range(16)], dtype=torch.float64)
    w = fp4[torch.randint(0, 16, shape, generator=g)]
    t = torch.randint(-100, 101, (E, Kdim // 32, R), generator=g).double()
    w = w * torch.exp2(t).repeat_interleave(32, dim=1)
    w[0, :32, 0] = 0.0
    w[-1, -32:, -1] = -0.0
    return w


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64])
def test_round_trip_is_exact(dtype):
    w = representable((3, 96, 5))
    blocks, scales = quantise(w)
    got = dequantize(blocks, scales, dtype)
    assert same_bits(got, w.to(dtype))  # −0 included
    assert same_bits(got, convert_moe_packed_tensors(blocks, scales, dtype=dtype))


# ---- chunking ---------------------------------------------------------------------------


@pytest.mark.parametrize("chunk", [1, 31, 32, 33, 32 * 7, 32 * 7 * 2 + 1, 10**9])
def test_every_chunk_size_gives_the_same_bits(chunk):
    """Chunks of part of a row, whole rows, whole experts, several experts, all at once."""
    blocks, scales = random_pair((4, 7, 1), seed=6)  # k = 32 values per row, 7 rows
    want = convert_moe_packed_tensors(blocks, scales, dtype=torch.bfloat16)
    assert same_bits(dequantize(blocks, scales, chunk=chunk), want)


class Allocations(TorchDispatchMode):
    """The bytes of each fresh storage an op makes (views and in-place results skipped)."""

    def __init__(self):
        super().__init__()
        self.made: list[tuple[int, int]] = []  # (storage address, bytes)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        storage = lambda t: t.untyped_storage()  # noqa: E731
        seen = {storage(t).data_ptr() for t in tree_flatten((args, kwargs))[0]
                if isinstance(t, torch.Tensor)}  # fmt: skip
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and storage(t).data_ptr() not in seen:
                self.made.append((storage(t).data_ptr(), storage(t).nbytes()))
        return out


def largest_intermediate(chunk: int) -> tuple[int, int]:
    """(bytes of the largest tensor other than the result, values in the result) while
    dequantising 16 experts to bfloat16."""
    blocks, scales = random_pair((16, 24, 4), seed=9)  # 16 × 24 × 128 values
    with Allocations() as seen:
        out = dequantize(blocks, scales, chunk=chunk)
    ptr = out.untyped_storage().data_ptr()
    return max(n for p, n in seen.made if p != ptr), out.numel()


@pytest.mark.parametrize("chunk", [128, 1000, 3072])
def test_memory_stays_bounded_by_the_chunk(chunk):
    """No intermediate holds more than `chunk` float32 values, where one step for all 16
    experts (the check can fail) makes one of all 49152."""
    biggest, _ = largest_intermediate(chunk)
    assert biggest <= 4 * chunk, (chunk, biggest)
    biggest, n = largest_intermediate(10**9)
    assert biggest >= 4 * n


# ---- the checkpoint helpers ---------------------------------------------------------------

L0 = "model.layers.0.mlp.experts."


def checkpoint(E=2, m=64, f=32):
    """gpt-oss's MXFP4 tensors for one layer, and a dense one beside them."""
    gu_b, gu_s = random_pair((E, 2 * f, m // 32), seed=7)
    dn_b, dn_s = random_pair((E, m, f // 32), seed=8)
    return {
        L0 + "gate_up_proj_blocks": gu_b, L0 + "gate_up_proj_scales": gu_s,
        L0 + "gate_up_proj_bias": torch.zeros(E, 2 * f),
        L0 + "down_proj_blocks": dn_b, L0 + "down_proj_scales": dn_s,
        "model.norm.weight": torch.ones(m),
    }  # fmt: skip


def test_packed_params_name_each_parameter_and_its_shape():
    ck = checkpoint()
    assert packed_params(ck) == {
        L0 + "gate_up_proj": Packed(L0 + "gate_up_proj", L0 + "gate_up_proj_blocks",
                                    L0 + "gate_up_proj_scales", (2, 64, 64)),
        L0 + "down_proj": Packed(L0 + "down_proj", L0 + "down_proj_blocks",
                                 L0 + "down_proj_scales", (2, 32, 64)),
    }  # fmt: skip
    assert packed_params({"model.norm.weight": torch.ones(3)}) == {}


def test_dequantized_view_replaces_each_pair():
    ck = checkpoint()
    view = Dequantized(ck, torch.float32)
    assert list(view) == [L0 + "gate_up_proj_bias", "model.norm.weight", L0 + "gate_up_proj",
                          L0 + "down_proj"]  # fmt: skip
    assert len(view) == 4 and L0 + "down_proj" in view and L0 + "down_proj_blocks" not in view
    for name in (L0 + "gate_up_proj", L0 + "down_proj"):
        want = convert_moe_packed_tensors(ck[name + "_blocks"], ck[name + "_scales"],
                                          dtype=torch.float32)  # fmt: skip
        assert same_bits(view[name], want) and tuple(want.shape) == view.packed[name].shape
    assert view[L0 + "down_proj"] is view[L0 + "down_proj"]  # the last one is kept
    assert view["model.norm.weight"] is ck["model.norm.weight"]
    with pytest.raises(KeyError):
        view[L0 + "down_proj_scales"]


def _without(ck, key):
    return {k: v for k, v in ck.items() if k != key}


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda ck: _without(ck, L0 + "down_proj_scales"),
         r"'model.layers.0.mlp.experts.down_proj_blocks' has no "
         r"'model.layers.0.mlp.experts.down_proj_scales' beside it"),
        (lambda ck: _without(ck, L0 + "down_proj_blocks"),
         r"'model.layers.0.mlp.experts.down_proj_scales' has no '.*down_proj_blocks' beside"),
        (lambda ck: {**ck, L0 + "down_proj": torch.zeros(2, 32, 64)},
         r"'.*experts.down_proj' is in the checkpoint both dense and as"),
        (lambda ck: {**ck, L0 + "down_proj_blocks": ck[L0 + "down_proj_blocks"].to(torch.int8)},
         r"'.*down_proj_blocks' is torch.int8, expected torch.uint8 \(two FP4 codes per byte\)"),
        (lambda ck: {**ck, L0 + "down_proj_scales": ck[L0 + "down_proj_scales"].float()},
         r"'.*down_proj_scales' is torch.float32, expected torch.uint8 \(one E8M0 exponent"),
        (lambda ck: {**ck, L0 + "down_proj_scales": ck[L0 + "down_proj_scales"][:, :-1]},
         r"'.*down_proj_scales' has shape \(2, 63, 1\), expected \(2, 64, 1\) \(one exponent "
         r"per 32-value group of '.*down_proj_blocks'\)"),
        (lambda ck: {**ck, L0 + "down_proj_blocks": ck[L0 + "down_proj_blocks"].view(2, 64, 2, 8)},
         r"'.*down_proj_blocks' has shape \(2, 64, 2, 8\), expected \(experts, rows, groups, 16\)"),
    ],
)  # fmt: skip
def test_bad_checkpoints_are_named(edit, match):
    bad = edit(checkpoint())
    with pytest.raises(ValueError, match=match):
        packed_params(bad)
    with pytest.raises(ValueError, match=match):
        Dequantized(bad)


@pytest.mark.parametrize(
    ("args", "kw", "err", "match"),
    [
        ((torch.zeros(2, 3, 4, 16, dtype=torch.int32), torch.zeros(2, 3, 4, dtype=torch.uint8)),
         {}, ValueError, r"'blocks' is torch.int32, expected torch.uint8"),
        ((torch.zeros(3, 4, 16, dtype=torch.uint8), torch.zeros(3, 4, dtype=torch.uint8)),
         {}, ValueError, r"'blocks' has shape \(3, 4, 16\), expected \(experts, rows, groups, 16\)"),
        ((torch.zeros(2, 3, 4, 16, dtype=torch.uint8), torch.zeros(2, 3, 5, dtype=torch.uint8)),
         {}, ValueError, r"'scales' has shape \(2, 3, 5\), expected \(2, 3, 4\)"),
        ((torch.zeros(2, 3, 4, 16, dtype=torch.uint8), [[1]]),
         {}, TypeError, r"'scales' must be a tensor, got list"),
        ((torch.zeros(2, 3, 4, 16, dtype=torch.uint8), torch.zeros(2, 3, 4, dtype=torch.uint8)),
         {"dtype": torch.int32}, ValueError,
         r"dtype must be torch.bfloat16, float16, float32 or float64, got torch.int32"),
        ((torch.zeros(2, 3, 4, 16, dtype=torch.uint8), torch.zeros(2, 3, 4, dtype=torch.uint8)),
         {"chunk": 0}, ValueError, r"chunk must be an int ≥ 1 \(values per step\), got 0"),
    ],
)  # fmt: skip
def test_bad_arguments_are_named(args, kw, err, match):
    with pytest.raises(err, match=match):
        dequantize(*args, **kw)
