"""Fixtures for the explorer's tests: smollm2 loaded once, the real app on uvicorn on a free
127.0.0.1 port, and Debian's Chromium for the browser test (a missing browser fails with the
command that installs it; it never skips)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

import qkv
from qkv.web import Explorer, Limits, Server

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

SENTENCE = "The dog chased the ball because it was excited."
SENTENCE_B = "The dog chased the ball because it was round."
SHOTS = Path(__file__).resolve().parents[2] / "out" / "screenshots"  # gitignored (/out/)
INSTALL = "apt-get install -y chromium   (or: make setup, which installs it)"


@pytest.fixture(scope="session")
def smollm2():
    return qkv.load("smollm2")


@pytest.fixture(scope="session")
def server(smollm2):
    """The explorer over smollm2, served by uvicorn in a thread on 127.0.0.1:<free port>."""
    ex = Explorer(["smollm2"], Limits(), loaded={"smollm2": smollm2})  # the defaults
    srv = Server(ex, port=0).start()
    yield srv
    srv.stop()


def chromium() -> str:
    """Debian's chromium, or a failure that names the install command."""
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    pytest.fail(
        f"no Chromium on PATH: the explorer's browser test needs it. Install it with: {INSTALL}"
    )


@pytest.fixture(scope="session")
def browser():
    from playwright.sync_api import sync_playwright

    exe = chromium()
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=exe, args=["--no-sandbox", "--disable-gpu"])
        yield b
        b.close()


@pytest.fixture
def shots():
    SHOTS.mkdir(parents=True, exist_ok=True)
    return SHOTS
