"""Bugs found in a full walk through the workbench in a real browser, each pinned down under AppTest.

The servers are the real in-process ones on tiny models (``tests/test_ui_app.py``'s fixture).
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import test_ui_app
from streamlit.testing.v1 import AppTest
from test_ui_app import payloads, run_ok, texts

from seqsal.v1 import common_pb2, saliency_pb2
from ui import generation, side_loop, targets
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


def test_tokens_that_only_completed_a_stop_string_are_not_explained(app: AppTest) -> None:
    at = run_ok(app)
    at.radio(key="w_target_kind").set_value("candidate")
    at.text_area(key="w_stop").set_value("")
    run_ok(at)
    full = at.session_state["gen_main"].candidates[0]
    # A stop string from the middle of what the (greedy, so repeatable) model says.
    middle = full.text[len(full.text) // 2 :]
    pieces = (middle[i : i + 3] for i in range(len(middle) - 3))
    stop = next(p for p in pieces if p.strip() == p and "\\" not in p)
    at.text_area(key="w_stop").set_value(stop)
    run_ok(at)
    cut = at.session_state["gen_main"].candidates[0]
    assert stop not in cut.text and full.text.startswith(cut.text + stop)
    assert len(cut.shown_token_ids) < len(cut.token_ids)  # the ids that completed the stop string
    explained = target_text(payloads(at)["main"])
    # The explained target is what the response box shows (a token may hold its last visible char
    # and the stop string's first ones), never the stop string itself.
    assert explained.startswith(cut.text) and stop not in explained
    assert any(c.value == cut.text for c in at.code)


def test_contrastive_mode_is_signed_and_a_selection_is_contrasted_in_its_place(app: AppTest) -> None:
    at = run_ok(app)
    assert at.radio(key="w_method").value == "GRAD_L2"
    at.radio(key="w_target_kind").set_value("foil")
    run_ok(at)
    assert at.radio(key="w_method").value == "GRAD_DOT_INPUT"  # a contrast has a direction
    whole = payloads(at)["main"]
    assert whole["legend"]["signed"] and whole["target_count"] >= 2
    at.session_state["sel_main"] = (1,)  # the Recommendation sentence, against the foil in its place
    run_ok(at)
    data = payloads(at)["main"]
    assert data["selected"] == [1]
    rows = unit_rows(data)
    first_sentence = [r for r in rows if r["part"] == "target" and r["index"] == 0]
    assert any(r["score"] for r in first_sentence)  # the shared context before the selection is scored
    assert not any(r["score"] for r in rows if r["part"] == "target" and r["index"] >= 1)
    assert not any(r["score"] for r in rows if r["part"] == "foil")


def test_the_regex_leaves_the_link_with_its_granularity(app: AppTest) -> None:
    at = run_ok(app)
    at.selectbox(key="w_granularity").set_value("CUSTOM_REGEX")
    run_ok(at)
    at.text_input(key="w_regex").set_value(r"(?m)^Taste")
    run_ok(at)
    assert at.query_params["re"] == "(?m)^Taste"
    at.selectbox(key="w_granularity").set_value("WORDS")
    run_ok(at)
    assert "re" not in at.query_params and at.query_params["gran"] == "words"


def test_chat_template_markers_are_dimmed_segments_and_the_template_can_leave_the_scale(app: AppTest) -> None:
    at = run_ok(app)
    at.toggle(key="w_chat").set_value(True)
    run_ok(at)
    prompt = at.session_state["gen_main"].prompt
    assert prompt.startswith("<|user|>\n")
    rows = [r for r in unit_rows(payloads(at)["main"]) if r["part"] == "prompt"]
    markers = [r["text"] for r in rows if r["marker"]]
    assert [m.strip() for m in markers] == ["<|user|>", "<|assistant|>"]  # segments of their own
    assert all(r["excluded"] for r in rows if r["marker"])  # special: out of the range by default
    user = EXAMPLES["restaurant-copy-paste"].prompt
    assert at.toggle(key="w_template").value is True
    at.toggle(key="w_template").set_value(False)
    run_ok(at)
    data = payloads(at)["main"]
    kept = "".join(r["text"] for r in unit_rows(data) if r["part"] == "prompt" and not r["excluded"])
    assert kept and kept in user and user.startswith(kept[:20])  # only the user's own text counts
    assert "chat template" in data["legend"]["rules"] and at.query_params["tmpl"] == "0"


def test_the_selection_survives_a_granularity_change_and_a_prompt_edit(app: AppTest) -> None:
    at = run_ok(app)
    at.session_state["sel_main"] = (1,)  # the Recommendation sentence of the reference target
    run_ok(at)
    sentence = "".join(
        r["text"] for r in unit_rows(payloads(at)["main"]) if r["part"] == "target" and r["index"] == 1
    )
    at.selectbox(key="w_granularity").set_value("WORDS")
    run_ok(at)
    words = payloads(at)["main"]
    chosen = [
        r["text"] for r in unit_rows(words) if r["part"] == "target" and r["index"] in words["selected"]
    ]
    assert len(chosen) > 1 and "".join(chosen) == sentence  # the same chars, as words
    at.selectbox(key="w_granularity").set_value("SENTENCES")
    run_ok(at)
    assert payloads(at)["main"]["selected"] == [1]
    # An edit of the prompt that leaves the (reference) target as it is keeps the selection.
    at.text_area(key="w_prompt").set_value(at.text_area(key="w_prompt").value + "\n")
    run_ok(at)
    assert payloads(at)["main"]["selected"] == [1] and at.query_params["sel"] == "1"
    # A new target clears it.
    at.text_area(key="w_reference").set_value("Something else entirely.")
    run_ok(at)
    assert payloads(at)["main"]["selected"] == []


def test_a_whitespace_only_segment_cannot_be_selected_by_a_link_or_state(app: AppTest) -> None:
    """A response's newline token is a whitespace-only segment at token granularity; a selection of
    it (a link's sel=, or a stale click) is dropped: there is nothing to see or explain in it."""
    at = run_ok(app)
    at.text_area(key="w_reference").set_value("Tasty.\n\nTry it.\n")
    at.selectbox(key="w_granularity").set_value("TOKENS")
    run_ok(at)
    rows = [r for r in unit_rows(payloads(at)["main"]) if r["part"] == "target"]
    blank = sorted({r["index"] for r in rows if not r["text"].strip()})
    assert blank, [r["text"] for r in rows]  # a newline is a token of its own
    visible = next(r["index"] for r in rows if r["text"].strip())
    at.session_state["sel_main"] = (blank[0], visible)
    run_ok(at)
    assert payloads(at)["main"]["selected"] == [visible] and at.query_params["sel"] == str(visible)
    at.session_state["sel_main"] = (blank[0],)
    run_ok(at)
    assert payloads(at)["main"]["selected"] == [] and "sel" not in at.query_params


def test_the_first_heatmap_of_a_reference_target_waits_for_no_generation(
    app: AppTest, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str] = []
    generate, call_saliency = generation.generate, targets.call_saliency

    def spy_generate(*args: Any, **kwargs: Any) -> Any:
        calls.append("generate")
        return generate(*args, **kwargs)

    def spy_saliency(*args: Any, **kwargs: Any) -> Any:
        calls.append("saliency")
        return call_saliency(*args, **kwargs)

    monkeypatch.setattr(generation, "generate", spy_generate)
    monkeypatch.setattr(targets, "call_saliency", spy_saliency)
    app.query_params["ex"] = "gsm8k-socratic-annotated"
    at = run_ok(app)
    assert at.radio(key="w_target_kind").value == "reference"
    assert calls[:2] == ["saliency", "generate"]  # the heatmap first, the response after it
    assert payloads(at)["main"]["units"] and at.session_state["gen_main"].candidates
    calls.clear()
    at.radio(key="w_target_kind").set_value("candidate")  # a generated target needs the generation
    run_ok(at)
    assert "saliency" in calls and "generate" not in calls  # generated already, and reused


def test_an_integrated_gradients_residual_larger_than_the_threshold_is_warned_in_words() -> None:
    def response(residual: float, scores: list[float]) -> saliency_pb2.SaliencyResponse:
        ms = saliency_pb2.MethodScores(
            method=common_pb2.INTEGRATED_GRADIENTS, scores=scores, completeness_residual=residual, ig_steps=16
        )
        return saliency_pb2.SaliencyResponse(scores=[ms])

    scores = [13.5, -4.0, 2.5, 5.0]  # total |score| 25
    assert side_loop.ig_residual_warning(response(1.9, scores), 0) is None  # under 10 %
    words = side_loop.ig_residual_warning(response(24.5, scores), 0)  # the walk's case
    assert words and "did not converge" in words and "24.5" in words and "13.5" in words
    assert "98%" in words and "SEQSAL_IG_STEPS" in words
    grad = saliency_pb2.SaliencyResponse(scores=[saliency_pb2.MethodScores(method=common_pb2.GRAD_L2)])
    assert side_loop.ig_residual_warning(grad, 0) is None


def test_the_integrated_gradients_progress_line_names_its_steps_and_estimates_by_the_rule(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The status line of a long IG call: its steps, the seconds so far on a controlled clock, and the
    estimate the last IG call's rate gives (ms per step and size unit, times this call's)."""
    import streamlit as st

    def request(prompt: str, target: str, steps: int) -> saliency_pb2.SaliencyRequest:
        r = saliency_pb2.SaliencyRequest()
        r.problem.prompt, r.problem.target, r.problem.ig_steps = prompt, target, steps
        return r

    monkeypatch.setitem(st.session_state, side_loop.IG_RATE, None)  # no rate yet (removed afterwards)
    now = [1000.0]
    first = request("x" * 90, " y" * 5, 16)
    assert side_loop._ig_size(first) == 100
    words = side_loop._ig_progress(first, clock=lambda: now[0])
    now[0] += 3.2
    assert words() == "Integrated gradients: 16 steps, each a forward and a backward pass · 3 s"
    # It took 4 s on the server: 4000 ms / (16 steps x 100) = 2.5 ms per step and size unit.
    side_loop._learn_ig_rate(first, saliency_pb2.SaliencyResponse(server_time_ms=4000))
    assert st.session_state[side_loop.IG_RATE] == 2.5
    side_loop._learn_ig_rate(first, saliency_pb2.SaliencyResponse(server_time_ms=9, cache_hit=True))
    assert st.session_state[side_loop.IG_RATE] == 2.5  # a cache hit says nothing about the time

    second = request("x" * 190, " y" * 5, 32)  # twice the size, twice the steps: 2.5 x 32 x 200 ms
    words = side_loop._ig_progress(second, clock=lambda: now[0])
    now[0] += 7.4
    assert words() == (
        "Integrated gradients: 32 steps, each a forward and a backward pass · 7 s of about 16 s "
        "(estimated from your last IG call)"
    )
    now[0] += 20.0  # past the estimate: the seconds go on counting
    assert words().startswith(
        "Integrated gradients: 32 steps, each a forward and a backward pass · 27 s of about 16 s"
    )
    assert side_loop.ig_estimate_s(200, 32, 2.5) == 16.0 and side_loop.ig_estimate_s(200, 32, None) is None
    assert side_loop.ig_progress_words(200, 32, None, 7.4) == (
        "Integrated gradients: 32 steps, each a forward and a backward pass · 7 s"
    )


def test_integrated_gradients_in_the_page_warns_by_the_rule_and_learns_its_duration(app: AppTest) -> None:
    at = run_ok(app)
    at.radio(key="w_method").set_value("INTEGRATED_GRADIENTS")
    run_ok(at)
    cache = at.session_state[side_loop.SESSION_CACHE]
    response = next(r for r in cache._items.values() if r.scores[0].ig_steps)
    expected = side_loop.ig_residual_warning(response, 0)
    warned = [w for w in texts(at.warning) if "did not converge" in w]
    assert bool(warned) == (expected is not None)
    assert isinstance(at.session_state[side_loop.IG_RATE], float)  # the next call's progress estimate


def test_an_uploaded_example_opens_in_a_fresh_session_and_brings_its_own_max_tokens(app: AppTest) -> None:
    at = run_ok(app)
    assert at.number_input(key="w_max_new").value == EXAMPLES["restaurant-copy-paste"].max_new_tokens == 40
    label = at.expander[0].label
    mine = {"id": "mine", "title": "Mine", "prompt": "Say hi.", "target": " Hi!"}
    content = (json.dumps(mine) + "\n{not json\n").encode()
    at.file_uploader(key="w_upload").set_value(("mine.jsonl", content, "application/json"))
    run_ok(at)
    panel = next(e for e in at.expander if e.label.startswith("Data table"))
    assert panel.proto.expanded and panel.label != label  # opened, showing the per-line report
    assert any("line 2" in w for w in texts(panel.warning)) and panel.success
    at.selectbox(key="w_example").set_value("mine")
    run_ok(at)
    assert at.number_input(key="w_max_new").value == 64  # not the previous example's 40
    link = dict(at.query_params)
    assert "ex" not in link and link["prompt"] == "Say hi." and link["ref"] == " Hi!"
    fresh = AppTest.from_file(test_ui_app.APP, default_timeout=test_ui_app.TIMEOUT)
    fresh.query_params.update(link)
    run_ok(fresh)
    assert fresh.text_area(key="w_prompt").value == "Say hi." and not fresh.info
    assert target_text(payloads(fresh)["main"]) == " Hi!"


def test_a_reload_says_the_response_was_reused_and_the_data_table_is_full_width(app: AppTest) -> None:
    generation.GENERATIONS._items.clear()  # this process's earlier tests generated it already
    first = run_ok(app)
    assert any(s.label.startswith("Generated ") for s in first.status), [s.label for s in first.status]
    again = run_ok(AppTest.from_file(test_ui_app.APP, default_timeout=test_ui_app.TIMEOUT))  # a reload
    labels = [s.label for s in again.status]
    assert not any(label.startswith("Generated ") for label in labels), labels  # no old "in 8.6 s"
    assert any(label.startswith("Reused a response of") for label in labels), labels
    in_columns = [e.label for column in again.columns for e in column.expander]
    assert not any(label.startswith("Data table") for label in in_columns)
    assert any(e.label.startswith("Data table") for e in again.main.expander)


def test_a_click_is_applied_by_the_next_run_even_without_its_callback(app: AppTest) -> None:
    at = run_ok(app)
    assert payloads(at)["main"]["selected"] == [] and payloads(at)["main"]["target_count"] >= 2
    # What the component's state holds after a click made while a run was in flight, whose own
    # rerun (and callback) was coalesced away: the next run, for whatever reason, applies it.
    at.session_state["seqsal_heatmap_main"] = {"selection": {"indices": [1], "seq": 7, "side": "main"}}
    run_ok(at)
    data = payloads(at)["main"]
    assert data["selected"] == [1] and data["click_seq"] == 7 and at.query_params["sel"] == "1"
    at.session_state["sel_main"] = (0,)  # the selection changed since (e.g. another click)
    run_ok(at)
    assert payloads(at)["main"]["selected"] == [0]  # the old click is not applied again
