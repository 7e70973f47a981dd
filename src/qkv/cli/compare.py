"""`qkv compare TEXT_A TEXT_B --token WORD`: how one token's lookups moved between two texts,
per layer and head (a causal model's query that cannot see the difference is compared at the
first token that differs instead, and the output says so)."""

from __future__ import annotations

import argparse
import sys

from qkv.cli import add_dtype, check_output, model_of, stdout_console, utf8_argument
from qkv.lens import compare
from qkv.models import DEFAULT_MODEL


def run(args: argparse.Namespace) -> int:
    if (args.token is None) == (args.index is None):
        raise ValueError("choose the query with --token WORD or --index I (exactly one)")
    if args.occurrence is not None and args.token is None:
        raise ValueError("--occurrence picks among repeats of --token WORD; give --token with it "
                         "(a position needs no occurrence)")  # fmt: skip
    if args.top < 1:
        raise ValueError(f"--top must be ≥ 1, got {args.top}")
    if args.json is not None and args.json != "-":
        check_output("--json", args.json)  # fail before the model runs
    result = compare(
        utf8_argument(args.text_a, "TEXT_A"),
        utf8_argument(args.text_b, "TEXT_B"),
        args.token if args.token is not None else args.index,
        model=model_of(args),
        occurrence=1 if args.occurrence is None else args.occurrence,
        layer=args.layer,
        head=args.head,
    )
    if args.json == "-":
        sys.stdout.write(result.to_json(indent=1) + "\n")
        return 0
    if args.json is not None:  # first: a reader of stdout that leaves early does not cost it
        result.to_json(args.json, indent=1)
    try:
        result.render(stdout_console(), n=args.top)
    finally:
        if args.json is not None:
            print(f"wrote {args.json}", file=sys.stderr)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "compare",
        help="how one token's lookups moved between two texts, per layer and head",
        description="Explain the query token in both texts with the same model and show, for keys "
        "matched by aligning the two token sequences, how each head's weights and contributions moved (B − A).",
    )
    p.add_argument("text_a", metavar="TEXT_A", help="the first text")
    p.add_argument("text_b", metavar="TEXT_B", help="the second text")
    p.add_argument("--token", help="the query: a word of both texts (always a word, even '1')")
    p.add_argument("--index", type=int, help="the query by position instead (-1 = the last)")
    p.add_argument("--occurrence", type=int,
                   help="which occurrence of a repeated --token word (from 1, the default; -1 = the "
                   "last)")  # fmt: skip
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"model name or checkpoint directory (default {DEFAULT_MODEL})")  # fmt: skip
    add_dtype(p)
    p.add_argument("--layer", type=int, help="only this layer (0-based; -1 = the last)")
    p.add_argument("--head", type=int, help="only this head (0-based; -1 = the last)")
    p.add_argument("--top", type=int, default=10, help="movers shown (default 10)")
    p.add_argument("--json", metavar="PATH|-", help="write the qkv.compare/1 record (- for stdout)")
    p.set_defaults(
        run=run,
        python_names={"token index": "--index", "text_a": "TEXT_A", "text_b": "TEXT_B"},
    )
