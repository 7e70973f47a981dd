"""The CPU kernels under the models, one at a time, against the PyTorch code they replace, on
SmolLM2's shapes (d_model 576, 9 query / 3 kv heads of 64, MLP 1536, vocabulary 49152):

    .venv/bin/python benchmarks/kernels.py                 # 2048 tokens, 1 thread
    .venv/bin/python benchmarks/kernels.py --threads 2 --tokens 512

rows                     qkv                                   PyTorch
RoPE + split of QKV      nn.fused.rope_qkv (contiguous out)    rope on the strided heads, as before
RMSNorm                  nn.fused.rms_norm                     F.rms_norm
gate and up              one (2f, m) matmul, SiLU·up in place  two matmuls, silu(g) * u
logits (unembedding)     matmul into pre-mapped pages          F.linear
Q4_1 matmul, 1–2 rows    nn.quant blocks, 30 layers' gate+up   F.linear on the dense weights

Times are medians of --runs alternating pairs after a warm-up (both sides see the same machine
state); the ratio is PyTorch's time over ours, with the pairs ours won. Random weights: the kernels' speed does not depend on them.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from models import alternate  # the same paired timing as the model benchmarks

D_MODEL, HEADS, KV_HEADS, D_HEAD, D_FF, VOCAB, LAYERS = 576, 9, 3, 64, 1536, 49152, 30


def cases(n: int) -> list[tuple[str, Callable[[], object], Callable[[], object]]]:
    from qkv.nn import RotaryEmbedding, fused, quant

    g = torch.Generator().manual_seed(0)
    rope = RotaryEmbedding(D_HEAD, base=100000.0)
    qkv = torch.randn(1, n, HEADS + 2 * KV_HEADS, D_HEAD, generator=g)

    def rope_torch():
        qk, v = qkv.transpose(1, 2).split((HEADS + KV_HEADS, KV_HEADS), dim=1)
        return rope(qk, 0).split((HEADS, KV_HEADS), dim=1), v

    x = torch.randn(1, n, D_MODEL, generator=g)
    w_norm = torch.randn(D_MODEL, generator=g)
    gate_up = torch.randn(2 * D_FF, D_MODEL, generator=g) / D_MODEL**0.5
    gate, up = gate_up[:D_FF], gate_up[D_FF:]

    def mlp_fused():
        h, u = F.linear(x, gate_up).chunk(2, dim=-1)
        return F.silu(h, inplace=True).mul_(u)

    embed = torch.randn(VOCAB, D_MODEL, generator=g)
    rng = np.random.default_rng(0)
    c = D_MODEL // 32
    layers = [  # one per layer, as a decode step streams them (each dense one is 7 MiB)
        quant.BlockWeight(
            "q4_1",
            rng.integers(0, 256, (c, 16, 2 * D_FF), dtype=np.uint8),
            rng.random((c, 2 * D_FF), dtype=np.float32) / 100,
            rng.random((c, 2 * D_FF), dtype=np.float32) / -10,
        )
        for _ in range(LAYERS)
    ]
    dense = [b.dequantize() for b in layers]
    rows = {r: torch.randn(r, D_MODEL, generator=g) for r in (1, 2)}

    def stream(r: int, use_blocks: bool):
        if use_blocks:
            return lambda: [b.matmul(rows[r]) for b in layers]
        return lambda: [F.linear(rows[r], w) for w in dense]

    return [
        (f"RoPE + split of the fused QKV, {n} tokens",
         lambda: fused.rope_qkv(qkv, *rope.pair_tables(n), 0, HEADS, KV_HEADS, False), rope_torch),
        (f"RMSNorm, {n} × {D_MODEL}", lambda: fused.rms_norm(x, w_norm, 1e-5),
         lambda: F.rms_norm(x, (D_MODEL,), w_norm, 1e-5)),
        (f"gate and up + SiLU·up, {n} tokens", mlp_fused,
         lambda: F.silu(F.linear(x, gate)) * F.linear(x, up)),
        (f"logits {n} × {VOCAB}", lambda: quant.linear(x, embed), lambda: F.linear(x, embed)),
        *[(f"Q4_1 gate+up matmul × {LAYERS} layers, {r} row{'s' * (r > 1)}",
           stream(r, True), stream(r, False)) for r in (1, 2)],
    ]  # fmt: skip


def width_cases() -> list[tuple[str, Callable[[], object], Callable[[], object]]]:
    """The block kernels compiled twice in this process, without numba's disk cache (it would
    hand both the same machine code): 16 float32 lanes forced, and LLVM's own choice."""
    from qkv.nn import _jit, quant

    def variant(wide: bool) -> _jit.Kernels:
        return _jit.Kernels(lambda flags: quant._build({**flags, "cache": False}), wide=wide)

    forced, llvm = variant(True), variant(False)
    rng = np.random.default_rng(0)
    c, n = D_MODEL // 32, 2 * D_FF
    q4 = [rng.integers(0, 256, (c, 16, n), dtype=np.uint8) for _ in range(LAYERS)]
    q8 = [rng.integers(-128, 128, (c, 32, n), dtype=np.int8) for _ in range(LAYERS)]
    scale = rng.random((c, n), dtype=np.float32) / 100
    minimum = rng.random((c, n), dtype=np.float32) / -10

    def stream(kernels: _jit.Kernels, kind: str, r: int):
        x = rng.standard_normal((r, D_MODEL), dtype=np.float32)
        y = np.empty((r, n), np.float32)
        if kind == "q4_1":
            return lambda: [kernels["q4_1"](x, d, scale, minimum, y) for d in q4]
        return lambda: [kernels["q8_0"](x, d, scale, y) for d in q8]

    return [
        (f"{kind.upper()} gate+up × {LAYERS} layers, {r} row{'s' * (r > 1)}",
         stream(forced, kind, r), stream(llvm, kind, r))
        for kind in ("q4_1", "q8_0") for r in (1, 2)
    ]  # fmt: skip


def print_table(rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for k, r in enumerate(rows):
        print("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |")
        if k == 0:
            print("|" + "|".join("-" * (w + 2) for w in widths) + "|")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--runs", type=int, default=9)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"## CPU kernels  (torch {torch.__version__}, {args.threads} thread(s))\n")
    rows = [("kernel", "qkv ms", "PyTorch ms", "speed-up")]
    with torch.inference_mode():
        for name, ours, theirs in cases(args.tokens):
            ours(), theirs()  # warm-up: first-call compilation, page faults
            p = alternate(ours, theirs, args.runs)
            rows.append((name, f"{p.a * 1e3:.3f}", f"{p.b * 1e3:.3f}", p.speedup()))
    print_table(rows)

    import llvmlite.binding as llvm

    from qkv.nn import _jit

    print(f"\n## Block kernels: 16 float32 lanes forced vs LLVM's own width "
          f"(host CPU {llvm.get_host_cpu_name()}; qkv forces them: {_jit.wide_vectors_pay()})\n")  # fmt: skip
    rows = [("kernel", "forced 16 ms", "LLVM's width ms", "speed-up of forcing")]
    for name, forced, own in width_cases():
        forced(), own()
        p = alternate(forced, own, args.runs)
        rows.append((name, f"{p.a * 1e3:.3f}", f"{p.b * 1e3:.3f}", p.speedup()))
    print_table(rows)


if __name__ == "__main__":
    main()
