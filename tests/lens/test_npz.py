"""The streaming .npz writer, checked by readers that share no code with it: Python's zipfile
(which verifies every member's CRC-32) and np.load."""

from __future__ import annotations

import os
import zipfile

import numpy as np
import pytest

from qkv.lens.npz import NpzWriter


def write(path, members, fills):
    fd = os.open(path, os.O_CREAT | os.O_RDWR | os.O_TRUNC, 0o644)
    try:
        w = NpzWriter(fd, members)
        for key, piece in fills:
            w.write(key, piece)
        w.close()
    finally:
        os.close(fd)
    return w


def test_np_load_and_zipfile_read_what_it_writes(tmp_path):
    rng = np.random.default_rng(0)
    big = rng.standard_normal((3, 2, 5, 7)).astype(np.float32)
    other = rng.integers(-9, 9, (4, 1, 3)).astype(np.int32)
    small = {"text": np.array("Le café 🎉 東京"), "tokens": np.array(["a", "éé", ""]),
             "offsets": np.arange(6, dtype=np.int64).reshape(3, 2), "n": np.float64(0.5)}  # fmt: skip
    members = {**small, "big": (big.shape, big.dtype), "other": (other.shape, other.dtype)}
    # the two filled members interleave, as a layer of weights and one of contributions do
    fills = [("big", big[0]), ("other", other[:2]), ("big", big[1:]), ("other", other[2:])]
    path = tmp_path / "a.npz"
    w = write(path, members, fills)
    with zipfile.ZipFile(path) as z:
        assert z.testzip() is None  # every CRC-32 checks out
        assert [i.filename for i in z.infolist()] == [f"{k}.npy" for k in members]
        assert all(i.compress_type == zipfile.ZIP_STORED for i in z.infolist())
    got = np.load(path)
    for key, val in small.items():
        assert got[key].dtype == val.dtype
        np.testing.assert_array_equal(got[key], val)
    np.testing.assert_array_equal(got["big"], big)
    np.testing.assert_array_equal(got["other"], other)
    m = np.memmap(path, np.float32, "r", offset=w.data_offset("big"), shape=big.shape)
    np.testing.assert_array_equal(m, big)


def test_the_crc_check_can_fail(tmp_path):
    """A flipped byte in a filled member's data is caught by zipfile's CRC: the CRCs are real."""
    a = np.arange(1000, dtype=np.float32)
    path = tmp_path / "a.npz"
    w = write(path, {"a": (a.shape, a.dtype)}, [("a", a)])
    with open(path, "r+b") as f:
        f.seek(w.data_offset("a") + 123)
        b = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([b[0] ^ 0xFF]))
    with zipfile.ZipFile(path) as z:
        assert z.testzip() == "a.npy"


def test_too_many_or_too_few_bytes_are_errors(tmp_path):
    fd = os.open(tmp_path / "a.npz", os.O_CREAT | os.O_RDWR, 0o644)
    try:
        w = NpzWriter(fd, {"a": ((4,), np.float32)})
        with pytest.raises(RuntimeError, match="20 bytes written, the array holds 16"):
            w.write("a", np.zeros(5, np.float32))
        w.write("a", np.zeros(2, np.float32))
        with pytest.raises(RuntimeError, match=r"members not filled: \['a'\]"):
            w.close()
    finally:
        os.close(fd)
