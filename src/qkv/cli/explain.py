"""`qkv explain TEXT --token WORD`: what one token looks up, per layer and head.

Every index (--index, --key-index, --layer, --head) is 0-based and, as in Python, a negative
one counts from the end (-1 = the last); outside -n..n-1 is an error naming both ranges."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

from qkv.cli import add_dtype, check_output, model_of, stdout_console, text_or_file
from qkv.lens import DEFAULT_TOP, explain, neuron
from qkv.lens.explain import resolve_model
from qkv.models import DEFAULT_MODEL


def run(args: argparse.Namespace) -> int:
    text = text_or_file(args.text, args.file, "text")
    if (args.token is None) == (args.index is None):
        raise ValueError("choose the query with --token WORD or --index I (exactly one)")
    if args.key is not None and args.key_index is not None:
        raise ValueError("choose the key with --key WORD or --key-index J (not both)")
    for occ, word, other in (("--occurrence", "--token", args.token),
                             ("--key-occurrence", "--key", args.key)):  # fmt: skip
        if getattr(args, occ[2:].replace("-", "_")) is not None and other is None:
            raise ValueError(f"{occ} picks among repeats of {word} WORD; give {word} with it "
                             "(a position needs no occurrence)")  # fmt: skip
    args.occurrence = 1 if args.occurrence is None else args.occurrence
    args.key_occurrence = 1 if args.key_occurrence is None else args.key_occurrence
    if args.neuron and (args.layer is None or args.head is None or
                        (args.key is None and args.key_index is None)):  # fmt: skip
        raise ValueError(
            "--neuron shows one head's q·k for one key: give --layer L, --head H and --key WORD "
            "(or --key-index J) with it"
        )
    outputs = [(f, p) for f, p in (("--json", args.json), ("--html", args.html),
                                   ("--png", args.png)) if p is not None]  # fmt: skip
    check_outputs(outputs)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # launched by torchrun: shard the text
        if args.flow or args.rollout or args.neuron:
            raise ValueError("--flow, --rollout and --neuron run on one process: drop torchrun")
        result = _explain_sharded(text, args)
        if result is None:  # not rank 0: rank 0 prints and writes
            return 0
        return _output(result, args)
    model = resolve_model(model_of(args)) if args.neuron else model_of(args)  # loaded once
    result = explain(
        text,
        args.token if args.token is not None else args.index,
        model=model,
        occurrence=args.occurrence,
        layer=args.layer,
        head=args.head,
        top=args.top,
        key=args.key if args.key is not None else args.key_index,
        key_occurrence=args.key_occurrence,
        flow=args.flow,
        rollout=args.rollout,
        truncate=args.truncate,
    )
    if args.neuron:
        result.neuron = neuron(
            text,
            result.query.index,
            result.key.index,
            layer=args.layer,
            head=args.head,
            model=model,
        )
    return _output(result, args)


def check_outputs(outputs: list[tuple[str, str]]) -> None:
    """Fail before the model runs: an unwritable path, two flags naming one file, more than
    one flag on stdout ("-"), or a PNG for a terminal."""
    stdout = [f for f, p in outputs if p == "-"]
    if len(stdout) > 1:
        raise ValueError(f"{' and '.join(stdout)} both ask for stdout ('-'): give one a file name")
    if "--png" in stdout and sys.stdout.isatty():
        raise ValueError("--png -: stdout is a terminal; redirect it (> out.png) or name a file")
    seen: dict[str, str] = {}
    for flag, path in outputs:
        if path == "-":
            continue
        if flag == "--png" and not path.lower().endswith(".png"):
            raise ValueError(f"--png writes PNG data: name the file *.png, got {path!r}")
        check_output(flag, path)
        real = os.path.realpath(path)
        if real in seen:
            raise ValueError(
                f"{seen[real]} and {flag} name the same file {path!r}: give each its own"
            )
        seen[real] = flag


def _explain_sharded(text: str, args: argparse.Namespace):
    """`explain_sharded` over torchrun's ranks (gloo; MASTER_ADDR, RANK, WORLD_SIZE from the
    environment): the record on rank 0, None on the others."""
    import torch.distributed as dist

    from qkv.lens.distributed import explain_sharded

    dist.init_process_group("gloo")
    try:
        result = explain_sharded(
            text, args.token if args.token is not None else args.index, model=model_of(args),
            occurrence=args.occurrence, layer=args.layer, head=args.head, top=args.top,
            key=args.key if args.key is not None else args.key_index,
            key_occurrence=args.key_occurrence, truncate=args.truncate,
        )  # fmt: skip
        return result if dist.get_rank() == 0 else None
    finally:
        dist.destroy_process_group()


def _output(result, args: argparse.Namespace) -> int:
    # the files first: a reader of stdout that leaves early (`| head`) does not cost them
    written = []
    if args.json not in (None, "-"):
        result.to_json(args.json, indent=1)
        written.append(args.json)
    for path, write in ((args.html, result.to_html), (args.png, result.to_png)):
        if path not in (None, "-"):
            write(path)
            written.append(path)
    try:
        if args.json == "-":
            sys.stdout.write(result.to_json(indent=1) + "\n")
        elif args.html == "-":  # the page is stdout's one payload
            sys.stdout.write(result.to_html())
        elif args.png == "-":  # the picture is
            with tempfile.TemporaryDirectory() as d:
                png = result.to_png(os.path.join(d, "view.png")).read_bytes()
            sys.stdout.flush()
            sys.stdout.buffer.write(png)
            sys.stdout.buffer.flush()
        else:
            result.render(stdout_console())
    finally:
        for w in written:
            print(f"wrote {w}", file=sys.stderr)
    return 0


def _add_token_choice(
    p: argparse.ArgumentParser, word: str, index: str, occurrence: str, what: str
) -> None:
    """--WORD (always a word of the text, even '1'), --INDEX (always a position), --OCCURRENCE."""
    p.add_argument(f"--{word}", help=f"{what}: a word of the text (always a word, even '1')")
    p.add_argument(
        f"--{index}", type=int, help=f"{what} by position, instead of --{word} (-1 = the last)"
    )
    p.add_argument(
        f"--{occurrence}",
        type=int,
        help=f"which occurrence of a repeated --{word} word (from 1, the default; -1 = the last)",
    )


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "explain",
        help="what one token looks up: per layer and head, each key's score, weight and contribution",
        description="Run the model once and show, for the query token, every layer and head's lookup: "
        "score q·k/√d, softmax weight, and contribution ‖w·v W_O‖ (what the key carried), keys ranked.",
    )
    p.add_argument("text", nargs="?", help="the text (or use --file)")
    p.add_argument("--file", help="read the text from this file")
    _add_token_choice(p, "token", "index", "occurrence", "the query token")
    p.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"model name or checkpoint directory (default {DEFAULT_MODEL})",
    )
    add_dtype(p)
    p.add_argument("--layer", type=int, help="only this layer (0-based; -1 = the last)")
    p.add_argument(
        "--head",
        type=int,
        help="only this head, in every layer or in --layer (0-based; -1 = the last)",
    )
    p.add_argument(
        "--top",
        type=int,
        default=DEFAULT_TOP,
        help="keys kept per head: the top K by weight and the top K by content, plus the first "
        "and special tokens, the query, the chosen key and the next key by weight; 0 = all "
        f"(default {DEFAULT_TOP})",
    )
    _add_token_choice(
        p,
        "key",
        "key-index",
        "key-occurrence",
        "a key to rank heads by (which send the query most to it)",
    )
    p.add_argument(
        "--truncate",
        action="store_true",
        help="read only the text's first tokens when it is longer than the model's context",
    )
    p.add_argument(
        "--flow",
        action="store_true",
        help="also propagate the query's contribution norms through the layers (Kobayashi et al.; "
        "costs about one more attention pass)",
    )
    g = p.add_mutually_exclusive_group()
    g.add_argument(
        "--rollout",
        dest="rollout",
        action="store_true",
        default=False,
        help="also compute classic attention rollout (weights only; converges to a sink on most "
        "real models, and says so)",
    )
    g.add_argument(
        "--no-rollout", dest="rollout", action="store_false", help="no rollout (the default)"
    )
    p.add_argument(
        "--neuron",
        action="store_true",
        help="the Q·K neuron view of --layer/--head for --key: q, k (after RoPE), q⊙k and the "
        "dims that drive the score",
    )
    p.add_argument("--json", metavar="PATH|-", help="write the qkv.explain/1 record (- for stdout)")
    p.add_argument("--html", metavar="PATH|-", help="write a standalone HTML view (- for stdout)")
    p.add_argument(
        "--png", metavar="PATH|-", help="write a PNG figure (- for stdout, not a terminal)"
    )
    p.set_defaults(run=run, python_names={"token index": "--index", "key index": "--key-index"})
