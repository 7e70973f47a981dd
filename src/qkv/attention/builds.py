"""Where Triton could not build a kernel on this GPU, remembered for the process.

A kernel that does not compile or fit (Triton's CompilationError, OutOfResources, PTXASError)
fails the same way on every later call with the same dtype and head dim, so `auto` warns once
and takes another path there, and only there: an OutOfResources for fp32 at D = 256 leaves
bf16 at D = 128 on Triton. Importable without Triton.
"""

from __future__ import annotations

import warnings

import torch


def head_dim_class(D: int) -> int:
    """The head dim the kernels are built for: D padded to a power of two ≥ 16."""
    return max(16, 1 << (max(D, 1) - 1).bit_length())


class BuildFailures:
    """Build failures of one kernel family, by (input dtype, `head_dim_class`).

    `what` names the kernels in the warning ("the Triton kernel"), `instead` says what runs
    in their place ("backend='auto' runs 'tiled' instead"), `hint` ends it."""

    def __init__(self, what: str, instead: str, hint: str = "") -> None:
        self.what, self.instead, self.hint = what, instead, hint
        self.seen: dict[tuple[torch.dtype, int], str] = {}

    def broken(self, dtype: torch.dtype, D: int) -> bool:
        """Whether these kernels failed to build here for `dtype` and head dim `D`."""
        return (dtype, head_dim_class(D)) in self.seen

    def record(self, e: Exception, dtype: torch.dtype, D: int, stacklevel: int = 3) -> None:
        """Remember build error `e` for (dtype, D), warning the first time for that pair."""
        key = (dtype, head_dim_class(D))
        if key in self.seen:
            return
        self.seen[key] = f"{type(e).__name__}: {str(e)[:300]}"
        warnings.warn(
            f"qkv.attention: {self.what} could not be built on this GPU for {dtype} with head "
            f"dim {D} ({self.seen[key]}); {self.instead} for those from now on.{self.hint}",
            RuntimeWarning,
            stacklevel=stacklevel + 1,
        )
