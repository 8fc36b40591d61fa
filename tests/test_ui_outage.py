"""The workbench when a service goes down and comes back (Streamlit AppTest, real servers).

The servers run in a background event loop; the saliency server is stopped and then started
again on the same port. AppTest cannot run the page's timer, so the test reruns the script as
the health-check fragment does once the server answers: same session, no reload, no click.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest
from streamlit.testing.v1 import AppTest
from test_ui_app import APP, TIMEOUT, payloads, run_ok, texts

from inference_server.settings import InferenceSettings
from saliency_server.settings import SaliencySettings
from ui import outage


class RestartableServers:
    """Saliency and inference servers in a background event loop; the saliency one can be
    stopped and started again on its port."""

    def __init__(self, settings: SaliencySettings, inference_settings: InferenceSettings) -> None:
        self.settings = settings
        self.inference_settings = inference_settings
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.saliency_port = 0
        self.run(self._start_all())

    def run(self, coroutine: Coroutine[Any, Any, Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(120)

    async def _start_all(self) -> None:
        from inference_server.server import build_server as build_inference_server
        from inference_server.server import build_serving as build_inference_serving
        from saliency_server.server import build_serving

        self.saliency_serving = build_serving(self.settings)
        await self._start_saliency()
        self.inference_serving = await build_inference_serving(self.inference_settings)
        self.inference = build_inference_server(self.inference_serving, self.inference_settings)
        self.inference_port = self.inference.bind("127.0.0.1", 0)
        await self.inference.start()

    async def _start_saliency(self) -> None:
        from saliency_server.server import build_server

        self.saliency = build_server(self.saliency_serving, self.settings)
        self.saliency_port = self.saliency.bind("127.0.0.1", self.saliency_port)
        await self.saliency.start()

    def stop_saliency(self) -> None:
        self.run(self.saliency.server.stop(0))

    def start_saliency(self) -> None:
        self.run(self._start_saliency())

    def close(self) -> None:
        async def stop() -> None:
            await self.inference.stop(0)
            await self.inference_serving.close()
            await self.saliency.server.stop(0)
            self.saliency_serving.close()

        self.run(stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture(scope="module")
def servers(tiny_chat_llama_dir: Path) -> Iterator[RestartableServers]:
    models = [f"tiny={tiny_chat_llama_dir}"]
    stack = RestartableServers(
        SaliencySettings(_env_file=None, models=models),  # type: ignore[call-arg]
        InferenceSettings(_env_file=None, models=models, backend="transformers"),  # type: ignore[call-arg]
    )
    try:
        yield stack
    finally:
        stack.close()


def outage_errors(at: AppTest) -> list[str]:
    return [e for e in texts(at.error) if "server at `" in e]


def test_saliency_outage_is_named_once_and_the_page_recovers(
    servers: RestartableServers, monkeypatch: pytest.MonkeyPatch
) -> None:
    saliency = f"127.0.0.1:{servers.saliency_port}"
    inference = f"127.0.0.1:{servers.inference_port}"
    monkeypatch.setenv("SEQSAL_SALIENCY_ADDRESS", saliency)
    monkeypatch.setenv("SEQSAL_INFERENCE_ADDRESS", inference)
    at = run_ok(AppTest.from_file(APP, default_timeout=TIMEOUT))
    assert payloads(at) and not outage_errors(at)

    servers.stop_saliency()
    at.radio(key="w_method").set_value("INTEGRATED_GRADIENTS")  # a new request: it needs the server
    run_ok(at)
    (banner,) = outage_errors(at)  # said once, at the top; the side does not repeat it
    assert f"saliency server at `{saliency}` is not answering" in banner
    assert f"inference server at `{inference}` is up" in banner
    assert "make up" not in banner  # the stack is running: do not tell the user to start it
    assert "restarts a server that stops" in banner
    assert at.session_state[outage.DOWN_KEY] == {"saliency": saliency}
    assert not payloads(at) and not [b for b in at.button if b.label == "Retry"]

    servers.start_saliency()
    run_ok(at)  # the rerun the health-check fragment triggers once the server answers
    assert not outage_errors(at) and not at.session_state[outage.DOWN_KEY]
    data = payloads(at)["main"]
    assert data["legend"]["method"] == "INTEGRATED_GRADIENTS"  # the request that failed, now answered


def test_a_failed_selection_never_shows_the_previous_result_under_its_label(
    servers: RestartableServers, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The whole target's heatmap is on screen; the server stops; the user selects two sentences.

    The selection cannot be explained: the page must not show the whole target's heatmap (its
    legend maximum and log p) under the selection's label.
    """
    monkeypatch.setenv("SEQSAL_SALIENCY_ADDRESS", f"127.0.0.1:{servers.saliency_port}")
    monkeypatch.setenv("SEQSAL_INFERENCE_ADDRESS", f"127.0.0.1:{servers.inference_port}")
    at = run_ok(AppTest.from_file(APP, default_timeout=TIMEOUT))
    whole = payloads(at)["main"]
    assert whole["whole_target"] and whole["target_count"] >= 2
    servers.stop_saliency()
    try:
        at.session_state["sel_main"] = (0, 1)  # a shift-click selection: never precomputed
        at.session_state["clicks_main"] = 1
        run_ok(at)
        data = payloads(at)["main"]
        explaining = " ".join(m for m in texts(at.markdown) if m.startswith("**Explaining**"))
        # What is drawn is the whole target, and the label says so and why.
        assert data["whole_target"] and data["selected"] == []
        assert "the whole reference target" in explaining and "could not be explained" in explaining
        assert "sentences 1, 2 of" not in explaining
        assert at.session_state["sel_main"] == (0, 1)  # kept: Retry (or recovery) asks again
        assert data["clicks"] == 1 and whole["clicks"] == 0  # a new payload: the component redraws
    finally:
        servers.start_saliency()
    run_ok(at)
    data = payloads(at)["main"]
    assert data["selected"] == [0, 1] and not data["whole_target"]
