"""The sm_90 smoke build of `test_triton_build.py`, startable ahead of its test.

`benchmarks/triton_build.py --smoke --arch 90` spends about a minute in Triton and ptxas, most
of it one core per build. The engine's conftest starts it in the background, at low priority,
when test_triton.py begins, so that it overlaps those single-threaded tests (Triton's
interpreter) instead of running alone; the build's test then waits for it and reads its output.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import signal
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "triton_build.py"
TEST = "tests/attention/test_triton_build.py::test_smoke_set_builds_and_fits_on_sm90"


def cannot_build() -> str | None:
    """Why this machine cannot build for sm_90 with the Triton wheel's ptxas, or None."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install triton; Linux only)"
    try:
        from triton.backends.nvidia.compiler import get_ptxas
    except ImportError as e:
        return f"triton has no NVIDIA backend: {e}"
    try:
        path = get_ptxas(90).path
    except RuntimeError as e:  # Triton's "Cannot find ptxas-blackwell"
        return f"no ptxas for sm_90 in the triton wheel: {e}"
    return None if os.access(path, os.X_OK) else f"ptxas for sm_90 is not executable: {path}"


def start(*, nice: int = 0) -> subprocess.Popen:
    """The smoke build, running; its stdout and stderr are pipes (text). A subprocess because
    Triton decides interpreted vs compiled when a kernel is decorated, once per process: the
    engine's tests import the kernels under TRITON_INTERPRET=1, and the build needs them
    compiled. `nice` lowers its priority, so it takes only a core the tests leave idle."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.Popen(
        [sys.executable, str(SCRIPT), "--smoke", "--arch", "90"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        start_new_session=True,  # its own process group: `stop` ends its build workers too
    )  # fmt: skip
    if nice:  # set from here, not in the child before exec (unsafe in a threaded parent);
        # its build workers, started a second later, inherit it
        os.setpriority(os.PRIO_PROCESS, proc.pid, nice)
    return proc


def stop(proc: subprocess.Popen) -> None:
    """Kill the build and its worker processes if they still run (killing the parent alone
    leaves its multiprocessing workers behind), and reap it."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate()
