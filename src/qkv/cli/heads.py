"""`qkv heads`: rank heads by pronoun → antecedent accuracy on Winograd-style minimal pairs."""

from __future__ import annotations

import argparse

from qkv.cli import add_dtype, model_of, stdout_console
from qkv.lens import head_search
from qkv.models import DEFAULT_MODEL


def run(args: argparse.Namespace) -> int:
    if args.top < 1:
        raise ValueError(f"--top must be ≥ 1, got {args.top}")
    result = head_search(model_of(args), args.data)
    result.render(stdout_console(), n=args.top)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "heads",
        help="rank heads by how well they route a pronoun to its antecedent",
        description="For each sentence, a head predicts the candidate that gets the most weight from the "
        "pronoun (and, for a causal model, from the word that decides the referent). Each head's "
        "accuracy is set against chance, the best of as many heads guessing at random (an exact "
        "null: `*` marks p < 0.05, corrected for the number of heads), and against the "
        "nearest-candidate baseline (Clark et al. 2019).",
    )
    p.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"model name or checkpoint directory (default {DEFAULT_MODEL})",
    )
    add_dtype(p)
    p.add_argument(
        "--data", help="a JSONL file of examples (default: the bundled Winograd-style pairs)"
    )
    p.add_argument("--top", type=int, default=10, help="heads shown per table (default 10)")
    p.set_defaults(run=run)
