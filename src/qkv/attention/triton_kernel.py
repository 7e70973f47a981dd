"""The triton backend: a FlashAttention-2-style forward kernel for CUDA. `auto` takes it on CUDA
where it would take `tiled` (with a gradient for D ≤ 128; `api.choose_backend`), and runs it
as `repair` after SDPA on masked requests without a gradient, in place of a host-side K/V check.

One program per (query block, b·h): it loads its Q block (i d) once, visits only the key
blocks the band (causal/window) can keep, and keeps an online softmax in base 2 (scores ×
scale·log2(e), `exp2`; without score mods that factor is applied inside the row max and the
exponent's FMA, `FOLD`) with fp32 running max `m`, sum `l` and accumulator `acc` (i e). Key
blocks come in three runs: the band's left edge and right edge (masked with `tl.where`, as is
the sequence tail) and the interior between them (no mask work at all). The run bounds are
`key_block_range`, mirrored exactly by the kernel's `_block_range` (a debug counter checks it).
Query blocks launch last first, so under a causal band the heaviest run in the first waves.
Score mods (`MODS`, `mod_args`): `softcap=` and the ready `qkv.softcap(c)` and
`qkv.alibi(slopes)` are evaluated on each fp32 score tile (`_score_mods`; tanh by `_tanh`),
the scores then turned to base 2; any other score_mod is refused (`unsupported`: tiled).
Launch sizes: `default_config`, measured on an H200 (benchmarks/triton_tune.py). On sm_90+,
`Config(tma=True)` reads K and V blocks by the TMA unit through host tensor descriptors
(`tma_ready`); opt-in until timed.

Exactly what `qkv.attention` means: scale, bottom-right alignment (query row i at position
i + δ, δ = Sk − Sq), window (left, right) inclusive, GQA by indexing kv head h // (Hq // Hk)
(no K/V copies), an empty row → out 0 and LSE −inf, NaN/inf in masked-out K or V never reaches
the output. A second launch (`repair` mode, `repair_config`) reads each output tile and redoes
only rows holding NaN/inf with the cleaning visits, which zero bad keys and values and mark NaN
where a kept one is (no host sync; any leak is a NaN in the row). The backward keeps them out of
the gradients on its own (`triton_backward`).
fp16/bf16/fp32 in; scores q·k are accumulated in fp32 by `tl.dot` and never rounded to the
input dtype, and softmax, `m`, `l` and `acc` stay fp32 (P is rounded to v's dtype before P·V, as
FlashAttention does); LSE fp32 natural log (under the interpreter, whose
`tl.dot` mistakes bf16 for integers, bf16 operands are widened to fp32 first: same products;
and its fp32 → bf16 cast truncates, so `_round` rounds to nearest even first, as a GPU does).
Head dims D = Dv ≤ 256, padded to a power of two ≥ 16 inside. fp32 dots use IEEE precision
(no TF32), as the error budget demands.

The backward is `triton_backward` (FlashAttention-2's dK/dV and dQ passes from the saved
LSE, fp32 scores and dP); where Triton cannot build it, `tiled.backward` (`_backward`).

Importing this module imports Triton and decides, once, whether kernels run compiled (CUDA)
or in Triton's CPU interpreter (`TRITON_INTERPRET=1` set before the import): under the
interpreter, CPU tensors are accepted so the kernel can be tested without a GPU.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import tiled
from .builds import BuildFailures, head_dim_class
from .mods import fused_score_mod
from .reference import double_backward_vjp
from .spec import Spec

try:  # host-side TMA descriptors (Triton ≥ 3.4)
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - older Triton: `Config.tma` falls back to pointers
    TensorDescriptor = None

LOG2E = math.log2(math.e)
LN2 = math.log(2.0)
MAX_D = 256
# Reductions as `tl.reduce` with Triton's own combine functions, and `tl.full` for zeros:
# builtins only. `tl.max`/`tl.sum`/`tl.zeros` are themselves jit functions, built compiled if
# `triton.language` was imported (e.g. by torch) before TRITON_INTERPRET=1 was set, and then the
# interpreter cannot call them; it recognises these combine functions and reduces with numpy.
_MAX = tl.standard._elementwise_max
_SUM = tl.standard._sum_combine


@dataclass(frozen=True)
class Config:
    """Launch parameters (to be tuned on a GPU): block sizes are powers of two ≥ 16."""

    block_m: int = 64
    block_n: int = 64
    num_warps: int = 4
    num_stages: int = 2
    # K and V blocks by the TMA unit (Hopper's tensor memory accelerator, sm_90+) through
    # host-built tensor descriptors, instead of per-thread pointer loads; only where
    # `tma_ready` holds (else the pointer loads). The forward only; not yet timed.
    tma: bool = False
    # registers per thread ptxas may use (None: its choice); the forward only. 128 keeps four
    # 4-warp programs per SM at D ≤ 64 bf16 (126 registers in the launch timed on the H200,
    # 132 causal and 174 windowed since the scale fold and `_band`) with no spills on sm_90,
    # but spills 28–52 B on sm_80: for benchmarks/triton_tune.py to time, not a default
    maxnreg: int | None = None


def cdiv(a: int, b: int) -> int:
    """⌈a / b⌉ for launch grids, in plain Python: `triton.cdiv` is a constexpr function whose
    call costs microseconds of host time per launch (Triton 3.9)."""
    return -(-a // b)


def default_config(spec: Spec, dtype: torch.dtype) -> Config:
    """The forward's launch. fp16/bf16: 64 × 64 blocks, 4 warps, and a third pipeline stage
    with 64 < D ≤ 128. Measured on an H200 in bf16 by benchmarks/triton_tune.py (RESULTS.md):
    of eight configs this one was fastest or within 5 % on each of issue 15's cases; the third
    stage took D = 128 causal from 0.60–0.63× SDPA to 0.67–0.74× (and the D = 128 window of 256
    from 0.377 to 0.394 ms), and would have cost D = 64 0.3 %.

    fp32: 32 × 64 blocks (32 × 32 past D = 128), 8 warps. Its IEEE dots are FMA loops that hold
    their tiles in registers: at 64 × 64, 4 warps ptxas for sm_90 spilled 2.5 KB per thread at
    D = 64, 53 KB at D = 128 and 142 KB at D = 256 (a 50 s build, and 213 KB of shared memory,
    past an A100's 163 KB); these spill nothing at D = 16 to 256 and build in seconds
    (`benchmarks/triton_build.py`). Chosen by the compiler's report: not yet timed."""
    if dtype == torch.float32:
        return _FP32_FORWARD if spec.D <= 128 else _FP32_FORWARD_WIDE
    if 64 < spec.D <= 128:
        return _HALF_FORWARD_128
    return _DEFAULT


_DEFAULT = Config()
_HALF_FORWARD_128 = Config(num_stages=3)
_FP32_FORWARD, _FP32_FORWARD_WIDE = Config(32, 64, 8, 2), Config(32, 32, 8, 2)


def repair_config(dtype: torch.dtype) -> Config:
    """The launch of the cleaning forward when it only repairs (`repair`, and the gated redo in
    `sdpa_checked`): small tiles and no pipelining, to keep its loop nest (with its fp32 `hit`
    dot) well inside shared memory for every dtype and D ≤ 256 (a review compiled a 64 × 64,
    2-stage kernel with two loop nests for sm_90: 360 KB at fp32 D = 256, past an H200's
    227 KB). It reads each output tile once and recomputes only where NaN/inf came back, so
    on clean inputs its cost is that read: 32 × 32, 4 warps for fp16/bf16. fp32: 16 × 16,
    8 warps; at 32 × 32, 4 warps ptxas for sm_90 spilled 6.4 KB per thread at D = 128 and
    82 KB at D = 256, against none and 1 KB (`benchmarks/triton_build.py`; not yet timed)."""
    return _FP32_REPAIR if dtype == torch.float32 else _HALF_REPAIR


_FP32_REPAIR, _HALF_REPAIR = Config(16, 16, 8, 1), Config(32, 32, 4, 1)


def tma_ready(*tensors: Tensor) -> bool:
    """Whether `Config.tma` can read these (b h j d) tensors through TMA descriptors: Triton
    has them, the GPU is sm_90 or newer (CPU tensors: the interpreter or a build for one),
    the head dim is contiguous, and the base and every other stride are positive multiples
    of 16 bytes, as the TMA unit requires. Else the kernel loads through pointers."""
    if TensorDescriptor is None:
        return False
    for t in tensors:
        if t.is_cuda and _capability(t.device.index) < 9:
            return False
        size = t.element_size()
        if t.stride(-1) != 1 or t.data_ptr() % 16:
            return False
        if any(st <= 0 or st * size % 16 for st in t.stride()[:-1]):
            return False
    return True


@functools.cache
def _capability(index: int | None) -> int:
    """The major compute capability of CUDA device `index` (None: the current one)."""
    return torch.cuda.get_device_capability(index)[0]


def unsupported(q: Tensor, spec: Spec) -> str | None:
    """Why the triton backend cannot compute this request exactly, or None if it can."""
    if spec.mask is not None or spec.mask_mod is not None:
        return "masks (mask=, mask_mod=) are not supported; use backend='tiled' or 'sdpa'"
    if spec.score_mod is not None and fused_score_mod(spec, q.device) is None:
        return (
            "a score_mod other than qkv.softcap(c) and qkv.alibi(slopes) is not supported; "
            "use backend='tiled'"
        )
    if spec.dropout_p > 0:
        return "dropout is not supported; use backend='tiled' or 'sdpa'"
    if spec.D != spec.Dv:
        return f"needs D == Dv, got D={spec.D}, Dv={spec.Dv}; use backend='tiled'"
    if not 1 <= spec.D <= MAX_D:
        return f"needs 1 ≤ D ≤ {MAX_D}, got D={spec.D}; use backend='tiled'"
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"needs float16/bfloat16/float32 inputs, got {q.dtype}; use backend='tiled'"
    if q.device.type != "cuda" and not (INTERPRETED and q.device.type == "cpu"):
        return (
            f"runs on CUDA tensors only, got device {q.device}; use backend='tiled' "
            "(or set TRITON_INTERPRET=1 before importing triton to interpret on CPU)"
        )
    return None


def key_block_range(
    qs: int, qe: int, Sk: int, delta: int, left: int | None, right: int | None, block_n: int
) -> tuple[int, int, int, int]:
    """Key blocks (of `block_n` keys) for query rows qs..qe−1: (lo, mid_lo, mid_hi, hi).

    [lo, hi) are the blocks holding any key of `scoring.band_range` for those rows (all others
    are skipped); [mid_lo, mid_hi) ⊆ [lo, hi) are the interior blocks where every (i, j) is kept
    and inside Sk, which need no mask. The kernel's `_block_range` computes the same integers.
    """
    start = 0 if left is None else max(0, qs + delta - left)
    stop = Sk if right is None else min(Sk, qe - 1 + delta + right + 1)
    stop = max(start, stop)
    lo, hi = start // block_n, (stop + block_n - 1) // block_n
    # interior: block b (keys b·n … b·n+n−1) kept by every row: b·n ≥ qe−1+δ−left and
    # b·n+n−1 ≤ qs+δ+right, and b·n+n ≤ Sk
    first = 0 if left is None else max(0, qe - 1 + delta - left)
    last = Sk if right is None else max(0, min(Sk, qs + delta + right + 1))
    mid_lo = min(hi, max(lo, (first + block_n - 1) // block_n))
    mid_hi = max(mid_lo, min(hi, last // block_n))
    return lo, mid_lo, mid_hi, hi


@triton.jit
def _block_range(qs, qe, Sk, delta, left, right, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
                 BLOCK_N: tl.constexpr):  # fmt: skip
    """`key_block_range`, in the kernel (all operands ≥ 0 before each division)."""
    start = 0
    first = 0
    if HAS_LEFT:
        start = tl.maximum(0, qs + delta - left)
        first = tl.maximum(0, qe - 1 + delta - left)
    stop = Sk
    last = Sk
    if HAS_RIGHT:
        stop = tl.minimum(Sk, qe - 1 + delta + right + 1)
        last = tl.maximum(0, tl.minimum(Sk, qs + delta + right + 1))
    stop = tl.maximum(start, stop)
    lo = start // BLOCK_N
    hi = (stop + BLOCK_N - 1) // BLOCK_N
    mid_lo = tl.minimum(hi, tl.maximum(lo, (first + BLOCK_N - 1) // BLOCK_N))
    mid_hi = tl.maximum(mid_lo, tl.minimum(hi, last // BLOCK_N))
    return lo, mid_lo, mid_hi, hi


@triton.jit
def _query_block(pid_m, Hq, G, Sq, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """Program (pid_m, b·h)'s query block: (b·h, b, h, the kv head h // G it reads, its rows
    [qs, qe), offs_m (i), offs_d (d))."""
    pid_bh = tl.program_id(1)
    h = pid_bh % Hq
    qs = pid_m * BLOCK_M
    qe = tl.minimum(qs + BLOCK_M, Sq)
    return (
        pid_bh,
        pid_bh // Hq,
        h,
        h // G,
        qs,
        qe,
        qs + tl.arange(0, BLOCK_M),
        tl.arange(0, BLOCK_D),
    )


@triton.jit
def _nonfinite(x):
    """True where x is NaN or ±inf, compared in fp32 (the interpreter's bf16 != is on bits)."""
    xf = x.to(tl.float32)
    return (xf != xf) | (tl.abs(xf) == float("inf"))


@triton.jit
def _round(x, dtype: tl.constexpr, RTNE_BF16: tl.constexpr):
    """fp32 x → `dtype`, to nearest even. RTNE_BF16 (Triton's CPU interpreter with bf16): its
    fp32 → bf16 cast truncates, unlike compiled kernels, so the rounding is done here on the
    bits first (+0x7FFF and the kept bit's parity, low half cleared); the cast is then exact.
    A negative NaN with all payload bits set would wrap to 0: the kernel makes none."""
    if RTNE_BF16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def _as_operand(x, like, DOT_F32: tl.constexpr):
    """fp32 x rounded to `like`'s dtype, as a dot operand beside it (FlashAttention rounds P
    and dS so). Under DOT_F32 (the interpreter's bf16, operands widened to fp32): rounded to
    bf16 to nearest even and widened back, the products a compiled kernel's bf16 dot forms."""
    if DOT_F32:
        return _round(x, tl.bfloat16, True).to(tl.float32)
    return x.to(like.dtype)


# the score mods the kernels evaluate (`mods.fused_score_mod`), as bits of their MODS constexpr
MOD_CAP1, MOD_CAP2, MOD_ALIBI = 1, 2, 4


def mod_args(spec: Spec, placeholder: Tensor) -> tuple[int, float, tuple]:
    """(MODS bits, qk_scale, (cap1, cap2, SLOPES, ssb)): what every kernel takes for the score
    mods. qk_scale is the natural scale with mods (`_score_mods` turn the scores to base 2),
    else scale·log2 e; cap1 is `softcap=`'s cap or 0, cap2 the softcap(c) score mod's c or 0,
    SLOPES the alibi(slopes) score mod's slopes (1|B, Hq) fp32 on `placeholder`'s device (or
    `placeholder`, never read, without ALiBi) and ssb their batch stride. `unsupported` has
    refused any other score mod."""
    params = fused_score_mod(spec, placeholder.device)
    assert params is not None, "unsupported() refuses this score_mod"
    cap2, slopes = params
    cap1 = spec.softcap or 0.0
    bits = (MOD_CAP1 if cap1 else 0) | (MOD_CAP2 if cap2 else 0)
    bits |= MOD_ALIBI if slopes is not None else 0
    ssb = 0 if slopes is None or len(slopes) == 1 else spec.Hq
    slopes = placeholder if slopes is None else slopes
    return bits, spec.scale if bits else spec.scale * LOG2E, (cap1, cap2, slopes, ssb)


@triton.jit
def _tanh(x):
    """tanh in fp32 (libdevice's does not run under the interpreter): an odd Taylor polynomial
    where |x| < 1/4 (truncation < 3e-9), else sign(x)·(1 − e)/(1 + e) with e = exp(−2|x|),
    free of cancellation there (1 − e ≥ 0.39). NaN stays NaN, ±inf gives ±1."""
    a = tl.abs(x)
    e = tl.exp2(a * -2.8853900817779268)  # exp(−2|x|)
    big = (1.0 - e) / (1.0 + e)
    x2 = x * x
    small = x * (1.0 + x2 * (-1.0 / 3 + x2 * (2.0 / 15 + x2 * (-17.0 / 315 + x2 * (62.0 / 2835)))))
    return tl.where(a < 0.25, small, tl.where(x < 0, -big, big))


@triton.jit
def _score_mods(s, pos, cols, cap1, cap2, slope, MODS: tl.constexpr):
    """Natural scores s (scale·q·k, fp32) → cap1·tanh(s/cap1) (`softcap=`) → the score mod:
    cap2·tanh(s/cap2) (`softcap(c)`) or s − slope·|pos − j| (`alibi`), as `scoring.modify`.
    `pos` (absolute query positions i + δ) and `cols` (key indices j) are broadcast to s's
    tile. Returns (scores, ∂scores/∂s): the factor dS is multiplied by (1.0 without a cap).
    MODS bits 1, 2, 4 are MOD_CAP1, MOD_CAP2, MOD_ALIBI (a jit function reads no plain global).
    s/cap is s·(1/cap), the reciprocal once per program: a division per score fewer."""
    grad = 1.0
    if MODS & 1:
        t = _tanh(s * (1.0 / cap1))
        s = cap1 * t
        grad = 1.0 - t * t
    if MODS & 2:
        t = _tanh(s * (1.0 / cap2))
        s = cap2 * t
        grad = grad * (1.0 - t * t)
    if MODS & 4:
        s = s - slope * tl.abs(pos - cols).to(tl.float32)
    return s, grad


@triton.jit
def _slope(SLOPES, b, h, ssb, MODS: tl.constexpr):
    """Head h's ALiBi slope in batch row b (SLOPES (1|B, Hq) fp32, batch stride ssb), or 0."""
    if MODS & 4:
        return tl.load(SLOPES + b * ssb + h)
    return 0.0


@triton.jit
def _band(offs_m, offs_n, rows_ok, Sk, delta, left, right, HAS_LEFT: tl.constexpr,
          HAS_RIGHT: tl.constexpr, RANGE: tl.constexpr = True):  # fmt: skip
    """(i j) True where query row i (`rows_ok`, at position i + δ) keeps key j: j < Sk and
    inside the band. The bounds are folded per row first (first = max(0, i + δ − left),
    last = min(i + δ + right, Sk − 1); nothing for a row not ok), so that each score takes
    one comparison: j ≤ last, or with a left bound 0 ≤ j − first ≤ last − first as one
    unsigned comparison (j − first < 0 wraps past any width), not three tests and two
    selects. An empty row's first is 2³⁰ (past any key) and its width 0. RANGE False: two
    comparisons for a left bound instead (the dK/dV pass: with the range form ptxas for sm_90
    gave its masked loop more instructions and spills, 950 against 916 and 92 B against 40 at
    bf16 D = 128; the forward's and dQ's loops were shorter with it, 535 and 500 against 567
    and 527; benchmarks/triton_sass.py)."""
    last = tl.where(rows_ok, Sk - 1, -1)  # (i)
    if HAS_RIGHT:
        last = tl.minimum(last, offs_m + delta + right)
    if not HAS_LEFT:
        return offs_n[None, :] <= last[:, None]
    if not RANGE:
        return (offs_n[None, :] <= last[:, None]) & (
            offs_n[None, :] >= (offs_m + delta - left)[:, None]
        )
    first = tl.maximum(0, offs_m + delta - left)  # (i)
    empty = last < first
    first = tl.where(empty, 1 << 30, first)
    width = tl.where(empty, 0, last - first).to(tl.uint32, bitcast=True)
    return (offs_n[None, :] - first[:, None]).to(tl.uint32, bitcast=True) <= width[:, None]


@triton.jit
def _block(DESC, b, h, j0, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Rows j0 … j0+BLOCK_N−1 of head (b, h) of a (b h j d) tensor descriptor, as
    (BLOCK_N, BLOCK_D); zeros past its sequence and head dim."""
    return DESC.load([b, h, j0, 0]).reshape(BLOCK_N, BLOCK_D)


@triton.jit
def _visit(acc, m_i, l_i, hit, visits, q, k_base, v_base, skn, skd, svn, svd, K_DESC, V_DESC,
           b, hk, offs_m, offs_d, blk_lo, blk_hi, Sk, D, delta, left, right, qk_scale, cap1,
           cap2, slope, MASKED: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
           CLEAN: tl.constexpr, EVEN_D: tl.constexpr, DOT_PREC: tl.constexpr,
           DOT_F32: tl.constexpr, MODS: tl.constexpr, FOLD: tl.constexpr,
           TMA: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):  # fmt: skip
    """Online softmax over key blocks [blk_lo, blk_hi): scores (i j) in base 2 (with MODS,
    `qk_scale` is the natural scale and `_score_mods` come first), masked by the band and the
    sequence tail only when MASKED; returns the updated (acc, m, l, hit, visits).
    FOLD (no MODS, qk_scale > 0): the tile stays q·k and qk_scale is applied inside the row
    max (max(c·s) = c·max(s) for c > 0, the same rounded value) and the exponent, where
    c·s − m is one FMA: a multiply per score fewer, as FlashAttention's Triton tutorial does.
    TMA: K and V blocks come through the descriptors K_DESC, V_DESC (b hk j d) at
    batch row b, kv head hk, which read zeros past Sk and D (no load masks)."""
    d_ok = offs_d < D
    fold = 1.0
    if FOLD:
        fold = qk_scale
    for blk in range(blk_lo, blk_hi):
        offs_n = blk * BLOCK_N + tl.arange(0, BLOCK_N)
        kv_ok = offs_n < Sk
        kt_ptrs = k_base + offs_n[None, :] * skn + offs_d[:, None] * skd  # (d j)
        v_ptrs = v_base + offs_n[:, None] * svn + offs_d[None, :] * svd  # (j e)
        if TMA:
            kt = tl.trans(_block(K_DESC, b, hk, blk * BLOCK_N, BLOCK_N, BLOCK_D))  # (d j)
        elif MASKED:
            kt = tl.load(kt_ptrs, mask=d_ok[:, None] & kv_ok[None, :], other=0.0)
        elif EVEN_D:
            kt = tl.load(kt_ptrs)
        else:
            kt = tl.load(kt_ptrs, mask=d_ok[:, None], other=0.0)
        if CLEAN:  # a non-finite key: NaN for the rows that keep it, nothing for the others
            kbad = tl.reduce(_nonfinite(kt).to(tl.int32), 0, _MAX)  # (j)
            kt = tl.where(kbad[None, :] > 0, 0.0, kt)
        if DOT_F32:
            kt = kt.to(tl.float32)
        s = tl.dot(q, kt, input_precision=DOT_PREC)  # (i j) q·k
        if MODS:
            s, _grad = _score_mods(s * qk_scale, offs_m[:, None] + delta, offs_n[None, :],
                                   cap1, cap2, slope, MODS)  # fmt: skip
            s = s * 1.4426950408889634  # log2(e): base-2 logits
        elif not FOLD:
            s = s * qk_scale  # base-2 logits
        if CLEAN:
            s = tl.where(kbad[None, :] > 0, float("nan"), s)
        if MASKED:
            keep = _band(offs_m, offs_n, offs_m >= 0, Sk, delta, left, right, HAS_LEFT,
                         HAS_RIGHT)  # fmt: skip
            s = tl.where(keep, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.reduce(s, 1, _MAX) * fold)
        m_safe = m_new  # interior: every score is kept, so m is −inf only for a −inf key (NaN)
        if MASKED:
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # an empty row keeps −inf
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s * fold - m_safe[:, None])  # one FMA with FOLD
        l_i = l_i * alpha + tl.reduce(p, 1, _SUM)
        acc = acc * alpha[:, None]
        if TMA:
            v = _block(V_DESC, b, hk, blk * BLOCK_N, BLOCK_N, BLOCK_D)  # (j e)
        elif MASKED:
            v = tl.load(v_ptrs, mask=kv_ok[:, None] & d_ok[None, :], other=0.0)
        elif EVEN_D:
            v = tl.load(v_ptrs)
        else:
            v = tl.load(v_ptrs, mask=d_ok[None, :], other=0.0)
        if CLEAN:  # 0·NaN = NaN: zero non-finite values, remember where kept ones were hit
            # (j e) 1.0 where non-finite (tl.where, not a cast of bools: the interpreter's
            # bool → float cast fails on bf16 tiles)
            bad = tl.where(_nonfinite(v), 1.0, 0.0)
            v = tl.where(bad > 0, 0.0, v)
            if MASKED:
                hit = tl.dot(tl.where(keep, 1.0, 0.0), bad, hit, input_precision="ieee")
            else:
                hit = hit + tl.reduce(bad, 0, _SUM)[None, :]
        p = _round(p, v.dtype, DOT_F32)  # (i j) rounded like v, as FlashAttention does
        if DOT_F32:
            p = p.to(tl.float32)
            v = v.to(tl.float32)
        acc = tl.dot(p, v, acc, input_precision=DOT_PREC)
        m_i = m_new
        visits += 1
    return acc, m_i, l_i, hit, visits


@triton.jit
def _attend(q, k_base, v_base, skn, skd, svn, svd, K_DESC, V_DESC, b, hk, offs_m, offs_d, h,
            SINKS, Sk, D, delta, left, right, qk_scale, cap1, cap2, slope, lo, mid_lo, mid_hi,
            hi, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, CLEAN: tl.constexpr,
            HAS_SINKS: tl.constexpr, EVEN_D: tl.constexpr, DOT_PREC: tl.constexpr,
            DOT_F32: tl.constexpr, MODS: tl.constexpr, FOLD: tl.constexpr,
            TMA: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
            BLOCK_D: tl.constexpr):  # fmt: skip
    """One query block's (out (i e) fp32, lse (i) natural log, masked and interior key blocks
    visited): the interior run [mid_lo, mid_hi) unmasked, then the two edge runs masked."""
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.full([BLOCK_M], 0.0, tl.float32)
    if HAS_SINKS:  # one more logit, σ, with no value: m = σ (base 2), l = 1 (0 if σ = −inf)
        sink = tl.load(SINKS + h) * 1.4426950408889634  # log2(e)
        m_i = tl.full([BLOCK_M], 0.0, tl.float32) + sink
        l_i = l_i + tl.where(sink == float("-inf"), 0.0, 1.0)
    acc = tl.full([BLOCK_M, BLOCK_D], 0.0, tl.float32)
    hit = tl.full([BLOCK_M, BLOCK_D], 0.0, tl.float32)
    n_masked = lo * 0  # i32 loop counters (debug: blocks visited)
    n_inner = lo * 0
    acc, m_i, l_i, hit, n_inner = _visit(
        acc, m_i, l_i, hit, n_inner, q, k_base, v_base, skn, skd, svn, svd, K_DESC, V_DESC, b,
        hk, offs_m, offs_d, mid_lo, mid_hi, Sk, D, delta, left, right, qk_scale, cap1, cap2, slope,
        False, HAS_LEFT, HAS_RIGHT, CLEAN, EVEN_D, DOT_PREC, DOT_F32, MODS, FOLD, TMA,
        BLOCK_N, BLOCK_D,
    )  # fmt: skip
    acc, m_i, l_i, hit, n_masked = _visit(
        acc, m_i, l_i, hit, n_masked, q, k_base, v_base, skn, skd, svn, svd, K_DESC, V_DESC, b,
        hk, offs_m, offs_d, lo, mid_lo, Sk, D, delta, left, right, qk_scale, cap1, cap2, slope,
        True, HAS_LEFT, HAS_RIGHT, CLEAN, EVEN_D, DOT_PREC, DOT_F32, MODS, FOLD, TMA,
        BLOCK_N, BLOCK_D,
    )  # fmt: skip
    acc, m_i, l_i, hit, n_masked = _visit(
        acc, m_i, l_i, hit, n_masked, q, k_base, v_base, skn, skd, svn, svd, K_DESC, V_DESC, b,
        hk, offs_m, offs_d, mid_hi, hi, Sk, D, delta, left, right, qk_scale, cap1, cap2, slope,
        True, HAS_LEFT, HAS_RIGHT, CLEAN, EVEN_D, DOT_PREC, DOT_F32, MODS, FOLD, TMA,
        BLOCK_N, BLOCK_D,
    )  # fmt: skip
    empty = l_i == 0.0  # no key kept (and no sink): out 0, LSE −inf
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    if CLEAN:
        out = tl.where(hit > 0, float("nan"), out)
    m_safe = tl.where(m_i == float("-inf"), 0.0, m_i)
    lse = tl.where(
        empty,
        float("-inf"),
        (m_safe + tl.log2(tl.where(empty, 1.0, l_i))) * 0.6931471805599453,  # ln 2
    )
    return out, lse, n_masked, n_inner


@triton.jit
def _forward_kernel(Q, K, V, O, LSE, VISITS, SINKS, K_DESC, V_DESC,
                    sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sob, soh, som, sod,
                    Hq, G, Sq, Sk, D, left, right, qk_scale, cap1, cap2, SLOPES, ssb,
                    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, CLEAN: tl.constexpr,
                    COUNT: tl.constexpr, HAS_SINKS: tl.constexpr, EVEN_D: tl.constexpr,
                    DOT_PREC: tl.constexpr, DOT_F32: tl.constexpr, REPAIR: tl.constexpr,
                    MODS: tl.constexpr, FOLD: tl.constexpr, TMA: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_D: tl.constexpr):  # fmt: skip
    """Grid (cdiv(Sq, BLOCK_M), B·Hq). O (b h i e) in q's dtype, LSE (b h i) fp32 contiguous;
    VISITS (B·Hq, n_blocks, 2) int32 [masked, interior] key blocks visited, when COUNT;
    SINKS (Hq,) fp32 natural-log sink logits when HAS_SINKS: the online softmax starts from
    the sink (m = σ·log2 e, l = 1) instead of from nothing (m = −inf, l = 0).
    MODS (bits MOD_CAP1, MOD_CAP2, MOD_ALIBI): `_score_mods` with caps cap1, cap2 and SLOPES
    (1|B, Hq) fp32 (batch stride ssb); `qk_scale` is then the natural scale, else scale·log2 e.
    TMA: K and V blocks come through K_DESC, V_DESC (host tensor descriptors of K and V,
    block (1, 1, BLOCK_N, BLOCK_D)); else those are K and V again, never read.
    REPAIR: O already holds an answer (SDPA's); a program whose O tile is all finite visits
    no key block and stores nothing, one with NaN/inf there recomputes its rows with the
    cleaning visits and stores those rows (and their LSE). One loop nest per kernel: a second
    one (checking this kernel's own answer in registers) would double its shared memory."""
    # the last query blocks first: under a causal band they visit the most key blocks, so
    # the light ones fill the GPU's last wave instead of the heavy ones
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    pid_bh, b, h, hk, qs, qe, offs_m, offs_d = _query_block(pid_m, Hq, G, Sq, BLOCK_M, BLOCK_D)
    delta = Sk - Sq
    m_ok = offs_m < Sq
    d_ok = offs_d < D

    q_ptrs = Q + b * sqb + h * sqh + offs_m[:, None] * sqm + offs_d[None, :] * sqd
    q = tl.load(q_ptrs, mask=m_ok[:, None] & d_ok[None, :], other=0.0)  # (i d)
    if DOT_F32:
        q = q.to(tl.float32)
    k_base = K + b * skb + hk * skh
    v_base = V + b * svb + hk * svh
    slope = _slope(SLOPES, b, h, ssb, MODS)
    lo, mid_lo, mid_hi, hi = _block_range(qs, qe, Sk, delta, left, right, HAS_LEFT, HAS_RIGHT,
                                          BLOCK_N)  # fmt: skip
    o_ptrs = O + b * sob + h * soh + offs_m[:, None] * som + offs_d[None, :] * sod
    o_mask = m_ok[:, None] & d_ok[None, :]
    lse_ptrs = LSE + pid_bh * Sq + offs_m
    n_masked = pid_m * 0
    n_inner = pid_m * 0
    if REPAIR:
        out = tl.load(o_ptrs, mask=o_mask, other=0.0).to(tl.float32)
    else:
        out, lse, n_masked, n_inner = _attend(
            q, k_base, v_base, skn, skd, svn, svd, K_DESC, V_DESC, b, hk, offs_m, offs_d, h,
            SINKS, Sk, D, delta, left, right, qk_scale, cap1, cap2, slope, lo, mid_lo, mid_hi,
            hi, HAS_LEFT, HAS_RIGHT, CLEAN, HAS_SINKS, EVEN_D, DOT_PREC, DOT_F32, MODS, FOLD,
            TMA, BLOCK_M, BLOCK_N, BLOCK_D,
        )  # fmt: skip
    if not REPAIR:
        out = _round(out, O.dtype.element_ty, DOT_F32 and O.dtype.element_ty == tl.bfloat16)
        tl.store(o_ptrs, out, mask=o_mask)
        tl.store(lse_ptrs, lse, mask=m_ok)
    if REPAIR:  # rows whose given answer holds NaN/inf: again, cleaning K and V
        bad = _nonfinite(out).to(tl.int32)
        row_bad = tl.reduce(bad, 1, _MAX)  # (i) 0 or 1
        n_bad = tl.reduce(row_bad, 0, _MAX)
        hi = lo + (hi - lo) * n_bad  # a finite tile: an empty visit, no key block is read
        mid_lo = lo + (mid_lo - lo) * n_bad
        mid_hi = lo + (mid_hi - lo) * n_bad
        fixed, fixed_lse, _m, _i = _attend(
            q, k_base, v_base, skn, skd, svn, svd, K_DESC, V_DESC, b, hk, offs_m, offs_d, h,
            SINKS, Sk, D, delta, left, right, qk_scale, cap1, cap2, slope, lo, mid_lo, mid_hi,
            hi, HAS_LEFT, HAS_RIGHT, True, HAS_SINKS, EVEN_D, DOT_PREC, DOT_F32, MODS, FOLD,
            TMA, BLOCK_M, BLOCK_N, BLOCK_D,
        )  # fmt: skip
        redo = m_ok & (row_bad > 0)  # only these rows are stored
        fixed = _round(fixed, O.dtype.element_ty, DOT_F32 and O.dtype.element_ty == tl.bfloat16)
        tl.store(o_ptrs, fixed, mask=redo[:, None] & d_ok[None, :])
        tl.store(lse_ptrs, fixed_lse, mask=redo)
    if COUNT:
        n_blocks = tl.num_programs(0)
        tl.store(VISITS + (pid_bh * n_blocks + pid_m) * 2, n_masked)
        tl.store(VISITS + (pid_bh * n_blocks + pid_m) * 2 + 1, n_inner)


def forward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    spec: Spec,
    config: Config | None = None,
    count: bool = False,
    clean: bool | None = None,
    out_dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """(out (b h i e) in q's dtype, lse (b h i) fp32, visits) — no autograd; see `triton`.

    `visits` (b·h, n_query_blocks, 2) int32 counts the [masked, interior] key blocks each
    program visited when `count`, else None. `clean` None (the default): a plain pass, then a
    `repair` launch that recomputes with the cleaning visits only rows that came back NaN/inf
    (no host sync; rows that come back finite are plain arithmetic's); True: the cleaning
    visits throughout; False: plain arithmetic only (masked NaN/inf may leak: for timing).
    `out_dtype` (default q's): fp32 keeps O unrounded for the backward's Δ = rowsum(dO∘O).
    `config` defaults to `default_config`, or with `clean=True` to `repair_config` (the cleaning
    loop holds a second fp32 dot: at fp32 D = 256 the default's 32 × 32 tiles need 172 KB of
    shared memory that way, past an A100's 163 KB)."""
    config = config or (repair_config(q.dtype) if clean else default_config(spec, q.dtype))
    for name, n in (("block_m", config.block_m), ("block_n", config.block_n)):
        if n < 16 or n & (n - 1):
            raise ValueError(f"{name} must be a power of two ≥ 16, got {n}")
    s = spec
    visits = None
    if count:
        n_blocks = cdiv(s.Sq, config.block_m)
        visits = torch.zeros(s.B * s.Hq, n_blocks, 2, dtype=torch.int32, device=q.device)
    if s.Sq == 0 or s.Sk == 0 or s.B * s.Hq == 0:
        out = torch.zeros(s.B, s.Hq, s.Sq, s.Dv, dtype=out_dtype or q.dtype, device=q.device)
        lse = torch.full((s.B, s.Hq, s.Sq), float("-inf"), dtype=torch.float32, device=q.device)
        if s.sinks is not None:  # no key: a row's only logit is its sink, so its LSE is σ_h
            lse.copy_(s.sinks.detach().to(lse.dtype).view(1, -1, 1).expand_as(lse))
        return out, lse, visits
    # every row is stored by the first launch: no fill
    out = torch.empty(s.B, s.Hq, s.Sq, s.Dv, dtype=out_dtype or q.dtype, device=q.device)
    lse = torch.empty(s.B, s.Hq, s.Sq, dtype=torch.float32, device=q.device)
    sinks = None if s.sinks is None else s.sinks.detach().to(torch.float32).contiguous()
    _launch(q, k, v, s, out, lse, sinks, visits, config, "clean" if clean else "plain")
    if clean is None:  # check the answer instead of K/V: a second launch, no host sync
        _launch(q, k, v, s, out, lse, sinks, None, repair_config(q.dtype), "repair")
    return out, lse, visits


def _launch(q, k, v, s: Spec, out, lse, sinks, visits, config: Config, mode: str) -> None:
    """`_forward_kernel` over (query blocks, b·h); `mode` "plain" (CLEAN off), "clean" or
    "repair" (`out` holds an answer: rows holding NaN/inf are recomputed cleaning K and V)."""
    block_d = head_dim_class(s.D)
    grid = (cdiv(s.Sq, config.block_m), s.B * s.Hq)
    mods, qk_scale, mod_tail = mod_args(s, lse)
    tma = config.tma and tma_ready(k, v)
    descs = (k, v)
    if tma:
        block = [1, 1, config.block_n, block_d]
        descs = tuple(TensorDescriptor.from_tensor(t, block) for t in (k, v))
    _forward_kernel[grid](
        q, k, v, out, lse, lse if visits is None else visits, lse if sinks is None else sinks,
        *descs,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        s.Hq, s.G, s.Sq, s.Sk, s.D, s.left or 0, s.right or 0, qk_scale, *mod_tail,
        HAS_LEFT=s.left is not None, HAS_RIGHT=s.right is not None,
        CLEAN=mode in ("clean", "repair"), COUNT=visits is not None,
        HAS_SINKS=sinks is not None, EVEN_D=block_d == s.D,
        DOT_PREC="ieee" if q.dtype == torch.float32 else "tf32",
        DOT_F32=INTERPRETED and q.dtype == torch.bfloat16,
        REPAIR=mode == "repair", MODS=mods,
        FOLD=not mods and qk_scale > 0, TMA=tma,
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_D=block_d,
        num_warps=config.num_warps, num_stages=config.num_stages,
        **({} if config.maxnreg is None else {"maxnreg": config.maxnreg}),
    )  # fmt: skip


def repair(
    q: Tensor, k: Tensor, v: Tensor, spec: Spec, out: Tensor, lse: Tensor | None = None
) -> tuple[Tensor, Tensor | None]:
    """`out` (b h i e, q's dtype) and `lse` (b h i, fp32, or None) of another kernel (SDPA),
    with every query row whose `out` holds NaN/inf recomputed by the cleaning forward: NaN/inf
    in masked-out K/V (which SDPA's 0·NaN lets through, always as a NaN in the row) never
    reaches it, a kept one gives NaN as `attention` documents. Rows that came back finite are
    SDPA's, plain arithmetic (a kept infinite key whose score is −inf weighs 0 there). No host
    sync: each program reads its out tile and visits no key when it is finite, so clean
    inputs cost one read of `out`.
    Writes in place (a non-contiguous `lse` is replaced by a contiguous copy) and returns
    them. The request must be one `unsupported` accepts, without sinks."""
    s = spec
    if s.Sq == 0 or s.Sk == 0 or s.B * s.Hq == 0:
        return out, lse
    if lse is not None and not lse.is_contiguous():
        lse = lse.contiguous()
    scratch = lse if lse is not None else torch.empty(s.B, s.Hq, s.Sq, device=q.device)
    _launch(q, k, v, s, out, scratch, None, None, repair_config(q.dtype), "repair")
    return out, lse


# whether the kernels above were built for Triton's CPU interpreter (TRITON_INTERPRET=1 at import)
INTERPRETED = not isinstance(_forward_kernel, triton.runtime.JITFunction)


class _TritonAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, sinks, spec: Spec, config: Config | None):
        """`sinks` is `spec.sinks`, passed again so autograd sees it. `config` None: each
        kernel's default (`default_config` forward, `triton_backward.default_configs`)."""
        # O in fp32 for the backward: Δ = rowsum(dO∘O) from a half-rounded O puts dQ 10× past
        # flash-attn's bwd-overflow criterion (fp16, 2 keys); the tiled backend keeps it too
        wide = torch.float32 if any(ctx.needs_input_grad[:4]) else None
        out, lse, _ = forward(q, k, v, spec, config, out_dtype=wide)  # checks its own answer
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.spec, ctx.config = spec, config
        return out.to(q.dtype), lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: a backward that differentiates again
            grads = double_backward_vjp(
                q, k, v, ctx.spec, dout, dlse, ctx.needs_input_grad[:4], "triton"
            )
            return *grads, None, None
        if _BACKWARD_BROKEN.broken(q.dtype, ctx.spec.D):  # Triton could not build it here
            dq, dk, dv = tiled.backward(q, k, v, ctx.spec, out, lse, dout, dlse)
        else:
            dq, dk, dv = _backward(q, k, v, ctx.spec, out, lse, dout, dlse, ctx.config)
        return dq, dk, dv, tiled.sink_grad(ctx, out, lse, dout, dlse), None, None


# where this process's Triton could not build the backward (by dtype and head dim)
_BACKWARD_BROKEN = BuildFailures(
    "the Triton backward", "the tiled backward computes these gradients instead"
)


def build_error(e: Exception) -> bool:
    """Whether `e` is Triton failing to compile or fit a kernel on this GPU (its
    `TritonError`s: CompilationError, OutOfResources, PTXASError)."""
    try:
        from triton.errors import TritonError
    except ImportError:  # older Triton: no common base class
        from triton.compiler.errors import CompilationError as TritonError
    return isinstance(e, TritonError)


def _backward(q, k, v, spec, out, lse, dout, dlse, config):
    """The Triton backward; where Triton cannot build it on this GPU, the tiled backward (the
    same gradients within the error budget, from the same saved out and LSE), with a warning
    once per dtype and head dim, and tiled's for those from then on: an error in the middle
    of a training step's backward would lose the step."""
    from .triton_backward import backward

    try:
        return backward(q, k, v, spec, out, lse, dout, dlse, config, interpreted=INTERPRETED)
    except Exception as e:
        if not build_error(e):
            raise
        _BACKWARD_BROKEN.record(e, q.dtype, spec.D, stacklevel=2)
    return tiled.backward(q, k, v, spec, out, lse, dout, dlse)


def triton_attention(
    q: Tensor, k: Tensor, v: Tensor, spec: Spec, config: Config | None = None
) -> tuple[Tensor, Tensor]:
    """(out (b h i e), lse (b h i) fp32) by the Triton forward; differentiable in q, k, v
    through the Triton backward (`triton_backward`). Raises ValueError naming another backend
    for what it lacks."""
    why = unsupported(q, spec)
    if why is not None:
        raise ValueError(f"backend='triton': {why}")
    return _TritonAttention.apply(q, k, v, spec.sinks, spec, config)
