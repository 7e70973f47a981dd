"""L5 — the `qkv` command: a thin shell over public functions.

Each subcommand lives in its own module with `register(subparsers)`; it parses, calls one
public function, renders. Defaults come from the library's config dataclasses.
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import sys
from pathlib import Path
from typing import Any

# one module per subcommand group; each defines register(subparsers)
COMMANDS = ("compare", "demo", "explain", "export", "generate", "heads", "models", "serve", "train")


def utf8_argument(text: str, what: str, file_flag: bool = False) -> str:
    """`text` if it is UTF-8 as typed; else a ValueError naming the first byte that is not
    (Python keeps such bytes of an argument as lone surrogates, which no tokenizer takes)."""
    bad = next((i for i, c in enumerate(text) if 0xD800 <= ord(c) <= 0xDFFF), None)
    if bad is None:
        return text
    raw = text[:bad].encode("utf-8", "surrogateescape")
    byte = f"byte 0x{ord(text[bad]) - 0xDC00:02x}" if ord(text[bad]) >= 0xDC80 else "a byte"
    raise ValueError(
        f"{what} is not UTF-8 text ({byte} at offset {len(raw)}); type it in a UTF-8 terminal"
        + (" or pass it with --file PATH" if file_flag else "")
    )


def text_or_file(text: str | None, file: str | None, what: str = "text") -> str:
    """The positional TEXT, or the UTF-8 contents of --file PATH: exactly one of them."""
    if text is None and file is None:
        raise ValueError(f"pass the {what} as an argument or with --file PATH")
    if text is not None and file is not None:
        raise ValueError(f"pass the {what} either as an argument or with --file PATH, not both")
    if file is None:
        return utf8_argument(text, f"the {what} argument", file_flag=True)
    p = Path(file)
    if not p.is_file():
        raise FileNotFoundError(f"--file: no {what} file at {file!r}")
    try:
        out = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(
            f"--file {file!r} is not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset "
            f"{e.start}); save it as UTF-8"
        ) from None
    if "\x00" in out:  # valid UTF-8, but no text holds NUL: an archive, an image, a binary
        raise ValueError(f"--file {file!r} is binary (a NUL byte at offset "
                         f"{len(out[: out.index(chr(0))].encode())}); pass a text file")  # fmt: skip
    return out


DTYPES = ("float32", "bfloat16", "float16", "float64", "bf16", "fp16", "fp32", "fp64")


def add_dtype(p: argparse.ArgumentParser) -> None:
    """--dtype: the model's parameters (and so its activations) in that dtype."""
    p.add_argument("--dtype", choices=DTYPES, metavar="DTYPE",
                   help="the model's weights and activations: float32 (the default), bfloat16 "
                   "(bf16: half the memory), float16 (fp16) or float64")  # fmt: skip


def model_of(args: argparse.Namespace) -> Any:
    """--model as the library takes it: the name or path, or with --dtype the model loaded in
    that dtype (`qkv.load(..., dtype=)`)."""
    if getattr(args, "dtype", None) is None:
        return args.model
    from qkv.models import load

    return load(args.model, dtype=args.dtype)


def check_output(flag: str, path: str, check: Any = None) -> None:
    """Fail now, before the model runs, if `path` (given with `flag`) cannot be written: the
    error names the flag. `check` defaults to `qkv.lens.io.check_writable`."""
    if check is None:
        from qkv.lens.io import check_writable as check
    try:
        check(path)
    except (ValueError, FileNotFoundError) as e:
        if not str(e).startswith(("cannot write", "output path")):  # names its flag already
            raise
        raise type(e)(f"{flag}: {e}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qkv", description="Attention as a soft lookup.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"qkv.cli.{name}").register(sub)
    return parser


def _flags(parser: argparse.ArgumentParser) -> dict[str, tuple[str, bool]]:
    """dest → (its long flag, whether it takes a value), over the parser and its subcommands."""
    out: dict[str, tuple[str, bool]] = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for p in action.choices.values():
                out.update(_flags(p))
        elif action.option_strings and action.dest != "help":
            out[action.dest] = (action.option_strings[-1], action.nargs != 0)
    return out


def cli_message(message: str, flags: dict[str, tuple[str, bool]], names: dict[str, str]) -> str:
    """A library error in the CLI's words: Python names become the flags that set them.

    `names` maps a phrase or Python name to its flag ("token index" → "--index",
    "n_records" → "--records"); `flags` is dest → (flag, takes a value), from the parser.
    Rewritten: `Owner.name` / `Owner: name` (a config field), `name=value` (a keyword
    argument), a name with an underscore anywhere, and a plain name opening a clause before
    "must", "counts" or "N out of range"."""
    table = {k: (v, True) for k, v in names.items()} | flags

    def flag(name: str) -> str | None:
        return table[name][0] if name in table else None

    def kwarg(m: re.Match) -> str:
        name, value = m.group(1), m.group(2)
        f = flag(name)
        if f is None:
            return m.group(0)
        return f if value is None or (value == "True" and not table[name][1]) else f"{f} {value}"

    for phrase, f in sorted(names.items(), key=lambda t: -len(t[0])):
        if " " in phrase:
            message = re.sub(rf"(?<![\w-]){re.escape(phrase)}\b", f, message)

    def switch_off(m: re.Match) -> str:  # "with chat=False": there is no "--chat False"
        f = flag(m.group(1))
        return m.group(0) if f is None or table[m.group(1)][1] else f"without {f}"

    message = re.sub(r"\bwith ([a-z_]\w*)=False\b", switch_off, message)
    value = r"=([^\s,;)]*[^\s,;).])"  # name=value (a sentence's full stop is not the value's)
    message = re.sub(rf"\b[A-Z]\w*(?:\.|: )([a-z_]\w*)\b(?:{value})?", kwarg, message)
    message = re.sub(rf"(?<![\w.-])([a-z_]\w*){value}", kwarg, message)
    message = re.sub(
        r"(?<![\w-])([a-z]\w*_\w+)\b", lambda m: flag(m.group(1)) or m.group(0), message
    )
    message = re.sub(r"\bor None\b", "or left out", message)  # Python's "unset"
    message = re.sub(r"^unknown model ('[^']*'):", r"--model \1 is not a bundled model:", message)
    return re.sub(
        r"(^|; |\. )([a-z]\w*)(?= (?:must|counts|-?\d+ out of range)\b)",
        lambda m: m.group(1) + (flag(m.group(2)) or m.group(2)),
        message,
    )


def stdout_console() -> Any:
    """A rich Console on stdout whose broken pipe reaches `main` as BrokenPipeError (rich's
    own handler exits 1)."""
    from rich.console import Console

    class _Console(Console):
        def on_broken_pipe(self) -> None:
            self.quiet = True
            raise BrokenPipeError

    return _Console()


def _quiet_stdout() -> None:
    """After a broken pipe: point stdout at /dev/null so that the exit flush stays silent."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError):  # no real file descriptor (captured output)
        pass


def _tolerant_streams() -> None:
    """A terminal whose locale cannot show a character (LC_ALL=C without UTF-8 mode) gets an
    escape such as \\u03b8 for it, not a UnicodeEncodeError."""
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")


def _utf8_args(argv: list[str]) -> list[str]:
    """Arguments as the UTF-8 text they were typed in. Under a non-UTF-8 locale Python keeps
    the bytes it could not decode as lone surrogates, which no tokenizer takes; those bytes
    are decoded again as UTF-8 (an argument that is not UTF-8 either is left as it is)."""
    out = []
    for a in argv:
        try:
            out.append(a.encode(sys.getfilesystemencoding(), "surrogateescape").decode("utf-8"))
        except UnicodeError:
            out.append(a)
    return out


def os_message(e: OSError) -> str:
    """One line for an OSError: its reason and the file it names ("No space left on device:
    /cache/x"), without errno's "[Errno 28]" prefix."""
    reason = e.strerror or str(e)
    return f"{reason}: {e.filename}" if e.filename else reason


def main(argv: list[str] | None = None) -> int:
    """Run one command. Exit codes: 0 done; 1 the system refused (a full disk, a read-only
    folder: one line naming the file); 2 bad input (one line naming the flag); 130
    interrupted (Ctrl-C); 141 the reader of stdout went away (`| head`); no traceback."""
    _tolerant_streams()
    try:
        parser = build_parser()
        args = parser.parse_args(_utf8_args(sys.argv[1:] if argv is None else argv))
        try:
            rc = int(args.run(args) or 0)
        except (ValueError, TypeError, FileNotFoundError, IndexError, KeyError) as e:
            msg = e.args[0] if isinstance(e, KeyError) and e.args else e
            msg = getattr(e, "cli_text", msg)  # the error without its Python-only advice
            names = getattr(args, "python_names", {})
            print(f"qkv {args.command}: error: {cli_message(str(msg), _flags(parser), names)}",
                  file=sys.stderr)  # fmt: skip
            return 2
        except BrokenPipeError:
            raise
        except OSError as e:  # the system refused: a full disk, a read-only folder, no memory
            names = getattr(args, "python_names", {})
            msg = cli_message(os_message(e), _flags(parser), names)
            print(f"qkv {args.command}: error: {msg}", file=sys.stderr)
            return 1
        sys.stdout.flush()  # a closed pipe shows here, not at interpreter exit
        return rc
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        _quiet_stdout()
        return 141
