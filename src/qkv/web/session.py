"""The explorer's state: the allowed models, the kept captures, the worker pool and its queue.

* Models are fixed when the `Explorer` is made: a request names one by its name in that set,
  never by a path. Each is loaded once (on first use, or by `preload`).
* `run` is one forward of a text (`qkv.lens.capture_text`), kept in an LRU of captures under an
  opaque id, bounded in count and in bytes. Forwards of one model run one at a time (a lock per
  model: `qkv.nn.capture` hooks the model's modules); lookups on kept captures run beside them.
* Model work runs in bounded `ThreadPoolExecutor`s, never on the event loop: forwards in one,
  clicks (rows from a kept capture) in another, so a long run never holds up a click; at most
  `max_queue` jobs wait or run at once, the next one is refused (`Busy`, HTTP 429).
* A newer run from the same page (`client`) supersedes the older one: a queued run never
  starts, a running one stops at its next layer (`Superseded`, HTTP 409). `progress(client)`
  says how far the latest run got.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from qkv._validate import positive_ints
from qkv.lens import Capture, capture_text
from qkv.lens.explain import attention_modules


class Busy(Exception):
    """The queue of model work is full (HTTP 429)."""


class Superseded(Exception):
    """A newer run from the same page replaced this one (HTTP 409)."""


class Unknown(LookupError):
    """A capture id the server does not hold (never made, or evicted; HTTP 404)."""


class UnknownModel(ValueError):
    """A model name outside the set fixed at start-up (HTTP 400)."""


@dataclass(frozen=True)
class Limits:
    """The explorer's bounds; every one is validated, the CLI's defaults come from here."""

    workers: int = 2  # threads running forwards (runs, compare), and as many for clicks
    max_queue: int = 64  # jobs waiting or running at once; the next gets 429
    max_captures: int = 8  # kept forwards (LRU)
    max_capture_mib: int = 4096  # their tensors' bytes, all together (LRU beyond)
    max_body_kib: int = 1024  # a request body
    max_chars: int = 100_000  # a text, in characters (the model's context bounds its tokens)
    max_compare_tokens: int = 1024  # compare explains every key of every head of both texts

    def __post_init__(self) -> None:
        positive_ints("Limits", self, tuple(self.__dataclass_fields__))


@dataclass
class Job:
    """One run's progress: layers done of `of`, and whether a newer run cancelled it."""

    of: int = 0
    done: int = 0
    state: str = "queued"  # queued → running → done | cancelled | failed
    cancelled: bool = False


@dataclass
class _Slot:
    name: str
    source: str
    model: Any = None
    lock: threading.Lock = field(default_factory=threading.Lock)


def model_names(models: Sequence[str | os.PathLike]) -> dict[str, str]:
    """name → what `qkv.load` reads: a bundled name stands for itself, a path by its folder or
    file name (without .gguf), made unique with -2, -3 …"""
    from qkv.models import MODELS

    if not models:
        raise ValueError("the explorer needs at least one model: pass --model NAME|PATH")
    out: dict[str, str] = {}
    for m in models:
        s = os.fspath(m)
        if isinstance(m, str) and s in MODELS:
            name = s
        else:
            p = Path(s).expanduser()
            if not p.exists():
                raise FileNotFoundError(
                    f"--model {s!r}: no bundled model of that name and no such path"
                )
            name = p.stem if p.suffix == ".gguf" else p.name
        base, n = name, 2
        while name in out and out[name] != s:
            name, n = f"{base}-{n}", n + 1
        out[name] = s
    return out


def capture_bytes(cap: Capture) -> int:
    """Bytes held by the capture's kept tensors (q, k, v, z, LSE per layer; W_O is the model's)
    and its routing (a mixture-of-experts model's experts and weights per token)."""
    n = 0
    for rec in cap.records:
        for name in ("q", "k", "v", "z", "lse"):
            t = getattr(rec, name, None)
            if t is not None:
                n += t.numel() * t.element_size()
    return n + (0 if cap.routing is None else cap.routing.nbytes)


class Explorer:
    """The server's state (see the module docstring). `models`: bundled names or paths."""

    def __init__(
        self,
        models: Sequence[str | os.PathLike],
        limits: Limits | None = None,
        *,
        loaded: dict[str, Any] | None = None,
        dtype: Any = None,
    ) -> None:
        """`loaded`: models already loaded, by their name here (not loaded again). `dtype`: the
        one every model is loaded in (`qkv.load(..., dtype=)`; None: float32)."""
        self.limits = limits or Limits()
        self.dtype = dtype
        self.slots = {n: _Slot(n, s) for n, s in model_names(models).items()}
        for name, m in (loaded or {}).items():
            self.check_model(name).model = m
        # forwards and clicks in pools of their own: a long run never holds up a click
        self.pool = ThreadPoolExecutor(self.limits.workers, thread_name_prefix="qkv-forward")
        self.clicks = ThreadPoolExecutor(self.limits.workers, thread_name_prefix="qkv-click")
        self._lock = threading.Lock()
        self._pending = 0
        self._captures: OrderedDict[str, tuple[str, Capture, int]] = OrderedDict()
        self._jobs: dict[str, Job] = {}

    # ---- models ---------------------------------------------------------------------------
    def model(self, name: Any) -> Any:
        """The loaded model called `name`; UnknownModel for a name outside the allowed set."""
        slot = self.check_model(name)
        with slot.lock:
            if slot.model is None:
                from qkv.models import load

                slot.model = load(slot.source, dtype=self.dtype)
            return slot.model

    def check_model(self, name: Any) -> _Slot:
        if not isinstance(name, str) or name not in self.slots:
            raise UnknownModel(
                f"model must be one of {sorted(self.slots)} (fixed when the server started), "
                f"got {name!r}"
            )
        return self.slots[name]

    def preload(self) -> None:
        """Load every allowed model now. One without a tokenizer is refused here, not at its
        first run: the page sends text."""
        from qkv.lens.explain import no_tokenizer

        for name in self.slots:
            if getattr(self.model(name), "tokenizer", False) is None:
                raise no_tokenizer(name)

    def describe(self) -> list[dict]:
        """Each allowed model's name, and its shape once loaded."""
        from qkv.lens.explain import summarize

        out = []
        for name, slot in self.slots.items():
            d: dict[str, Any] = {"name": name, "loaded": slot.model is not None}
            if slot.model is not None:
                m = summarize(slot.model, name)
                d |= {"layers": m.n_layers, "heads": m.n_heads, "causal": m.causal,
                      "context": m.max_positions, "dtype": m.dtype}  # fmt: skip
            out.append(d)
        return out

    # ---- the pool -------------------------------------------------------------------------
    async def call(self, fn: Callable[..., Any], *args: Any, forward: bool = False) -> Any:
        """`fn(*args)` in a worker (the forward pool when `forward`, else the click pool); Busy
        when `max_queue` jobs already wait or run, in both pools together."""
        with self._lock:
            if self._pending >= self.limits.max_queue:
                n = self._pending
                raise Busy(
                    f"the server is busy: {n} job{'s' if n != 1 else ''} queued or running "
                    f"(at most {self.limits.max_queue}); retry shortly"
                )
            self._pending += 1
        try:
            pool = self.pool if forward else self.clicks
            return await asyncio.get_running_loop().run_in_executor(pool, fn, *args)
        finally:
            with self._lock:
                self._pending -= 1

    @property
    def pending(self) -> int:
        return self._pending

    # ---- runs -----------------------------------------------------------------------------
    def start_job(self, client: str) -> Job:
        """A new job for `client`, cancelling the one it replaces."""
        job = Job()
        with self._lock:
            old = self._jobs.get(client)
            if old is not None and old.state in ("queued", "running"):
                old.cancelled = True
            self._jobs[client] = job
            while len(self._jobs) > 1024:  # forget the oldest pages
                self._jobs.pop(next(iter(self._jobs)))
        return job

    def progress(self, client: str) -> dict:
        job = self._jobs.get(client)
        if job is None:
            return {"state": "none", "done": 0, "of": 0}
        return {"state": job.state, "done": job.done, "of": job.of}

    def run(self, model: str, text: str, job: Job) -> tuple[str, Capture]:
        """One forward of `text` (in a worker): the capture and its new id."""
        m = self.model(model)
        slot = self.slots[model]
        mods = attention_modules(m)

        def step(*_: Any) -> None:
            job.done += 1
            if job.cancelled:
                raise Superseded("superseded by a newer run from the same page")

        with slot.lock:  # one forward of a model at a time: the capture hooks its modules
            if job.cancelled:
                job.state = "cancelled"
                raise Superseded("superseded by a newer run from the same page")
            job.state, job.of = "running", len(mods)
            hooks = [mod.register_forward_hook(step) for mod in mods]
            try:
                cap = capture_text(text, model=m, progress=False)
            except Superseded:
                job.state = "cancelled"
                raise
            except ValueError as e:  # a text over the context: the explorer never cuts one
                job.state = "failed"
                said = getattr(e, "cli_text", str(e))  # without Python-only advice
                raise ValueError(said.replace(" or pass truncate=True", "")) from None
            except BaseException:
                job.state = "failed"
                raise
            finally:
                for h in hooks:
                    h.remove()
        cap.info = replace(cap.info, name=model)  # the record names the model as the page does
        job.state = "done"
        return self.keep(model, cap), cap

    def with_model(self, model: str, fn: Callable[[Any], Any]) -> Any:
        """`fn(loaded model)` holding that model's lock (for work that runs its forward)."""
        m = self.model(model)
        with self.slots[model].lock:
            return fn(m)

    # ---- kept captures ----------------------------------------------------------------------
    def keep(self, model: str, cap: Capture) -> str:
        cid = secrets.token_urlsafe(12)
        size = capture_bytes(cap)
        cap_bytes = self.limits.max_capture_mib << 20
        with self._lock:
            self._captures[cid] = (model, cap, size)
            while len(self._captures) > 1 and (
                len(self._captures) > self.limits.max_captures
                or sum(s for _, _, s in self._captures.values()) > cap_bytes
            ):
                self._captures.popitem(last=False)
        return cid

    def capture(self, cid: Any) -> Capture:
        """The kept capture `cid` (now the most recently used); Unknown when evicted or never
        made."""
        with self._lock:
            if not isinstance(cid, str) or cid not in self._captures:
                raise Unknown(
                    "no kept run with that id (the server keeps the latest "
                    f"{self.limits.max_captures}); run the text again"
                )
            self._captures.move_to_end(cid)
            return self._captures[cid][1]

    @property
    def kept(self) -> int:
        return len(self._captures)

    def close(self) -> None:
        for pool in (self.pool, self.clicks):
            pool.shutdown(wait=False, cancel_futures=True)
