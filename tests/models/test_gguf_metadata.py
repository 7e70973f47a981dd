"""GGUF metadata as `read_gguf` parses it (`gguf._kv`, one pass over the bytes) against the gguf
library's own reader (`gguf.GGUFReader`, two NumPy views per element), the oracle: every value
type, arrays of each, an array of arrays, both byte orders, the real files, and headers cut or
corrupted at every kind of field."""

from __future__ import annotations

import numpy as np
import pytest

from qkv.models import gguf as qgguf

gguf = pytest.importorskip("gguf")


def library_value(field):
    """The gguf library's reading of a field as Python (its ReaderField.data indexes parts)."""
    kinds = field.types
    if kinds[0] == gguf.GGUFValueType.ARRAY:
        if kinds[-1] == gguf.GGUFValueType.STRING:
            return [bytes(field.parts[i]).decode("utf-8") for i in field.data]
        return [field.parts[i].item() for i in field.data]
    if kinds[0] == gguf.GGUFValueType.STRING:
        return bytes(field.parts[-1]).decode("utf-8")
    return field.parts[-1][0].item()


def library_metadata(path) -> dict:
    return {k: library_value(f) for k, f in gguf.GGUFReader(path).fields.items()}


def every_type(path, endianess) -> None:
    T = gguf.GGUFValueType
    w = gguf.GGUFWriter(str(path), "llama", endianess=endianess)
    for name, value, kind in [
        ("u8", 250, T.UINT8), ("i8", -7, T.INT8), ("u16", 65000, T.UINT16),
        ("i16", -30000, T.INT16), ("u32", 4_000_000_000, T.UINT32), ("i32", -2_000_000_000, T.INT32),
        ("f32", 0.1, T.FLOAT32), ("yes", True, T.BOOL), ("no", False, T.BOOL),
        ("u64", 2**63 + 5, T.UINT64), ("i64", -(2**62), T.INT64), ("f64", 0.1, T.FLOAT64),
        ("s", "crème — 中文 🙂", T.STRING), ("empty", "", T.STRING),
    ]:  # fmt: skip
        w.add_key_value(f"t.{name}", value, kind)
    w.add_array("t.strings", ["a", "", "naïve", "<|endoftext|>", "\n"])
    w.add_array("t.ints", [3, -1, 2**31 - 1])
    w.add_array("t.floats", [0.5, -1e-30, 3.4e38])
    w.add_array("t.bools", [True, False, True])
    w.add_array("t.none", [])
    w.add_array("t.nested", [[1, 2], [3]])
    w.add_tensor("x", np.arange(6, dtype=np.float32).reshape(2, 3))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("endianess", ["LITTLE", "BIG"])
def test_every_value_type_reads_as_the_library_reads_it(tmp_path, endianess):
    path = tmp_path / "all.gguf"
    every_type(path, getattr(gguf.GGUFEndian, endianess))
    got = qgguf._open_reader(path, gguf).metadata
    want = library_metadata(path)
    assert got == want
    assert list(got) == list(want)  # the same order, GGUF.version first
    assert got["t.s"] == "crème — 中文 🙂" and got["t.u64"] == 2**63 + 5
    assert got["t.nested"] == [1, 2, 3]  # flattened, as the library's data indexes
    if endianess == "LITTLE":
        assert qgguf.read_gguf(path, cache_dir=False).metadata == want
    else:  # the library's tensor views keep the file's bytes: refused, not misread
        with pytest.raises(ValueError, match=r"other byte order.*gguf-convert-endian"):
            qgguf.read_gguf(path, cache_dir=False)


@pytest.mark.slow
def test_a_real_file_reads_as_the_library_reads_it():
    """smollm2's 49k-token vocabulary, token types and merges: equal values, equal tensor table
    (gemma3's 262k vocabulary has the same kinds of fields; the library takes 20 s over it)."""
    from qkv.models import llama

    path = llama.package_file(llama.SMOLLM2_MODULE, llama.SMOLLM2_FILE, llama.SMOLLM2_PACKAGE)
    ours, lib = qgguf._open_reader(path, gguf), gguf.GGUFReader(path)
    assert ours.metadata == {k: library_value(f) for k, f in lib.fields.items()}
    assert len(ours.metadata["tokenizer.ggml.tokens"]) == 49152
    assert [(t.name, t.tensor_type, t.data_offset) for t in ours.tensors] == [
        (t.name, t.tensor_type, t.data_offset) for t in lib.tensors
    ]


def test_a_cut_or_corrupted_header_is_a_clear_error(tmp_path):
    """Cut inside a key, a string value, a string array, a number array; a length pointing past
    the end; an unknown value type: ValueError naming the file, never a wrong read."""
    path = tmp_path / "all.gguf"
    every_type(path, gguf.GGUFEndian.LITTLE)
    data = path.read_bytes()
    cut = tmp_path / "cut.gguf"
    # inside a key, a string value, a string array's element, a float array's values
    for marker, into in ((b"t.u8", 2), ("crème".encode(), 3), ("naïve".encode(), 2),
                         (b"t.floats", 8 + 16 + 4)):  # fmt: skip
        cut.write_bytes(data[: data.index(marker) + into])
        with pytest.raises(ValueError, match=r"cut\.gguf.*not a readable GGUF"):
            qgguf.read_gguf(cut, cache_dir=False)
    key = data.index(b"t.strings")  # its array length, far past the end
    bad = bytearray(data)
    bad[key + 9 + 4 + 4 : key + 9 + 4 + 12] = (2**40).to_bytes(8, "little")
    cut.write_bytes(bytes(bad))
    with pytest.raises(ValueError, match="not a readable GGUF"):
        qgguf.read_gguf(cut, cache_dir=False)
    bad = bytearray(data)
    bad[key + 9 : key + 13] = (77).to_bytes(4, "little")  # the value type
    cut.write_bytes(bytes(bad))
    with pytest.raises(ValueError, match="unknown GGUF value type 77"):
        qgguf.read_gguf(cut, cache_dir=False)
