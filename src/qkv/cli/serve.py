"""`qkv serve [--model NAME|PATH ...] [--host 127.0.0.1] [--port 8000] [--open]`: the explorer,
a local web page where you type a text, click any token and see what it looked up (see
`qkv.web`). The models it may load are fixed here; a request never names a file."""

from __future__ import annotations

import argparse

from qkv.cli import add_dtype
from qkv.models import DEFAULT_MODEL


def run(args: argparse.Namespace) -> int:
    from qkv.web import Limits, serve

    limits = Limits(workers=args.workers, max_queue=args.queue, max_captures=args.keep)
    serve(args.model or [DEFAULT_MODEL], host=args.host, port=args.port,
          open_browser=args.open, limits=limits, dtype=args.dtype)  # fmt: skip
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    from qkv.web.session import Limits

    d = Limits()
    p = sub.add_parser(
        "serve",
        help="the explorer: a local web app where you click any token and see what it looked up",
        description="Start a local web server (127.0.0.1 unless --host says otherwise) and print "
        "its URL. One forward per text; clicking another token, layer or head recomputes rows "
        "from the kept capture. Assets ship in the package: the page works offline.",
    )
    p.add_argument("--model", action="append", metavar="NAME|PATH",
                   help=f"a model the page may use (repeat for more; default {DEFAULT_MODEL})")  # fmt: skip
    add_dtype(p)
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1: this machine only)")  # fmt: skip
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 = any free port)")
    p.add_argument("--open", action="store_true", help="open the page in the default browser")
    p.add_argument("--workers", type=int, default=d.workers,
                   help=f"threads doing model work (default {d.workers})")  # fmt: skip
    p.add_argument("--queue", type=int, default=d.max_queue,
                   help=f"model jobs queued or running at once before 429 (default {d.max_queue})")  # fmt: skip
    p.add_argument("--keep", type=int, default=d.max_captures,
                   help=f"forwards kept for clicks (LRU, default {d.max_captures})")  # fmt: skip
    p.set_defaults(run=run, python_names={"max_queue": "--queue", "max_captures": "--keep"})
