"""L5 — the `qkv` command: a thin shell over public functions.

Each subcommand lives in its own module with `register(subparsers)`; it parses, calls one
public function, renders. Defaults come from the library's config dataclasses.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

# one module per subcommand group; each defines register(subparsers)
COMMANDS = ("demo", "explain", "generate", "heads", "models", "train")


def text_or_file(text: str | None, file: str | None, what: str = "text") -> str:
    """The positional TEXT, or the UTF-8 contents of --file PATH: exactly one of them."""
    if (text is None) == (file is None):
        raise ValueError(f"pass the {what} either as an argument or with --file PATH (not both)")
    if file is None:
        return text
    p = Path(file)
    if not p.is_file():
        raise FileNotFoundError(f"no {what} file at {file!r}")
    return p.read_text(encoding="utf-8")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qkv", description="Attention as a soft lookup.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"qkv.cli.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except (ValueError, TypeError, FileNotFoundError, IndexError, KeyError) as e:
        print(f"qkv {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
