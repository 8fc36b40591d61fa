"""Side-by-side across two models in a real browser (paper section 4.3; issue 15).

``seqsal up`` hosts two tiny models, ``tiny`` (a Llama with a chat template, the default) and
``gpt2``, as the AppTest of the same comparison does (test_ui_models.py). The page is driven as
a user would: pin the restaurant example, move the current side to ``gpt2``, see both heatmaps
(each component's root says which side it draws in ``data-side``), turn on the shared colour
scale, then change what the pinned side explains without unpinning it.

The stack, browser, page and helpers come from test_ui_browser.py (:func:`running_stack` with
both models).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from test_ui_browser import (  # noqa: F401  (fixtures: browser, page)
    CHROMIUM,
    HEATMAP,
    WAIT_MS,
    RunningStack,
    browser,
    open_app,
    page,
    query,
    running_stack,
    shot,
    wait_query,
    wait_until,
)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(300),
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="needs Debian's chromium at /usr/bin/chromium"),
]

from playwright.sync_api import Locator, Page, expect  # noqa: E402

SIDES = ("pin", "main")


@pytest.fixture(scope="module")
def sxs_stack(
    tiny_chat_llama_dir: Path, tiny_model_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningStack]:
    models = [f"tiny={tiny_chat_llama_dir}", f"gpt2={tiny_model_dirs['gpt2']}"]
    with running_stack(models, tmp_path_factory.mktemp("ui_sxs_browser_stack") / "logs") as running:
        yield running


def heatmap(tab: Page, side: str) -> Locator:
    """The heatmap component of one side ("pin" on the left, "main" on the right)."""
    return tab.locator(f'{HEATMAP}[data-side="{side}"]')


def side_payload(tab: Page, side: str) -> dict[str, Any]:
    """The data one side's heatmap last drew, and whether a click on it is pending."""
    result: dict[str, Any] = heatmap(tab, side).evaluate(
        """root => {
            const d = (root.seqsalState || {}).data || {};
            const u = d.units || {part: [], text: [], special: [], score: []};
            const text = (part) => u.text.filter((t, i) => u.part[i] === part && !u.special[i]).join("");
            const ticks = [...root.querySelectorAll(".seqsal-legend-tick")].map(t => t.textContent);
            const rules = root.querySelector(".seqsal-legend-rules");
            return {side: root.getAttribute("data-side"), textKey: d.text_key || "",
                    prompt: text("prompt"), target: text("target"), scores: u.score || [],
                    selected: d.selected || [], max: Number((d.legend || {}).max || 0),
                    maxShown: ticks.length ? ticks[ticks.length - 1] : "",
                    rules: rules ? rules.textContent : "",
                    busy: root.classList.contains("seqsal-busy"),
                    units: Number(root.getAttribute("data-units") || 0)};
        }"""
    )
    return result


def both_settled(
    tab: Page, check: Callable[[dict[str, dict[str, Any]]], bool], what: str
) -> dict[str, dict[str, Any]]:
    """Wait until both sides drew (no click pending) and ``check`` holds for their payloads."""
    seen: list[dict[str, dict[str, Any]]] = []

    def ready() -> dict[str, dict[str, Any]] | None:
        both = {side: side_payload(tab, side) for side in SIDES}
        seen[:] = [both]
        drawn = all(d["units"] > 0 and not d["busy"] for d in both.values())
        return both if drawn and check(both) else None

    try:
        return wait_until(tab, ready, what)
    except AssertionError as exc:
        raise AssertionError(f"{exc}; the last payloads: {seen[-1] if seen else None}") from None


def side_caption(tab: Page, label: str) -> Locator:
    """The caption under a side's header ("Pinned" or "Current"): its model, method and granularity."""
    return tab.locator(
        f'xpath=//h4[starts-with(normalize-space(.), "{label}:")]'
        '/following::*[@data-testid="stCaptionContainer"][1]'
    )


def pick(tab: Page, combobox: str, option: str) -> None:
    """Choose ``option`` in a Streamlit selectbox."""
    tab.get_by_role("combobox", name=combobox, exact=True).click()
    tab.get_by_role("option", name=option, exact=True).click()


def test_two_models_side_by_side_share_a_scale_and_keep_their_own_targets(
    sxs_stack: RunningStack,
    page: Page,  # noqa: F811
    tmp_path: Path,
) -> None:
    timings: dict[str, float] = {}
    t_test = time.monotonic()
    open_app(page, sxs_stack)
    # Pin once the page is quiet: the precompute of every segment reruns the page when it ends.
    expect(page.get_by_text(re.compile(r"All \d+ segments precomputed in"))).to_be_visible(timeout=WAIT_MS)

    t0 = time.monotonic()
    page.get_by_role("button", name="Pin for side-by-side").click()
    expect(page.get_by_role("button", name="Unpin")).to_be_visible()
    wait_query(page, "pin", "1")
    expect(side_caption(page, "Pinned")).to_contain_text("tiny ·")
    expect(side_caption(page, "Current")).to_contain_text("tiny ·")
    pinned = both_settled(page, lambda b: b["pin"]["textKey"] == b["main"]["textKey"], "the view, pinned")
    timings["pin -> both sides"] = time.monotonic() - t0
    reference = pinned["pin"]["target"]
    assert reference and pinned["pin"]["scores"] == pinned["main"]["scores"]  # the same view, twice

    # The current side moves to gpt2; the pinned side keeps its model, its response and its scores.
    t0 = time.monotonic()
    pick(page, "Model", "gpt2")
    expect(side_caption(page, "Current")).to_contain_text("gpt2 ·")
    wait_query(page, "model", "gpt2")
    own = both_settled(
        page,
        lambda b: b["main"]["textKey"] != b["pin"]["textKey"] and b["main"]["scores"] != b["pin"]["scores"],
        "the current side's heatmap on gpt2",
    )
    timings["model switch -> heatmap"] = time.monotonic() - t0
    expect(side_caption(page, "Pinned")).to_contain_text("tiny ·")
    assert own["pin"]["scores"] == pinned["pin"]["scores"] and own["pin"]["target"] == reference
    assert own["main"]["prompt"] == own["pin"]["prompt"]  # the same prompt on another model
    assert own["main"]["max"] != own["pin"]["max"], own  # each side on its own colour range
    assert own["main"]["maxShown"] != own["pin"]["maxShown"]
    assert "shared by both sides" not in own["main"]["rules"] + own["pin"]["rules"]
    assert "shared" not in query(page)
    shot(page, tmp_path, "11-sxs-own-scales")

    # Shared colour scale: both legends end at the larger of the two ranges; the scores are the same.
    t0 = time.monotonic()
    page.get_by_text("Shared colour scale", exact=True).click()
    wait_query(page, "shared", "1")
    larger = max(own["main"]["max"], own["pin"]["max"])
    shared = both_settled(
        page,
        lambda b: all(d["max"] == pytest.approx(larger) for d in b.values()),
        "both sides on one colour range",
    )
    timings["shared scale -> both heatmaps"] = time.monotonic() - t0
    assert shared["main"]["maxShown"] == shared["pin"]["maxShown"] != "", shared
    for side in SIDES:
        assert "shared by both sides" in shared[side]["rules"], shared[side]["rules"]
        assert shared[side]["scores"] == own[side]["scores"]  # new colours, same scores
    shot(page, tmp_path, "12-sxs-shared-scale")

    # The pinned side explains its generated response instead of the reference: still pinned, the
    # current side untouched.
    t0 = time.monotonic()
    pinned_explain = page.get_by_role("radiogroup", name="Explain (pinned side)")
    pinned_explain.get_by_text("Generated response", exact=True).click()
    wait_query(page, "pin.target", "candidate")
    changed = both_settled(
        page,
        lambda b: (
            b["pin"]["target"] not in ("", reference) and b["pin"]["textKey"] != shared["pin"]["textKey"]
        ),
        "the pinned side's heatmap of its generated response",
    )
    timings["pinned target kind -> heatmap"] = time.monotonic() - t0
    expect(page.get_by_role("button", name="Unpin")).to_be_visible()
    link = query(page)
    assert link.get("pin") == "1" and link.get("model") == "gpt2" and link.get("shared") == "1", link
    assert "target" not in link  # the current side still explains the reference target
    expect(side_caption(page, "Pinned")).to_contain_text("tiny ·")
    expect(side_caption(page, "Current")).to_contain_text("gpt2 ·")
    assert changed["main"]["target"] == own["main"]["target"] == reference
    assert changed["main"]["scores"] == own["main"]["scores"] and changed["pin"]["selected"] == []
    # Still on one range: the larger of the two sides' ranges now.
    assert changed["main"]["max"] == pytest.approx(changed["pin"]["max"])
    assert changed["main"]["maxShown"] == changed["pin"]["maxShown"]
    shot(page, tmp_path, "13-sxs-pinned-generated")
    timings["test"] = time.monotonic() - t_test
    print("\n[ui-sxs-browser] timings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in timings.items()))
