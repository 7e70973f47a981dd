"""The explorer's ASGI app (Starlette): the page, its assets, and a JSON API over the lens.

    GET  /                   the page (assets shipped in the package, no CDN)
    GET  /static/NAME        one of the packaged assets (a fixed set read at start-up)
    GET  /api/models         the allowed models
    POST /api/run            {model, text, client?} → one forward, kept: {id, tokens, layers, …}
    GET  /api/progress       ?client=C → {state, done, of} of that page's latest run
    POST /api/lookup         {id, query, layer, head, key?, top?} → one head's qkv.explain/1 record
                             (a MoE model's: with the query's "experts" in every sparse layer)
    POST /api/grid           {id, query, key} → (layers × heads) weight on key, entropy
    POST /api/compare        {model, a, b, query} → qkv.compare/1 + per-head max |Δweight|
    POST /api/export         {id, query, layer, head, key?, top?, format: json|png} → a download
                             (a PNG draws at most `qkv.lens.png.MAX_BARS` keys; its title says so)

Why Starlette: a small, well-kept ASGI toolkit (routing, requests, responses, TestClient) with
one dependency (anyio), served by uvicorn; qkv validates its few request fields explicitly, so
FastAPI's pydantic layer would add weight without adding checks.

Every request is validated (JSON object, body ≤ `max_body_kib`, only the route's fields, types
and index ranges, text ≤ `max_chars` characters of valid Unicode and ≤ the model's context in
tokens); a bad one gets a 4xx with {"error": message} in JSON's words (null, true, an array …).
An optional field (key, top, client) sent as null takes its default, as if it were absent.
No request names a file: models are named from the set fixed at start-up, assets come from a
dict read when the app is made. Model work runs in the Explorer's worker pool (see
`qkv.web.session`). Each JSON answer carries "server_ms", the time spent serving it.
"""

from __future__ import annotations

import json
import logging
import re
import secrets
import time
import traceback
from importlib import resources
from typing import Any

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from . import payload
from .session import Busy, Explorer, Limits, Superseded, Unknown

log = logging.getLogger("qkv.web")

TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
         ".css": "text/css; charset=utf-8", ".png": "image/png", ".txt": "text/plain; charset=utf-8"}  # fmt: skip
# the page runs only its own script and styles and talks only to this server
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
LOOPBACK = ["127.0.0.1", "localhost", "::1", "[::1]"]
TOP_KEYS = 20  # a lookup's default: the top 20 keys by weight ∪ by contribution (0 = every key)
# each route's request fields (anything else is refused)
RUN = ("model", "text", "client")
LOOKUP = ("id", "query", "layer", "head", "key", "top")
GRID = ("id", "query", "key")
COMPARE = ("model", "a", "b", "query")


SURROGATE = re.compile(r"[\ud800-\udfff]")  # left in a str only by an unpaired "\\ud800" escape


def shown(x: Any) -> str:
    """`x` as the request spelt it, in JSON's words: null, true, 7, "it"; an array or an object
    by its kind only (never echoed whole); a long string cut to 60 characters."""
    if isinstance(x, list):
        return "an array"
    if isinstance(x, dict):
        return "an object"
    s = json.dumps(x, ensure_ascii=False)
    s = s if len(s) <= 60 else s[:59] + "…"
    return SURROGATE.sub(lambda m: f"\\u{ord(m.group()):04x}", s)  # a str the answer can encode


class BadRequest(Exception):
    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def assets() -> dict[str, bytes]:
    """Every file of the package's web/static folder, by name, read once."""
    root = resources.files("qkv.web") / "static"
    return {p.name: p.read_bytes() for p in root.iterdir() if p.is_file()}


# ---- request fields -------------------------------------------------------------------------


async def read_json(request: Request, limit: int) -> dict:
    """The body as a JSON object, at most `limit` bytes; 413/415/400 otherwise."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip()
    if ctype != "application/json":
        raise BadRequest(f"send the request as application/json, got {ctype or 'no content type'!r}", 415)  # fmt: skip
    size = request.headers.get("content-length")
    if size is not None and (not size.isdigit() or int(size) > limit):
        raise BadRequest(f"request body is {size} bytes; at most {limit} are accepted", 413)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise BadRequest(f"request body is over {limit} bytes; at most {limit} are accepted", 413)  # fmt: skip
    try:
        doc = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadRequest(f"request body is not JSON ({e})") from None
    except RecursionError:
        raise BadRequest("request body nests arrays or objects too deep to read; send one flat JSON object") from None  # fmt: skip
    except ValueError as e:  # Python's bound on an integer's digits (4300 by default)
        raise BadRequest(f"request body holds a number too long to read ({str(e).split(';')[0]}); every field takes a small integer or a string") from None  # fmt: skip
    if not isinstance(doc, dict):
        raise BadRequest(f"request body must be a JSON object, got {shown(doc)}")
    return doc


def fields(doc: dict, route: str, known: tuple[str, ...]) -> dict:
    """`doc`, refused when it names a field `route` does not take (a misspelt optional field
    would otherwise be dropped in silence and its default used)."""
    unknown = sorted(set(doc) - set(known))
    if unknown:
        raise BadRequest(
            f"unknown field {shown(unknown[0])} for {route}; its fields are {', '.join(known)}"
        )
    return doc


def integer(
    doc: dict, name: str, n: int, *, default: Any = ..., what: str = "", most: bool = False
) -> Any:
    """doc[name] as an int in [0, n) ([0, n] when `most`); `default` when the field is absent or
    null and a default is given, else a 400 that says it is missing."""
    span = f"[0, {n}]" if most else f"[0, {n})"
    if doc.get(name) is None and default is not ...:
        return default
    if name not in doc:
        raise BadRequest(f"{name} is missing: pass an integer in {span}{what}")
    x = doc[name]
    if isinstance(x, bool) or not isinstance(x, int) or not 0 <= x < n + most:
        raise BadRequest(f"{name} must be an integer in {span}{what}, got {shown(x)}")
    return x


def string(doc: dict, name: str, limit: int) -> str:
    """doc[name]: a non-blank string of at most `limit` characters, valid Unicode (JSON lets a
    "\\ud800" escape stand alone; no tokenizer can read the string it leaves)."""
    if name not in doc:
        raise BadRequest(f"{name} is missing: pass the text as a string")
    x = doc[name]
    if not isinstance(x, str):
        raise BadRequest(f"{name} must be a string, got {shown(x)}")
    if not x.strip():
        raise BadRequest(f"{name} is empty: type a text")
    if len(x) > limit:
        raise BadRequest(f"{name} is {len(x)} characters; at most {limit} are accepted")
    bad = SURROGATE.search(x)
    if bad:
        raise BadRequest(
            f"{name} holds an unpaired surrogate (U+{ord(bad.group()):04X} at character "
            f"{bad.start()}); send valid Unicode"
        )
    return x


def run_id(doc: dict) -> str:
    """doc["id"]: the id that /api/run returned (a string)."""
    if "id" not in doc:
        raise BadRequest("id is missing: pass the id that /api/run returned")
    cid = doc["id"]
    if not isinstance(cid, str):
        raise BadRequest(f"id must be the string that /api/run returned, got {shown(cid)}")
    return cid


def model_name(doc: dict, explorer: Explorer) -> str:
    """doc["model"]: one of the models fixed when the server started (refused before any work)."""
    names = json.dumps(sorted(explorer.slots))
    if "model" not in doc:
        raise BadRequest(f"model is missing: pass one of {names}")
    m = doc["model"]
    if not isinstance(m, str) or m not in explorer.slots:
        raise BadRequest(
            f"model must be one of {names} (fixed when the server started), got {shown(m)}"
        )
    return m


def client_id(doc: dict) -> str | None:
    """doc["client"], the page's id for its runs; None when absent or null."""
    c = doc.get("client")
    if c is None:
        return None
    if not isinstance(c, str) or not 1 <= len(c) <= 64 or not c.isascii() or not c.isprintable():
        raise BadRequest(f"client must be 1–64 printable ASCII characters, got {shown(c)}")
    return c


# ---- the app ----------------------------------------------------------------------------------


def create_app(explorer: Explorer, *, allowed_hosts: list[str] | None = None) -> Starlette:
    """The explorer's ASGI app over `explorer` (its models, captures and pool). `allowed_hosts`:
    the Host headers served (default: loopback names only, against DNS rebinding)."""
    lim: Limits = explorer.limits
    body_limit = lim.max_body_kib << 10
    static = assets()

    def answer(doc: dict, t0: float, status: int = 200) -> JSONResponse:
        doc["server_ms"] = round((time.perf_counter() - t0) * 1e3, 3)
        return JSONResponse(doc, status_code=status)

    async def page(request: Request) -> Response:
        return Response(static["index.html"], media_type=TYPES[".html"],
                        headers={"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff"})  # fmt: skip

    async def asset(request: Request) -> Response:
        name = request.path_params["name"]
        if name not in static:  # a fixed dict: nothing in a request reaches the file system
            raise BadRequest(f"no asset {name!r}; the page's assets are {sorted(static)}", 404)
        ext = "." + name.rsplit(".", 1)[-1]
        return Response(static[name], media_type=TYPES.get(ext, "application/octet-stream"),
                        headers={"X-Content-Type-Options": "nosniff"})  # fmt: skip

    async def models(request: Request) -> Response:
        t0 = time.perf_counter()
        return answer({"models": explorer.describe(), "limits": lim.__dict__}, t0)

    async def run(request: Request) -> Response:
        t0 = time.perf_counter()
        doc = fields(await read_json(request, body_limit), "/api/run", RUN)
        model = model_name(doc, explorer)
        text = string(doc, "text", lim.max_chars)
        client = client_id(doc)
        job = explorer.start_job(client or "anon-" + secrets.token_hex(8))
        cid, cap = await explorer.call(explorer.run, model, text, job, forward=True)
        return answer(payload.summary(cap, cid), t0)

    async def progress(request: Request) -> Response:
        t0 = time.perf_counter()
        client = client_id({"client": request.query_params.get("client")})
        if client is None:
            raise BadRequest("pass ?client=ID, the id the page sent with its run")
        return answer(explorer.progress(client), t0)

    def head_args(doc: dict) -> tuple:
        cap = explorer.capture(run_id(doc))
        n, info = len(cap.tokens), cap.info
        i = integer(doc, "query", n, what=f" (a token of the {n})")
        layer = integer(doc, "layer", info.n_layers, what=f" (a layer of {info.name})")
        head = integer(doc, "head", info.n_heads, what=f" (a head of {info.name})")
        key = integer(doc, "key", n, default=None, what=f" (a token of the {n})")
        top = integer(doc, "top", 1 << 20, default=TOP_KEYS, what=" (0 = every key)", most=True)
        return cap, i, layer, head, key, top

    async def lookup(request: Request) -> Response:
        t0 = time.perf_counter()
        args = head_args(fields(await read_json(request, body_limit), "/api/lookup", LOOKUP))
        _, doc = await explorer.call(payload.lookup, *args)
        return answer(doc, t0)

    async def grid(request: Request) -> Response:
        t0 = time.perf_counter()
        doc = fields(await read_json(request, body_limit), "/api/grid", GRID)
        cap = explorer.capture(run_id(doc))
        n = len(cap.tokens)
        i = integer(doc, "query", n, what=f" (a token of the {n})")
        j = integer(doc, "key", n, what=f" (a token of the {n})")
        return answer(await explorer.call(payload.grid, cap, i, j), t0)

    async def compare(request: Request) -> Response:
        t0 = time.perf_counter()
        doc = fields(await read_json(request, body_limit), "/api/compare", COMPARE)
        model = model_name(doc, explorer)
        a, b = string(doc, "a", lim.max_chars), string(doc, "b", lim.max_chars)
        if "query" not in doc:
            raise BadRequest("query is missing: pass a token position (an integer ≥ 0)")
        q = doc["query"]
        if isinstance(q, bool) or not isinstance(q, int) or q < 0:
            raise BadRequest(f"query must be a token position (an integer ≥ 0), got {shown(q)}")
        if a == b:
            raise BadRequest("a and b are identical: nothing can move; change one of them")

        def work(m: Any) -> dict:
            n = {}
            for what, t in (("a", a), ("b", b)):
                n[what] = len(m.tokenizer.encode(t).ids)
                if n[what] > lim.max_compare_tokens:
                    raise BadRequest(f"text {what} is {n[what]} tokens; compare takes at most {lim.max_compare_tokens} (it explains every key of every head of both)")  # fmt: skip
            if q >= min(n.values()):
                raise BadRequest(f"query must be a token of both texts, an integer in [0, {min(n.values())}) (a has {n['a']} tokens, b {n['b']}), got {q}")  # fmt: skip
            _, out = payload.compare(m, a, b, q)
            out["model"] = {**out["model"], "name": model}
            return out

        return answer(await explorer.call(explorer.with_model, model, work, forward=True), t0)

    async def export(request: Request) -> Response:
        doc = fields(await read_json(request, body_limit), "/api/export", (*LOOKUP, "format"))
        if "format" not in doc:
            raise BadRequest('format is missing: pass "json" or "png"')
        fmt = doc["format"]
        if fmt not in ("json", "png"):
            raise BadRequest(f'format must be "json" or "png", got {shown(fmt)}')
        cap, i, layer, head, key, top = head_args(doc)
        r, _ = await explorer.call(payload.lookup, cap, i, layer, head, key, top)
        name = f"qkv-{cap.info.name}-token{i}-L{layer}H{head}.{fmt}"
        disp = {"Content-Disposition": f'attachment; filename="{name}"'}
        if fmt == "json":
            return Response(r.to_json(indent=1) + "\n", media_type="application/json", headers=disp)
        png = await explorer.call(payload.png_bytes, r)
        return Response(png, media_type="image/png", headers=disp)

    routes = [
        Route("/", guarded(page)),
        Route("/static/{name}", guarded(asset)),
        Route("/api/models", guarded(models)),
        Route("/api/run", guarded(run), methods=["POST"]),
        Route("/api/progress", guarded(progress)),
        Route("/api/lookup", guarded(lookup), methods=["POST"]),
        Route("/api/grid", guarded(grid), methods=["POST"]),
        Route("/api/compare", guarded(compare), methods=["POST"]),
        Route("/api/export", guarded(export), methods=["POST"]),
    ]
    hosts = allowed_hosts if allowed_hosts is not None else LOOPBACK
    handlers: dict = {404: _not_found, 405: _not_allowed}
    app = Starlette(
        routes=routes,
        middleware=[Middleware(HostCheck, allowed=hosts)],
        exception_handlers=handlers,
    )
    app.state.explorer = explorer
    return app


class HostCheck:
    """Serve only requests whose Host header names an allowed host ("*": any): a page on
    another site cannot reach a loopback server through a DNS name it controls (rebinding)."""

    def __init__(self, app: Any, allowed: list[str]) -> None:
        self.app, self.allowed = app, allowed

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] in ("http", "websocket") and "*" not in self.allowed:
            host = dict(scope["headers"]).get(b"host", b"").decode("latin-1")
            name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
            if name not in self.allowed:
                msg = f"host {host!r} is not served; use one of {self.allowed}"
                await JSONResponse({"error": msg}, status_code=400)(scope, receive, send)
                return
        await self.app(scope, receive, send)


STATUS: list[tuple[type, int]] = [
    (BadRequest, 400),
    (Busy, 429),
    (Superseded, 409),
    (Unknown, 404),
    (ValueError, 400),
    (TypeError, 400),
    (IndexError, 400),
]


def guarded(handler: Any) -> Any:
    """`handler` with every exception answered as JSON here (`_error`), so none reaches the
    server: an unexpected one is a 500 on a connection that stays open."""

    async def run(request: Request) -> Response:
        try:
            return await handler(request)
        except Exception as e:
            return await _error(request, e)

    return run


async def _error(request: Request, exc: Exception) -> JSONResponse:
    """Every failure as {"error": message} with its status; an unexpected one is logged, 500."""
    for cls, status in STATUS:
        if isinstance(exc, cls):
            status = getattr(exc, "status", status)
            return JSONResponse({"error": str(exc)}, status_code=status)
    log.error(
        "internal error on %s: %s", request.url.path, "".join(traceback.format_exception(exc))
    )
    return JSONResponse({"error": f"internal error: {type(exc).__name__}: {exc}"}, status_code=500)


async def _not_found(request: Request, exc: Exception) -> JSONResponse:
    return JSONResponse({"error": f"no such page or endpoint: {request.url.path}"}, status_code=404)


async def _not_allowed(request: Request, exc: Exception) -> JSONResponse:
    return JSONResponse(
        {"error": f"{request.method} is not allowed on {request.url.path}"}, status_code=405
    )
