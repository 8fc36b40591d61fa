"""The heatmap component's JavaScript in a real browser, on its own: no stack, no model.

``ui/heatmap/heatmap.js`` and its CSS are loaded into a blank page in headless Chromium and
called the way Streamlit calls them, with payloads built by ``ui.heatmap.build_payload`` from
hand-made responses; the tests read what it drew. A few seconds in all.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from seqsal.v1 import common_pb2, saliency_pb2
from ui.heatmap import build_payload

CHROMIUM = "/usr/bin/chromium"
pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="needs Debian's chromium")
playwright_sync = pytest.importorskip("playwright.sync_api")

from playwright.sync_api import Page, sync_playwright  # noqa: E402

from ui.heatmap import component_js  # noqa: E402
from ui.matrix import build_matrix  # noqa: E402
from ui.state import apply_click  # noqa: E402

HEATMAP_DIR = Path(__file__).resolve().parent.parent / "ui" / "heatmap"
MATRIX_DIR = HEATMAP_DIR.parent / "matrix"
UNIT = '[data-testid="seqsal-heatmap"] span.seqsal-unit'


@pytest.fixture(scope="module")
def page() -> Iterator[Page]:
    js = component_js(HEATMAP_DIR, "heatmap")  # as Streamlit gets it: the shared click rule first
    css = (HEATMAP_DIR / "heatmap.css").read_text(encoding="utf-8")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 800, "height": 600})
        page.set_content('<div id="host" style="width: 230px"></div>')
        page.add_style_tag(content=css)
        page.add_script_tag(content=js.replace("export default function", "window.seqsalDraw = function"))
        page.evaluate("() => { window.sent = []; }")
        yield page
        browser.close()


def response(prompt: list[str], target: list[str]) -> saliency_pb2.SaliencyResponse:
    """A response whose tokens are the given pieces (one segment each), every score 1."""
    tokens = []
    for part, pieces in ((common_pb2.PROMPT, prompt), (common_pb2.TARGET, target)):
        pos = 0
        for text in pieces:
            tokens.append(
                common_pb2.Token(id=len(tokens), text=text, start=pos, end=pos + len(text), part=part)
            )
            pos += len(text)
    scores = [float(i + 1) for i in range(len(tokens))]
    return saliency_pb2.SaliencyResponse(
        tokens=tokens,
        scores=[saliency_pb2.MethodScores(method=common_pb2.GRAD_L2, scores=scores)],
        target_mask=[True] * len(target),
        granularity=common_pb2.TOKENS,
    )


def draw(page: Page, data: dict[str, Any]) -> None:
    page.evaluate(
        """data => window.seqsalDraw({data, parentElement: document.getElementById("host"),
                                      setStateValue: (name, value) => window.sent.push([name, value]),
                                      setTriggerValue: () => {}})""",
        data,
    )


PROMPT = ["Analyze", " a", " wonderfully", " long", " menu", " item", ".\n\n", "Then", " recommend", "."]


def test_a_leading_space_is_drawn_uncoloured_in_front_of_its_unit(page: Page) -> None:
    draw(page, build_payload(response(PROMPT, [" Tasty", "!"]), 0, side="main"))
    units = page.locator(UNIT)
    texts = units.all_text_contents()
    assert not any(t != t.lstrip(" ") for t in texts), texts  # no coloured span starts with a space
    text = page.locator('[data-testid="seqsal-text"]').text_content()
    assert text == "".join(PROMPT) + " Tasty!"  # the spaces are still there, between the units


def test_chip_mode_does_not_box_blank_lines(page: Page) -> None:
    draw(page, build_payload(response(PROMPT, [" Tasty"]), 0, side="main", chips=True))
    borders = page.locator(UNIT).evaluate_all(
        "us => us.map(u => [u.textContent, getComputedStyle(u).borderTopStyle])"
    )
    assert dict(borders)[".\n\n"] == "solid"  # text with a newline is a chip ...
    blank = response(["Line one", "\n\n", "Line two"], [" ok"])
    draw(page, build_payload(blank, 0, side="main", chips=True))
    borders = page.locator(UNIT).evaluate_all(
        "us => us.map(u => [u.textContent, getComputedStyle(u).borderTopStyle])"
    )
    assert dict(borders) == {"Line one": "solid", "\n\n": "none", "Line two": "solid", "ok": "solid"}


def test_the_legend_names_the_target_it_explains(page: Page) -> None:
    data = build_payload(response(PROMPT, [" Tasty"]), 0, side="main", target_label="reference target")
    draw(page, data)
    legend = page.locator(".seqsal-legend-sel").text_content() or ""
    assert "explained: the whole reference target" in legend and "response" not in legend.split("·")[0]


def test_a_click_during_a_run_survives_the_stale_redraw_and_goes_back_as_numbered_state(page: Page) -> None:
    stale = build_payload(response(PROMPT, [" Tasty.", " Yes", "!"]), 0, side="main")
    draw(page, stale)
    page.evaluate("() => { window.sent = []; }")
    page.locator(f'{UNIT}[data-part="target"][data-index="1"]').click()
    ((name, value),) = page.evaluate("() => window.sent")
    assert name == "selection" and value["indices"] == [1] and value["seq"] > 0
    # The run that was in flight when the user clicked draws its (older) data: the click stays.
    draw(page, stale)
    root = page.locator('[data-testid="seqsal-heatmap"]')
    assert "seqsal-busy" in (root.get_attribute("class") or "")
    assert page.locator(f"{UNIT}.seqsal-selected").all_text_contents() == ["Yes"]
    # A shift-click then builds on it, not on the stale data.
    page.locator(f'{UNIT}[data-part="target"][data-index="2"]').click(modifiers=["Shift"])
    last = page.evaluate("() => window.sent")[-1][1]
    assert last["indices"] == [1, 2] and last["seq"] > value["seq"]
    # The run that applied it draws: no longer busy, Python's selection shown.
    applied = build_payload(
        response(PROMPT, [" Tasty.", " Yes", "!"]), 0, side="main", selection=(1, 2), click_seq=last["seq"]
    )
    draw(page, applied)
    assert "seqsal-busy" not in (root.get_attribute("class") or "")
    assert page.locator(f"{UNIT}.seqsal-selected").all_text_contents() == ["Yes", "!"]


def test_the_scripts_click_rule_is_pythons(page: Page) -> None:
    """selection.js (the heatmap's and the matrix view's clicks) selects what ui.state.apply_click does."""
    import itertools

    cases = [
        (list(selection), index, additive)
        for n in range(4)
        for selection in itertools.combinations(range(4), n)
        for index in range(4)
        for additive in (False, True)
    ]
    got = page.evaluate(
        "cases => cases.map(([sel, i, add]) => [...nextSelection(sel, i, add)].sort((a, b) => a - b))", cases
    )
    assert got == [list(apply_click(tuple(sel), i, add)) for sel, i, add in cases]
    seqs = page.evaluate(
        "() => { const s = {}; return [nextClickSeq(s, 0), nextClickSeq(s, 0), nextClickSeq({}, 9e15)]; }"
    )
    assert seqs[1] > seqs[0] and seqs[2] == 9e15 + 1  # always above the last sent and the last applied


def _extent(page: Page, selector: str) -> float:
    """Top to bottom of everything an element draws on (all its line fragments, empty ones too)."""
    return page.locator(selector).evaluate(
        "u => { const rs = [...u.getClientRects()];"
        " return Math.max(...rs.map(r => r.bottom)) - Math.min(...rs.map(r => r.top)); }"
    )


def test_a_sentences_trailing_newlines_stay_out_of_its_outline(page: Page) -> None:
    """The last sentence of a response ending ".\\n\\n": selected, its outline covers one line."""
    target = ["Tasty.", " Recommend it.\n\n"]
    draw(page, build_payload(response(PROMPT, target), 0, side="main", selection=(1,)))
    one_line = _extent(page, f'{UNIT}[data-part="target"][data-index="0"]')
    assert one_line > 0 and _extent(page, f"{UNIT}.seqsal-selected") == pytest.approx(one_line, abs=1)
    assert page.locator(f"{UNIT}.seqsal-selected").all_text_contents() == ["Recommend it."]
    # The newlines are still drawn, after the unit and outside it.
    text = page.locator('[data-testid="seqsal-text"]').text_content()
    assert text == "".join(PROMPT) + "".join(target)


def test_a_whitespace_only_response_unit_cannot_be_focused_clicked_or_outlined(page: Page) -> None:
    target = ["Tasty", ".\n\n", "  ", "\n"]  # token units: the response ends in blank ones
    draw(page, build_payload(response(PROMPT, target), 0, side="main", selection=(2, 3)))
    page.evaluate("() => { window.sent = []; }")
    for index in (2, 3):
        unit = page.locator(f'{UNIT}[data-part="target"][data-index="{index}"]')
        looks = unit.evaluate(
            "u => { u.focus(); const s = getComputedStyle(u);"
            " return [u.tabIndex, u.getAttribute('role'), document.activeElement === u,"
            "         s.pointerEvents, s.outlineStyle]; }"
        )
        assert looks == [-1, None, False, "none", "none"], (index, looks)
        # A real mouse click on it (where it has width) and a synthetic click select nothing.
        for rect in unit.evaluate("u => [...u.getClientRects()].map(r => [r.x, r.y, r.width, r.height])"):
            x, y, w, h = rect
            if w > 0:
                page.mouse.click(x + w / 2, y + h / 2)
        unit.evaluate("u => u.click()")
    assert page.locator(f'{UNIT}[data-part="target"][data-index="2"]').evaluate("u => u.offsetWidth") > 0
    assert page.evaluate("() => window.sent") == []
    # The visible units still are buttons, and a click on one is sent.
    page.locator(f'{UNIT}[data-part="target"][data-index="0"]').click()
    assert [v["indices"] for _, v in page.evaluate("() => window.sent")] == [[0]]


def test_a_whitespace_only_segments_matrix_row_cannot_be_clicked(page: Page) -> None:
    """The matrix view's row of a whitespace-only response segment is inert, as its heatmap unit."""
    js = component_js(MATRIX_DIR, "matrix")
    browser = page.context.browser
    assert browser is not None
    page = browser.new_page()  # its own page: both scripts declare the same top-level names
    page.set_content('<div id="host"></div>')
    page.add_style_tag(content=(MATRIX_DIR / "matrix.css").read_text(encoding="utf-8"))
    page.add_script_tag(content=js.replace("export default function", "window.seqsalMatrix = function"))
    texts = ["Tasty.", "\n\n", "Try it."]
    segments = [common_pb2.Segment(text=t) for t in texts]
    responses = {i: response(PROMPT, texts) for i in range(len(texts))}
    data = build_matrix(responses, segments, lambda r: 0, side="main")
    assert data is not None and [r["inert"] for r in data["rows"]] == [False, True, False]
    page.evaluate(
        """data => { window.sent = [];
            window.seqsalMatrix({data, parentElement: document.getElementById("host"),
                                 setStateValue: (name, value) => window.sent.push([name, value])}); }""",
        data,
    )
    rows = page.locator('[data-testid="seqsal-matrix"] tr.seqsal-matrix-row')
    assert rows.count() == 3
    blank = rows.nth(1)
    assert blank.evaluate("r => [r.classList.contains('seqsal-inert'), r.tabIndex]") == [True, -1]
    blank.evaluate("r => r.click()")
    assert page.evaluate("() => window.sent") == []
    rows.nth(2).evaluate("r => r.click()")
    assert [v["indices"] for _, v in page.evaluate("() => window.sent")] == [[2]]
    page.close()
