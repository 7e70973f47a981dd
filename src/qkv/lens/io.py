"""Atomic output: a view is written to a temporary file beside its target, then renamed.

A reader never sees a half-written file, and a failed write leaves nothing behind. The rename
never replaces what is not a plain file: a symbolic link is followed (its target is written),
and a FIFO, a terminal or a device (/dev/stdout) is written in place, as a shell's `>` would.
A replaced file keeps its permission bits; a new one gets 0o666 less the umask.
"""

from __future__ import annotations

import os
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def _special(p: Path) -> bool:
    """Whether `p` exists and is not a plain file or a directory (a FIFO, a device, a socket)."""
    try:
        mode = os.stat(p).st_mode
    except OSError:
        return False
    return not (stat.S_ISREG(mode) or stat.S_ISDIR(mode))


def _umask() -> int:
    """This process's umask, read without changing it (Linux: /proc/self/status); 0o022 if
    unknown."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o022


def check_writable(path: str | os.PathLike) -> Path:
    """Raise a clear error now (before any work) if `path` cannot be written."""
    p = Path(path)
    if str(path) == "" or p.name == "":
        raise ValueError(f"output path must name a file, got {str(path)!r}")
    if p.is_dir():
        raise ValueError(f"output path {str(p)!r} is a directory; name a file inside it")
    if _special(p):  # written in place: only the file itself must take writes
        if not os.access(p, os.W_OK, effective_ids=True):
            raise ValueError(f"cannot write {str(p)!r}: permission denied")
        return p
    p = Path(os.path.realpath(p)) if p.is_symlink() else p  # a link: its target is written
    parent = p.parent if str(p.parent) else Path(".")
    if parent.exists() and not parent.is_dir():
        raise FileNotFoundError(
            f"cannot write {str(path)!r}: {str(parent)!r} is a file, not a directory"
        )
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
    of a large payload). Returns `path` as given (a link's name, not its target)."""
    p = check_writable(path)
    if isinstance(data, str):
        data = data.encode("utf-8")
    if _special(p):  # a FIFO or a device: in place, nothing to rename
        try:
            with open(p, "wb") as f:
                data(f) if callable(data) else f.write(data)
                f.flush()
        except BrokenPipeError:  # a reader that left (`| head`): the caller's to handle
            raise
        except OSError as e:
            raise ValueError(f"cannot write {str(path)!r}: {e.strerror or e}") from e
        return Path(path)
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
        try:  # the replaced file's permission bits, else a new file's
            mode = stat.S_IMODE(os.stat(p).st_mode)
        except FileNotFoundError:
            mode = 0o666 & ~_umask()
        os.chmod(tmp, mode)
        os.replace(tmp, p)
    except OSError as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise ValueError(f"cannot write {str(p)!r}: {e.strerror or e}") from e
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return Path(path)
