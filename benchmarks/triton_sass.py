"""What the Triton kernels' inner loops cost per iteration on an H100/H200, without a GPU: SASS.

    python benchmarks/triton_sass.py                        # bf16, D 128, causal (≈ 30 s)
    python benchmarks/triton_sass.py --head-dim 64 --band window
    python benchmarks/triton_sass.py --tma --floor          # also Config(tma=True), the floor

Each kernel qkv launches for one request (the forward as `auto` runs it, the training forward's
backward: dK/dV, dQ and dQ's repair) is built for sm_90 with the ptxas in the triton wheel
(`triton_build`'s recorder and binder, its default launch), disassembled with the wheel's
nvdisasm, and every loop (a backward branch) is listed with its instruction count and mix:
tensor-core MMAs (HGMMA), async copies (LDGSTS, or UTMALDG with TMA), exponentials (MUFU),
float and integer ALU work, selects. The interior loop (no mask) is the one long runs spend
their time in; the masked loops run once or twice per program (a causal diagonal, a window's
two edges). `--floor` adds `triton_floor.py`'s minimal forward at the same launch.

A count is not a time: MMAs, exponentials and memory overlap differently on the GPU. It shows
where a kernel does work another does not, which is what can be checked here; the timing is
benchmarks/gpu.py's on a GPU.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import os
import re
import sys
import tempfile

os.environ.pop("TRITON_INTERPRET", None)  # compiled builds, decided when kernels are decorated

import torch
import triton
from triton import knobs
from triton.tools.disasm import get_sass

import triton_build as tb
from qkv.attention import triton_kernel as tk
from qkv.attention.spec import make_spec

SHOWN = ("HGMMA", "LDGSTS", "UTMALDG", "MUFU", "FFMA", "FMUL", "FADD", "FMNMX", "FSEL", "SEL",
         "ISETP", "IMAD", "LEA", "LDS", "STS", "LDL", "STL")  # fmt: skip
_LABEL = re.compile(r"^\.?(L\w+):")
_TARGET = re.compile(r"\b\.?(L\w+)\b")


def sass_of(kernel, args: tuple, kwargs: dict, arch: int = 90) -> tuple[str, tb.Built]:
    """(SASS text, ptxas's report) of one recorded launch built for `arch`."""
    compiled, built = tb.compile_reported(kernel, *tb.bind(kernel, args, kwargs, arch), arch)
    return get_sass(compiled.asm["cubin"]), built


def loops(sass: str) -> list[tuple[int, collections.Counter]]:
    """(instructions, opcode counts) of each loop body: a label to the branch back to it.
    Loops of one or two instructions and branches placed after the kernel's first EXIT
    (barrier waits, and their out-of-line retries) are left out."""
    ops: list[str] = []
    at: dict[str, int] = {}
    for line in sass.splitlines():
        label = _LABEL.match(line.strip())
        if label:
            at[label.group(1)] = len(ops)
        elif "\t" in line:
            text = re.sub(r"^@!?U?P\w+\s+", "", line.split("\t", 1)[1].strip())
            ops.append(text)
    found = []
    end = next((i for i, text in enumerate(ops) if text.startswith("EXIT")), len(ops))
    for i, text in enumerate(ops[:end]):  # past EXIT: out-of-line waits that branch back
        if text.startswith("BRA"):
            target = _TARGET.search(text[3:])
            start = at.get(target.group(1)) if target else None
            if start is not None and start <= i and i - start > 2:
                body = ops[start : i + 1]
                found.append(
                    (len(body), collections.Counter(o.split()[0].split(".")[0] for o in body))
                )
    return found


def launches(dtype: torch.dtype, D: int, band: dict, tma: bool, floor: bool) -> list[tuple]:
    """(name, kernel, args, kwargs) of each launch of a request B1 H16 S4096 (nothing runs)."""
    q, k, v = (torch.randn(1, 16, 4096, D, dtype=dtype, requires_grad=True) for _ in range(3))
    spec = make_spec(q, k, v, **band)
    config = tk.default_config(spec, dtype)
    got = []
    with tb.recording() as rec:
        tk.forward(q.detach(), k.detach(), v.detach(), spec)
    got += [
        ("forward" if not kw["REPAIR"] else "forward repair", kern, a, kw) for kern, a, kw in rec
    ]
    if tma:
        with tb.recording() as rec:
            tk.forward(q.detach(), k.detach(), v.detach(), spec,
                       dataclasses.replace(config, tma=True), clean=False)  # fmt: skip
        got += [("forward, TMA", *rec[0])]
    if floor:
        from triton_floor import floor_forward

        with tb.recording() as rec:
            floor_forward(q.detach(), k.detach(), v.detach(), band.get("causal", False), config)
        got += [("floor forward", *rec[0])]
    with tb.recording() as rec:
        held = tk._TritonAttention.apply(q, k, v, None, spec, None)
    with tb.recording() as rec:
        torch.autograd.backward(held, [torch.ones_like(t) for t in held])
    for kern, a, kw in rec:
        name = kern.fn.__name__.strip("_").replace("_kernel", "")
        if name != "delta":
            got.append((name + (" repair" if kw.get("REPAIR") else ""), kern, a, kw))
    return got


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("--dtype", choices=list(tb.DTYPES), default="bf16")
    ap.add_argument("--head-dim", type=int, default=128, choices=(16, 32, 64, 96, 128, 256))
    ap.add_argument("--band", choices=["causal", "window", "dense"], default="causal")
    ap.add_argument("--tma", action="store_true", help="also the forward with Config(tma=True)")
    ap.add_argument("--floor", action="store_true", help="also triton_floor.py's forward")
    a = ap.parse_args()
    why = tb.ptxas_problem([90])
    if why is not None:
        print(f"error: {why}", file=sys.stderr)
        return 1
    knobs.cache.dir = tempfile.mkdtemp(prefix="qkv-sass-")  # a fresh build: ptxas's report
    band = {"causal": {"causal": True}, "window": {"window": (255, 0)}, "dense": {}}[a.band]
    print(
        f"triton {triton.__version__}, sm_90, {a.dtype} D={a.head_dim} {a.band}, default launches\n"
    )
    print("| kernel | regs | spills B | loop | instructions | " + " | ".join(SHOWN) + " |")
    print("|---|---|---|---|---|" + "---|" * len(SHOWN))
    for name, kern, args, kwargs in launches(tb.DTYPES[a.dtype], a.head_dim, band, a.tma, a.floor):
        sass, built = sass_of(kern, args, kwargs)
        for i, (n, ops) in enumerate(loops(sass)):
            cells = " | ".join(str(ops.get(op, 0) or "") for op in SHOWN)
            print(f"| {name} | {built.regs} | {built.spill_stores} | {i + 1} | {n} | {cells} |",
                  flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
