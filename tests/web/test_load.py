"""The explorer under load, on 127.0.0.1: 50 concurrent requests (none lost or mixed up, memory
bounded, still answering after), a full queue refused with 429, a newer run from the same page
cancelling the older, and the LRU of kept captures."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import numpy as np
import pytest

from qkv.web import Explorer, Limits, Server
from qkv.web.session import Unknown

from .conftest import SENTENCE

pytestmark = pytest.mark.slow
BURST = 50
BOUND_S = 600  # the whole burst must finish within this (a bound on the test, not a timing claim)


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def in_thread(coro: Any) -> Any:
    """asyncio.run(coro) in a fresh thread: the session's Playwright (sync API) keeps an event
    loop in this one."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


def texts(n: int) -> list[str]:
    animals = ["dog", "cat", "fox", "owl", "cow", "bee", "elk", "yak", "ant", "bat"]
    return [
        f"The {animals[k % 10]} number {k} chased the ball because it was excited."
        for k in range(n)
    ]


async def burst(url: str, reqs: list[tuple[str, dict]]) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=url, timeout=BOUND_S) as c:
        return await asyncio.wait_for(
            asyncio.gather(*(c.post(path, json=body) for path, body in reqs)), BOUND_S
        )


def test_fifty_concurrent_requests(server, smollm2):
    url = server.url
    with httpx.Client(base_url=url, timeout=120) as c:
        cid = c.post("/api/run", json={"model": "smollm2", "text": SENTENCE}).json()["id"]
        asks = [(q, layer, head) for q, layer, head in
                [(q, (7 * q + 3 * r) % 30, (5 * q + r) % 9) for q in range(10) for r in range(4)]]  # fmt: skip
        # the answers asked one at a time: what each concurrent answer must equal
        alone = {a: c.post("/api/lookup", json={"id": cid, "query": a[0], "layer": a[1], "head": a[2], "top": 0}).json() for a in asks}  # fmt: skip
    before = rss_mib()
    runs = texts(BURST - len(asks))
    reqs = [
        ("/api/lookup", {"id": cid, "query": q, "layer": layer, "head": head, "top": 0})
        for q, layer, head in asks
    ]
    reqs += [
        ("/api/run", {"model": "smollm2", "text": t, "client": f"page-{k}"})
        for k, t in enumerate(runs)
    ]
    got = in_thread(burst(url, reqs))
    after = rss_mib()
    assert len(got) == BURST
    assert [r.status_code for r in got] == [200] * BURST, [
        r.text for r in got if r.status_code != 200
    ]
    for (q, layer, head), r in zip(asks, got[: len(asks)], strict=True):
        d, want = r.json(), alone[(q, layer, head)]
        assert (
            d["query"]["index"],
            d["layers"][0]["layer"],
            d["layers"][0]["heads"][0]["head"],
        ) == (q, layer, head)
        for col in ("index", "weight", "contribution"):
            a = [k[col] for k in d["layers"][0]["heads"][0]["keys"]]
            b = [k[col] for k in want["layers"][0]["heads"][0]["keys"]]
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    for text, r in zip(runs, got[len(asks) :], strict=True):
        d = r.json()
        assert d["text"] == text
        assert [(t[1], t[2]) for t in d["tokens"]] == [
            tuple(o) for o in smollm2.tokenizer.encode(text).offsets
        ]
        assert "".join(t[0] for t in d["tokens"]) == text
    assert server.explorer.kept <= server.explorer.limits.max_captures
    assert server.explorer.pending == 0
    assert after - before < 512, f"RSS grew {after - before:.0f} MiB over the burst"
    with httpx.Client(base_url=url, timeout=60) as c:  # still answers
        assert c.get("/api/models").status_code == 200
        assert c.post("/api/run", json={"model": "smollm2", "text": SENTENCE}).status_code == 200


def test_a_full_queue_is_refused_with_429(smollm2):
    ex = Explorer(["smollm2"], Limits(workers=1, max_queue=2), loaded={"smollm2": smollm2})
    srv = Server(ex, port=0).start()
    try:
        long = "The dog chased the ball because it was excited. " * 40
        got = in_thread(
            burst(
                srv.url,
                [
                    ("/api/run", {"model": "smollm2", "text": long, "client": f"p{k}"})
                    for k in range(6)
                ],
            )
        )
        codes = sorted(r.status_code for r in got)
        assert set(codes) == {200, 429} and codes.count(200) >= 2, codes
        busy = next(r for r in got if r.status_code == 429).json()["error"]
        assert "busy" in busy and "at most 2" in busy
        assert ex.pending == 0
        assert httpx.get(srv.url + "api/models", timeout=30).status_code == 200
    finally:
        srv.stop()


def test_a_newer_run_from_the_same_page_cancels_the_older(server):
    long = "The dog chased the ball because it was excited. " * 300

    async def two() -> tuple[httpx.Response, httpx.Response]:
        async with httpx.AsyncClient(base_url=server.url, timeout=BOUND_S) as c:
            first = asyncio.create_task(
                c.post("/api/run", json={"model": "smollm2", "text": long, "client": "same"})
            )
            while True:  # until the older run has started its forward
                p = (await c.get("/api/progress", params={"client": "same"})).json()
                if (p["state"] == "running" and p["done"] >= 1) or first.done():
                    break
                await asyncio.sleep(0.02)
            second = await c.post(
                "/api/run", json={"model": "smollm2", "text": SENTENCE, "client": "same"}
            )
            return await first, second

    first, second = in_thread(two())
    assert first.status_code == 409 and "superseded" in first.json()["error"]
    assert second.status_code == 200 and second.json()["text"] == SENTENCE
    p = httpx.get(server.url + "api/progress", params={"client": "same"}).json()
    assert p == {"state": "done", "done": 30, "of": 30, "server_ms": p["server_ms"]}


def test_kept_captures_are_an_lru(smollm2):
    from qkv.web.session import Job

    ex = Explorer(["smollm2"], Limits(max_captures=2), loaded={"smollm2": smollm2})
    ids = [ex.run("smollm2", t, Job())[0] for t in texts(3)]
    with pytest.raises(Unknown, match="run the text again"):
        ex.capture(ids[0])
    assert ex.capture(ids[1]).text == texts(3)[1] and ex.capture(ids[2]).text == texts(3)[2]
    small = Explorer(["smollm2"], Limits(max_capture_mib=1), loaded={"smollm2": smollm2})
    a = small.run("smollm2", SENTENCE * 20, Job())[0]  # over 1 MiB: kept alone, until the next
    b = small.run("smollm2", SENTENCE, Job())[0]
    assert small.kept == 1 and small.capture(b).text == SENTENCE
    with pytest.raises(Unknown):
        small.capture(a)
    ex.close()
    small.close()


def test_a_click_is_answered_while_a_long_run_holds_the_forward_pool(smollm2):
    """One forward worker, busy with a long text: a lookup on a kept capture is answered before
    that run ends (clicks have a pool of their own)."""
    ex = Explorer(["smollm2"], Limits(workers=1), loaded={"smollm2": smollm2})
    srv = Server(ex, port=0).start()
    long = "The dog chased the ball because it was excited. " * 300

    async def go() -> tuple[int, bool, int]:
        async with httpx.AsyncClient(base_url=srv.url, timeout=BOUND_S) as c:
            cid = (await c.post("/api/run", json={"model": "smollm2", "text": SENTENCE})).json()[
                "id"
            ]
            run = asyncio.create_task(
                c.post("/api/run", json={"model": "smollm2", "text": long, "client": "busy"})
            )
            while (await c.get("/api/progress", params={"client": "busy"})).json()[
                "state"
            ] != "running":
                await asyncio.sleep(0.02)
            look = await c.post("/api/lookup", json={"id": cid, "query": 8, "layer": 13, "head": 8})
            ended_first = run.done()
            return look.status_code, ended_first, (await run).status_code

    try:
        status, ended_first, run_status = in_thread(go())
    finally:
        srv.stop()
    assert status == 200 and run_status == 200
    assert not ended_first, "the click waited for the long run"


def test_concurrent_png_exports_are_whole(server):
    """Six PNG exports at once (matplotlib in worker threads): each a whole PNG of its own head."""
    with httpx.Client(base_url=server.url, timeout=120) as c:
        cid = c.post("/api/run", json={"model": "smollm2", "text": SENTENCE}).json()["id"]
    reqs = [
        ("/api/export", {"id": cid, "query": 8, "layer": k, "head": k, "format": "png"})
        for k in range(6)
    ]
    got = in_thread(burst(server.url, reqs))
    for k, r in enumerate(got):
        assert r.status_code == 200, r.text
        assert f"L{k}H{k}.png" in r.headers["content-disposition"]
        assert r.content[:8] == b"\x89PNG\r\n\x1a\n" and r.content[-8:] == b"IEND\xaeB`\x82"
