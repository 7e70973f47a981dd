"""A model's floating-point dtype: `as_dtype` reads it, `cast` moves a model to it.

    as_dtype("bf16")            → torch.bfloat16   ("float32"/"fp32", "bfloat16"/"bf16",
                                                   "float16"/"fp16"/"half", "float64"/"double")
    cast(model, torch.bfloat16) → model, in place: every floating parameter and buffer in
                                  bfloat16, except those a module names in `keep_float32`
                                  (kept float32 in float16/bfloat16 only: float64 casts all)

`keep_float32` is a tuple of names relative to the module that holds it ("router.weight",
"score_bias"): what transformers keeps in float32 in a half-precision model
(`_keep_in_fp32_modules_strict`), such as DeepSeek-V3's gate. `model.to(dtype)` casts those too.
Integer and boolean tensors are never touched. Works on the meta device (a model built before
its weights are loaded), so a checkpoint is read straight into the dtype, never through float32.
"""

from __future__ import annotations

import torch
from torch import nn

FLOATS: dict[str, torch.dtype] = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "float64": torch.float64, "fp64": torch.float64, "double": torch.float64,
}  # fmt: skip
NAMES = ("float32", "bfloat16", "float16", "float64")


def as_dtype(dtype: torch.dtype | str | None, name: str = "dtype") -> torch.dtype:
    """A floating torch dtype from a dtype or one of its names; None → float32. `name` is the
    argument's name in the error."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        if dtype in FLOATS.values():
            return dtype
    elif isinstance(dtype, str) and dtype.lower().removeprefix("torch.") in FLOATS:
        return FLOATS[dtype.lower().removeprefix("torch.")]
    raise ValueError(
        f"{name} must be one of {', '.join(repr(n) for n in NAMES)} (or that torch dtype), "
        f"got {dtype!r}"
    )


def kept_float32(model: nn.Module) -> set[str]:
    """The state_dict names of `model` that `cast` leaves float32 (`keep_float32`)."""
    out = set()
    for prefix, m in model.named_modules():
        for leaf in getattr(m, "keep_float32", ()):
            out.add(f"{prefix}.{leaf}" if prefix else leaf)
    return out


def cast(model: nn.Module, dtype: torch.dtype | str) -> nn.Module:
    """`model` with its floating parameters and buffers in `dtype`, in place (see the module
    docstring); returns it. Parameter objects are kept (their data replaced, as `Module.to`
    does), so tied weights stay tied."""
    dtype = as_dtype(dtype)
    half = dtype in (torch.float16, torch.bfloat16)
    keep = kept_float32(model) if half else set()  # float64: all of it, the routers too
    buffers: dict[int, torch.Tensor] = {}  # a buffer two modules share stays shared
    for prefix, m in model.named_modules(remove_duplicate=False):
        dot = f"{prefix}." if prefix else ""
        for n, p in m._parameters.items():
            if p is not None and p.is_floating_point() and p.dtype != dtype and dot + n not in keep:
                p.data = p.data.to(dtype)
        for n, b in list(m._buffers.items()):
            if b is None or not b.is_floating_point() or b.dtype == dtype or dot + n in keep:
                continue
            m._buffers[n] = buffers.setdefault(id(b), b.to(dtype))
    return model
