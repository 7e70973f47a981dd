"""A full disk or a missing folder while writing weights reads as an OSError, and nothing is lost.

The oracle for the message format is safetensors itself: a save into a folder that does not exist
raises its real SafetensorError, which `save_safetensors` must turn into ENOENT. A full disk
cannot be made on demand, so its case patches `save_file` to raise the SafetensorError that
safetensors raised on CI's full disk, word for word ("... (os error 28)").
"""

from __future__ import annotations

import errno
from pathlib import Path

import pytest
import safetensors.torch
import torch
from safetensors import SafetensorError

from qkv.cli import main
from qkv.models import gemma3 as qgemma3
from qkv.models import gguf as qgguf
from qkv.models.files import save_safetensors

from .test_smollm2 import tiny_gguf

FULL_DISK = "Error while serializing: I/O error: No space left on device (os error 28)"


@pytest.fixture
def full_disk(monkeypatch):
    def save_file(*args, **kwargs):
        raise SafetensorError(FULL_DISK)

    monkeypatch.setattr(safetensors.torch, "save_file", save_file)


def test_missing_folder_is_enoent_naming_the_file(tmp_path):
    target = tmp_path / "absent" / "w.safetensors"
    with pytest.raises(OSError) as info:
        save_safetensors({"a": torch.zeros(3)}, target)
    assert info.value.errno == errno.ENOENT and info.value.filename == str(target)
    assert isinstance(info.value.__cause__, SafetensorError)  # the real library's error, kept


def test_full_disk_is_enospc(tmp_path, full_disk):
    with pytest.raises(OSError) as info:
        save_safetensors({"a": torch.zeros(3)}, tmp_path / "w.safetensors")
    assert info.value.errno == errno.ENOSPC and info.value.strerror == "No space left on device"


def test_other_safetensors_errors_pass_through(tmp_path, monkeypatch):
    def save_file(*args, **kwargs):
        raise SafetensorError("Error while serializing: header too large")

    monkeypatch.setattr(safetensors.torch, "save_file", save_file)
    with pytest.raises(SafetensorError, match="header too large"):
        save_safetensors({"a": torch.zeros(3)}, tmp_path / "w.safetensors")


def test_gguf_loads_on_a_full_disk_and_leaves_no_partial_entry(tmp_path, full_disk):
    """The cache is an optimisation: a full disk makes the next load slower, never this one fail."""
    path = tiny_gguf(tmp_path / "t.gguf")
    want = qgguf.read_gguf(path, cache_dir=False)
    got = qgguf.read_gguf(path, cache_dir=tmp_path / "cache")
    assert got.tensors.keys() == want.tensors.keys()
    assert all(torch.equal(got.tensors[k], t) for k, t in want.tensors.items())
    assert list((tmp_path / "cache").iterdir()) == []  # no .tmp- folder, no half entry


def test_train_on_a_full_disk_is_one_line_naming_the_file(tmp_path, capsys, full_disk):
    out = tmp_path / "run"
    args = ["train", "recall", "--out", str(out), "--steps", "2", "--d-model", "16", "-q"]
    assert main(args) == 1
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert last.startswith("qkv train: error: No space left on device: ") and str(out) in last
    assert "Traceback" not in err
    assert not [p for p in out.iterdir() if p.suffix == ".safetensors" or ".tmp" in p.name]


def test_gemma3_assembly_on_a_full_disk_names_the_fix_and_leaves_no_partial_file(
    tmp_path, monkeypatch
):
    try:
        pkg = qgemma3.importlib.import_module(qgemma3.MODULE)
        pkg.chunk_paths()
    except (ModuleNotFoundError, FileNotFoundError) as e:
        pytest.skip(f"gemma3 chunk packages not installed: {e}")

    def assemble(target, overwrite=False):
        Path(target).parent.mkdir(parents=True, exist_ok=True)
        with open(target, "wb") as f:
            f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pkg, "assemble", assemble)
    with pytest.raises(OSError, match=r"cannot assemble .* MiB\) in .*: No space left on device;"
                       r" free space there or set QKV_CACHE_DIR") as info:  # fmt: skip
        qgemma3.gguf_path(cache_dir=tmp_path)
    assert info.value.errno == errno.ENOSPC
    assert not list((tmp_path / "gemma3").glob("*.gguf"))
