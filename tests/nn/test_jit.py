"""qkv.nn._jit: the forced vector width of our kernels stays inside their compilation.

LLVM's `-force-vector-width` is process-wide. What we promise is that code numba compiles after
our kernels is the code it would compile in a process that never loaded them. The oracle is that
fresh process, never an assumed default: LLVM's own width differs between hosts (256-bit on
Intel's AVX-512 servers, 512-bit on AMD Zen 4).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

# One numba loop compiled afresh per call of `probe()`, described by its instructions: each
# mnemonic with the vector register classes it touches (symbol names differ between processes).
PROBE = r"""
import json, re, sys
import numpy as np
from numba import njit

def dot(a, b):
    s = np.float32(0)
    for i in range(a.shape[0]):
        s += a[i] * b[i]
    return s

def probe():
    f = njit(fastmath={"reassoc"})(dot)
    a = np.ones(1000, np.float32)
    assert f(a, a) == 1000
    asm = f.inspect_asm(f.signatures[0])
    rows = []
    for line in asm.splitlines():
        m = re.match(r"\s+([a-z][a-z0-9]*)\b(.*)", line)
        if m and not line.lstrip().startswith("."):
            rows.append(m.group(1) + " " + ",".join(re.findall(r"%([xyz]mm|k)\d", m.group(2))))
    return rows
"""


def run(code: str, cache_dir: os.PathLike, *, quiet: bool = False) -> dict:
    """What `code` prints last, as JSON. `quiet`: it must print nothing else, on either stream."""
    env = {**os.environ, "NUMBA_CACHE_DIR": str(cache_dir)}
    res = subprocess.run(
        [sys.executable, "-c", PROBE + code], capture_output=True, text=True, env=env, timeout=300
    )
    assert res.returncode == 0, res.stderr[-3000:]
    if quiet:
        assert res.stderr == "" and res.stdout.count("\n") == 1, (res.stdout + res.stderr)[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_wide_vectors_stay_inside_our_kernels(tmp_path):
    """Numba code compiled after our kernels (compiled from scratch, then loaded from numba's
    disk cache) equals the same code compiled in a fresh process that never loaded them. Both
    times our kernels print nothing (before: LLVM remarks from the forced vector width)."""
    fresh = run("print(json.dumps({'asm': probe()}))", tmp_path / "fresh")
    after = (
        "from qkv.nn import fused, quant\nfused.KERNELS['rms_norm'], quant.KERNELS['q4_1']\n"
        "print(json.dumps({'asm': probe()}))"
    )
    for state in ("cold cache", "warm cache"):
        got = run(after, tmp_path / "ours", quiet=True)
        assert got["asm"] == fresh["asm"], f"{state}: the loop compiled differently after ours"
    assert any((tmp_path / "ours").rglob("*.nbi")), "numba cached nothing: the warm run was cold"


def test_the_width_check_can_fail(tmp_path):
    """A width left forced after compilation shows in the probe: at least one of 4, 8 and 16
    lanes changes its instructions on any x86-64 host (and 16, the width we force, does on every
    host where we force it)."""
    code = """
import llvmlite.binding as llvm
from qkv.nn._jit import wide_vectors_pay
out = {"own": probe(), "ours_forced": wide_vectors_pay()}
for lanes in (4, 8, 16):
    llvm.set_option("", f"-force-vector-width={lanes}")
    out[str(lanes)] = probe()
print(json.dumps(out))
"""
    got = run(code, tmp_path)
    changed = {lanes: got[lanes] != got["own"] for lanes in ("4", "8", "16")}
    assert any(changed.values()), changed
    if got["ours_forced"]:
        assert changed["16"], "forcing 16 lanes did not change the probe: the check is blind here"


def test_no_writable_cache_compiles_uncached(tmp_path):
    """Where numba finds no writable cache directory (a read-only install and HOME), it raises
    "cannot cache function" at decoration; the kernels then compile uncached, say so once on
    stderr, and still compute the right thing (vs float64)."""
    code = """
from numba.core import caching
caching.CacheImpl._locator_classes = []  # numba's own "no locator available" path
import numpy as np, torch
from qkv.nn import fused, quant
x, w = torch.randn(3, 64, dtype=torch.float64), torch.randn(64, dtype=torch.float64)
ref = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * w
got = fused.rms_norm(x.float(), w.float(), 1e-5)
rows = np.ones((1, 32), np.float32)
q = quant.BlockWeight("q8_0", np.ones((1, 32, 4), np.int8), np.full((1, 4), 0.5, np.float32),
                     None)
print(json.dumps({"err": float((got.double() - ref).abs().max()),
                  "q8": q.matmul(torch.from_numpy(rows)).tolist()}))
"""
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path)}
    res = subprocess.run(
        [sys.executable, "-c", PROBE + code], capture_output=True, text=True, env=env, timeout=300
    )
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got["err"] < 1e-5 and got["q8"] == [[16.0] * 4]  # 32 · 1 · 0.5 each, exact
    assert res.stderr.count("set NUMBA_CACHE_DIR to a writable directory") == 1, res.stderr
    assert not any(tmp_path.rglob("*.nbi")), "numba cached although it had no locator"
