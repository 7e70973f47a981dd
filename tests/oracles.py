"""transformers' readings of the bundled GGUF files (smollm2, gemma3), made once per test session.

The oracle is transformers' own GGUF loader: the `gguf` library's header reader and NumPy
dequantisation, then transformers' model and tokenizer. What this module changes is only how
often that runs:

- one `from_pretrained` reads a file's header two times (the config, then the weights), and the
  tokenizer a third; gemma3's 262,144-token vocabulary takes the library ~21 s each time. Here
  the reader of a file is built once per oracle (`_one_reader_per_file`), while its model and
  tokenizer are made;
- the model (float32, eager attention: its rows are what `output_attentions` returns) and the
  tokenizer are made once per session and shared by the modules that compare with them
  (tests/models, tests/lens). Callers must not change them; a test that needs another setting
  passes it per call. The model's `generate` has no end-of-sequence token, so its greedy picks
  are never suppressed (`min_new_tokens`) nor cut short, as ours with `stop_ids=()`.
"""

from __future__ import annotations

import contextlib
import functools
import os
from pathlib import Path

import pytest
import torch


@contextlib.contextmanager
def _one_reader_per_file():
    """`gguf.GGUFReader` answers a second call for the same unchanged file with the reader it
    built the first time (transformers builds a new one per call; it only reads from it)."""
    import gguf

    made, original = {}, gguf.GGUFReader

    def reader(path, mode="r"):
        st = os.stat(path)
        key = (os.path.realpath(path), st.st_mtime_ns, st.st_size, mode)
        if key not in made:
            made[key] = original(path, mode)
        return made[key]

    gguf.GGUFReader = reader
    try:
        yield
    finally:
        gguf.GGUFReader = original


@functools.cache
def gguf_reference(path: Path):
    """(transformers' causal LM, transformers' tokenizer) read from the GGUF at `path`: float32,
    eager attention, in eval mode, no end-of-sequence token. Skips, naming what is missing,
    without transformers, accelerate (transformers needs it to load a GGUF) or gguf."""
    transformers = pytest.importorskip("transformers", reason="transformers is the parity oracle")
    pytest.importorskip("accelerate", reason="transformers needs accelerate to load a GGUF")
    pytest.importorskip("gguf", reason="transformers reads a GGUF with the gguf package")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with _one_reader_per_file():
        model = transformers.AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=torch.float32,
            attn_implementation="eager",
        )  # fmt: skip
        tokenizer = transformers.AutoTokenizer.from_pretrained(
            str(path.parent), gguf_file=path.name
        )
    model.generation_config.eos_token_id = None
    return model.eval(), tokenizer


def smollm2():
    """transformers' reading of the bundled smollm2 GGUF (Q4_1): (model, tokenizer)."""
    from qkv.models import llama

    return gguf_reference(
        llama.package_file(llama.SMOLLM2_MODULE, llama.SMOLLM2_FILE, llama.SMOLLM2_PACKAGE)
    )


def gemma3():
    """transformers' reading of the bundled gemma3 GGUF (Q4_K_M): (model, tokenizer)."""
    from qkv.models import gemma3 as qgemma3

    return gguf_reference(qgemma3.gguf_path())
