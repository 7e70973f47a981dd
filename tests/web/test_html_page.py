"""The standalone HTML page (`qkv explain ... --html`, `ExplainResult.to_html`) in a real browser:
Debian's Chromium driven by Playwright (tests/web's session browser), on smollm2 and the seed
sentence, the reviewer's repro. What the mean-of-heads view's columns say they hold, and a marked
token's ring, which must not paint over the letters of the token beside it."""

from __future__ import annotations

import numpy as np
import pytest

from qkv.lens import explain

from .conftest import SENTENCE

pytestmark = pytest.mark.slow


def open_page(browser, r, path):
    r.to_html(path)
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(path.as_uri())
    page.wait_for_selector("#keys table")
    return page, errors


def test_the_mean_of_heads_view_says_its_content_is_the_layers(smollm2, browser, tmp_path):
    """Layer 13, head "mean of heads": the weight column is mean_h w_hj, the next one the layer's
    content ‖Σ_h w·v W_O‖ (not a mean over heads): the header, the title and the "show" menu say
    so, in the terminal's words. Oracle for the numbers under those words: the mean of the heads'
    weights computed here, and the record's layer content (checked against a float64 ‖Σ_h‖ in
    tests/lens/test_lookup.py), which is not the mean of the heads' ‖w·v W_O‖."""
    r = explain(SENTENCE, "it", model=smollm2, top=0, rollout=False, progress=False)
    lay = r.layers[13]
    page, errors = open_page(browser, r, tmp_path / "r.html")
    try:
        page.select_option("#layer", "13")  # opens "mean of heads"
        assert page.input_value("#head") == "-1"
        header = page.locator("#keys tr").first.locator("th").all_inner_texts()
        title = page.locator("#keys b").first.inner_text()
        assert header[4:6] == ["mean weight", "content carried ‖Σ_h w·v W_O‖"], header
        assert "mean weight over heads vs the content carried (‖Σ_h w·v W_O‖)" in title, title
        option = page.locator("#qty option[value=contribution]").inner_text()
        assert option == "content carried ‖Σ_h w·v W_O‖"
        rows = page.evaluate(
            "Array.from(document.querySelectorAll('#keys tr')).slice(1).map(r => "
            "Array.from(r.cells).map(c => c.textContent))"
        )
        mean_w = {j: np.mean([h.key(j).weight for h in lay.heads]) for j in range(7)}
        mean_c = {j: np.mean([h.key(j).contribution for h in lay.heads]) for j in range(7)}
        content = dict(zip(lay.index.tolist(), lay.contribution, strict=True))
        assert len(rows) == 7  # "it" (token 6) sees tokens 0..6
        assert any(abs(content[j] / mean_c[j] - 1) > 0.05 for j in mean_w)  # not a mean of heads
        for row in rows:
            j = int(row[2])
            assert float(row[4]) == pytest.approx(mean_w[j], rel=5e-3), row
            assert float(row[5]) == pytest.approx(content[j], rel=5e-3), row
        page.select_option("#head", "8")  # one head: its own weight and ‖w·v W_O‖
        header = page.locator("#keys tr").first.locator("th").all_inner_texts()
        assert header[4:6] == ["weight", "contribution"], header
        assert page.locator("#qty option[value=contribution]").inner_text() == (
            "contribution ‖w·v W_O‖"
        )
        assert errors == []
    finally:
        page.close()


def pixels_beside(page, i: int, j: int, cls: str) -> tuple[bytes, bytes, bytes, bytes]:
    """Token j's box drawn with token i marked by `cls` and without, and token i's ring area
    (its box grown by 4 px) with and without: screenshots, each at the box's own position."""
    span = "document.querySelectorAll('#text span')[{}]"
    out = []
    for k, grow in ((j, 0), (i, 4)):
        for on in (True, False):
            page.evaluate(f"{span.format(i)}.classList.toggle('{cls}', {str(on).lower()})")
            b = page.evaluate(f"(() => {{ const r = {span.format(k)}.getBoundingClientRect();"
                              " return {x: r.x, y: r.y, width: r.width, height: r.height}; })()")  # fmt: skip
            clip = {"x": b["x"] - grow, "y": b["y"] - grow,
                    "width": b["width"] + 2 * grow, "height": b["height"] + 2 * grow}  # fmt: skip
            out.append(page.screenshot(clip=clip))
    return tuple(out)


def test_a_marked_token_does_not_paint_over_its_neighbour(smollm2, browser, tmp_path, shots):
    """The query's outline (red) and the pinned token's ring (blue) lie outside the token's box,
    and smollm2's tokens touch (" ball" " because"): pinned " because" painted over the last
    letter of "ball" ("bal"), the query " it" over the "e" of "because". Each neighbour's pixels
    must be the same with the mark and without it; the mark's own area must change (so the
    check can fail)."""
    r = explain(SENTENCE, "it", model=smollm2, layer=13, rollout=False, progress=False)
    words = [t.text for t in r.tokens]
    assert words[4:8] == [" ball", " because", " it", " was"]
    assert all(r.tokens[k].end == r.tokens[k + 1].start for k in range(4, 7))
    page, errors = open_page(browser, r, tmp_path / "r.html")
    try:
        page.locator("#text span").nth(5).click()  # pin " because"
        page.mouse.move(1, 1)  # its tooltip away
        page.locator("#text").screenshot(path=str(shots / "html-marks.png"))
        for marked, beside, cls in ((5, 4, "pin"), (6, 5, "q"), (6, 7, "q")):
            with_mark, without, ring, no_ring = pixels_beside(page, marked, beside, cls)
            assert ring != no_ring, f"the {cls} mark draws nothing: the check cannot fail"
            assert with_mark == without, f"the {cls} mark on {words[marked]!r} paints over {words[beside]!r}"  # fmt: skip
        assert errors == []
    finally:
        page.close()


def test_the_rank_by_content_column_and_its_marks_equal_the_terminal_s(smollm2, browser, tmp_path):
    """The page's "rank by content" cell for every key of every head is what the terminal
    prints (lens.terminal.content_ranks / content_flag, held to the top=0 record in
    tests/lens/test_content_rank.py): the same rank or "> k", the same mark. Before, the page
    ranked among the kept keys only and marked a sink one place later than the terminal."""
    from qkv.lens.terminal import content_flag, content_ranks

    r = explain(SENTENCE, "excited", model=smollm2, top=2, rollout=False, progress=False)
    page, errors = open_page(browser, r, tmp_path / "r.html")
    marks = 0
    heads = [(layer, h) for layer in r.layers for h in layer.heads]
    try:
        # every head's column in one round trip: each menu set as select_option sets it (the
        # value, then its change event), the column read after each (270 heads: 19 s one by one)
        shown = page.evaluate(
            """pairs => pairs.map(([layer, head]) => {
                for (const [id, value] of [['layer', layer], ['head', head]]) {
                    const menu = document.getElementById(id);
                    menu.value = String(value);
                    menu.dispatchEvent(new Event('change', {bubbles: true}));
                }
                return [document.getElementById('layer').value, document.getElementById('head').value,
                        Array.from(document.querySelectorAll('#keys tr')).slice(1)
                             .map(r => r.cells[r.cells.length - 1].textContent)];
            })""",
            [[lay.layer, h.head] for lay, h in heads],
        )
        for (lay, h), (layer_shown, head_shown, cells) in zip(heads, shown, strict=True):
            assert (layer_shown, head_shown) == (str(lay.layer), str(h.head))
            want = []
            for n, (rank, exact) in enumerate(content_ranks(h, r.top)):
                mark = content_flag(n + 1, (rank, exact), float(h.weight[n]))
                mark = {"more": "carries more", "less": "carries less"}.get(mark, mark)
                want.append((str(rank) if exact else "> 2") + (f" {mark}" if mark else ""))
                marks += bool(mark)
            assert cells == want, (lay.layer, h.head, cells, want)
        assert errors == []
    finally:
        page.close()
    assert marks  # some head has a mark, so the marks were compared too
