"""`qkv export TEXT --out FILE.npz`: every token's attention rows, from one forward.

Dense (layer, head, query, key) weights and contributions for texts of at most
DENSE_MAX_TOKENS tokens, the top-k keys of each row beyond (or as --top says)."""

from __future__ import annotations

import argparse
import sys

import numpy as np

from qkv.cli import add_dtype, check_output, model_of, text_or_file
from qkv.lens.export import (
    DENSE_MAX_TOKENS,
    SPARSE_TOP,
    TopRows,
    check_export_path,
    export_text,
)
from qkv.models import DEFAULT_MODEL


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def run(args: argparse.Namespace) -> int:
    text = text_or_file(args.text, args.file, "text")
    if args.top is not None and args.top < 0:
        raise ValueError(f"--top must be ≥ 0 (0 = dense rows), got {args.top}")
    try:
        check_output("--out", args.out, check_export_path)  # fail before the model runs
    except ImportError as e:
        raise ValueError(str(e).replace("writing .parquet", "--out FILE.parquet")) from None
    progress = sys.stderr.isatty()
    rows, path = export_text(
        text,
        args.out,
        model=model_of(args),
        top=args.top,
        truncate=args.truncate,
        progress=progress,
    )
    L, H, Q = len(rows.layers), rows.model.n_heads, len(rows.queries)
    if path.suffix.lower() == ".parquet":
        key = "kept key" if isinstance(rows, TopRows) else "key"
        what = f"one table row per (layer, head, query, {key}): weight and contribution"
    elif isinstance(rows, TopRows):
        what = f"top {rows.index.shape[-1]} keys per row (index, weight, contribution)"
    else:
        what = f"dense rows ({len(rows.tokens)} keys; weight float32 + value_norm (l h j))"
    held = (
        f"{_mib(rows.nbytes)} of rows, streamed to disk a layer at a time"
        if isinstance(rows.weight, np.memmap)
        else f"{_mib(rows.nbytes)} in memory"
    )
    print(
        f"wrote {path}: {L} layers × {H} heads × {Q} queries, {what}: "
        f"{held}, {_mib(path.stat().st_size)} on disk"
    )
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="every token's exact attention rows from one forward, to .npz or .parquet",
        description="Run the model once and write every query's exact attention rows (all "
        f"layers and heads): dense up to {DENSE_MAX_TOKENS} tokens, the top {SPARSE_TOP} keys "
        "of each row beyond. The .npz holds tokens, offsets, layers, queries and either weight "
        "(l h i j) + value_norm (l h j), contribution = weight · value_norm, or index/weight/"
        "contribution (l h i k).",
    )
    p.add_argument("text", nargs="?", metavar="TEXT", help="the text (or --file PATH)")
    p.add_argument("--file", metavar="PATH", help="read the text from a UTF-8 file")
    p.add_argument("--out", required=True, metavar="FILE.npz|FILE.parquet",
                   help="where to write (.parquet needs pyarrow)")  # fmt: skip
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"model name or checkpoint directory (default {DEFAULT_MODEL})")  # fmt: skip
    add_dtype(p)
    p.add_argument("--top", type=int, default=None,
                   help=f"keys kept per row; 0 = dense (default: dense up to {DENSE_MAX_TOKENS} "
                   f"tokens, else {SPARSE_TOP})")  # fmt: skip
    p.add_argument("--truncate", action="store_true",
                   help="keep the text's first tokens when it is longer than the model's context")  # fmt: skip
    p.set_defaults(run=run, python_names={"text": "TEXT", "export path": "--out"})
