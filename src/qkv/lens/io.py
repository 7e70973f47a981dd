"""Atomic output: a view is written to a temporary file beside its target, then renamed.

A reader never sees a half-written file, and a failed write leaves nothing behind.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def check_writable(path: str | os.PathLike) -> Path:
    """Raise a clear error now (before any work) if `path` cannot be written."""
    p = Path(path)
    if str(path) == "" or p.name == "":
        raise ValueError(f"output path must name a file, got {str(path)!r}")
    if p.is_dir():
        raise ValueError(f"output path {str(p)!r} is a directory; name a file inside it")
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        raise FileNotFoundError(
            f"cannot write {str(p)!r}: directory {str(parent)!r} does not exist (create it first)"
        )
    if not os.access(parent, os.W_OK | os.X_OK, effective_ids=True):
        raise ValueError(f"cannot write {str(p)!r}: directory {str(parent)!r} is not writable")
    if p.exists() and not os.access(p, os.W_OK, effective_ids=True):
        raise ValueError(f"cannot write {str(p)!r}: the file exists and is read-only")
    try:  # the bits can say yes where the file system says no (/proc, a read-only mount)
        fd, probe = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".probe", dir=parent)
    except OSError as e:
        raise ValueError(f"cannot write {str(p)!r}: {e.strerror or e}") from e
    os.close(fd)
    os.unlink(probe)
    return p


def write_atomic(path: str | os.PathLike, data: str | bytes | Callable[[BinaryIO], None]) -> Path:
    """Write `data` to `path` via a temp file + `os.replace`; on any failure nothing is left.
    `data` may be a writer `f -> None` that streams into the open temp file (no in-memory copy
    of a large payload)."""
    p = check_writable(path)
    if isinstance(data, str):
        data = data.encode("utf-8")
    try:  # the directory may change between the check and the write
        fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent or ".")
    except OSError as e:
        raise ValueError(f"cannot write {str(p)!r}: {e.strerror or e}") from e
    try:
        with os.fdopen(fd, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, p)
    except OSError as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise ValueError(f"cannot write {str(p)!r}: {e.strerror or e}") from e
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return p
