"""`qkv serve` and the server's security: 127.0.0.1 by default, models fixed at start-up, and no
value in any request reaches the file system."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import uuid

import httpx
import pytest

from qkv.cli import build_parser, main
from qkv.web import Explorer, Server
from qkv.web.session import model_names

pytestmark = pytest.mark.slow
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_binds_loopback_unless_told():
    args = build_parser().parse_args(["serve"])
    assert (args.host, args.port, args.model) == ("127.0.0.1", 8000, None)
    srv = Server(Explorer(["smollm2"]), port=0)  # nothing loaded until a request needs it
    try:
        assert srv.sock.getsockname()[0] == "127.0.0.1"
        assert srv.url == f"http://127.0.0.1:{srv.port}/"
    finally:
        srv.sock.close()
        srv.explorer.close()


def test_the_cli_serves_and_stops(tmp_path):
    """`python -m qkv serve --port 0` prints its 127.0.0.1 URL, answers there, stops on Ctrl-C."""
    p = subprocess.Popen([sys.executable, "-m", "qkv", "serve", "--port", "0"], cwd=tmp_path,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        url = None
        for line in p.stdout:
            m = re.search(r"(http://\S+/)", line)
            if m:
                url = m.group(1)
                break
        assert url is not None and url.startswith("http://127.0.0.1:"), p.stderr.read()
        models = httpx.get(url + "api/models", timeout=60).json()["models"]
        assert [m["name"] for m in models] == ["smollm2"] and models[0]["loaded"]
    finally:
        p.send_signal(signal.SIGINT)
        p.wait(timeout=60)
    assert "Traceback" not in p.stderr.read()


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["serve", "--model", "/no/such/model"], "--model '/no/such/model': no bundled model"),
        (["serve", "--port", "70000"], "port must be an integer in 0..65535"),
        (["serve", "--queue", "0"], "--queue must be a positive int, got 0"),
    ],
)
def test_cli_errors_are_one_line(argv, says, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert says in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_a_model_without_a_tokenizer_is_refused_at_start(tmp_path, capsys, monkeypatch):
    """The page sends text, so a checkpoint folder without tokenizer.json would fail every run:
    serve refuses it before listening, in one line with the fix a CLI user can follow."""
    from tests.models.test_families import build

    build("llama", tmp_path / "notok")
    monkeypatch.setattr("qkv.web.server.Server.serve_forever", lambda self: pytest.fail("served"))
    capsys.readouterr()  # transformers' progress bar while saving
    assert main(["serve", "--model", str(tmp_path / "notok"), "--port", "0"]) == 2
    captured = capsys.readouterr()
    assert captured.err == (
        "qkv serve: error: notok has no tokenizer (its folder has no tokenizer.json), and the "
        "lens reads text; put the checkpoint's tokenizer.json beside its config.json\n"
    )


def test_model_names_are_fixed_and_unique(tmp_path):
    (tmp_path / "a" / "m").mkdir(parents=True)
    (tmp_path / "b" / "m").mkdir(parents=True)
    names = model_names(["smollm2", str(tmp_path / "a" / "m"), str(tmp_path / "b" / "m")])
    assert names == {
        "smollm2": "smollm2",
        "m": str(tmp_path / "a" / "m"),
        "m-2": str(tmp_path / "b" / "m"),
    }
    with pytest.raises(ValueError, match="at least one model"):
        model_names([])


def test_no_request_value_reaches_the_file_system(server, tmp_path):
    """A real file's path, sent in every field a request has (and as an asset name), is never
    opened or listed by a Python-level call (audit hook: every event whose arguments name it),
    and every request that has it where a name or index belongs is refused with a 4xx."""
    secret = tmp_path / f"secret-{uuid.uuid4().hex}.txt"
    secret.write_text("do not read")
    s = str(secret)
    seen: list[tuple[str, str]] = []
    armed = [True]

    def audit(event: str, args: tuple) -> None:
        if armed[0] and secret.name in repr(args):
            seen.append((event, repr(args)[:200]))

    sys.addaudithook(audit)  # cannot be removed: disarmed at the end instead
    try:
        with httpx.Client(base_url=server.url, timeout=60) as c:
            cid = c.post("/api/run", json={"model": "smollm2", "text": "a dog"}).json()["id"]
            asks = [
                ("/api/run", {"model": s, "text": "a dog"}),
                ("/api/lookup", {"id": s, "query": 0, "layer": 0, "head": 0}),
                ("/api/lookup", {"id": cid, "query": s, "layer": 0, "head": 0}),
                ("/api/grid", {"id": cid, "query": 0, "key": s}),
                ("/api/compare", {"model": s, "a": "a dog", "b": "a cat", "query": 1}),
                ("/api/export", {"id": cid, "query": 0, "layer": 0, "head": 0, "format": s}),
            ]
            for path, body in asks:
                r = c.post(path, json=body)
                assert 400 <= r.status_code < 500, (path, r.status_code, r.text)
            # a page's client id is an opaque label: accepted, and still never a path
            r = c.post("/api/run", json={"model": "smollm2", "text": s, "client": s[-64:]})
            assert r.status_code == 200
            for url in (f"/static/{s}", f"/static/..%2F..%2F{secret.name}", "/static/../pyproject.toml",
                        f"/{s}", f"/api/progress?client={secret.name}"):  # fmt: skip
                r = c.get(url)
                assert r.status_code in (200, 404), (url, r.status_code)
                assert "do not read" not in r.text
    finally:
        armed[0] = False
    assert seen == [], f"request values reached the file system: {seen}"


def test_the_audit_check_can_fail(tmp_path):
    """The same hook sees an open() of the file: the check above would catch a leak."""
    secret = tmp_path / f"secret-{uuid.uuid4().hex}.txt"
    secret.write_text("x")
    seen: list[str] = []
    armed = [True]
    sys.addaudithook(lambda e, a: seen.append(e) if armed[0] and secret.name in repr(a) else None)
    try:
        secret.read_text()
        os.listdir(tmp_path)  # lists it by its folder: not its name, not caught, not needed
    finally:
        armed[0] = False
    assert "open" in seen
