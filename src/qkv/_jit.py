"""Numba kernels behind the CPU fast paths (`attention.fused_cpu`'s attention loop, `nn.quant`'s
block matmuls, `nn.fused`'s elementwise kernels): compiled once per process against explicit
signatures, loaded from numba's disk cache when it has them. It sits below the layers so that
every layer may import it.

    KERNELS = Kernels(build, wide=wide_vectors_pay)  # build(flags) → {name: (dispatcher, sig)}
    KERNELS["q4_1"](x, ...)              # the first lookup compiles all that `build` returns
"""

from __future__ import annotations

import hashlib
import inspect
import threading
import warnings
from collections.abc import Callable
from typing import Any

# reassociation lets LLVM vectorise the sums; no "fast" (it would assume no NaN/inf)
FLAGS: dict[str, Any] = {
    "fastmath": {"reassoc", "contract", "nsz"},
    "cache": True,
    "nogil": True,
    "boundscheck": False,
    "error_model": "numpy",  # x/0 gives inf or nan as in PyTorch, not ZeroDivisionError
}

_uncached_warned = threading.Event()


class Kernels:
    """A lazily compiled set of numba kernels, thread-safe. `wide=True` compiles them with 16
    float32 lanes forced (`-force-vector-width=16`); a callable such as `wide_vectors_pay`
    decides at the first compilation. The LLVM option is process-wide, so it is set only around
    our own compilation and put back (0 = LLVM's own choice) before anything else compiles.
    `wide=False` leaves the width to LLVM: a forced width makes LLVM print a remark for every
    loop it cannot vectorise, which memory-bound elementwise kernels have plenty of."""

    def __init__(
        self,
        build: Callable[[dict[str, Any]], dict[str, tuple[Any, tuple]]],
        *,
        wide: bool | Callable[[], bool],
    ) -> None:
        self._build, self._wide = build, wide
        self._compiled: dict[str, Any] = {}
        self._lock = threading.Lock()

    def __getitem__(self, name: str) -> Any:
        if not self._compiled:
            with self._lock:
                if not self._compiled:
                    self._compiled.update(self._compile())
        return self._compiled[name]

    def _compile(self) -> dict[str, Any]:
        import llvmlite.binding as llvm

        try:
            kernels = self._build(FLAGS)
        except RuntimeError as e:  # numba found no writable place for its cache
            if "cannot cache" not in str(e):
                raise
            if not _uncached_warned.is_set():  # once a process, not once a kernel set
                _uncached_warned.set()
                warnings.warn(
                    "numba has no writable cache directory, so qkv's CPU kernels compile anew "
                    "in every process (a few seconds); set NUMBA_CACHE_DIR to a writable directory",
                    RuntimeWarning,
                    stacklevel=3,
                )
            kernels = self._build({**FLAGS, "cache": False})
        for kernel, _ in kernels.values():
            _key_by_source(kernel)
        wide = self._wide() if callable(self._wide) else self._wide
        if wide:
            llvm.set_option("", "-force-vector-width=16")
        try:
            for kernel, signature in kernels.values():
                kernel.compile(signature)  # from numba's disk cache when it has them
        finally:
            if wide:
                llvm.set_option("", "-force-vector-width=0")
        return {name: kernel for name, (kernel, _) in kernels.items()}


def _key_by_source(kernel: Any) -> None:
    """Let numba find `kernel` in its disk cache from another process.

    numba keys a cached closure by the pickle of its cells, and a pickled numba function carries
    a uuid made anew in every process: a kernel that closes over a helper (`exp2`, `tile`) was
    compiled again in every process (3 s for the fused forward, 9 s for its backward) and added
    one more entry to the cache each time. Here the cells count by what they compile from
    instead (`_compiled_from`). A kernel without a closure, or with caching off, is left as it is.
    """
    from numba.core.caching import FunctionCache

    if kernel.py_func.__closure__ is None or type(kernel._cache) is not FunctionCache:
        return

    class SourceKeyed(FunctionCache):
        def _index_key(self, sig, codegen):
            func = self._py_func
            code = hashlib.sha256(func.__code__.co_code).hexdigest()
            cells = hashlib.sha256(_compiled_from(func).encode()).hexdigest()
            return sig, codegen.magic_tuple(), (code, cells)

    kernel._cache = SourceKeyed(kernel.py_func)


def _compiled_from(func: Any, seen: set | None = None) -> str:
    """What a numba function compiles from besides its own bytecode, as text that is the same in
    every process: the plain constants it reads as globals (`BQ`, `LOG2E`: numba freezes them),
    and each closure cell: a numba function or intrinsic by its source and, recursively, what it
    compiles from; a module by its name; a number, string or bool by its repr. Anything else is
    pickled as numba would (a cache miss at worst, never a stale hit)."""
    from numba.core.serialize import dumps

    seen = set() if seen is None else seen
    if id(func) in seen:
        return ""
    seen.add(id(func))
    parts = [
        f"{name}={func.__globals__[name]!r}"
        for name in func.__code__.co_names
        if isinstance(func.__globals__.get(name), (bool, int, float, str))
    ]
    for cell in func.__closure__ or ():
        value = cell.cell_contents
        inner = getattr(value, "py_func", None) or getattr(value, "_defn", None)
        if inspect.isfunction(inner):
            try:
                parts.append(inspect.getsource(inner))
            except OSError:  # no source on disk
                parts.append(dumps(value).hex())
            options = getattr(value, "targetoptions", {})  # fastmath: a set, its order per process
            parts += [f"{k}={sorted(v) if isinstance(v, (set, frozenset)) else v!r}"
                      for k, v in sorted(options.items())]  # fmt: skip
            parts.append(_compiled_from(inner, seen))
        elif inspect.ismodule(value):
            parts.append(value.__name__)
        elif isinstance(value, (bool, int, float, str)):
            parts.append(repr(value))
        else:
            parts.append(dumps(value).hex())
    return "\n".join(parts)


def wide_vectors_pay() -> bool:
    """Whether 16 forced float32 lanes pay on this host: on AVX-512 hosts, yes. Intel's, where
    LLVM prefers 256-bit vectors: the block matmuls ~25% faster. AMD Zen 4, where LLVM already
    picks 512-bit: Q4_1 (every layer's matrices) 1.03–1.05×, Q8_0 (the unembedding) 0.97–1.00×
    (RESULTS.md, "Vector width"). Without AVX-512, 16 lanes would be split into narrower
    registers, and the width is left to LLVM."""
    import llvmlite.binding as llvm

    return "avx512f" in llvm.get_host_cpu_features().flatten()
