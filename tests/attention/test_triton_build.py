"""The Triton kernels build for an H100/H200 (sm_90) without a GPU, and fit in shared memory.

Runs `benchmarks/triton_build.py --smoke --arch 90` in a subprocess: the forward's default
launches and the backward's kernels in bf16 (with and without softcap and ALiBi) and fp32 at
D = 128, the forward reading K/V by TMA (`Config(tma=True)`, bf16 D = 128), and SDPA's repair at fp32 D = 256, each compiled by Triton to cubin with the wheel's ptxas. The default launches of the
forward and backward passes must not spill more than `SPILL_LIMIT` bytes per thread (fp32 at
64 × 64 blocks spilled 53 KB in the forward and 200 KB in dK/dV at D = 128). The build runs in a
subprocess (`sm90.start`), which the engine's conftest starts ahead of this test.
"""

from __future__ import annotations

import re
import subprocess

import pytest

from .sm90 import cannot_build, start, stop

SPILL_LIMIT = 1024  # bytes of spill stores per thread, in a pass's default launch


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


def test_smoke_set_builds_and_fits_on_sm90(sm90_build):
    why = cannot_build()
    if why is not None:
        pytest.skip(why)
    # started by the conftest with test_triton.py, or for this test; here only if its node id
    # did not match there
    proc = sm90_build or start()
    try:
        stdout, stderr = proc.communicate(timeout=600)
    finally:
        stop(proc)
    res = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
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
