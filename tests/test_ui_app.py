"""The Streamlit workbench (ui/app.py) under AppTest, against real in-process servers on tiny models.

AppTest runs the script in this process but cannot run the heatmap's JavaScript: the tests
read the data the component receives (its proto's JSON) and stand in for a click by setting
the selection the click callback would set.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from streamlit.testing.v1 import AppTest

from inference_server.settings import InferenceSettings
from saliency_server.settings import SaliencySettings
from ui import clients, prefetch
from ui.examples import load_examples
from ui.heatmap import unit_rows

APP = Path(__file__).resolve().parent.parent / "ui" / "app.py"
TIMEOUT = 120


@dataclass(frozen=True)
class Servers:
    saliency: str
    inference: str
    #: the saliency server's serving layer (to hold its engine in a test)
    saliency_serving: Any = None


@pytest.fixture(scope="module")
def servers(tiny_chat_llama_dir: Path, tiny_model_dirs: dict[str, Path]) -> Iterator[Servers]:
    """Saliency and inference servers hosting two tiny models, in a background event loop.

    AppTest blocks its thread while the script runs, so the servers cannot share it.
    """
    from inference_server.server import build_server as build_inference_server
    from inference_server.server import build_serving as build_inference_serving
    from saliency_server.server import build_server, build_serving

    models = [f"tiny={tiny_chat_llama_dir}", f"gpt2={tiny_model_dirs['gpt2']}"]
    settings = SaliencySettings(models=models)
    inference_settings = InferenceSettings(models=models, backend="transformers")
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    holder: dict[str, Any] = {}

    async def start() -> None:
        serving = build_serving(settings)
        server = build_server(serving, settings)
        holder["saliency"] = (server, server.bind("127.0.0.1", 0), serving)
        await server.start()
        inference_serving = await build_inference_serving(inference_settings)
        inference = build_inference_server(inference_serving, inference_settings)
        holder["inference"] = (inference, inference.bind("127.0.0.1", 0), inference_serving)
        await inference.start()
        ready.set()

    def run() -> None:
        try:
            loop.run_until_complete(start())
        except BaseException as exc:  # surface start-up failures to the fixture
            holder["error"] = exc
            ready.set()
            return
        loop.run_forever()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert ready.wait(120), "servers did not start"
    if "error" in holder:
        raise holder["error"]
    yield Servers(
        saliency=f"127.0.0.1:{holder['saliency'][1]}",
        inference=f"127.0.0.1:{holder['inference'][1]}",
        saliency_serving=holder["saliency"][2],
    )

    async def stop() -> None:
        await holder["inference"][0].stop(0)
        await holder["inference"][2].close()
        await holder["saliency"][0].stop(0)
        holder["saliency"][2].close()

    asyncio.run_coroutine_threadsafe(stop(), loop).result(30)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)


@pytest.fixture
def app(servers: Servers, monkeypatch: pytest.MonkeyPatch) -> AppTest:
    monkeypatch.setenv("SEQSAL_SALIENCY_ADDRESS", servers.saliency)
    monkeypatch.setenv("SEQSAL_INFERENCE_ADDRESS", servers.inference)
    return AppTest.from_file(APP, default_timeout=TIMEOUT)


def _components(at: AppTest) -> Iterator[dict[str, Any]]:
    """The data of every mounted bidirectional component (heatmaps and matrix views)."""
    for element in at.get("bidi_component"):
        proto = element.proto
        yield json.loads(proto.json if proto.WhichOneof("data") == "json" else proto.mixed.json)


def payloads(at: AppTest) -> dict[str, dict[str, Any]]:
    """The data each mounted heatmap component received, by side ("main", "pin")."""
    return {data["side"]: data for data in _components(at) if "units" in data}


def matrices(at: AppTest) -> dict[str, dict[str, Any]]:
    """The data each mounted matrix view received, by side."""
    return {data["for_side"]: data for data in _components(at) if "rows" in data}


def texts(elements: Any) -> list[str]:
    """Element texts with Markdown backslash escapes removed (the UI escapes untrusted text)."""
    return [re.sub(r"\\(.)", r"\1", str(e.value)) for e in elements]


def run_ok(at: AppTest) -> AppTest:
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def wait_prefetch(at: AppTest, side: str = "main") -> prefetch.Progress:
    key = at.session_state[f"v_prefetch_{side}"]
    assert key, "no prefetch was started"
    progress = prefetch.PREFETCHER.wait(key, 60)
    assert progress is not None and progress.finished and not progress.error, progress
    return progress


def test_example_generate_select_heatmap(app: AppTest) -> None:
    at = run_ok(app)
    assert at.query_params == {"ex": "restaurant-copy-paste"}
    assert at.session_state["gen_main"].candidates, "the model answered"
    assert not [e for e in at.error], texts(at.error)
    data = payloads(at)["main"]
    rows = unit_rows(data)
    example = {e.id: e for e in load_examples()[0]}["restaurant-copy-paste"]
    prompt_text = "".join(r["text"] for r in rows if r["part"] == "prompt" and not r["special"])
    target_text = "".join(r["text"] for r in rows if r["part"] == "target" and not r["special"])
    assert prompt_text == example.prompt
    assert target_text == example.target  # the example's reference target is explained
    assert data["whole_target"] and data["selected"] == []
    assert data["target_count"] >= 2  # sentences: the analysis, then the recommendation
    assert len({r["color"] for r in rows if r["part"] == "prompt"}) > 2  # colours differ by score

    # The generated response instead of the reference.
    at.radio(key="w_target_kind").set_value("candidate")
    run_ok(at)
    generated = at.session_state["gen_main"].candidates[0]
    rows = unit_rows(payloads(at)["main"])
    target_ids_text = "".join(r["text"] for r in rows if r["part"] == "target" and not r["special"])
    assert target_ids_text == generated.text  # explained on exactly the generated ids
    assert any(c.value == generated.text for c in at.code)
    assert at.query_params["target"] == "candidate"
    # one request id follows the action through both services: Generate, then its Saliency calls
    generation = at.session_state["gen_main"]
    endpoints = clients.Endpoints.from_settings(clients.load_settings())
    assert generation.request_id and clients.POOL.saliency(endpoints).last_request_id == generation.request_id

    # Back to the reference; every segment is precomputed in the background, so a click is a cache hit.
    at.radio(key="w_target_kind").set_value("reference")
    run_ok(at)
    wait_prefetch(at)
    at.session_state["sel_main"] = (1,)  # what a click on the second sentence sets
    run_ok(at)
    data = payloads(at)["main"]
    assert data["selected"] == [1] and not data["whole_target"]
    assert any("cache hit" in c.value for c in at.caption), texts(at.caption)
    assert at.query_params["sel"] == "1"
    assert any("sentence 2 of" in m.value for m in at.markdown), texts(at.markdown)


def test_settings_change_what_they_should(app: AppTest) -> None:
    at = run_ok(app)
    base = payloads(at)["main"]
    assert base["legend"]["method"] == "GRAD_L2" and not base["legend"]["signed"]

    at.radio(key="w_method").set_value("GRAD_DOT_INPUT")
    run_ok(at)
    signed = payloads(at)["main"]
    assert signed["legend"]["method"] == "GRAD_DOT_INPUT" and signed["legend"]["signed"]
    assert signed["legend"]["min"] == -signed["legend"]["max"]
    assert signed["units"]["text"] == base["units"]["text"]
    assert signed["units"]["score"] != base["units"]["score"]

    at.select_slider(key="w_intensity").set_value(2.0)
    run_ok(at)
    brighter = payloads(at)["main"]
    assert brighter["legend"]["max"] == pytest.approx(signed["legend"]["max"] / 2, rel=1e-6)
    assert brighter["units"]["score"] == signed["units"]["score"]
    assert brighter["units"]["color"] != signed["units"]["color"]
    assert at.query_params["int"] == "2"

    at.toggle(key="w_chips").set_value(True)
    at.toggle(key="w_compact").set_value(True)
    run_ok(at)
    chips = payloads(at)["main"]
    assert chips["chips"] and chips["compact"]
    assert chips["units"] == brighter["units"]
    assert at.query_params["chips"] == "1" and at.query_params["dense"] == "1"

    at.session_state["sel_main"] = (0,)
    run_ok(at)
    assert payloads(at)["main"]["selected"] == [0]
    at.selectbox(key="w_granularity").set_value("WORDS")
    run_ok(at)
    words = payloads(at)["main"]
    assert len(words["units"]["text"]) > len(chips["units"]["text"])
    assert words["selected"][0] == 0  # carried over: the words of the first sentence
    assert at.query_params["gran"] == "words"

    at.selectbox(key="w_granularity").set_value("TOKENS")
    run_ok(at)
    tokens = payloads(at)["main"]

    # An invalid regex is shown as such and the view falls back to tokens.
    at.selectbox(key="w_granularity").set_value("CUSTOM_REGEX")
    run_ok(at)
    assert any("Type a regular expression" in i for i in texts(at.info)), texts(at.info)
    assert not any("custom_regex" in e for e in texts(at.error) + texts(at.warning))  # no internal words
    at.text_input(key="w_regex").set_value("(Taste")
    run_ok(at)
    assert any("'(Taste' is not a valid RE2 pattern" in e for e in texts(at.error))
    assert any("showing tokens" in w for w in texts(at.warning)), texts(at.warning)
    assert payloads(at)["main"]["units"]["text"] == tokens["units"]["text"]
    # The same engine as the servers: lookaround is refused with the syntax, x* as matching nothing.
    for pattern, fragment in (
        (r"(?=Taste)", "lookaround"),
        (r"x*", "empty string everywhere"),
        (r"\B", "inside words"),
    ):
        at.text_input(key="w_regex").set_value(pattern)
        run_ok(at)
        assert any(fragment in e for e in texts(at.error)), texts(at.error)
        assert payloads(at)["main"]["units"]["text"] == tokens["units"]["text"]

    # A valid regex segments the prompt where it matches.
    at.text_input(key="w_regex").set_value(r"(?m)^Taste")
    run_ok(at)
    regex = payloads(at)["main"]
    starts = [t for t, p in zip(regex["units"]["text"], regex["units"]["part"], strict=True) if p == "prompt"]
    assert sum(t.startswith("Taste") for t in starts) == 8
    assert at.query_params["re"] == "(?m)^Taste"


def test_models_and_chat_template(app: AppTest) -> None:
    at = run_ok(app)
    model = at.selectbox(key="w_model")
    assert model.options == ["tiny", "gpt2"] and model.value == "tiny"
    model.set_value("gpt2")
    at.radio(key="w_target_kind").set_value("candidate")
    run_ok(at)
    assert at.session_state["gen_main"].model == "gpt2"
    assert at.query_params["model"] == "gpt2"

    # tiny has a chat template: the heatmap shows the templated prompt the model saw.
    at.selectbox(key="w_model").set_value("tiny")
    at.toggle(key="w_chat").set_value(True)
    run_ok(at)
    generation = at.session_state["gen_main"]
    assert generation.prompt.startswith("<|user|>\n")
    prompt = "".join(
        r["text"] for r in unit_rows(payloads(at)["main"]) if r["part"] == "prompt" and not r["special"]
    )
    assert prompt == generation.prompt

    # gpt2 has none: the error says so in plain words, and the page still works.
    at.selectbox(key="w_model").set_value("gpt2")
    run_ok(at)
    assert any("Chat template" in e.value for e in at.error), texts(at.error)
    assert at.text_area(key="w_prompt").value


def test_query_params_round_trip(app: AppTest) -> None:
    app.query_params.update(
        {
            "ex": "gsm8k-socratic-plain",
            "method": "grad_dot_input",
            "gran": "lines",
            "int": "3",
            "sel": "1",
            "chips": "1",
        }
    )
    at = run_ok(app)
    assert at.radio(key="w_method").value == "GRAD_DOT_INPUT"
    assert at.selectbox(key="w_granularity").value == "LINES"
    assert at.select_slider(key="w_intensity").value == 3.0
    assert at.toggle(key="w_chips").value is True
    assert at.selectbox(key="w_example").value == "gsm8k-socratic-plain"
    data = payloads(at)["main"]
    assert data["selected"] == [1] and data["chips"]
    assert at.query_params == {
        "ex": "gsm8k-socratic-plain",
        "method": "grad_dot_input",
        "gran": "lines",
        "int": "3",
        "sel": "1",
        "chips": "1",
    }

    # Editing the prompt regenerates and puts the (short) prompt into the link.
    first = at.session_state["gen_main"]
    at.text_area(key="w_prompt").set_value("Question: What is 2 + 2?\nAnswer:")
    run_ok(at)
    assert at.session_state["gen_main"].key != first.key
    assert at.query_params["prompt"] == "Question: What is 2 + 2?\nAnswer:"

    # A link with a bad value still opens, with a note.
    fresh = AppTest.from_file(APP, default_timeout=TIMEOUT)
    fresh.query_params.update({"ex": "no-such-example", "method": "nope", "int": "99"})
    run_ok(fresh)
    notes = " ".join(texts(fresh.info))
    assert "no-such-example" in notes and "nope" in notes and "int" in notes


def test_side_by_side(app: AppTest) -> None:
    app.query_params["ex"] = "gsm8k-socratic-annotated"
    at = run_ok(app)
    pin = next(b for b in at.button if b.label == "Pin for side-by-side")
    pin.click()
    run_ok(at)
    assert at.query_params["pin"] == "1" and at.query_params["pin.ex"] == "gsm8k-socratic-annotated"
    assert "pin.model" not in at.query_params  # the default model is not spelled out
    at.selectbox(key="w_example").set_value("gsm8k-socratic-plain")
    run_ok(at)
    both = payloads(at)
    assert set(both) == {"main", "pin"}
    pinned_text = "".join(both["pin"]["units"]["text"])
    current_text = "".join(both["main"]["units"]["text"])
    assert "<<4*12=48>>" in pinned_text and "<<" not in current_text

    # Each side keeps its own selection.
    at.session_state["sel_pin"] = (0,)
    run_ok(at)
    both = payloads(at)
    assert both["pin"]["selected"] == [0] and both["main"]["selected"] == []
    assert at.query_params["pin.sel"] == "0" and "sel" not in at.query_params

    next(b for b in at.button if b.label == "Unpin").click()
    run_ok(at)
    assert set(payloads(at)) == {"main"} and "pin" not in at.query_params


def test_upload_examples(app: AppTest) -> None:
    at = run_ok(app)
    good = {"id": "mine", "title": "My <b>prompt</b>", "prompt": "Say hi.", "target": " Hi!"}
    content = (json.dumps(good) + "\n{not json\n" + json.dumps({"id": "x", "title": "t"}) + "\n").encode()
    at.file_uploader(key="w_upload").set_value(("mine.jsonl", content, "application/json"))
    run_ok(at)
    assert any("Added 1 example" in s.value for s in at.success), texts(at.success)
    warnings = texts(at.warning)
    assert any("line 2" in w and "not valid JSON" in w for w in warnings), warnings
    assert any("line 3" in w and "prompt" in w for w in warnings), warnings
    assert "My <b>prompt</b>" in at.selectbox(key="w_example").options  # a title is plain text
    at.selectbox(key="w_example").set_value("mine")
    run_ok(at)
    assert at.text_area(key="w_prompt").value == "Say hi."
    assert at.text_area(key="w_reference").value == " Hi!"


def test_service_down_is_explained(monkeypatch: pytest.MonkeyPatch, servers: Servers) -> None:
    monkeypatch.setenv("SEQSAL_SALIENCY_ADDRESS", "127.0.0.1:9")
    monkeypatch.setenv("SEQSAL_INFERENCE_ADDRESS", "127.0.0.1:9")
    at = run_ok(AppTest.from_file(APP, default_timeout=TIMEOUT))
    (banner,) = [e for e in texts(at.error) if "server at `" in e]  # one message for both
    assert "Neither the inference server at `127.0.0.1:9` nor the saliency server at `127.0.0.1:9`" in banner
    assert "make up" in banner and "reconnects by itself" in banner
    assert at.text_area(key="w_prompt").value  # the page still renders and can be edited
    assert not payloads(at)

    # Only the saliency server down: the response comes, the banner names the one that is down.
    monkeypatch.setenv("SEQSAL_INFERENCE_ADDRESS", servers.inference)
    at = run_ok(AppTest.from_file(APP, default_timeout=TIMEOUT))
    assert at.session_state["gen_main"].candidates
    (banner,) = [e for e in texts(at.error) if "server at `" in e]
    assert "saliency server at `127.0.0.1:9` is not answering" in banner and "make up" not in banner


def test_shared_password_guards_the_page(app: AppTest, monkeypatch: pytest.MonkeyPatch) -> None:
    """With SEQSAL_UI_PASSWORD set, nothing but the login form renders until the password is given."""
    monkeypatch.setenv("SEQSAL_UI_PASSWORD", "open sesame")
    at = run_ok(app)
    assert not payloads(at) and not at.text_area
    assert at.text_input(key="seqsal-password").label.startswith("Password")
    at.text_input(key="seqsal-password").input("wrong")
    at.button[0].click()
    at = run_ok(at)
    assert any("Wrong password" in str(e.value) for e in at.error)
    assert not at.text_area
    at.text_input(key="seqsal-password").input("open sesame")
    at.button[0].click()
    at = run_ok(at)
    assert at.text_area  # the workbench itself


def test_scale_controls(app: AppTest) -> None:
    """The first token is left out of the colour range by default; the display controls bring it back."""
    at = run_ok(app)
    base = payloads(at)["main"]
    rows = unit_rows(base)
    assert rows[0]["part"] == "prompt" and rows[0]["excluded"]  # the attention-sink position
    assert sum(r["excluded"] for r in rows) == sum(r["special"] for r in rows[1:]) + 1
    assert "first token" in base["legend"]["rules"]

    at.toggle(key="w_scale_all").set_value(True)
    run_ok(at)
    every = payloads(at)["main"]
    assert not any(every["units"]["excluded"]) and every["legend"]["rules"] == ""
    assert at.query_params["all"] == "1"

    clip = at.selectbox(key="w_clip")  # the default is an option shown by name, not a placeholder
    assert clip.index == 0 and clip.value == 100.0 and clip.options[0] == "largest |score|"
    clip.set_value(90.0)
    run_ok(at)
    clipped = payloads(at)["main"]
    assert clipped["legend"]["max"] < every["legend"]["max"] and clipped["legend"]["percentile"] == 90.0
    assert at.query_params["clip"] == "90"
    at.selectbox(key="w_clip").set_value(100.0)
    run_ok(at)
    assert "clip" not in at.query_params and payloads(at)["main"]["legend"]["max"] == every["legend"]["max"]
    at.selectbox(key="w_clip").set_value(90.0)
    run_ok(at)

    at.radio(key="w_aggregate").set_value("mean")
    run_ok(at)
    mean = payloads(at)["main"]
    assert mean["units"]["text"] == clipped["units"]["text"]
    assert mean["units"]["score"] != clipped["units"]["score"]
    assert at.query_params["agg"] == "mean"


def test_matrix_view_rows_are_the_precomputed_segments(app: AppTest) -> None:
    """Rows = target segments, columns = prompt units, each row the heatmap of that segment alone."""
    at = run_ok(app)
    wait_prefetch(at)
    run_ok(at)
    heat = payloads(at)["main"]
    grid = matrices(at)["main"]
    count = heat["target_count"]
    assert len(grid["rows"]) == count and grid["ready"] == count and grid["selected"] == []
    prompt_units = [r for r in unit_rows(heat) if r["part"] == "prompt"]
    assert [c["title"] for c in grid["columns"]] == [r["text"] for r in prompt_units]
    assert grid["columns"][0]["excluded"]  # the attention sink, as in the heatmap
    assert grid["rows"][0]["scores"] != grid["rows"][1]["scores"]
    for index in range(count):  # a row holds what the heatmap of that segment shows
        at.session_state["sel_main"] = (index,)
        run_ok(at)
        selected = [r["score"] for r in unit_rows(payloads(at)["main"]) if r["part"] == "prompt"]
        assert grid["rows"][index]["scores"] == pytest.approx(selected, rel=1e-5)
        assert matrices(at)["main"]["selected"] == [index]
