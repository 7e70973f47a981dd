"""Layers import downward only: attention → nn/distributed → models → lens/train → cli/web."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "qkv"
LEVEL = {
    "attention": 1,
    "nn": 2,
    "distributed": 2,
    "models": 3,
    "lens": 4,
    "train": 4,
    "cli": 5,
    "web": 5,
}


def imported_layers(path: Path) -> set[str]:
    return layers_in(path.read_text(encoding="utf-8"), path.relative_to(SRC).parts)


def layers_in(source: str, pkg: tuple[str, ...]) -> set[str]:
    """qkv layers that `source` (the file at src/qkv/<pkg...>) imports, absolute or relative."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this file's package
                base = list(pkg[: len(pkg) - node.level])
                names = [".".join(["qkv", *base, node.module or ""]).rstrip(".")]
            else:
                names = [node.module or ""]
        for n in names:
            parts = n.split(".")
            if parts[0] == "qkv" and len(parts) > 1 and parts[1] in LEVEL:
                found.add(parts[1])
    return found


FILES = sorted(p for p in SRC.rglob("*.py") if p.relative_to(SRC).parts[0] in LEVEL)


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(SRC)))
def test_imports_flow_down(path):
    layer = path.relative_to(SRC).parts[0]
    for other in imported_layers(path):
        assert LEVEL[other] <= LEVEL[layer], (
            f"{layer} (L{LEVEL[layer]}) imports {other} (L{LEVEL[other]})"
        )


def test_the_check_can_fail():
    """The parser sees upward imports in both spellings, so a violation would be caught."""
    assert layers_in("from ..lens import explain\nimport qkv.cli", ("nn", "attention.py")) == {
        "lens",
        "cli",
    }
    assert layers_in("from .spec import Spec", ("attention", "api.py")) == {"attention"}
    assert FILES, "no source files found: the layer test would pass vacuously"
