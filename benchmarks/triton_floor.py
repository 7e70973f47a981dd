"""How fast can a Triton attention forward be on this GPU? A floor to measure qkv's kernel against.

    python benchmarks/triton_floor.py                 # on a CUDA machine (≈ 30 s)
    TRITON_INTERPRET=1 python benchmarks/triton_floor.py --device cpu --quick   # smoke test

`floor_forward` is the least a FlashAttention-2 forward in Triton does: one program per (query
block, b·h), dense or causal with Sq = Sk, N a multiple of the block, D a power of two,
contiguous (b h s d) inputs, scale folded into the exponent's FMA; no GQA, windows, tails,
padded head dims, sinks, score mods, NaN/inf cleaning or LSE rounding care. It is not part of
qkv and must not be: it is the yardstick for issue 15's "Triton forward ≥ 0.9× SDPA".
If the floor itself stays well under SDPA at the same launch config, the gap is Triton's code
generation for this GPU (what is left: TMA, warp specialisation), not qkv's features; if the
floor is near SDPA and qkv's kernel is not, qkv's kernel is where the time goes.

Prints, per case: SDPA, the floor and qkv's Triton forward (default launch, and with K/V read
by TMA where the GPU has it) in ms, and SDPA time / each. Every output is compared with SDPA's
first (bf16: max abs difference ≤ 3e-2), so a fast wrong kernel shows as WRONG.
"""

from __future__ import annotations

import dataclasses
import math
import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from qkv.attention import triton_kernel as tk
from qkv.attention.spec import make_spec
from triton_tune import bench, device_args

CASES = [  # (B, H, N, D, causal): issue 15's forward cases
    (4, 16, 1024, 128, False),
    (4, 16, 1024, 128, True),
    (2, 16, 4096, 128, True),
    (1, 16, 16384, 128, True),
    (1, 32, 16384, 64, True),
]
TOL = 3e-2  # bf16, against SDPA in bf16


@triton.jit
def _floor_kernel(Q, K, V, O, seq_stride, head_stride, N, qk_scale, CAUSAL: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr):  # fmt: skip
    """Grid (N / BLOCK_M, B·H) over contiguous (b h s d) tensors: O = softmax(scale·QKᵀ)V."""
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)  # heaviest causal blocks first
    base = tl.program_id(1) * head_stride
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, D)
    q = tl.load(Q + base + rows[:, None] * seq_stride + dims[None, :])
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l = tl.full([BLOCK_M], 0.0, tl.float32)
    acc = tl.full([BLOCK_M, D], 0.0, tl.float32)
    full = N // BLOCK_N
    if CAUSAL:
        full = pid_m * BLOCK_M // BLOCK_N  # key blocks wholly left of the diagonal
    m, l, acc = _floor_visit(q, K, V, base, seq_stride, rows, dims, m, l, acc, 0, full,
                             qk_scale, False, BLOCK_N)  # fmt: skip
    if CAUSAL:
        m, l, acc = _floor_visit(q, K, V, base, seq_stride, rows, dims, m, l, acc, full,
                                 ((pid_m + 1) * BLOCK_M + BLOCK_N - 1) // BLOCK_N, qk_scale, True,
                                 BLOCK_N)  # fmt: skip
    out = acc / l[:, None]
    tl.store(O + base + rows[:, None] * seq_stride + dims[None, :], out.to(O.dtype.element_ty))


@triton.jit
def _floor_visit(q, K, V, base, seq_stride, rows, dims, m, l, acc, lo, hi, qk_scale,
                 DIAGONAL: tl.constexpr, BLOCK_N: tl.constexpr):  # fmt: skip
    """Online softmax over key blocks [lo, hi); DIAGONAL masks keys past each row."""
    for blk in range(lo, hi):
        cols = blk * BLOCK_N + tl.arange(0, BLOCK_N)
        kt = tl.load(K + base + cols[None, :] * seq_stride + dims[:, None])  # (d j)
        s = tl.dot(q, kt)
        if DIAGONAL:
            s = tl.where(rows[:, None] >= cols[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1) * qk_scale)
        p = tl.exp2(s * qk_scale - m_new[:, None])
        alpha = tl.exp2(m - m_new)
        l = l * alpha + tl.sum(p, 1)
        v = tl.load(V + base + cols[:, None] * seq_stride + dims[None, :])  # (j e)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
        m = m_new
    return m, l, acc


def floor_forward(q, k, v, causal: bool, config: tk.Config) -> torch.Tensor:
    """The floor kernel at `config`'s launch; (b h s d) contiguous, same shapes, scale 1/√D."""
    B, H, N, D = q.shape
    if N % config.block_m or N % config.block_n or D & (D - 1):
        raise ValueError(
            f"the floor needs N a multiple of the blocks and D a power of 2: {q.shape}"
        )
    out = torch.empty_like(q)
    _floor_kernel[(N // config.block_m, B * H)](
        q, k, v, out, D, N * D, N, (1 / math.sqrt(D)) * math.log2(math.e), CAUSAL=causal,
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, D=D,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )  # fmt: skip
    return out


def main() -> None:
    a = device_args(__doc__, "tiny sizes: checks the script runs")
    if a.device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("on CPU the kernels run in Triton's interpreter: set TRITON_INTERPRET=1")
    dtype = torch.bfloat16 if a.device == "cuda" else torch.float32
    cases = [(1, 2, 128, 32, c) for c in (False, True)] if a.quick else CASES
    name = torch.cuda.get_device_name() if a.device == "cuda" else "CPU (interpreter)"
    print(f"device: {name}, torch {torch.__version__}, triton {triton.__version__}, {dtype}\n")
    print("| case | launch | SDPA ms | floor | qkv triton | qkv triton, TMA |")
    print("|---|---|---|---|---|---|")
    for B, H, N, D, causal in cases:
        q, k, v = (torch.randn(B, H, N, D, device=a.device, dtype=dtype) for _ in range(3))
        spec = make_spec(q, k, v, causal=causal)
        config = tk.default_config(spec, dtype)
        want = F.scaled_dot_product_attention(q, k, v, is_causal=causal).float()
        runs = {
            "floor": lambda: floor_forward(q, k, v, causal, config),
            "qkv": lambda: tk.forward(q, k, v, spec, config, clean=False)[0],
        }
        if tk.tma_ready(k, v):
            tma = dataclasses.replace(config, tma=True)
            runs["tma"] = lambda: tk.forward(q, k, v, spec, tma, clean=False)[0]
        sdpa = bench(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal),
                         a.device)  # fmt: skip
        cells = []
        for key in ("floor", "qkv", "tma"):
            if key not in runs:
                cells.append("no TMA")
                continue
            worst = (runs[key]().float() - want).abs().max().item()
            if not worst <= (TOL if dtype != torch.float32 else 2e-3):  # NaN is wrong too
                cells.append("WRONG")
                continue
            t = bench(runs[key], a.device)
            cells.append(f"{t:.3f} ({sdpa / t:.2f}×)")
        kind = "causal" if causal else "dense"
        launch = f"{config.block_m}×{config.block_n} w{config.num_warps} s{config.num_stages}"
        print(f"| B{B} H{H} N{N} D{D} {kind} | {launch} | {sdpa:.3f} | " + " | ".join(cells) + " |",
              flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
