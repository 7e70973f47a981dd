"""`qkv generate PROMPT`: continue a text, or answer it with --chat, with a bundled decoder,
streaming the new text as it is decoded."""

from __future__ import annotations

import argparse
import sys

import qkv.models
from qkv.cli import add_dtype, text_or_file
from qkv.models import DEFAULT_MODEL
from qkv.models.registry import UnknownModel


def run(args: argparse.Namespace) -> int:
    prompt = text_or_file(args.prompt, args.file, "prompt")
    if args.temperature == 0 and (args.top_k is not None or args.seed is not None):
        flags = " and ".join(
            f for f, v in (("--top-k", args.top_k), ("--seed", args.seed)) if v is not None
        )
        raise ValueError(f"{flags} shape sampling, but --temperature 0 (the default) is greedy: "
                         "add --temperature T > 0, or drop them")  # fmt: skip
    bundled = {m.name for m in qkv.models.available()}
    if args.model in bundled and args.model not in decoders():
        raise not_a_decoder(args.model)  # before loading it
    try:
        model = qkv.models.load(args.model, dtype=args.dtype)
    except UnknownModel as e:  # offer the decoders only
        raise UnknownModel(e.name, decoders()) from None
    if not callable(getattr(model, "generate", None)):
        raise not_a_decoder(args.model)
    pieces = model.generate(
        prompt,
        args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        chat=args.chat,
        seed=args.seed,
        stream=True,
        truncate=args.truncate,
    )
    for piece in pieces:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def not_a_decoder(model: str) -> ValueError:
    return ValueError(
        f"--model {model!r} is not a decoder and cannot generate text; use a decoder "
        f"such as {' or '.join(decoders())} (`qkv models` lists them)"
    )


def decoders() -> list[str]:
    """The bundled models that generate (their loaders build a decoder)."""
    return [m.name for m in qkv.models.available() if "decoder" in m.architecture.lower()]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "generate",
        help="continue a text (or answer it, --chat) with a decoder, streamed",
        description="Greedy by default (--temperature 0); the KV cache keeps each step O(context). "
        "Stops at the model's end-of-turn token or after --max-new-tokens.",
    )
    p.add_argument("prompt", nargs="?", help="the text to continue (or --file PATH)")
    p.add_argument("--file", help="read the prompt from a UTF-8 text file")
    p.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"a decoder: a bundled name or a checkpoint directory (default {DEFAULT_MODEL})",
    )
    add_dtype(p)
    p.add_argument("--max-new-tokens", type=int, default=64, help="at most this many (default 64)")
    p.add_argument(
        "--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples"
    )
    p.add_argument("--top-k", type=int,
                   help="sample only among the k likeliest tokens (default: among all)")  # fmt: skip
    p.add_argument("--seed", type=int,
                   help="seed for sampling (reproducible output; default: a fresh one each run)")  # fmt: skip
    p.add_argument(
        "--chat", action="store_true", help="wrap the prompt in the model's chat template"
    )
    p.add_argument(
        "--truncate",
        action="store_true",
        help="keep the prompt's last tokens when it does not fit the context",
    )
    p.set_defaults(run=run)
