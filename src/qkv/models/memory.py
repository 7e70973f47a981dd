"""Refuse, before loading any weight, a model the machine cannot hold.

    check_fits(model, source)   # OSError(ENOMEM) naming the size, the memory and the fix

`model` is built on the meta device (shapes and dtypes, no memory), so its parameters' bytes are
known before the checkpoint is read. The memory is Linux's `MemAvailable` (free RAM plus the
page cache the kernel can drop) plus free swap, from /proc/meminfo; elsewhere nothing is checked.
A load that would not fit otherwise dies in the kernel's OOM killer or thrashes swap for minutes,
leaving no message at all.
"""

from __future__ import annotations

import errno

import torch
from torch import nn


def _size(n: int) -> str:
    for unit, step in (("GiB", 2**30), ("MiB", 2**20)):
        if n >= step:
            return f"{n / step:.1f} {unit}"
    return f"{n / 2**10:.1f} KiB"


def available_bytes() -> int | None:
    """MemAvailable + SwapFree in bytes, or None where /proc/meminfo does not say."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            fields = {k: v for k, _, v in (line.partition(":") for line in f)}
        return sum(int(fields[k].split()[0]) * 1024 for k in ("MemAvailable", "SwapFree"))
    except (OSError, KeyError, ValueError, IndexError):
        return None


def check_fits(model: nn.Module, source: str) -> None:
    """OSError(ENOMEM) if `model`'s parameters and buffers need more bytes than the machine
    has (`available_bytes`); the message names both and, for a float32/float64 model, the dtype
    that halves it."""
    have = available_bytes()
    if have is None:
        return
    tensors = [*model.parameters(), *model.buffers()]
    need = sum(t.numel() * t.element_size() for t in tensors if t.is_floating_point())
    if need <= have:
        return
    dtype = next((t.dtype for t in tensors if t.is_floating_point()), torch.float32)
    name = str(dtype).removeprefix("torch.")
    hint = (
        "; load it with dtype=bfloat16 to halve that"
        if dtype in (torch.float32, torch.float64)
        else "; free memory or use a machine with more"
    )
    raise OSError(
        errno.ENOMEM,
        f"{source}: the model needs {_size(need)} in {name} but this machine has "
        f"{_size(have)} available (RAM and swap){hint}",
    )
