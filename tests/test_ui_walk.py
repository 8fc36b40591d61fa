"""Bugs found in a full walk through the workbench in a real browser, each pinned down under AppTest.

The servers are the real in-process ones on tiny models (``tests/test_ui_app.py``'s fixture).
"""

from __future__ import annotations

import test_ui_app
from streamlit.testing.v1 import AppTest
from test_ui_app import payloads, run_ok, texts

from ui.examples import load_examples
from ui.heatmap import unit_rows

servers = test_ui_app.servers  # the fixtures: real servers on tiny models, and the app on them
app = test_ui_app.app
EXAMPLES = {e.id: e for e in load_examples()[0]}


def target_text(data: dict) -> str:
    return "".join(r["text"] for r in unit_rows(data) if r["part"] == "target" and not r["special"])


def test_your_own_prompt_drops_what_the_example_brought(app: AppTest) -> None:
    at = run_ok(app)
    example = EXAMPLES["restaurant-copy-paste"]
    assert at.query_params["ex"] == example.id and target_text(payloads(at)["main"]) == example.target
    assert example.description and any(example.description[:20] in t for t in texts(at.caption))
    at.selectbox(key="w_example").set_value("")
    run_ok(at)
    assert at.radio(key="w_target_kind").value == "candidate"  # its own answer, not the example's
    assert at.text_area(key="w_prompt").value == example.prompt  # kept, to be edited
    assert at.text_area(key="w_stop").value == "" and at.number_input(key="w_max_new").value == 64
    assert "ex" not in at.query_params and "prompt" in at.query_params
    assert not any(example.description[:20] in t for t in texts(at.caption))
    generated = at.session_state["gen_main"].candidates[0]
    assert target_text(payloads(at)["main"]) == generated.text
