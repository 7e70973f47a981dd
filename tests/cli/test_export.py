"""`qkv export`: a thin shell over `qkv.lens.export` (tiny models stand in for the real ones)."""

from __future__ import annotations

import os
import re
import sys

import numpy as np
import pytest

import qkv.lens.export as export_mod
import qkv.models
from qkv.cli import main
from qkv.lens.export import capture_text
from tests.lens.conftest import SENTENCE, TinyModel


@pytest.fixture(scope="module")
def tiny():
    return TinyModel(causal=True)


@pytest.fixture
def loads(monkeypatch, tiny):
    calls = []

    def load(name):
        calls.append(name)
        return tiny

    monkeypatch.setattr(qkv.models, "load", load)
    return calls


def test_export_writes_dense_rows_and_states_the_memory(loads, tiny, tmp_path, capsys):
    out = tmp_path / "rows.npz"
    assert main(["export", SENTENCE, "--out", str(out), "--model", "tiny-causal"]) == 0
    said = capsys.readouterr().out
    z = np.load(out)
    n = len(z["tokens"])
    assert f"3 layers × 4 heads × {n} queries, dense rows" in said
    mib = (3 * 4 * n * n + 3 * 4 * n) * 4 / 2**20  # weight (l h i j) + value_norm (l h j)
    assert re.search(
        rf"{mib:.1f} MiB of rows, streamed to disk a layer at a time, [\d.]+ MiB on disk", said
    )
    want = capture_text(SENTENCE, model=tiny, progress=False).rows()
    np.testing.assert_array_equal(z["weight"], want.weight)
    assert loads == ["tiny-causal"]


def test_export_writes_top_k_rows_for_a_long_text(loads, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(export_mod, "DENSE_MAX_TOKENS", 4)
    out = tmp_path / "rows.npz"
    assert main(["export", SENTENCE, "--out", str(out), "--model", "tiny-causal"]) == 0
    assert "top 10 keys per row" in capsys.readouterr().out  # 10 tokens, fewer than SPARSE_TOP
    assert (
        main(["export", SENTENCE, "--out", str(out), "--model", "tiny-causal", "--top", "2"]) == 0
    )
    assert "top 2 keys per row" in capsys.readouterr().out
    assert np.load(out)["index"].shape[-1] == 2


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--out", "rows.csv"], "--out must end in .npz or .parquet"),
        (["--out", "rows.npz", "--top", "-1"], "--top must be ≥ 0"),
        (["--out", "no/such/dir/rows.npz"], "--out: cannot write 'no/such/dir/rows.npz': directory"),
        (["--out", "/proc/qkv-rows.npz"], "--out: cannot write '/proc/qkv-rows.npz'"),
        (["--out", "rows.parquet"], "--out FILE.parquet needs pyarrow, which is not installed: pip install pyarrow"),
    ],
)  # fmt: skip
def test_bad_input_names_the_cli_words(loads, tmp_path, monkeypatch, capsys, argv, message):
    if "/proc" in " ".join(argv) and not os.path.isdir("/proc/self"):
        pytest.skip("needs Linux's /proc")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # as where pyarrow is not installed
    assert main(["export", SENTENCE, "--model", "tiny-causal", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("qkv export: error: ") and message in err
    assert loads == []  # failed before the model was loaded


def test_export_to_parquet_describes_the_parquet_table(loads, tmp_path, capsys):
    """Before, a .parquet export was described as the .npz layout ("weight float32 +
    value_norm (l h j)"); the table holds one row per key with weight and contribution."""
    pq = pytest.importorskip("pyarrow.parquet", reason="parquet output needs pyarrow")
    out = tmp_path / "rows.parquet"
    assert main(["export", SENTENCE, "--out", str(out), "--model", "tiny-causal"]) == 0
    said = capsys.readouterr().out
    assert "one table row per (layer, head, query, key): weight and contribution" in said
    assert "value_norm" not in said
    names = pq.read_table(out).schema.names
    assert names == ["layer", "head", "query", "key", "weight", "contribution"]
