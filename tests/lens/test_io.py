"""`write_atomic` never destroys what a path names: a link is followed, a FIFO or a device is
written in place, a replaced file keeps its permission bits, a new one follows the umask.
Before, every write renamed a temp file over the path: a link became a plain file (its target
untouched), a FIFO's reader got nothing, a 0600 file became 0644, and root's `--json /dev/full`
replaced the device with a plain file and said "wrote"."""

from __future__ import annotations

import os
import stat
import threading

import pytest

from qkv.lens.io import write_atomic


def test_a_symbolic_link_is_followed(tmp_path):
    target = tmp_path / "target.json"
    target.write_text("old")
    link = tmp_path / "link.json"
    link.symlink_to("target.json")
    assert write_atomic(link, "new") == link
    assert link.is_symlink() and os.readlink(link) == "target.json"
    assert target.read_text() == "new"


def test_a_dangling_link_creates_its_target(tmp_path):
    link = tmp_path / "link.json"
    link.symlink_to("made.json")
    write_atomic(link, "x")
    assert link.is_symlink() and (tmp_path / "made.json").read_text() == "x"


def test_a_fifo_is_written_in_place(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    got = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_bytes()))
    reader.start()
    write_atomic(fifo, b"through the pipe")
    reader.join(timeout=30)
    assert got == [b"through the pipe"]
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)
    assert sorted(os.listdir(tmp_path)) == ["fifo"]  # no temp file left


def test_a_full_device_fails_and_stays_a_device():
    if not os.path.exists("/dev/full") or not stat.S_ISCHR(os.stat("/dev/full").st_mode):
        pytest.skip("this system has no /dev/full character device")
    with pytest.raises(ValueError, match=r"cannot write '/dev/full': No space left on device"):
        write_atomic("/dev/full", "x" * 10)
    assert stat.S_ISCHR(os.stat("/dev/full").st_mode)


@pytest.mark.parametrize("mode", [0o600, 0o640, 0o755])
def test_a_replaced_file_keeps_its_mode(tmp_path, mode):
    f = tmp_path / "secret.json"
    f.write_text("old")
    f.chmod(mode)
    write_atomic(f, "new")
    assert f.read_text() == "new" and stat.S_IMODE(os.stat(f).st_mode) == mode


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_a_new_file_follows_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        write_atomic(tmp_path / "new.json", "x")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "new.json").st_mode) == 0o666 & ~umask


def test_a_file_where_a_directory_should_be_is_named(tmp_path):
    (tmp_path / "f.txt").write_text("x")
    with pytest.raises(FileNotFoundError, match=r"f\.txt' is a file, not a directory"):
        write_atomic(tmp_path / "f.txt" / "x.png", b"x")
