"""Run a function on `world` gloo processes on 127.0.0.1, bounded in time, and collect what
each rank returned (or raised) — the tests' stand-in for torchrun.

Every rank: `GLOO_SOCKET_IFNAME=lo`, one intra-op thread (the machine may have few cores),
`init_process_group("gloo", file:// store, timeout=pg_timeout)`, then `fn(rank, world, *args)`;
its return value (JSON) or its exception (type and message) goes to `<dir>/rank<r>.json`.
The parent waits at most `timeout` seconds in all, then kills what is left and reports it:
a hang fails the test, it never stalls the run.
"""

from __future__ import annotations

import datetime
import importlib
import json
import os
import tempfile
import time
import traceback
from pathlib import Path

import torch.multiprocessing as mp


def _entry(rank: int, world: int, store: str, out: str, target: str, args: tuple, pg: float):
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    path = Path(out) / f"rank{rank}.json"
    try:
        dist.init_process_group(
            "gloo", init_method=f"file://{store}", rank=rank, world_size=world,
            timeout=datetime.timedelta(seconds=pg),
        )  # fmt: skip
        module, name = target.rsplit(":", 1)
        result = getattr(importlib.import_module(module), name)(rank, world, *args)
        path.write_text(json.dumps({"ok": result}))
    except BaseException as e:  # reported to the parent, which fails the test with it
        path.write_text(
            json.dumps({"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()})
        )
        raise SystemExit(1) from None
    if dist.is_initialized():
        dist.destroy_process_group()


def run(target: str, world: int, *args, timeout: float = 90.0, pg_timeout: float = 30.0):
    """Run `module:function` on `world` ranks; returns (per-rank results, elapsed seconds).
    A result is {"ok": value} or {"error": "Type: message", "trace": ...}; a rank still
    running at `timeout` is killed and reported as {"error": "killed after ... s"}."""
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp:
        store = os.path.join(tmp, "store")
        procs = [
            ctx.Process(target=_entry, args=(r, world, store, tmp, target, args, pg_timeout))
            for r in range(world)
        ]
        t0 = time.monotonic()
        for p in procs:
            p.start()
        for p in procs:
            p.join(max(0.0, timeout - (time.monotonic() - t0)))
        elapsed = time.monotonic() - t0
        results = []
        for r, p in enumerate(procs):
            if p.is_alive():
                p.kill()
                p.join(5)
                results.append({"error": f"killed after {elapsed:.0f} s (hung)"})
                continue
            f = Path(tmp) / f"rank{r}.json"
            if f.exists():
                results.append(json.loads(f.read_text()))
            else:
                results.append({"error": f"exited with code {p.exitcode} and no report"})
        return results, elapsed


def ok(results: list[dict]) -> list:
    """The ranks' return values; fail naming every rank's error if any rank failed."""
    bad = [f"rank {r}: {x['error']}\n{x.get('trace', '')}" for r, x in enumerate(results)
           if "error" in x]  # fmt: skip
    assert not bad, "\n".join(bad)
    return [x["ok"] for x in results]
