"""The workbench's model selector and side-by-side across two models (AppTest, two tiny models).

The servers host ``tiny`` (a Llama, the default) and ``gpt2``; the pinned side must keep the
model it was pinned with while the current side moves to the other one, as in the paper's SxS
comparison of two models on the same prompt.
"""

from __future__ import annotations

import pytest
from streamlit.testing.v1 import AppTest
from test_ui_app import app, payloads, run_ok, servers, texts  # noqa: F401  (fixtures)

from ui.heatmap import unit_rows


def _pin(at: AppTest) -> None:
    next(b for b in at.button if b.label == "Pin for side-by-side").click()
    run_ok(at)


def test_selector_lists_the_models_both_servers_host(app: AppTest) -> None:  # noqa: F811
    at = run_ok(app)
    selector = at.selectbox(key="w_model")
    assert selector.options == ["tiny", "gpt2"] and selector.value == "tiny"
    assert any("LlamaForCausalLM" in c for c in texts(at.sidebar.caption))
    selector.set_value("gpt2")
    run_ok(at)
    assert any("GPT2LMHeadModel" in c for c in texts(at.sidebar.caption))


def test_pinned_side_keeps_its_model(app: AppTest) -> None:  # noqa: F811
    at = run_ok(app)
    pinned_generation = at.session_state["gen_main"]
    assert pinned_generation.model == "tiny"
    _pin(at)
    at.selectbox(key="w_model").set_value("gpt2")
    run_ok(at)

    assert at.session_state["gen_pin"].model == "tiny"
    assert at.session_state["gen_pin"].key == pinned_generation.key  # not generated again
    assert at.session_state["gen_main"].model == "gpt2"
    both = payloads(at)
    assert set(both) == {"main", "pin"}
    # Same prompt, two models: each side shows its own model's answer and scores.
    assert both["pin"]["units"]["score"] != both["main"]["units"]["score"]
    captions = " ".join(texts(at.caption))
    assert "`tiny`" in captions and "`gpt2`" in captions
    assert at.query_params["model"] == "gpt2" and "pin.model" not in at.query_params

    # Pinned on the non-default model, the link spells it out and a fresh session restores it.
    next(b for b in at.button if b.label == "Unpin").click()
    run_ok(at)
    assert "pin" not in payloads(at)
    _pin(at)
    at.selectbox(key="w_model").set_value("tiny")
    run_ok(at)
    assert at.session_state["gen_pin"].model == "gpt2" and at.session_state["gen_main"].model == "tiny"
    assert at.query_params["pin.model"] == "gpt2"
    fresh = AppTest.from_file(app._script_path, default_timeout=120)
    fresh.query_params.update(dict(at.query_params))
    run_ok(fresh)
    assert fresh.session_state["gen_pin"].model == "gpt2" and fresh.session_state["gen_main"].model == "tiny"


def test_two_models_share_a_scale_and_keep_their_own_targets(app: AppTest) -> None:  # noqa: F811
    """SxS across models: a shared colour range on request, each side with its own target and selection."""
    at = run_ok(app)
    _pin(at)
    at.selectbox(key="w_model").set_value("gpt2")
    run_ok(at)
    own = payloads(at)
    assert own["pin"]["legend"]["max"] != own["main"]["legend"]["max"]  # each side on its own range
    assert at.radio(key="w_target_kind").value == "reference" == at.session_state["pinned"].target_kind

    at.toggle(key="w_shared_scale").set_value(True)
    run_ok(at)
    shared = payloads(at)
    larger = max(own["pin"]["legend"]["max"], own["main"]["legend"]["max"])
    assert shared["pin"]["legend"]["max"] == pytest.approx(larger)
    assert shared["main"]["legend"]["max"] == pytest.approx(larger)
    assert "shared by both sides" in shared["main"]["legend"]["rules"]
    assert shared["pin"]["units"]["score"] == own["pin"]["units"]["score"]  # same scores, new colours
    assert at.query_params["shared"] == "1"

    # The pinned side changes what it explains without being unpinned; the current side is untouched.
    at.session_state["sel_pin"] = (1,)
    run_ok(at)
    assert payloads(at)["pin"]["selected"] == [1] and payloads(at)["main"]["selected"] == []
    at.radio(key="w_pin_target_kind").set_value("candidate")
    run_ok(at)
    both = payloads(at)
    generated = at.session_state["gen_pin"].candidates[0].text
    pinned_target = "".join(
        r["text"] for r in unit_rows(both["pin"]) if r["part"] == "target" and not r["special"]
    )
    assert pinned_target == generated and both["pin"]["selected"] == []
    assert at.session_state["pinned"].target_kind == "candidate" and at.query_params["pin"] == "1"
    assert at.query_params["pin.target"] == "candidate" and "target" not in at.query_params
    assert at.session_state["gen_pin"].model == "tiny" and at.session_state["gen_main"].model == "gpt2"

    # An example loaded next to it explains the same kind of target as the pinned side.
    at.selectbox(key="w_example").set_value("quiche-query")
    run_ok(at)
    assert at.radio(key="w_target_kind").value == "candidate"
