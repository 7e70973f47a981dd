"""Numba kernels behind the CPU fast paths (`nn.quant`'s block matmuls, `nn.fused`'s
elementwise kernels): compiled once per process against explicit signatures, loaded from
numba's disk cache when it has them.

    KERNELS = Kernels(build, wide=wide_vectors_pay)   # build() → {name: (dispatcher, signature)}
    KERNELS["q4_1"](x, ...)               # the first lookup compiles all that `build` returns
"""

from __future__ import annotations

import threading
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


class Kernels:
    """A lazily compiled set of numba kernels, thread-safe. `wide=True` compiles them with 16
    float32 lanes forced (`-force-vector-width=16`); a callable such as `wide_vectors_pay`
    decides at the first compilation. The LLVM option is process-wide, so it is set only around
    our own compilation and put back (0 = LLVM's own choice) before anything else compiles.
    `wide=False` leaves the width to LLVM: a forced width makes LLVM print a remark for every
    loop it cannot vectorise, which memory-bound elementwise kernels have plenty of."""

    def __init__(
        self, build: Callable[[], dict[str, tuple[Any, tuple]]], *, wide: bool | Callable[[], bool]
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

        kernels = self._build()
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


def wide_vectors_pay() -> bool:
    """Whether 16 forced float32 lanes pay on this host: on AVX-512 hosts, yes (Intel, where
    LLVM prefers 256-bit vectors: ~25% on the block matmuls; AMD Zen 4, where LLVM already picks
    512-bit: 1.00–1.04×, RESULTS.md); elsewhere 16 lanes would be split into narrower registers."""
    import llvmlite.binding as llvm

    return "avx512f" in llvm.get_host_cpu_features().flatten()
