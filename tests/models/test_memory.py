"""A checkpoint the machine cannot hold is refused before any weight is read, naming the size,
the memory and the dtype that halves it (`qkv.models.memory`). Oracles: the bytes of the
checkpoint's own tensors (read with safetensors here) and the OS's count of free pages."""

from __future__ import annotations

import errno
import os
import sys

import pytest
import torch
from safetensors.torch import load_file

import qkv
from qkv.cli import main
from qkv.models import memory

from .test_families import build, word_tokenizer


@pytest.fixture
def folder(tmp_path):
    build("llama", tmp_path)  # untied, q/k/v/o and MLP biases
    word_tokenizer().save(str(tmp_path / "tokenizer.json"))
    return tmp_path


def _file_bytes(folder, itemsize: int) -> int:
    return sum(t.numel() for t in load_file(str(folder / "model.safetensors")).values()) * itemsize


@pytest.mark.parametrize(("dtype", "itemsize"), [("float32", 4), ("bfloat16", 2)])
def test_the_limit_is_the_model_s_own_bytes(folder, monkeypatch, dtype, itemsize):
    """One byte short of the checkpoint's tensors in the asked dtype is refused; exactly
    enough loads."""
    need = _file_bytes(folder, itemsize)
    monkeypatch.setattr(memory, "available_bytes", lambda: need - 1)
    with pytest.raises(OSError) as info:
        qkv.load(folder, dtype=dtype)
    assert info.value.errno == errno.ENOMEM
    monkeypatch.setattr(memory, "available_bytes", lambda: need)
    assert {p.dtype for p in qkv.load(folder, dtype=dtype).parameters()} == {getattr(torch, dtype)}


def test_the_message_names_the_sizes_and_the_fix(folder, monkeypatch):
    need = _file_bytes(folder, 4)
    monkeypatch.setattr(memory, "available_bytes", lambda: 2048)
    with pytest.raises(OSError, match=rf"the model needs {need / 1024:.1f} KiB in float32 but "
                       r"this machine has 2\.0 KiB available \(RAM and swap\); load it with "
                       r"dtype=bfloat16 to halve that"):  # fmt: skip
        qkv.load(folder)
    with pytest.raises(OSError, match=r"in bfloat16 .*; free memory or use a machine with more"):
        qkv.load(folder, dtype="bf16")


def test_the_cli_says_it_in_one_line_and_exits_1(folder, monkeypatch, capsys):
    monkeypatch.setattr(memory, "available_bytes", lambda: 2048)
    rc = main(["explain", "the dog chased the ball because it was excited", "--token", "it",
               "--model", str(folder)])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 1 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert err.startswith("qkv explain: error: ") and "load it with --dtype bfloat16 to" in err


def test_unknown_memory_checks_nothing(folder, monkeypatch):
    monkeypatch.setattr(memory, "available_bytes", lambda: None)
    assert qkv.load(folder) is not None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/meminfo is Linux's")
def test_available_is_at_least_the_free_pages():
    """MemAvailable + SwapFree ≥ the pages nobody uses (free RAM, which MemAvailable contains)."""
    free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    got = memory.available_bytes()
    assert got is not None and got >= free * 0.9  # the two reads are a moment apart
