"""Writing weight files so that a failure reads as the OSError it is.

`safetensors.torch.save_file` reports a full disk or a missing folder as a `SafetensorError`
whose message carries the OS error ("I/O error: No space left on device (os error 28)"). Code
that already handles OSError (a cache that is skipped when it cannot be written, a CLI that
names the file) would let it through as a traceback. `save_safetensors` raises it as the
OSError it is, with errno, strerror and the file name.
"""

from __future__ import annotations

import errno as _errno
import os
import re
from pathlib import Path

from safetensors import SafetensorError
from torch import Tensor

_OS_ERROR = re.compile(r"\(os error (\d+)\)")


def save_safetensors(
    tensors: dict[str, Tensor], path: str | Path, metadata: dict[str, str] | None = None
) -> None:
    """`safetensors.torch.save_file(tensors, path, metadata)`; an I/O failure raises OSError
    (errno and strerror from the OS, `filename` = path), any other failure its SafetensorError."""
    from safetensors.torch import save_file

    try:
        save_file(tensors, str(path), metadata=metadata)
    except SafetensorError as e:
        found = _OS_ERROR.search(str(e))
        if found is None:
            raise
        code = int(found.group(1))
        raise OSError(
            code, os.strerror(code) or _errno.errorcode.get(code, "I/O error"), str(path)
        ) from e
