"""The verification panel (ui/verify.py) and the perturbation methods in the workbench, under AppTest
against real in-process servers on tiny models (the servers of tests/test_ui_app.py)."""

from __future__ import annotations

from typing import Any

import pytest
from streamlit.testing.v1 import AppTest
from test_ui_app import app, payloads, run_ok, servers  # noqa: F401 (fixtures)

from seqsal.client import InferenceClient
from seqsal.verification import describe_step
from ui import verify


def _button(at: AppTest, key: str) -> Any:
    found = [b for b in at.button if b.key == key]
    assert found, f"no button {key}: {[b.key for b in at.button]}"
    return found[0]


def test_verification_panel_words_ablated_prompt_answer_and_keep(app: AppTest, servers) -> None:  # noqa: F811
    at = run_ok(app)
    assert not at.session_state["w_chat"]
    _button(at, "verify_run_main").click()
    run_ok(at)
    _, response, error = at.session_state[verify.RESULT_KEY.format(side="main")]
    assert error is None and response.steps
    assert response.method == 1  # GRAD_L2, the side's method
    granularity = response.saliency.granularity
    shown = [m.value for m in at.markdown]
    for step in response.steps:
        assert f"- {describe_step(step, granularity)}" in shown
    assert any("removing the most salient sentence" in m for m in shown)

    at.radio(key="verify_k_main").set_value(response.steps[0].k)
    run_ok(at)
    ablated = response.steps[0].ablated_prompt
    assert any(c.value == ablated for c in at.code)
    _button(at, "verify_generate_main").click()
    run_ok(at)
    with InferenceClient(servers.inference) as client:
        expected = (
            client.generate(prompt=ablated, max_tokens=at.session_state["w_max_new"]).candidates[0].text
        )
    assert any(c.value == expected for c in at.code), [c.value for c in at.code]

    _button(at, "verify_keep_main").click()
    run_ok(at)
    assert at.session_state["w_prompt"] == ablated
    assert any(t.value == ablated for t in at.text_area)


@pytest.mark.parametrize("method", ["OCCLUSION", "LIME"])
def test_perturbation_methods_in_the_selector(app: AppTest, method: str) -> None:  # noqa: F811
    at = run_ok(app)
    at.radio(key="w_method").set_value(method)
    run_ok(at)
    data = payloads(at)["main"]
    assert data["legend"]["method"] == method and data["legend"]["signed"]
    assert any(score != 0 for score in data["units"]["score"])  # segments' effects, not all zero
