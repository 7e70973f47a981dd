"""One-pass CPU kernels for the elementwise steps around the matmuls: RoPE with the q|k|v
split, and RMSNorm. Each replaces several PyTorch ops (each a pass over memory and a fresh
tensor) for float32 CPU tensors that autograd does not track; callers check `eligible` and keep
their PyTorch code for everything else (GPU, other dtypes, training).

    rope_qkv   qkv (b i t d), t = h + 2k heads  →  q (b h i d), k, v (b k i d), contiguous,
               q and k rotated at positions start … start+i−1; v copied as is
    rms_norm   x (r m)  →  x / sqrt(mean(x², -1) + eps) · weight
    empty_populated   a large float32 CPU tensor whose pages are mapped in one system call

The arithmetic is float32 as in the PyTorch code, except that RMSNorm's sum of squares
accumulates in float64; products may fuse into FMAs (results agree within float32 rounding).

Letters: b batch, i position, t head of the fused projection, h query head, k kv head,
d head dim, p rotation pair, r row, m model dim.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from .._jit import Kernels


def eligible(*tensors: Tensor) -> bool:
    """True when every tensor is float32 on the CPU and none needs a gradient recorded, outside
    `torch.compile`'s tracing (a traced graph keeps the PyTorch code it can compile)."""
    if torch.compiler.is_compiling():
        return False
    grad = torch.is_grad_enabled()
    return all(
        t.device.type == "cpu" and t.dtype == torch.float32 and not (grad and t.requires_grad)
        for t in tensors
    )


def rope_qkv(
    qkv: Tensor, cos: Tensor, sin: Tensor, start: int, n_q: int, n_k: int, interleaved: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """qkv (b i n_q+2n_k d) float32 CPU; cos, sin (≥ start+i, d/2): pair p of position s turns
    by the angle whose cos/sin are cos[s, p], sin[s, p]. Pair p is (p, p + d/2), or (2p, 2p+1)
    when `interleaved`. Returns q (b n_q i d), k and v (b n_k i d), each contiguous."""
    B, S, T, D = qkv.shape
    if T != n_q + 2 * n_k or D % 2 or cos.shape[0] < start + S or cos.shape[1] != D // 2:
        raise ValueError(
            f"rope_qkv: qkv {tuple(qkv.shape)} needs {n_q}+2·{n_k} heads of even size and "
            f"tables of ≥ {start + S} rows × {D // 2}, got {tuple(cos.shape)}"
        )
    q = qkv.new_empty(B, n_q, S, D)
    k = qkv.new_empty(B, n_k, S, D)
    v = qkv.new_empty(B, n_k, S, D)
    arrays = (_np(qkv), _np(cos), _np(sin), start, n_q, n_k, interleaved)
    KERNELS["rope_qkv"](*arrays, q.numpy(), k.numpy(), v.numpy())
    return q, k, v


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """`x / sqrt(mean(x², -1) + eps) * weight` for float32 CPU x (… m), weight (m,)."""
    m = x.shape[-1]
    if weight.shape != (m,):
        raise ValueError(f"rms_norm: weight must have shape ({m},), got {tuple(weight.shape)}")
    out = torch.empty(x.shape, dtype=x.dtype)
    KERNELS["rms_norm"](_np(x.reshape(-1, m)), _np(weight), float(eps), out.view(-1, m).numpy())
    return out


POPULATE_BYTES = 64 << 20  # below this, page faults cost too little to bother
_MADV_POPULATE_WRITE = 23  # Linux ≥ 5.14


def empty_populated(*shape: int) -> Tensor:
    """`torch.empty(shape)` (float32, CPU) with its pages mapped up front by one
    madvise(MADV_POPULATE_WRITE) when it is ≥ POPULATE_BYTES: a fresh 384 MiB logits tensor
    otherwise takes ~98k page faults inside the matmul that fills it (RESULTS.md: 0.92 → 0.85 s
    for SmolLM2's 2048-token unembedding). Elsewhere (older kernels, other systems) it is
    torch.empty."""
    out = torch.empty(shape, dtype=torch.float32)
    size = out.numel() * 4
    if size >= POPULATE_BYTES and _LIBC is not None:
        lo = -(-out.data_ptr() // _PAGE) * _PAGE  # whole pages inside the tensor
        hi = (out.data_ptr() + size) // _PAGE * _PAGE
        _LIBC.madvise(lo, hi - lo, _MADV_POPULATE_WRITE)  # failure (-1) just leaves faults
    return out


def _libc():
    import ctypes
    import mmap
    import sys

    if not sys.platform.startswith("linux"):
        return None, 4096
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        return libc, mmap.PAGESIZE
    except (OSError, AttributeError):
        return None, 4096


_LIBC, _PAGE = _libc()


def _np(t: Tensor) -> np.ndarray:
    return t.detach().contiguous().numpy()


def _build(flags: dict) -> dict[str, tuple]:
    import numba
    from numba import njit

    jit = njit(**flags)

    @jit
    def rope_qkv(qkv, cos, sin, start, n_q, n_k, interleaved, q, k, v):
        B, S, _, D = qkv.shape
        P = D // 2
        for b in range(B):
            for i in range(S):
                c, s = cos[start + i], sin[start + i]
                for t in range(n_q + n_k):
                    x = qkv[b, i, t]
                    o = q[b, t, i] if t < n_q else k[b, t - n_q, i]
                    if interleaved:
                        for p in range(P):
                            a, e = x[2 * p], x[2 * p + 1]
                            o[2 * p] = a * c[p] - e * s[p]
                            o[2 * p + 1] = e * c[p] + a * s[p]
                    else:
                        for p in range(P):
                            a, e = x[p], x[P + p]
                            o[p] = a * c[p] - e * s[p]
                            o[P + p] = e * c[p] + a * s[p]
                for t in range(n_k):
                    v[b, t, i, :] = qkv[b, i, n_q + n_k + t]

    @jit
    def rms_norm(x, weight, eps, out):
        R, M = x.shape
        for r in range(R):
            row, o = x[r], out[r]
            acc = 0.0
            for j in range(M):
                acc += np.float64(row[j]) * np.float64(row[j])
            inv = np.float32(1.0 / np.sqrt(acc / M + eps))
            for j in range(M):
                o[j] = (row[j] * inv) * weight[j]

    f32, i64 = numba.float32, numba.int64
    f32_2d, f32_4d = f32[:, ::1], f32[:, :, :, ::1]
    rope_types = (f32_4d, f32_2d, f32_2d, i64, i64, i64, numba.boolean, f32_4d, f32_4d, f32_4d)
    return {
        "rope_qkv": (rope_qkv, rope_types),
        "rms_norm": (rms_norm, (f32_2d, f32[::1], numba.float64, f32_2d)),
    }


KERNELS = Kernels(_build, wide=False)
