"""The explorer on uvicorn: bind a socket (127.0.0.1 unless told otherwise), serve the app.

srv = Server(Explorer(["smollm2"]), port=0)   # port 0: any free port
srv.start(); print(srv.url); ...; srv.stop()  # in a background thread (tests)
serve(["smollm2"])                            # in the foreground until Ctrl-C (the CLI)
"""

from __future__ import annotations

import ipaddress
import socket
import threading
import time
from collections.abc import Sequence
from typing import Any

import uvicorn

from .app import LOOPBACK, create_app
from .session import Explorer, Limits

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on (host, port); ValueError naming both when that fails."""
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise ValueError(f"port must be an integer in 0..65535 (0 = any free port), got {port!r}")
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(
            host.strip("[]"), port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(128)
    except OSError as e:
        raise ValueError(f"cannot listen on host {host!r} port {port}: {e.strerror or e}") from None
    sock.set_inheritable(True)
    return sock


class Server:
    """The explorer app served by uvicorn on a socket bound now (so `url` holds the real port)."""

    def __init__(
        self, explorer: Explorer, *, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT
    ) -> None:
        self.explorer = explorer
        self.sock = bind(host, port)
        self.host = host
        self.port = self.sock.getsockname()[1]
        shown = f"[{host.strip('[]')}]" if ":" in host else host
        self.url = f"http://{shown}:{self.port}/"
        hosts = LOOPBACK if is_loopback(host) else ["*"]  # DNS rebinding: loopback names only
        app = create_app(explorer, allowed_hosts=hosts)
        config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off",
                                timeout_graceful_shutdown=2)  # fmt: skip
        self.uvicorn = uvicorn.Server(config)
        self._thread: threading.Thread | None = None

    def serve_forever(self) -> None:
        """Serve in this thread until interrupted (Ctrl-C)."""
        try:
            self.uvicorn.run(sockets=[self.sock])
        finally:
            self.explorer.close()
            self.sock.close()

    def start(self, timeout: float = 30.0) -> Server:
        """Serve in a background thread; return once it accepts connections."""
        self.uvicorn.config.install_signal_handlers = False  # not the main thread
        self._thread = threading.Thread(
            target=self.uvicorn.run, kwargs={"sockets": [self.sock]}, daemon=True
        )
        self._thread.start()
        end = time.monotonic() + timeout
        while not self.uvicorn.started:
            if not self._thread.is_alive() or time.monotonic() > end:
                raise RuntimeError(f"the explorer did not start on {self.url}")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.uvicorn.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)
        self.explorer.close()
        self.sock.close()


def serve(
    models: Sequence[str],
    *,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    open_browser: bool = False,
    limits: Limits | None = None,
    announce: bool = True,
    dtype: Any = None,
) -> None:
    """Load `models` (the only ones requests may name) in `dtype` (None: float32), bind, print
    the URL, serve until Ctrl-C."""
    explorer = Explorer(models, limits, dtype=dtype)
    srv = Server(explorer, host=host, port=port)
    if announce:
        names = ", ".join(explorer.slots)
        print(f"loading {names} …", flush=True)
    explorer.preload()
    if announce:
        print(f"qkv explorer on {srv.url}  (models: {names}; Ctrl-C stops it)", flush=True)
        if not is_loopback(host):
            print(f"note: bound to {host}, reachable from other machines", flush=True)
    if open_browser:
        import webbrowser

        threading.Timer(0.5, webbrowser.open, args=(srv.url,)).start()
    srv.serve_forever()
