"""Queue feedback in the workbench (AppTest): a click waits behind another user's computation.

Another client's computation is held at a step boundary (it holds the engine); the page's call
then waits in line. The test opens the gate only once the server has told the page, through
GetRequestStatus, that its call is queued behind one computation, so the page's words are
checked on what it was really told; never timed.
"""

from __future__ import annotations

import threading
import time

import pytest
from streamlit.testing.v1 import AppTest
from test_request_status import Gates
from test_ui_app import Servers, app, run_ok, servers, texts, wait_prefetch  # noqa: F401  (fixtures)

from seqsal.client import SaliencyClient
from seqsal.v1 import saliency_pb2
from ui import queue_status


def test_a_queued_click_says_where_it_stands(
    app: AppTest,  # noqa: F811
    servers: Servers,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    at = run_ok(app)
    wait_prefetch(at)
    serving = servers.saliency_serving
    engine = serving.host.get("").engine
    gates = Gates(engine.saliency_batch, at=[2])
    monkeypatch.setattr(engine, "saliency_batch", gates)
    (gate,) = gates.gates

    told: list[saliency_pb2.RequestStatus] = []
    real_status = serving.request_status

    async def spy(request: saliency_pb2.GetRequestStatusRequest) -> saliency_pb2.GetRequestStatusResponse:
        answer = await real_status(request)
        told.extend(answer.calls)
        return answer

    monkeypatch.setattr(serving, "request_status", spy)
    other = threading.Thread(target=_other_user, args=(servers.saliency,), daemon=True)
    other.start()
    assert gate.blocked.wait(60), "the other user's computation never started"

    def release_once_told() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if any(s.state == saliency_pb2.REQUEST_STATE_QUEUED and s.ahead == 1 for s in told):
                break
            time.sleep(0.02)
        gate.gate.set()

    releaser = threading.Thread(target=release_once_told, daemon=True)
    releaser.start()
    at.text_area(key="w_reference").set_value(" A new reference target.")  # a new, uncached explanation
    run_ok(at)
    releaser.join(5)
    other.join(60)
    assert any(s.state == saliency_pb2.REQUEST_STATE_QUEUED and s.rpc == "Saliency" for s in told), told
    notes = [c for c in texts(at.caption) if c.startswith(":material/schedule: Waited")]
    assert notes and "behind 1 computation of other requests" in notes[0], texts(at.caption)


def _other_user(address: str) -> None:
    with SaliencyClient(address, timeout=120) as client:
        client.saliency(prompt="Another user's long prompt.", target=" Something else.")


def test_status_words() -> None:
    queued = saliency_pb2.RequestStatus(state=saliency_pb2.REQUEST_STATE_QUEUED, ahead=2, interactive_ahead=1)
    assert queue_status.describe(queued, "the selection") == (
        "Waiting for the model: 2 computations (1 click) ahead of the selection…"
    )
    paused = saliency_pb2.RequestStatus(
        state=saliency_pb2.REQUEST_STATE_PAUSED,
        ahead=1,
        interactive_ahead=1,
        segments_total=12,
        segments_done=5,
    )
    assert queue_status.describe(paused, "x") == (
        "Paused while 1 click goes first; it resumes where it stopped… 5 of 12 segments ready."
    )
    assert queue_status.Waited(queued_s=0.05).note() == ""
