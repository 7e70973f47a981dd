"""The Triton kernels build for an H100/H200 (sm_90) without a GPU, and fit in shared memory.

Runs `benchmarks/triton_build.py --smoke --arch 90` in a subprocess: the forward's default
launches and the backward's kernels in bf16 (with and without softcap and ALiBi) and fp32 at
D = 128, the forward reading K/V by TMA (`Config(tma=True)`, bf16 D = 128), and SDPA's repair at fp32 D = 256, each compiled by Triton to cubin with the wheel's ptxas. The default launches of the
forward and backward passes must not spill more than `SPILL_LIMIT` bytes per thread (fp32 at
64 × 64 blocks spilled 53 KB in the forward and 200 KB in dK/dV at D = 128). A subprocess because Triton decides
interpreted vs compiled when a kernel is decorated, once per process: test_triton.py imports
the kernels under TRITON_INTERPRET=1 here, and the build needs them compiled.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "triton_build.py"
SPILL_LIMIT = 1024  # bytes of spill stores per thread, in a pass's default launch


def _ptxas_missing() -> str | None:
    """Why this machine cannot build for sm_90 with Triton's ptxas, or None."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas
    except ImportError as e:
        return f"triton has no NVIDIA backend: {e}"
    try:
        path = get_ptxas(90).path
    except RuntimeError as e:  # Triton's "Cannot find ptxas-blackwell"
        return f"no ptxas for sm_90 in the triton wheel: {e}"
    return None if os.access(path, os.X_OK) else f"ptxas for sm_90 is not executable: {path}"


def rows(output: str) -> list[dict[str, str]]:
    """The markdown tables' rows as {column: cell}."""
    out, header = [], None
    for line in output.splitlines():
        if not line.startswith("|") or line.startswith("|---"):
            continue
        cells = [c.strip() for c in line.strip("|").split("|")]
        if cells[0] == "kernel":
            header = cells
        elif header is not None:
            out.append(dict(zip(header, cells, strict=True)))
    return out


def test_smoke_set_builds_and_fits_on_sm90():
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed (pip install triton; Linux only)")
    why = _ptxas_missing()
    if why is not None:
        pytest.skip(why)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--arch", "90"],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    report = res.stdout + res.stderr[-3000:]
    assert res.returncode == 0, report
    got = rows(res.stdout)
    assert got, f"no table in the output:\n{report}"
    for row in got:
        assert row["fits"] == "yes", f"{row}\n{report}"
        assert int(row["shared B"]) <= 232448, row
    built = {(r["kernel"], r["dtype"], r["D"]) for r in got}
    fwd = [r for r in got if r["kernel"] == "_forward_kernel"]
    assert any(r["dtype"] == "fp32" and r["D"] == "256" and "REPAIR" in r["constexprs"]
               for r in fwd), built  # fmt: skip
    for dtype in ("bf16", "fp32"):
        at_128 = {k for k, dt, D in built if (dt, D) == (dtype, "128")}
        assert {"_dkdv_kernel", "_dq_kernel"} <= at_128, built
        assert any(r["dtype"] == dtype and r["D"] == "128" and "REPAIR" not in r["constexprs"]
                   for r in fwd), built  # fmt: skip
    tma = [r for r in fwd if re.search(r"\bTMA\b", r["constexprs"])]  # Config(tma=True)
    assert [(r["dtype"], r["D"]) for r in tma] == [("bf16", "128")], built
    modded = {r["kernel"] for r in got if "MODS=5" in r["constexprs"]}  # softcap= and alibi
    assert {"_forward_kernel", "_dkdv_kernel", "_dq_kernel"} <= modded, built
    passes = [r for r in got if "REPAIR" not in r["constexprs"]]
    for row in passes:
        stores = int(row["spills st/ld B"].split("/")[0])
        assert stores <= SPILL_LIMIT, f"{row['kernel']} {row['dtype']} D={row['D']} spills: {row}"
    assert re.search(rf"\n{len(got)}/{len(got)} built and fit", res.stdout), report
