"""Terminal, HTML and PNG views; atomic writes."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest

from qkv.lens import explain
from qkv.lens import io as lens_io
from qkv.lens.terminal import marked_text

from .conftest import SENTENCE

URL_TEXT = "See https://example.com/x and http://cdn.example.org/lib.js because it was excited."


@pytest.fixture(scope="module")
def result(tiny_causal):
    return explain(SENTENCE, "excited", model=tiny_causal, top=3, key="dog", rollout=True)


def test_terminal_view_shows_the_lookups(result, tiny_causal):
    s = str(result)
    assert "query excited (token 8)" in s
    assert "The dog chased the ball because it was excited." in s
    assert "Heads that send 'excited (8)' most to 'dog (1)'" in s and "rollout" in s
    one = explain(SENTENCE, "it", model=tiny_causal, layer=0, head=1)
    s1 = str(one)
    assert "layer 0 head 1" in s1 and "rank by content" in s1
    h = one.head(0, 1)
    assert f"{h.weight[0]:.3f}" in s1
    assert "every head" in str(explain(SENTENCE, "it", model=tiny_causal, layer=2))


def _data(page: str) -> dict:
    m = re.search(r'<script type="application/json" id="qkv-data">(.*?)</script>', page, re.S)
    return json.loads(m.group(1))


def test_html_is_standalone_and_carries_the_record(result, tmp_path):
    page = result.to_html(tmp_path / "r.html")
    assert (tmp_path / "r.html").read_text(encoding="utf-8") == page
    assert "<script src" not in page and "<link" not in page
    assert not re.search(r"https?://", page)
    data = _data(page)
    assert data["query"] == result.query.index and data["key"] == result.key.index
    w = np.frombuffer(base64.b64decode(data["weight"]), dtype="<f4")
    first = result.layers[0].heads[0]
    np.testing.assert_allclose(w[: len(first.weight)], first.weight, rtol=1e-6)
    assert len(data["heads"]) == sum(len(lay.heads) for lay in result.layers)


def test_html_neutralises_urls_in_the_text(tiny_causal):
    r = explain(URL_TEXT, "excited", model=tiny_causal)
    page = r.to_html()
    assert not re.search(r"https?://", page)
    assert _data(page)["text"] == URL_TEXT  # "\/" decodes back to "/"
    frag = r._repr_html_()
    assert frag.startswith("<iframe") and "srcdoc=" in frag and not re.search(r"https?://", frag)


def test_png_is_written(result, tiny_causal, tmp_path):
    for name, r in (
        ("all.png", result),
        ("one.png", explain(SENTENCE, "it", model=tiny_causal, layer=1, head=0)),
        ("layer.png", explain(SENTENCE, "it", model=tiny_causal, layer=1)),
    ):
        p = r.to_png(tmp_path / name)
        data = p.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000
    assert sorted(os.listdir(tmp_path)) == ["all.png", "layer.png", "one.png"]  # no temp files left


def test_unwritable_paths_write_nothing(result, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        result.to_json(tmp_path / "no" / "such" / "dir.json")
    with pytest.raises(ValueError, match="is a directory"):
        result.to_html(tmp_path)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(FileNotFoundError):
        result.to_png(blocker / "x.png")
    assert sorted(os.listdir(tmp_path)) == ["file"]


def test_a_failed_write_leaves_the_old_file_and_no_temp(result, tmp_path, monkeypatch):
    target = tmp_path / "r.json"
    target.write_text("old")

    def boom(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(lens_io.os, "replace", boom)
    with pytest.raises(ValueError, match="No space left on device"):
        result.to_json(target)
    assert target.read_text(encoding="utf-8") == "old"
    assert os.listdir(tmp_path) == ["r.json"]


@contextlib.contextmanager
def unprivileged():
    """Root ignores permission bits, so as root act as `nobody` for the block: only the
    effective uid changes, and root's saved uid takes it back. Other users stay themselves."""
    if os.geteuid() != 0:
        yield
        return
    os.seteuid(65534)
    try:
        yield
    finally:
        os.seteuid(0)


def test_read_only_directory(result):
    base = Path(tempfile.mkdtemp())  # under /tmp: every user can reach it (tmp_path is 0o700)
    base.chmod(0o755)
    ro = base / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with unprivileged():
            with pytest.raises(PermissionError):  # the setup is real: a plain write is refused
                (ro / "probe").write_text("x")
            with pytest.raises(ValueError, match="is not writable"):
                result.to_html(ro / "r.html")
        assert os.listdir(ro) == []
    finally:
        shutil.rmtree(base)


@pytest.mark.skipif(
    shutil.which("node") is None, reason="node.js is not installed to run the page's script"
)
def test_html_script_runs(result, tiny_bidir, tmp_path):
    """Run the page's script in node against a minimal DOM stub and click through the controls."""
    for name, r in (
        ("causal.html", result),
        ("bidir.html", explain(SENTENCE, "it", model=tiny_bidir, top=0)),
    ):
        r.to_html(tmp_path / name)
        out = subprocess.run(
            ["node", str(Path(__file__).with_name("dom_stub.js")), str(tmp_path / name)],
            capture_output=True, text=True, encoding="utf-8", timeout=60,
        )  # fmt: skip
        assert out.returncode == 0, out.stderr
        assert out.stdout.startswith("ok")


@pytest.fixture(scope="module")
def deep():
    from .conftest import TinyModel

    return TinyModel(causal=True, n_layers=5, seed=2)


def test_head_without_layer_shapes_the_per_layer_table(deep):
    r = explain(SENTENCE, "it", model=deep, head=2, top=2, rollout=False)
    s = str(r)
    assert "Per layer, head 2:" in s and "mean weight over heads" not in s
    rows = [line for line in s.splitlines() if line.startswith("│") and "│ most" not in line]
    for lay, row in zip(r.layers, rows, strict=False):
        h = lay.heads[0]
        assert f"{r.tokens[h.top_weight].text} ({h.top_weight}) {h.weight[0]:.2f}" in row


def test_tables_say_positions_and_what_their_columns_mean(deep):
    s = str(explain(SENTENCE, "it", model=deep, top=1, rollout=False))
    assert "rank w/c" not in s and "top content" in s and "rank: the key's place" in s
    assert "the (3) " in s or "dog (1) " in s or "ball (4) " in s


def test_repr_is_one_short_line(result):
    s = repr(result)
    assert "\n" not in s and len(s) < 200
    assert s.startswith("<ExplainResult tiny-causal: query 'excited'@8, key='dog'@1 of 10 tokens")
    assert len(repr(result.layers[0])) < 120 and len(repr(result.layers[0].heads[0])) < 120


def test_a_long_text_is_echoed_around_the_query(tiny_causal):
    words = [f"w{k}" for k in range(500)]  # 2,400 characters, within the tiny context
    words[300] = "needle"
    r = explain(" ".join(words), "needle", model=tiny_causal, layer=0, head=0, top=1)
    s = str(r)
    assert "needle" in s and "w290" in s and "w10 " not in s and "w499" not in s
    assert "[… 240 words before]" in s and "words after …]" in s
    assert len(s) < 5000
    short = str(explain(SENTENCE, "it", model=tiny_causal, layer=0, head=0))
    assert SENTENCE in short and "words before" not in short


def test_the_sink_note_states_this_run_s_numbers(tiny_bidir):
    r = explain(SENTENCE, "it", model=tiny_bidir, top=3, rollout=False)
    note = next(n for n in r.notes if "the key with the most weight is not" in n)
    assert "pass on little" not in note  # a claim the data may contradict
    heads = [h for lay in r.layers for h in lay.heads]
    dis = [h for h in heads if h.disagrees]
    assert f"In {len(dis)} of {len(heads)} heads" in note
    j = int(np.bincount([h.top_weight for h in dis]).argmax())
    mine = [h for h in dis if h.top_weight == j]
    w = np.mean([h.key(j).weight for h in mine])
    assert (
        f"in {len(mine)} head{'s' if len(mine) > 1 else ''} it takes the most weight (mean {w:.2f})"
        in note
    )
    both = [h for h in heads if h.top_weight == j and not h.disagrees]
    assert ("Not everywhere" in note) == bool(both)


def _tables(r, path: Path) -> dict:
    """The page's key tables per head, per propagation, and the text it drew (node + DOM stub)."""
    r.to_html(path)
    out = subprocess.run(
        ["node", str(Path(__file__).with_name("dom_stub.js")), str(path), "tables"],
        capture_output=True, text=True, encoding="utf-8", timeout=60,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.splitlines()[-1])


def _key_indices(table: str) -> list[int]:
    """The idx column of a key table: '<tr><td>rank</td><td class=l>key</td><td>idx</td>'."""
    return [
        int(j) for j in re.findall(r"<tr><td>\d+</td><td class=l>[^<]*</td><td>(\d+)</td>", table)
    ]


@pytest.mark.skipif(shutil.which("node") is None, reason="node.js runs the page's script")
def test_html_key_table_shows_every_kept_key(tiny_bidir, tmp_path):
    """With top=1 a head keeps its top key by weight, its top key by contribution, the sinks and
    the next key: the page lists every one of them (it listed the top `top` by weight only)."""
    r = explain(SENTENCE, "it", model=tiny_bidir, top=1)
    tables = _tables(r, tmp_path / "r.html")["heads"]
    hidden_before = 0
    for lay in r.layers:
        for h in lay.heads:
            shown = _key_indices(tables[f"{lay.layer}.{h.head}"])
            assert shown == h.index.tolist()  # every kept key, ranked by weight
            assert h.top_contribution in shown
            hidden_before += h.top_contribution not in h.index[:1]
    assert hidden_before > 0  # the old page (top 1 by weight) would have hidden some


@pytest.mark.skipif(shutil.which("node") is None, reason="node.js runs the page's script")
def test_html_propagations_are_not_labelled_weight_or_contribution(tiny_causal, tmp_path):
    r = explain(SENTENCE, "it", model=tiny_causal, flow=True, rollout=True)
    prop = _tables(r, tmp_path / "r.html")["prop"]
    assert set(prop) == {"flow", "rollout"}
    for name, table in prop.items():
        header = table.split("</tr>")[0]
        assert "share" in header and "weight" not in header and "contribution<" not in header
        values = r.flow.values if name == "flow" else r.rollout.values
        assert _key_indices(table)[0] == int(values.argmax())
    page = explain(SENTENCE, "it", model=tiny_causal).to_html()
    assert 'value="rollout"' in page  # the option exists in the template; the script drops it
    assert '"prop":{}' in page


def test_one_key_head_has_entropy_zero_not_minus_zero(tiny_causal):
    r = explain(SENTENCE, "The", model=tiny_causal, layer=0, head=0)  # token 0 sees one key
    h = r.head(0, 0)
    assert h.n_keys == 1 and 0 <= h.entropy < 1e-6
    assert "entropy 0.00 nats" in str(r) and "-0.00" not in str(r)
    from qkv.lens.lookup import entropy

    # an fp32 softmax row of one key may hold 1 + 1 ulp: −w log w is then −1.2e-7, shown "-0.00"
    assert f"{entropy(np.array([1.0000001]))}" == "0.0"


def test_the_echo_window_always_holds_the_query_and_counts_what_it_cut(tiny_causal):
    """A word longer than the snapping reach (here 5,000 characters) before the query: the
    window still ends after the query, and the part of the word cut away is not counted as
    a word left out."""
    text = "x" + "a" * 5000 + " it"
    r = explain(text, "it", model=tiny_causal, layer=0, head=0, top=1)
    echo = str(marked_text(r))
    assert echo.rstrip().endswith("it") and "words after" not in echo
    assert "1 words" not in echo and "characters before" in echo
    one = str(marked_text(explain("y " + "b" * 700 + " it", "it", model=tiny_causal, layer=0)))
    assert one.rstrip().endswith("it")


def test_a_narrow_terminal_never_cuts_or_wraps_a_number(tiny_causal):
    """At 80 columns the head table keeps every score, weight and contribution whole (rich cut
    '0.0345' to '0.03…' or wrapped it under its bar); the wordy columns give way instead."""
    from qkv.lens.terminal import render_text

    r = explain(SENTENCE, "excited", model=tiny_causal, layer=0, head=0, top=0)
    h = r.layers[0].heads[0]
    h.contribution = h.contribution * 0 + np.float32(0.0345)  # the widest .3g form
    h.contribution[0] = 9.38
    s = render_text(r, width=80)
    rows = [line for line in s.splitlines() if line.startswith("│") and line.strip("│ ")]
    assert "…" not in s
    for j, sc, w, c in zip(h.index, h.score, h.weight, h.contribution, strict=True):
        row = next(line for line in rows if line.split("│")[3].strip() == str(int(j)))
        assert f"{sc:.2f}" in row and f"{w:.3f}" in row and f"{c:.3g}" in row, row


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux's /proc")
def test_a_directory_that_refuses_new_files_fails_the_early_check():
    """/proc passes the permission bits (for root) but refuses new files: the check made before
    any work must say so, not the write after it."""
    with pytest.raises(ValueError, match=r"cannot write '/proc/qkv-probe\.json'"):
        lens_io.check_writable("/proc/qkv-probe.json")


def test_png_of_one_head_in_every_layer_draws_that_head(deep, tmp_path, monkeypatch):
    """explain(head=H) without a layer: the heatmaps are head H's rows, as the terminal's
    per-layer table is (they were the mean over every head, whatever H), each with a scale."""
    import matplotlib.axes
    import matplotlib.figure

    drawn, titles, bars = [], [], []
    imshow, set_title, colorbar = (
        matplotlib.axes.Axes.imshow,
        matplotlib.axes.Axes.set_title,
        matplotlib.figure.Figure.colorbar,
    )

    def spy_imshow(self, M, *a, **k):
        drawn.append(np.array(M))
        return imshow(self, M, *a, **k)

    def spy_title(self, s, *a, **k):
        titles.append(s)
        return set_title(self, s, *a, **k)

    def spy_colorbar(self, im, *a, **k):
        bars.append(k.get("label", ""))
        return colorbar(self, im, *a, **k)

    monkeypatch.setattr(matplotlib.axes.Axes, "imshow", spy_imshow)
    monkeypatch.setattr(matplotlib.axes.Axes, "set_title", spy_title)
    monkeypatch.setattr(matplotlib.figure.Figure, "colorbar", spy_colorbar)
    r = explain(SENTENCE, "it", model=deep, head=2, top=0)
    r.to_png(tmp_path / "h.png")
    assert len(drawn) == 2 and all("head 2" in t for t in titles[:2]), titles
    for M, what in zip(drawn, ("weight", "contribution"), strict=True):
        for row, lay in zip(M, r.layers, strict=True):
            h = lay.heads[0]
            want = np.zeros(M.shape[1])
            want[h.index] = getattr(h, what)
            np.testing.assert_allclose(row, want / want.max(), rtol=1e-5, atol=1e-7)
    assert len(bars) == 2 and all("max" in b for b in bars)


@pytest.mark.skipif(shutil.which("node") is None, reason="node.js runs the page's script")
def test_html_grid_opens_on_a_key_the_heads_kept(tiny_causal, tmp_path):
    """The grid (weight on one key by layer × head) opens on the key with the most weight over
    the kept rows, the first token and the query aside: on a long text the first head's top
    content key is kept in few other heads, and the grid was nearly all "not kept"."""
    words = [f"w{k % 37}" for k in range(300)]
    r = explain(" ".join([*words, "needle"]), "needle", model=tiny_causal, top=1)
    r.to_html(tmp_path / "g.html")
    out = subprocess.run(
        ["node", str(Path(__file__).with_name("dom_stub.js")), str(tmp_path / "g.html"), "grid"],
        capture_output=True, text=True, encoding="utf-8", timeout=60,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    grid = json.loads(out.stdout.splitlines()[-1])["grid"]
    total: dict[int, float] = {}
    for lay in r.layers:
        for h in lay.heads:
            for j, w in zip(h.index, h.weight, strict=True):
                if int(j) not in (0, r.query.index):
                    total[int(j)] = total.get(int(j), 0.0) + float(w)
    best = max(total, key=total.get)
    assert f"→ &quot;{r.tokens[best].text}&quot; by layer" in grid
    kept = sum(1 for lay in r.layers for h in lay.heads if h.key(best) is not None)
    assert grid.count("not kept") == len(r.layers) * r.model.n_heads - kept
