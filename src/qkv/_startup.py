"""Ctrl-C while the `qkv` command is still importing torch exits 130 without a traceback.

Once `qkv.cli.main` runs it handles KeyboardInterrupt itself; before that, the package import
(~2 s, mostly torch) would print a traceback of importlib frames. Only a process started as the
command (`qkv ...` or `python -m qkv ...`) is affected: `import qkv` in a program, a notebook or
a REPL keeps Python's KeyboardInterrupt.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections.abc import Iterator


def _started_as_the_cli() -> bool:
    argv0 = sys.argv[0] if sys.argv else ""
    # runpy sets argv[0] to "-m" while it imports the package of `python -m qkv`
    return argv0 == "-m" or os.path.basename(argv0) == "qkv"


@contextlib.contextmanager
def quiet_interrupts_while_the_cli_starts() -> Iterator[None]:
    if (
        not _started_as_the_cli()
        or signal.getsignal(signal.SIGINT) is not signal.default_int_handler
    ):
        yield
        return
    signal.signal(signal.SIGINT, lambda *_: os._exit(130))  # nothing to flush yet
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
