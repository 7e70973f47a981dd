"""Build every Triton kernel variant qkv launches for NVIDIA sm_90 (H100/H200) and sm_80 (A100),
on a machine without a GPU: shared memory, registers and spills per variant, and whether it fits.

    python benchmarks/triton_build.py --smoke --arch 90  # the test's 15 builds (≈ 30 s, 2 cores)
    python benchmarks/triton_build.py --quick            # bf16 at D = 256: 24 builds (≈ 70 s)
    python benchmarks/triton_build.py --only backward --dtype bf16 --head-dim 128
    python benchmarks/triton_build.py                    # every variant: 844 builds, 25 min
    python benchmarks/triton_build.py --all              # and fp32 D = 256's band/sinks ones too

Most builds take 1–5 s on one core: the full run took 1481 s on 2 cores (844/844 built and fit,
2026-12-01). fp32 at D = 256 was the slow case (`slow`): at the 64 × 64, 4-warp launches used
before, its IEEE dots became unrolled FMAs, megabytes of PTX, builds of 0.5–5 minutes and ptxas
up to ~10 GB; the fp32 launches now spill little and build in seconds, but such builds still
run one at a time per 11 GiB of free memory (`heavy_slots`), beside the rest. `--all` builds
fp32 D = 256's band/sinks variants too (the default builds those causal without sinks only). Each
build's result goes to stderr as it comes, the tables to stdout at the end.

How: the kernel modules are imported compiled (TRITON_INTERPRET is removed first), Triton's
`JITFunction.run` — what every `kernel[grid](...)` calls — is replaced for the moment by a
recorder, and qkv's own launch code runs on small CPU tensors (B 2, Hq 4, Hk 2, S 256; nothing
is computed): `triton_kernel.forward` (clean None: plain then repair; clean True), `.repair`
(after SDPA), the autograd Function's forward (O kept fp32) and backward, and
`sdpa_checked.redo_if_nonfinite` (auto's check of SDPA's gradients, gated redo). Each recorded
launch is bound by Triton's own binder for the target — the signature, constexprs, the
specialisations a launch at these sizes gets (ints equal to 1, 16-divisibility) and the
options — deduplicated, and built by `triton.compile(ASTSource, GPUTarget("cuda", arch, 32))`
down to cubin with the ptxas in the triton wheel. No kernel signature is written here: a
parameter added, renamed or made constexpr in the kernels is picked up.

Columns: `shared` is `metadata.shared`, the dynamic shared memory one program needs; `fits`
compares it with the arch's opt-in limit per block (sm_90 232448 B = 227 KB, sm_80 166912 B
= 163 KB), as Triton does before a launch; `regs`, `stack` (frame bytes) and `spills` (bytes
stored / loaded) are ptxas -v's (where a kernel needs far more than 255 registers, ptxas may
report 32 registers and a stack frame of kilobytes: fp32 at D = 256). Variants: dtype
fp32/bf16/fp16 × D 64/96/128/256 × causal, a window (127, 32), or causal with softcap and ALiBi
× with or without sinks (the backward and SDPA's paths take none), each with its default
launch config; a row lists every
case that launches the same build (D 96 and 128 share the backward's). Not built: the
debug-only `count=True` launches (COUNT).
Exit status 1 when a variant fails to build or does not fit, or when a kernel the modules
launch (`name[` in their source) was reached by no case here.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import importlib.util
import io
import os
import pkgutil
import re
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager, redirect_stdout
from dataclasses import dataclass, field
from multiprocessing import get_context

os.environ.pop("TRITON_INTERPRET", None)  # decided when a kernel is decorated: compiled here
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton's default, without its warning

import torch
import triton
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import JITFunction, create_function_from_signature

from qkv.attention import alibi, sdpa_checked
from qkv.attention import triton_kernel as tk
from qkv.attention.spec import make_spec

SMEM_LIMIT = {90: 232448, 80: 166912}  # bytes of shared memory one block may opt in to
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
HEAD_DIMS = (64, 96, 128, 256)
B, HQ, HK, S = 2, 4, 2, 256
# a band, and the score mods the kernels evaluate (softcap= and alibi: MODS = 5; SDPA, and so
# its repair and redo, never meets them)
BANDS = {
    "causal": {"causal": True},
    "window": {"window": (127, 32)},
    "causal+mods": {"causal": True, "softcap": 30.0, "score_mod": alibi(HQ)},
}
QUICK = [("bf16", 256)]  # the largest tiles whose builds take seconds (not fp32: see `slow`)
# tests/attention/test_triton_build.py's set: the forward's default launches and the backward
# in bf16 (with and without softcap and ALiBi) and fp32 at D = 128 (auto's Triton path with a
# gradient), and SDPA's repair at fp32 D = 256 (causal, no sinks)
SMOKE = [
    ("bf16", 128, "fwd", "causal"),
    ("bf16", 128, "fwd tma", "causal"),
    ("bf16", 128, "train bwd", "causal"),
    ("bf16", 128, "fwd", "causal+mods"),
    ("bf16", 128, "train bwd", "causal+mods"),
    ("fp32", 128, "fwd", "causal"),
    ("fp32", 128, "train bwd", "causal"),
    ("fp32", 256, "repair(sdpa)", "causal"),
]

# entries whose launches need sm_90 or newer (`tk.tma_ready`: TMA descriptors); built for those
# archs only
HOPPER_ONLY = {"fwd tma"}


def slow(dtype: str, D: int) -> bool:
    """fp32 at D > 128 (BLOCK_D 256): its IEEE dots become unrolled FMAs, megabytes of PTX;
    Triton and ptxas take 0.5–5 minutes per build, and ptxas up to ~10 GB (sm_90 dK/dV)."""
    return dtype == "fp32" and D > 128


@dataclass(frozen=True)
class Case:
    """One request shape: input dtype, head dim D = Dv, band and whether it has sinks."""

    dtype: str
    D: int
    band: str
    sinks: bool


@dataclass
class Job:
    """One distinct compilation: plain data, so it can go to a worker process."""

    arch: int
    module: str
    kernel: str
    signature: dict
    constexprs: dict
    attrs: dict
    options: dict
    cases: list[Case] = field(default_factory=list)  # the cases that launch it
    entries: list[str] = field(default_factory=list)  # the qkv calls that launch it

    def const(self, name: str, default: object = "-") -> object:
        return self.constexprs.get(name, default)

    def heavy(self) -> bool:
        return any(slow(c.dtype, c.D) for c in self.cases)

    def column(self, attr: str) -> str:
        """The distinct values of one `Case` field over the cases that launch this job."""
        values = dict.fromkeys(getattr(c, attr) for c in self.cases)
        return ", ".join(("yes" if v else "no") if isinstance(v, bool) else str(v) for v in values)


@dataclass
class Built:
    """What ptxas made of a job (or why it could not)."""

    shared: int | None = None
    regs: int | None = None
    stack: int | None = None
    spill_stores: int | None = None
    spill_loads: int | None = None
    error: str | None = None
    seconds: float = 0.0


@contextmanager
def recording() -> Iterator[list[tuple[JITFunction, tuple, dict]]]:
    """Within: every `kernel[grid](*args, **kwargs)` appends (kernel, args, kwargs) instead of
    compiling or running anything; `JITFunction.run` is restored on the way out."""
    launches: list[tuple[JITFunction, tuple, dict]] = []
    run = JITFunction.run

    def record(self, *args, grid, warmup, **kwargs):
        launches.append((self, args, kwargs))

    JITFunction.run = record
    try:
        yield launches
    finally:
        JITFunction.run = run


def entries(case: Case) -> Iterator[tuple[str, str, Callable[[], object]]]:
    """(phase, label, call) for each of qkv's launch paths on `case`'s CPU tensors."""
    dtype = DTYPES[case.dtype]
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, HQ, S, case.D, generator=g).to(dtype)
    k = torch.randn(B, HK, S, case.D, generator=g).to(dtype)
    v = torch.randn(B, HK, S, case.D, generator=g).to(dtype)
    sinks = torch.zeros(HQ) if case.sinks else None
    spec = make_spec(q, k, v, sinks=sinks, **BANDS[case.band])
    yield "forward", "fwd", lambda: tk.forward(q, k, v, spec)
    tma = dataclasses.replace(tk.default_config(spec, dtype), tma=True)  # opt-in, sm_90+
    yield "forward", "fwd tma", lambda: tk.forward(q, k, v, spec, tma)
    yield "forward", "fwd clean", lambda: tk.forward(q, k, v, spec, clean=True)
    sdpa = not case.sinks and "mods" not in case.band  # what SDPA serves: no sinks, no mods
    if sdpa:  # its repair
        yield "forward", "repair(sdpa)", lambda: tk.repair(q, k, v, spec, torch.zeros_like(q))
    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
    sg = None if sinks is None else sinks.clone().requires_grad_()
    spec_g = make_spec(qg, kg, vg, sinks=sg, **BANDS[case.band])
    held: list = []
    yield (
        "forward",
        "train fwd (O fp32)",
        lambda: held.extend(tk._TritonAttention.apply(qg, kg, vg, sg, spec_g, None)),
    )
    yield (
        "backward",
        "train bwd",
        lambda: torch.autograd.backward(held, [torch.ones_like(t) for t in held]),
    )
    if sdpa:  # auto's SDPA with a gradient: the device check and gated redo
        grads = (torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v))
        dout = torch.ones_like(q)
        yield (
            "backward",
            "sdpa redo",
            lambda: sdpa_checked.redo_if_nonfinite(q, k, v, spec, dout, grads),
        )


def bind(kernel: JITFunction, args: tuple, kwargs: dict, arch: int) -> tuple[dict, ...]:
    """(signature, constexprs, attrs, options) for launching `kernel` on `arch`, by Triton's
    own binder and `_pack_args`, with the launch options `JITFunction.run` adds."""
    backend = make_backend(GPUTarget("cuda", arch, 32))
    kwargs = dict(kwargs)
    kwargs["debug"] = kwargs.get("debug", kernel.debug) or knobs.runtime.debug
    kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    kwargs["fpsan_homomorphic_casts"] = knobs.compilation.fpsan_homomorphic_casts
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(
        backend, kwargs, bound, specialization, options
    )
    names = {(i,): p.name for i, p in enumerate(kernel.params)}
    constexprs = {names.get(path, path): value for path, value in constexprs.items()}
    return signature, constexprs, attrs, dict(options.__dict__)


Keep = Callable[[Case, str, str], bool]  # (case, phase, entry label) → build its launches?


def collect(cases: list[Case], archs: list[int], keep: Keep) -> tuple[list[Job], set[str]]:
    """The distinct jobs on `archs` of the launches `keep` selects, and the names of the
    kernels any of `cases`' entries launched (selected or not)."""
    jobs: dict[tuple, Job] = {}
    reached: set[str] = set()
    for case in cases:
        for phase, label, call in entries(case):
            with recording() as launches:
                call()
            for kernel, args, kwargs in launches:
                reached.add(kernel.fn.__name__)
                if not keep(case, phase, label):
                    continue
                for arch in archs:
                    if label in HOPPER_ONLY and arch < 90:
                        continue
                    sig, const, attrs, opts = bind(kernel, args, kwargs, arch)
                    name = kernel.fn.__name__
                    key = (arch, kernel.module, name, *map(repr, (sig, const, attrs, opts)))
                    job = jobs.setdefault(
                        key, Job(arch, kernel.module, name, sig, const, attrs, opts)
                    )
                    for seen, new in ((job.cases, case), (job.entries, label)):
                        if new not in seen:
                            seen.append(new)
    return list(jobs.values()), reached


def launched_kernels() -> set[str]:
    """Names of the JIT kernels `qkv.attention`'s modules launch: `name[` (a grid) in the
    source of a module that defines Triton kernels."""
    names = set()
    package = importlib.import_module("qkv.attention")  # (`qkv.attention` is also a function)
    for info in pkgutil.iter_modules(package.__path__, "qkv.attention."):
        spec = importlib.util.find_spec(info.name)
        with open(spec.origin, encoding="utf-8") as f:
            src = f.read()
        if "@triton.jit" not in src:
            continue
        module = importlib.import_module(info.name)
        for name, obj in vars(module).items():
            if isinstance(obj, JITFunction) and re.search(rf"\b{re.escape(name)}\[", src):
                names.add(name)
    return names


_PTXAS_REGS = re.compile(r"Used (\d+) registers")
_PTXAS_FRAME = re.compile(
    r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads"
)


def build(job: Job) -> Built:
    """Compile `job` to cubin (in a worker); any failure of Triton's or ptxas's is the
    variant's result, reported in its row, not the script's."""
    kernel = getattr(importlib.import_module(job.module), job.kernel)
    t0 = time.perf_counter()
    try:
        _, built = compile_reported(
            kernel, job.signature, job.constexprs, job.attrs, job.options, job.arch
        )
    except Exception as e:  # CompilationError, PTXASError, an MLIR pass's RuntimeError, ...
        first = next((ln for ln in str(e).splitlines() if ln.strip()), "")
        return Built(error=f"{type(e).__name__}: {first[:200]}", seconds=time.perf_counter() - t0)
    built.seconds = time.perf_counter() - t0
    return built


def compile_reported(
    kernel: JITFunction, signature: dict, constexprs: dict, attrs: dict, options: dict, arch: int
) -> tuple[object, Built]:
    """(Triton's compiled kernel, what ptxas -v reported: shared memory, registers, stack and
    spills) for a bound launch (`bind`) on `arch`; raises what Triton or ptxas raise."""
    src = ASTSource(kernel, signature, _paths(kernel, constexprs), attrs)
    knobs.nvidia.dump_ptxas_log = True  # ptxas -v's log, printed: registers and spills
    log = io.StringIO()
    with redirect_stdout(log):
        compiled = triton.compile(src, GPUTarget("cuda", arch, 32), options=options)
    regs, frame = _PTXAS_REGS.search(log.getvalue()), _PTXAS_FRAME.search(log.getvalue())
    stack, stores, loads = (int(x) for x in frame.groups()) if frame else (None, None, None)
    return compiled, Built(
        shared=compiled.metadata.shared,
        regs=int(regs.group(1)) if regs else None,
        stack=stack,
        spill_stores=stores,
        spill_loads=loads,
    )


def _paths(kernel: JITFunction, constexprs: dict) -> dict:
    """Constexprs keyed by name back to the argument-index paths ASTSource expects."""
    index = {p.name: (i,) for i, p in enumerate(kernel.params)}
    return {index.get(k, k): v for k, v in constexprs.items()}


def heavy_slots(workers: int) -> int:
    """How many `Job.heavy` builds may run at once: one per 11 GiB of memory available now
    beyond 4 GiB, at least one, and one worker always left for the others."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            kib = next(int(ln.split()[1]) for ln in f if ln.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return 1
    return max(1, min(workers - 1, int((kib / 2**20 - 4) // 11)))


def build_all(jobs: list[Job], workers: int) -> list[Built]:
    """`build` of each job on `workers` processes (spawned: no forked Triton or torch state), in
    a fresh Triton cache so that ptxas runs, and logs, for every one. `Job.heavy` ones first
    (the longest), at most `heavy_slots` of them at once. Each result is printed to stderr as
    it comes (a run stopped midway keeps what it built)."""
    built: list[Built | None] = [None] * len(jobs)
    heavy = deque(i for i, j in enumerate(jobs) if j.heavy())
    light = deque(i for i, j in enumerate(jobs) if not j.heavy())
    slots = heavy_slots(workers) if heavy else 0
    running: dict[Future, int] = {}

    def start(pool: ProcessPoolExecutor) -> None:
        while len(running) < workers:
            n_heavy = sum(jobs[i].heavy() for i in running.values())
            if heavy and n_heavy < slots:
                i = heavy.popleft()
            elif light:
                i = light.popleft()
            else:
                return
            try:
                running[pool.submit(build, jobs[i])] = i
            except BrokenProcessPool as e:  # a worker died before: nothing more builds
                built[i] = Built(error=f"worker died: {type(e).__name__}: {e}")

    with tempfile.TemporaryDirectory(prefix="qkv-triton-build-") as cache:
        os.environ["TRITON_CACHE_DIR"] = cache
        with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
            start(pool)
            while running:
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for f in done:
                    i = running.pop(f)
                    try:
                        built[i] = f.result()
                    except BrokenProcessPool as e:  # a compiler crash (or OOM kill) took a worker
                        built[i] = Built(error=f"worker died: {type(e).__name__}: {e}")
                    n = sum(b is not None for b in built)
                    print(f"[{n}/{len(jobs)}] {describe(jobs[i], built[i])}", file=sys.stderr,
                          flush=True)  # fmt: skip
                start(pool)
    return built


def describe(job: Job, b: Built) -> str:
    """One line: the job and what came of it."""
    head = (
        f"sm_{job.arch} {job.kernel} {job.column('dtype')} D={job.column('D')} "
        f"{job.column('band')} sinks={job.column('sinks')} ({', '.join(job.entries)})"
    )
    if b.error:
        return f"{head}: {b.error}"
    fit = "fits" if fits(job, b) else f"DOES NOT FIT ({SMEM_LIMIT[job.arch]} B)"
    return (
        f"{head}: shared {b.shared} B {fit}, {_or_q(b.regs)} regs, spills "
        f"{_or_q(b.spill_stores)}/{_or_q(b.spill_loads)} B, {b.seconds:.0f} s"
    )


def flags(kernel: JITFunction, job: Job) -> str:
    """The kernel's own constexpr parameters, BLOCK_* aside: true flags by name, others =."""
    declared = {p.name for p in kernel.params if p.is_constexpr}
    out = []
    for name, value in job.constexprs.items():
        if name not in declared or name.startswith("BLOCK_") or value is False:
            continue
        out.append(name if value is True else f"{name}={value}")
    return " ".join(out)


def fits(job: Job, built: Built) -> bool:
    return built.error is None and built.shared is not None and built.shared <= SMEM_LIMIT[job.arch]


def table(jobs: list[Job], built: list[Built]) -> str:
    """Markdown: one table per (arch, kernel), rows in the order the cases launched them."""
    out = []
    groups: dict[tuple[int, str], list[int]] = {}
    for i, job in enumerate(jobs):
        groups.setdefault((job.arch, job.kernel), []).append(i)
    for (arch, name), rows in groups.items():
        kernel = getattr(importlib.import_module(jobs[rows[0]].module), name)
        out += [
            f"\n### sm_{arch}: `{name}` (shared memory limit {SMEM_LIMIT[arch]} B)\n",
            "| kernel | entry | constexprs | dtype | D | band | sinks | BLOCK_M×N | warps | stages "
            "| shared B | fits | regs | stack B | spills st/ld B | build s |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for i in rows:
            job, b = jobs[i], built[i]
            spills = "?" if b.spill_stores is None else f"{b.spill_stores}/{b.spill_loads}"
            shared = b.error.replace("|", "\\|") if b.error else f"{b.shared}"
            fit = "BUILD FAILED" if b.error else ("yes" if fits(job, b) else "**NO**")
            out.append(
                f"| {name} | {', '.join(job.entries)} | {flags(kernel, job)} | {job.column('dtype')} "
                f"| {job.column('D')} | {job.column('band')} | {job.column('sinks')} "
                f"| {job.const('BLOCK_M')}×{job.const('BLOCK_N')} "
                f"| {job.options.get('num_warps')} | {job.options.get('num_stages')} | {shared} "
                f"| {fit} | {_or_q(b.regs)} | {_or_q(b.stack)} | {spills} | {b.seconds:.0f} |"
            )
    return "\n".join(out)


def _or_q(x: int | None) -> str:
    return "?" if x is None else str(x)


def ptxas_problem(archs: list[int]) -> str | None:
    """Why the wheel's ptxas cannot build for `archs` here, or None."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas
    except ImportError as e:
        return f"triton has no NVIDIA backend ({e})"
    for arch in archs:
        try:
            path = get_ptxas(arch).path
        except RuntimeError as e:  # Triton's "Cannot find ptxas"
            return f"no ptxas for sm_{arch}: {type(e).__name__}: {e}"
        if not (path and os.access(path, os.X_OK)):
            return f"ptxas for sm_{arch} is not an executable file: {path!r}"
    return None


def selection(a: argparse.Namespace) -> tuple[list[Case], Keep]:
    """The cases and the launches to build for the command line's options `a`. The default:
    every dtype × D × band × sinks, except that a `slow` (dtype, D) is built causal without
    sinks only (the band and sinks change a few scalar ops, not the tiles) unless `a.all`."""
    if a.smoke:
        cases = [Case(dt, D, band, False) for dt, D, _, band in dict.fromkeys(SMOKE)]
        cases = list(dict.fromkeys(cases))
    elif a.quick:
        cases = [Case(dt, D, "causal", False) for dt, D in QUICK]
    else:
        cases = [
            Case(dt, D, band, sinks)
            for dt in DTYPES
            for D in HEAD_DIMS
            for band in BANDS
            for sinks in (False, True)
            if a.all or not slow(dt, D) or (band, sinks) == ("causal", False)
        ]
    cases = [
        c for c in cases if c.dtype in (a.dtype or DTYPES) and c.D in (a.head_dim or HEAD_DIMS)
    ]

    def keep(case: Case, phase: str, label: str) -> bool:
        smoke = (case.dtype, case.D, label, case.band) in SMOKE
        return a.only in (None, phase) and (not a.smoke or smoke)

    return cases, keep


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--arch", type=int, nargs="+", choices=sorted(SMEM_LIMIT), default=[90, 80])
    ap.add_argument("--quick", action="store_true", help="bf16 at D=256, causal, no sinks")
    ap.add_argument("--smoke", action="store_true", help="the test's set (tests/attention)")
    ap.add_argument("--all", action="store_true", help="also fp32 D=256's band/sinks variants")
    ap.add_argument("--only", choices=["forward", "backward"])
    ap.add_argument("--dtype", nargs="+", choices=list(DTYPES), help="only these dtypes")
    ap.add_argument("--head-dim", type=int, nargs="+", choices=HEAD_DIMS, help="only these D")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="worker processes")
    a = ap.parse_args(argv)
    if a.jobs < 1:
        ap.error(f"--jobs must be ≥ 1, got {a.jobs}")
    if tk.INTERPRETED:
        print("error: triton_kernel was built for the interpreter; unset TRITON_INTERPRET",
              file=sys.stderr)  # fmt: skip
        return 1
    why = ptxas_problem(a.arch)
    if why is not None:
        print(f"error: {why}", file=sys.stderr)
        return 1
    t0 = time.perf_counter()
    cases, keep = selection(a)
    jobs, reached = collect(cases, a.arch, keep)
    missed = sorted(launched_kernels() - reached)
    if not jobs:
        print("error: these options select no build", file=sys.stderr)
        return 1
    archs = "/".join(f"sm_{x}" for x in a.arch)
    print(
        f"triton {triton.__version__}; {len(jobs)} distinct builds for {archs} on {a.jobs} processes"
    )
    built = build_all(jobs, a.jobs)
    print(table(jobs, built))
    failed = [(j, b) for j, b in zip(jobs, built, strict=True) if not fits(j, b)]
    print(
        f"\n{len(jobs) - len(failed)}/{len(jobs)} built and fit; {time.perf_counter() - t0:.0f} s"
    )
    for j, b in failed:
        print(f"FAILED {describe(j, b)}")
    if missed:
        print(f"FAILED: kernels launched in the modules but reached by no case: {missed}")
    return 1 if failed or missed else 0


if __name__ == "__main__":
    sys.exit(main())
