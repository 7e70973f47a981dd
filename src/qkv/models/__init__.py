"""L3 — real checkpoints on the engine: configs, weight conversion, tokenizers."""

from .registry import DEFAULT_MODEL, MODELS, ModelInfo, available, load

__all__ = ["DEFAULT_MODEL", "MODELS", "ModelInfo", "available", "load"]
