"""An uncompressed .npz written piece by piece: what `np.savez` writes (a zip of .npy members,
stored, zip64), but every member's bytes sit at an offset known before any is written, so a
large array can be filled a slice at a time while it is computed, and never held whole.

    w = NpzWriter(fd, {"text": np.array("hi"), "weight": ((30, 9, 512, 512), np.float32)})
    w.write("weight", buf)   # the next bytes of `weight`, in C order, any number of calls
    w.close()                # CRCs into the local headers, then the central directory
    np.load(path)["weight"]  # reads it like any .npz; np.memmap(path, offset=w.data_offset(...))

Members given as arrays are written at once; members given as (shape, dtype) must then receive
exactly their nbytes through `write`, in order (the CRC runs along). Writes go through
`os.pwrite`, so the file object's own buffer is never used.
"""

from __future__ import annotations

import io
import os
import struct
import time
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.lib import format as npy

_LOCAL, _CENTRAL = 0x04034B50, 0x02014B50
_END64, _LOCATOR, _END = 0x06064B50, 0x07064B50, 0x06054B50
_VERSION = 45  # zip64
_MAX32 = 0xFFFFFFFF


@dataclass
class _Member:
    name: bytes  # "<key>.npy"
    offset: int  # of the local header
    data_offset: int  # of the array's first byte (after the .npy header)
    size: int  # the member's bytes: .npy header + array
    nbytes: int  # the array's bytes
    crc: int
    written: int = 0  # array bytes written so far


class NpzWriter:
    """Lay out `members` (name → array, or → (shape, dtype) to be filled by `write`) in the file
    open as `fd`, from offset 0. See the module docstring."""

    def __init__(self, fd: int, members: dict[str, Any]) -> None:
        self.fd = fd
        t = time.localtime()
        self._stamp = (t.tm_hour << 11 | t.tm_min << 5 | t.tm_sec // 2,
                       (t.tm_year - 1980) << 9 | t.tm_mon << 5 | t.tm_mday)  # fmt: skip
        self.members: dict[str, _Member] = {}
        at = 0
        for key, val in members.items():
            if isinstance(val, tuple):
                shape, dtype = val
                head = _npy_header(tuple(shape), np.dtype(dtype))
                body = None
                nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
            else:
                buf = io.BytesIO()
                npy.write_array(buf, np.asanyarray(val), allow_pickle=False)
                body = buf.getvalue()
                head, nbytes = body, 0
            name = f"{key}.npy".encode()
            local = self._local(name, len(head) + nbytes, 0)
            m = _Member(name, at, at + len(local) + len(head), len(head) + nbytes, nbytes,
                        zlib.crc32(head))  # fmt: skip
            self._put(at, local + head)
            self.members[key] = m
            at = m.offset + len(local) + m.size
        self._end = at

    def data_offset(self, key: str) -> int:
        """Where the array of member `key` starts in the file (for np.memmap)."""
        return self.members[key].data_offset

    def write(self, key: str, buf: Any) -> None:
        """Append `buf` (bytes-like, C order) to the array of member `key`."""
        m = self.members[key]
        view = memoryview(buf).cast("B")
        if m.written + len(view) > m.nbytes:
            raise RuntimeError(
                f"{key}: {m.written + len(view)} bytes written, the array holds {m.nbytes}"
            )
        self._put(m.data_offset + m.written, view)
        m.crc = zlib.crc32(view, m.crc)
        m.written += len(view)

    def close(self) -> None:
        """Patch the CRCs into the local headers and write the central directory."""
        short = [k for k, m in self.members.items() if m.written != m.nbytes]
        if short:
            raise RuntimeError(f"members not filled: {short}")
        central = b""
        for m in self.members.values():
            self._put(m.offset + 14, struct.pack("<I", m.crc))
            central += struct.pack(
                "<IHHHHHHIIIHHHHHII", _CENTRAL, 3 << 8 | _VERSION, _VERSION, 0, 0, *self._stamp,
                m.crc, _MAX32, _MAX32, len(m.name), 28, 0, 0, 0, 0o644 << 16, _MAX32,
            ) + m.name + struct.pack("<HHQQQ", 1, 24, m.size, m.size, m.offset)  # fmt: skip
        n, start = len(self.members), self._end
        end64 = start + len(central)
        tail = (
            struct.pack("<IQHHIIQQQQ", _END64, 44, _VERSION, _VERSION, 0, 0, n, n,
                        len(central), start)
            + struct.pack("<IIQI", _LOCATOR, 0, end64, 1)
            + struct.pack("<IHHHHIIH", _END, 0, 0, min(n, 0xFFFF), min(n, 0xFFFF),
                          min(len(central), _MAX32), _MAX32, 0)
        )  # fmt: skip
        self._put(start, central + tail)

    def _local(self, name: bytes, size: int, crc: int) -> bytes:
        return struct.pack(
            "<IHHHHHIIIHH", _LOCAL, _VERSION, 0, 0, *self._stamp, crc, _MAX32, _MAX32,
            len(name), 20,
        ) + name + struct.pack("<HHQQ", 1, 16, size, size)  # fmt: skip

    def _put(self, at: int, data: Any) -> None:
        view = memoryview(data).cast("B")
        while len(view):  # pwrite may write less than asked
            n = os.pwrite(self.fd, view, at)
            view, at = view[n:], at + n


def _npy_header(shape: tuple[int, ...], dtype: np.dtype) -> bytes:
    buf = io.BytesIO()
    d = {"descr": npy.dtype_to_descr(dtype), "fortran_order": False, "shape": shape}
    npy.write_array_header_1_0(buf, d)
    return buf.getvalue()
