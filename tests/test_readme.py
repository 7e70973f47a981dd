"""The README shows real output: each of its self-contained Python examples runs as written, in a
fresh interpreter, and prints what the README shows after it.

Compared token by token: words exactly; numbers within a named tolerance (a float rounded for
print within 1 % of the README's; an error measure below 1e-4 within a factor of 10, since its
last digits follow the CPU's float kernels). The `>>>` examples run as doctests (numbers as
printed). The torch.distributed examples need `torchrun` and are run by tests/distributed.
"""

from __future__ import annotations

import doctest
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
FENCE = re.compile(r"```(\w*)\n(.*?)```", re.S)
NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:e[-+]?\d+)?")


def examples() -> list[tuple[int, str, str | None]]:
    """(line, code, shown output or None) of every ```python block; the output is the plain
    fenced block right after it."""
    text = README.read_text(encoding="utf-8")
    fences = list(FENCE.finditer(text))
    out = []
    for n, m in enumerate(fences):
        if m.group(1) != "python":
            continue
        nxt = fences[n + 1] if n + 1 < len(fences) else None
        shown = None
        if nxt and nxt.group(1) == "" and not text[m.end() : nxt.start()].strip():
            shown = nxt.group(2)
        out.append((text.count("\n", 0, m.start()) + 1, m.group(2), shown))
    return out


RUNNABLE = [e for e in examples() if "torch.distributed" not in e[1] and ">>>" not in e[1]]
DOCTESTS = [e for e in examples() if ">>>" in e[1]]


def same(printed: str, shown: str) -> bool:
    """Token by token: words equal, numbers within the module docstring's tolerances."""
    a, b = printed.split(), shown.split()
    if len(a) != len(b):
        return False
    for x, y in zip(a, b, strict=True):
        nx, ny = NUMBER.findall(x), NUMBER.findall(y)
        if NUMBER.sub("#", x) != NUMBER.sub("#", y) or len(nx) != len(ny):
            return False
        for u, v in zip(map(float, nx), map(float, ny), strict=True):
            if abs(v) < 1e-4 and v != 0:
                if not v / 10 <= abs(u) <= abs(v) * 10:
                    return False
            elif abs(u - v) > 0.01 * abs(v):
                return False
    return True


def test_the_readme_has_examples_to_run():
    assert len(RUNNABLE) >= 4 and len(DOCTESTS) >= 1


@pytest.mark.parametrize("line, code, shown", RUNNABLE, ids=[f"line {e[0]}" for e in RUNNABLE])
def test_a_readme_example_prints_what_the_readme_shows(line, code, shown):
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    if shown is not None:
        assert same(r.stdout, shown), f"README line {line} shows:\n{shown}\nit printed:\n{r.stdout}"


@pytest.mark.parametrize("line, code, shown", DOCTESTS, ids=[f"line {e[0]}" for e in DOCTESTS])
def test_a_readme_session_runs_as_a_doctest(line, code, shown):
    test = doctest.DocTestParser().get_doctest(code, {}, f"README line {line}", str(README), line)
    runner = doctest.DocTestRunner(optionflags=doctest.NORMALIZE_WHITESPACE)
    runner.run(test)
    assert runner.failures == 0 and runner.tries >= 1


def test_the_comparison_can_fail():
    assert same("max = 7.5e-07 ok", "max = 7.4e-07 ok") and same("0.5185", "0.519")
    assert not same("max = 7.5e-05 ok", "max = 7.5e-07 ok") and not same("0.60", "0.5185")
    assert not same("Paris.", "London.") and not same("a b", "a")
