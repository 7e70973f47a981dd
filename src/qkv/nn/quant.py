"""Block-quantised weights as the checkpoint stores them, for the one-token decode step on CPU.

A GGUF keeps most matrices in llama.cpp's blocks of 32 input features (Q4_1, Q5_0, Q8_0) or
super-blocks of 256 (Q4_K: 8 sub-blocks of 32; Q6_K: 16 of 16). Dequantised to float32 (what the
model's parameters hold, and what `transformers` multiplies by) they take 4 bytes a weight;
decoding one token is a matrix-vector product per weight, bound by the bytes it streams.
`BlockWeight` keeps the blocks in one of three layouts (0.75, 1.125 or 1.25 bytes a weight) and
multiplies by them directly, in float32 arithmetic — the weights are exactly the parameters'
values, only the order of the sums differs:

    q4_1   w[n, gc + t] = scale[c, n] · q[n, gc + t] + minimum[c, n],   q ∈ 0..15,      g = 32
    q8_0   w[n, gc + t] = scale[c, n] · q[n, gc + t],                   q ∈ −128..127,  g = 32
    q8_16  the same as q8_0 with g = 16

    y[r, n] = Σ_c scale[c, n] · Σ_t q[n, gc + t] · x[r, gc + t]  +  minimum[c, n] · Σ_t x[r, gc + t]

Each ggml type maps onto one layout with the same float32 values, bit for bit (`from_ggml`):

    Q4_1 → q4_1                    (scale, minimum: the block's fp16 d, m)
    Q4_K → q4_1   scale = d·sc,    minimum = −(dmin·m)   (fp16 × 6-bit: exact in float32; the
                  one rounding, of scale·q − dmin·m, is the one `gguf` makes)
    Q8_0 → q8_0                    (scale: fp16 d)
    Q5_0 → q8_0   q = q5 − 16      (scale: fp16 d)
    Q6_K → q8_16  q = q6 − 32,     scale = d·sc   (fp16 × int8: exact; scale·q rounds once, as
                  `gguf`'s (d·sc)·q does)

A `Mirror` ties blocks to the parameters they equal and is used only while those parameters are
unchanged (same storage, same autograd version counter: any in-place edit, `load_state_dict`, an
optimizer step or `.to()` retires it). `linear(x, weight, bias, mirror)` is `F.linear` with that
fast path: taken for float32 CPU inputs of at most `MAX_ROWS` rows without autograd, otherwise
(prefill, training, GPU, other dtypes, `with dense():`) it is exactly `F.linear`.

Caveat: writes through `param.data` bypass PyTorch's version counter, so a mirror cannot see them;
edit parameters in place under `torch.no_grad()` instead (or call `dense()`).

Letters: r row (token), n output feature, c block of g input features, t position in a block,
s super-block of 256 input features, j sub-block of a super-block.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .._jit import Kernels, wide_vectors_pay
from . import fused

GROUP = 32  # input features per block of the q4_1 and q8_0 layouts
# more rows go to F.linear: on one thread BLAS on the dense weights is faster from ~3 rows, on
# more threads (the kernels use one) from 2 (RESULTS.md)
MAX_ROWS = 2
Kind = Literal["q4_1", "q8_0", "q8_16"]
GROUPS: dict[str, int] = {"q4_1": GROUP, "q8_0": GROUP, "q8_16": 16}  # g of each layout
SUPER = 256  # weights per super-block of the K-quants (QK_K)
# ggml type → (weights, bytes) per block in a GGUF, and the layout it becomes
_GGML: dict[str, tuple[int, int, Kind]] = {
    "q4_1": (GROUP, 2 + 2 + GROUP // 2, "q4_1"),  # d, m, 32 nibbles
    "q8_0": (GROUP, 2 + GROUP, "q8_0"),  # d, 32 int8
    "q5_0": (GROUP, 2 + 4 + GROUP // 2, "q8_0"),  # d, 32 high bits, 32 nibbles
    "q4_k": (SUPER, 2 + 2 + 12 + SUPER // 2, "q4_1"),  # d, dmin, 8 × 6-bit (sc, m), nibbles
    "q6_k": (SUPER, SUPER // 2 + SUPER // 4 + SUPER // 16 + 2, "q8_16"),  # ql, qh, sc, d
}
_ENABLED: ContextVar[bool] = ContextVar("qkv_quant_enabled", default=True)


@dataclass(frozen=True, eq=False)
class BlockWeight:
    """An (n, k) nn.Linear-layout weight kept as blocks of g input features (`GROUPS[kind]`).

    data: (k/32, 16, n) uint8 for q4_1 (byte t of a block holds q[32c + t] in its low nibble and
    q[32c + 16 + t] in its high one, llama.cpp's Q4_1 order), (k/g, g, n) int8 for q8_0 (g = 32)
    and q8_16 (g = 16); scale, minimum: (k/g, n) float32 (minimum is None but for q4_1). Output
    features run along the last axis, so the kernel's inner loop is contiguous.
    """

    kind: Kind
    data: np.ndarray
    scale: np.ndarray
    minimum: np.ndarray | None

    @property
    def group(self) -> int:
        """g: input features per block (per scale)."""
        return GROUPS[self.kind]

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.data.shape[2]), int(self.data.shape[0]) * self.group

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.data, self.scale, self.minimum) if a is not None)

    @classmethod
    def from_ggml(cls, kind: str, raw: np.ndarray, shape: tuple[int, int]) -> BlockWeight:
        """A GGUF tensor's raw bytes (any shape, its blocks in row order) → BlockWeight.

        kind: the ggml type (Q4_1, Q8_0, Q5_0, Q4_K, Q6_K, any case); shape: the (n, k) PyTorch
        shape. The layout follows the table in the module docstring; `dequantize()` of the result
        equals `gguf.quants.dequantize(raw, type)` bit for bit. ValueError for an unknown kind or
        a size mismatch."""
        kind = kind.lower()
        if kind not in _GGML:
            raise ValueError(f"unsupported block format {kind!r}; expected one of {list(_GGML)}")
        n, k = shape
        per, size, layout = _GGML[kind]
        if k % per or np.asarray(raw).size != n * k // per * size:
            raise ValueError(
                f"{kind} blocks for a {shape} weight need k % {per} == 0 and "
                f"{n * k // per * size} bytes, got k={k} and {np.asarray(raw).size} bytes"
            )
        blocks = np.asarray(raw, dtype=np.uint8).reshape(n, k // per, size)  # (n c|s bytes)
        q, scale, minimum = _UNPACK[kind](blocks)  # q (n c g), scale/minimum (n c)
        if layout == "q4_1":
            data = q[..., : GROUP // 2] | (q[..., GROUP // 2 :] << 4)  # (n c 16), Q4_1's order
        else:
            data = q.view(np.int8)
        return cls(
            layout,
            np.ascontiguousarray(data.transpose(1, 2, 0)),  # (c t n)
            np.ascontiguousarray(scale.T),  # (c n)
            None if minimum is None else np.ascontiguousarray(minimum.T),
        )

    def rows(self, index: Sequence[int] | np.ndarray | Tensor) -> BlockWeight:
        """The weight's rows (output features) `index`, in that order (a copy)."""
        idx = np.asarray(index, dtype=np.int64)
        take = lambda a: None if a is None else np.ascontiguousarray(a[..., idx])  # noqa: E731
        return BlockWeight(self.kind, take(self.data), take(self.scale), take(self.minimum))

    @staticmethod
    def cat(parts: Sequence[BlockWeight]) -> BlockWeight:
        """Row-wise concatenation (the fused Q|K|V matrix); parts must share kind and k."""
        kinds, ks = {p.kind for p in parts}, {p.shape[1] for p in parts}
        if len(kinds) != 1 or len(ks) != 1:
            raise ValueError(f"cannot concatenate blocks of kinds {kinds} and widths {ks}")
        minimum = (
            None if parts[0].minimum is None else np.concatenate([p.minimum for p in parts], -1)
        )
        return BlockWeight(
            parts[0].kind,
            np.concatenate([p.data for p in parts], -1),
            np.concatenate([p.scale for p in parts], -1),
            minimum,
        )

    def dequantize(self) -> Tensor:
        """The (n, k) float32 weight, `scale·q (+ minimum)` in float32: what the `gguf` library's
        dequantisation of the blocks gives, bit for bit."""
        n, k = self.shape
        if self.kind == "q4_1":
            q = np.concatenate((self.data & 15, self.data >> 4), axis=1)  # (c 32 n)
        else:
            q = self.data
        w = self.scale[:, None, :] * q.astype(np.float32)  # (c t n)
        if self.minimum is not None:
            w = w + self.minimum[:, None, :]
        return torch.from_numpy(np.ascontiguousarray(w.reshape(k, n).T))

    def matmul(self, x: Tensor) -> Tensor:
        """x (r, k) float32 CPU → x @ Wᵀ (r, n), from the blocks (no dense weight is formed)."""
        n, k = self.shape
        if x.dim() != 2 or x.shape[1] != k or x.dtype != torch.float32 or x.device.type != "cpu":
            raise ValueError(
                f"x must be a (rows, {k}) float32 CPU tensor, got {tuple(x.shape)} {x.dtype} on {x.device}"
            )
        xs = x.detach().contiguous().numpy()
        y = np.empty((x.shape[0], n), np.float32)
        kernel = KERNELS[self.kind]
        if self.minimum is None:
            kernel(xs, self.data, self.scale, y)
        else:
            kernel(xs, self.data, self.scale, self.minimum, y)
        return torch.from_numpy(y)


def _f16(b: np.ndarray) -> np.ndarray:
    """(… 2) uint8 → (…) float32: the little-endian fp16 the byte pairs hold."""
    return np.ascontiguousarray(b).view("<f2")[..., 0].astype(np.float32)


# ggml's block layouts (llama.cpp ggml-common.h) → q (n c g), scale (n c), minimum (n c) | None,
# with w[n, gc + t] = scale·q (+ minimum) equal to gguf's dequantisation


def _q4_1(blocks: np.ndarray) -> tuple:  # (n c 20): d, m, byte t = q[t] | q[16 + t] << 4
    qs = blocks[..., 4:]  # (n c 16)
    q = np.concatenate((qs & 15, qs >> 4), axis=-1)  # (n c 32)
    return q, _f16(blocks[..., 0:2]), _f16(blocks[..., 2:4])


def _q8_0(blocks: np.ndarray) -> tuple:  # (n c 34): d, 32 int8
    return blocks[..., 2:].view(np.int8), _f16(blocks[..., 0:2]), None


def _q5_0(blocks: np.ndarray) -> tuple:  # (n c 22): d, bit t of 4 bytes = bit 4 of q[t], as Q4_1
    high = np.unpackbits(blocks[..., 2:6], axis=-1, bitorder="little")  # (n c 32)
    qs = blocks[..., 6:]  # (n c 16)
    q = np.concatenate((qs & 15, qs >> 4), axis=-1) | (high << 4)  # (n c 32), 0..31
    return q.view(np.int8) - np.int8(16), _f16(blocks[..., 0:2]), None


def _q4_k(blocks: np.ndarray) -> tuple:  # (n s 144): d, dmin, 12 bytes of (sc, m), 128 of q
    n, s, _ = blocks.shape
    d, dmin = _f16(blocks[..., 0:2]), _f16(blocks[..., 2:4])  # (n s)
    b = blocks[..., 4:16]  # 6-bit sc, m of sub-block j (llama.cpp's get_scale_min_k4):
    lo, mid, hi = b[..., 0:4], b[..., 4:8], b[..., 8:12]  # j < 4: low 6 bits of lo, mid
    sc = np.concatenate((lo & 63, (hi & 15) | (lo >> 6 << 4)), axis=-1)  # (n s 8)
    m = np.concatenate((mid & 63, (hi >> 4) | (mid >> 6 << 4)), axis=-1)  # (n s 8)
    qs = blocks[..., 16:].reshape(n, s, 4, 1, 32)  # 32 bytes: sub-block 2j low, 2j + 1 high
    q = np.concatenate((qs & 15, qs >> 4), axis=3).reshape(n, s * 8, 32)  # (n c 32)
    scale = d[..., None] * sc.astype(np.float32)  # (n s 8), exact: 11 × 6 bits
    minimum = -(dmin[..., None] * m.astype(np.float32))  # exact likewise
    return q, scale.reshape(n, s * 8), minimum.reshape(n, s * 8)


_SHIFT_2 = np.array([0, 2, 4, 6], np.uint8)[:, None]  # (4 1)


def _q6_k(blocks: np.ndarray) -> tuple:  # (n s 210): 128 bytes low 4 bits, 64 high 2, 16 sc, d
    n, s, _ = blocks.shape
    ql = blocks[..., :128].reshape(n, s, 2, 2, 32)  # (n s half l//32 l%32)
    qh = blocks[..., 128:192].reshape(n, s, 2, 1, 32)
    low = np.concatenate((ql & 15, ql >> 4), axis=3)  # (n s 2 4 32): quarter j of each half
    high = (qh >> _SHIFT_2) & 3  # (n s 2 4 32): bits 2j, 2j + 1
    q = (low | high << 4).view(np.int8) - np.int8(32)  # −32..31
    sc = blocks[..., 192:208].view(np.int8).astype(np.float32)  # (n s 16)
    scale = _f16(blocks[..., 208:210])[..., None] * sc  # exact: 11 × 8 bits
    return q.reshape(n, s * 16, 16), scale.reshape(n, s * 16), None


_UNPACK = {"q4_1": _q4_1, "q8_0": _q8_0, "q5_0": _q5_0, "q4_k": _q4_k, "q6_k": _q6_k}


class Mirror:
    """Blocks that equal the weight `owners` make up, valid while every owner keeps its storage
    and its autograd version (no in-place edit since). Owners are the parameters themselves
    (W_Q, W_K, W_V for a fused Q|K|V matrix).

    `blocks` may be a function that makes them (a row gather, a concatenation): it runs on the
    first use, so a process that never decodes (prefill, the lens) never reads or copies the
    blocks — they stay on disk behind the cache's memory map instead of in its resident set."""

    def __init__(self, blocks: BlockWeight | Callable[[], BlockWeight], *owners: Tensor) -> None:
        if not owners:
            raise ValueError("a Mirror needs the parameter(s) its blocks equal")
        self._blocks, self.owners = blocks, owners
        self._key = _key(owners)

    @property
    def blocks(self) -> BlockWeight:
        if not isinstance(self._blocks, BlockWeight):
            self._blocks = self._blocks()
        return self._blocks

    def valid(self) -> bool:
        return self._key is not None and _key(self.owners) == self._key

    def __repr__(self) -> str:
        if not isinstance(self._blocks, BlockWeight):
            return f"Mirror(not yet made, valid={self.valid()})"
        n, k = self.blocks.shape
        return f"Mirror({self.blocks.kind}, ({n}, {k}), valid={self.valid()})"


def _key(owners: Sequence[Tensor]) -> tuple | None:
    try:
        return tuple((p.data_ptr(), p._version, p.dtype, p.device) for p in owners)
    except RuntimeError:  # inference tensors keep no version counter: never trust a mirror of one
        return None


def linear(
    x: Tensor, weight: Tensor, bias: Tensor | None = None, mirror: Mirror | None = None
) -> Tensor:
    """`F.linear(x, weight, bias)`; x (… k), weight (n, k) → (… n). With a valid `mirror` of
    `weight`, a float32 CPU x of at most MAX_ROWS rows (1 when PyTorch has more than one thread)
    and no autograd, it multiplies by the
    mirror's blocks instead (same weights; float32 sums in another order)."""
    if mirror is None or not _usable(x, weight, bias, mirror):
        return _dense(x, weight, bias)
    y = mirror.blocks.matmul(x.reshape(-1, x.shape[-1]))  # (r n)
    if bias is not None:
        y += bias
    return y.view(*x.shape[:-1], y.shape[-1])


def _dense(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """F.linear; a large float32 CPU output without autograd goes into pre-mapped pages."""
    fits = x.dim() > 1 and weight.dim() == 2 and x.shape[-1] == weight.shape[1] and bias is None
    if not fits or x.numel() // max(x.shape[-1], 1) * weight.shape[0] * 4 < fused.POPULATE_BYTES:
        return F.linear(x, weight, bias)  # (and every error message F.linear gives)
    if not (fused.eligible(x, weight) and x.is_contiguous()):
        return F.linear(x, weight, bias)
    out = fused.empty_populated(*x.shape[:-1], weight.shape[0])
    torch.mm(x.view(-1, x.shape[-1]), weight.t(), out=out.view(-1, weight.shape[0]))
    return out


def _usable(x: Tensor, weight: Tensor, bias: Tensor | None, mirror: Mirror) -> bool:
    if torch.compiler.is_compiling():  # a traced graph keeps F.linear
        return False
    if not _ENABLED.get() or x.device.type != "cpu" or x.dtype != torch.float32:
        return False
    rows = MAX_ROWS if torch.get_num_threads() == 1 else 1
    if x.dim() == 0 or x.numel() > rows * x.shape[-1] or x.numel() == 0:
        return False
    if torch.is_grad_enabled() and (
        x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
    ):
        return False
    if bias is not None and (bias.dtype != torch.float32 or bias.device.type != "cpu"):
        return False
    return tuple(weight.shape) == mirror.blocks.shape and mirror.valid()


@contextlib.contextmanager
def dense() -> Iterator[None]:
    """Within the block, `linear` always multiplies by the dense parameters (F.linear): the
    reference the blocks are tested against, and the way to time the float32 path."""
    token = _ENABLED.set(False)
    try:
        yield
    finally:
        _ENABLED.reset(token)


# ---------------------------------------------------------------------------------------------
# kernels (numba, compiled on first use and cached on disk, see _jit)


def _build(flags: dict) -> dict[str, tuple]:
    import numba
    from numba import njit

    jit = njit(**flags)

    f32 = np.float32  # every constant typed: no float64 detour
    eight, sixteen, sixteenth = f32(8), f32(16), f32(1 / 16)

    @jit
    def q4_1(x, data, scale, minimum, y):  # x (r k), data (c 16 n) u8, scale/minimum (c n), y (r n)
        R = x.shape[0]
        C, _, N = data.shape
        dot = np.empty((R, N), np.float32)
        sx = np.empty(R, np.float32)
        y[:] = 0
        for c in range(C):  # each block row is read once, for every row of x
            o = c * GROUP
            dot[:] = 0
            for r in range(R):
                acc = f32(0)
                for t in range(GROUP):
                    acc += x[r, o + t]
                sx[r] = acc
            for t in range(GROUP // 2):
                row = data[c, t]
                for r in range(R):
                    lo, hi, d = x[r, o + t], x[r, o + GROUP // 2 + t], dot[r]
                    for i in range(N):  # nibbles split in float32 lanes (no int64 detour)
                        v = f32(row[i])
                        h = np.floor(v * sixteenth)  # q[32c + 16 + t]
                        # centred (q − 8): the two sums below cancel less
                        d[i] += (v - sixteen * h - eight) * lo + (h - eight) * hi
            sc, mn = scale[c], minimum[c]
            for r in range(R):
                for i in range(N):  # w = scale·(q − 8) + (minimum + 8·scale)
                    y[r, i] += sc[i] * dot[r, i] + (mn[i] + eight * sc[i]) * sx[r]

    @jit
    def q8(x, data, scale, y):  # x (r k), data (c g n) i8, scale (c n), y (r n)
        R = x.shape[0]
        C, G, N = data.shape
        dot = np.empty((R, N), np.float32)
        y[:] = 0
        for c in range(C):
            o = c * G
            dot[:] = 0
            for t in range(G):
                row = data[c, t]
                for r in range(R):
                    xt, d = x[r, o + t], dot[r]
                    for i in range(N):
                        d[i] += f32(row[i]) * xt
            sc = scale[c]
            for r in range(R):
                for i in range(N):
                    y[r, i] += sc[i] * dot[r, i]

    f32_2d = numba.float32[:, ::1]
    return {
        "q4_1": (q4_1, (f32_2d, numba.uint8[:, :, ::1], f32_2d, f32_2d, f32_2d)),
        "q8_0": (q8, (f32_2d, numba.int8[:, :, ::1], f32_2d, f32_2d)),
        "q8_16": (q8, (f32_2d, numba.int8[:, :, ::1], f32_2d, f32_2d)),  # (the same kernel)
    }


KERNELS = Kernels(_build, wide=wide_vectors_pay)
