"""Validation shared by the config dataclasses of every layer (dependency-free)."""

from __future__ import annotations


def positive_ints(owner: str, obj: object, names: tuple[str, ...]) -> None:
    """Raise ValueError naming `owner.name` for each field that is not an int > 0."""
    for name in names:
        v = getattr(obj, name)
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise ValueError(f"{owner}.{name} must be a positive int, got {v!r}")
