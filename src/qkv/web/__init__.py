"""L5 — the explorer: a local web app where you click any token and see what it looked up.

    qkv serve [--model NAME|PATH ...] [--host 127.0.0.1] [--port 8000] [--open]

    from qkv.web import Explorer, create_app, serve
    app = create_app(Explorer(["smollm2"]))      # any ASGI server can run it

One forward per text (`qkv.lens.capture_text`), kept; every click recomputes exact rows from
the kept capture through the lens' API (`Capture.explain`, `.neuron`, the rows of
`qkv.lens.lookup`), so it does not rerun the model. The page only lays out the numbers it is
sent. See `qkv.web.app` for the HTTP API and `qkv.web.session` for the pool and bounds.
"""

from .app import create_app
from .server import Server, serve
from .session import Explorer, Limits

__all__ = ["Explorer", "Limits", "Server", "create_app", "serve"]
