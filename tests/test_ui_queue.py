"""Queue feedback in the workbench (AppTest): a click waits behind another user's computation.

Another client's computation is held at a step boundary (it holds the engine); the page's call
then waits in line. The test opens the gate only once the server has told the page, through
GetRequestStatus, that its call is queued behind one computation, so the page's words are
checked on what it was really told; never timed. Likewise the page's own background precompute is
held after its first chunk of segments, paused by another client's click (held while it computes)
and held again just after it resumes, so its progress bar is read in each of those states.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import pytest
from streamlit.testing.v1 import AppTest
from test_request_status import Gates
from test_ui_app import Servers, app, payloads, run_ok, servers, texts, wait_prefetch  # noqa: F401  (fixtures)

from saliency_server.engine import SaliencyInputs, SaliencyResult, Steps
from saliency_server.settings import SaliencySettings
from seqsal.client import SaliencyClient
from seqsal.v1 import saliency_pb2
from ui import prefetch, queue_status


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


def _other_user(
    address: str,
    answers: list[saliency_pb2.SaliencyResponse] | None = None,
    prompt: str = "Another user's long prompt.",
) -> None:
    with SaliencyClient(address, timeout=120) as client:
        answer = client.saliency(prompt=prompt, target=" Something else.")
    if answers is not None:
        answers.append(answer)


class _Hold:
    """A place a computation waits at until the test opens it."""

    def __init__(self) -> None:
        self.blocked, self.gate = threading.Event(), threading.Event()

    def __call__(self) -> None:
        self.blocked.set()
        assert self.gate.wait(60), "the test never opened the gate"


class _HeldSteps:
    """A computation's scheduler steps with ``before(n)``/``after(n)`` around its n-th boundary."""

    def __init__(self, inner: Steps, before: Callable[[int], None], after: Callable[[int], None]) -> None:
        self.inner, self.before, self.after, self.boundaries = inner, before, after, 0

    def checkpoint(self, boundary: bool) -> None:
        if boundary:
            self.boundaries += 1
            self.before(self.boundaries)
        self.inner.checkpoint(boundary)  # where the scheduler pauses it
        if boundary:
            self.after(self.boundaries)

    def next_chunk(self, remaining: Sequence[int], size: int) -> Sequence[int]:
        return self.inner.next_chunk(remaining, size)


class _HeldEngine:
    """Replaces ``engine.saliency_batch``. The precompute (a call of several selections) waits at
    its 4th boundary (its first chunk of segments is computed and streamed), and once more just
    after it resumes from a pause (once ``resumed`` is armed); the first single-selection call made
    after ``click_armed`` is set (another user's click) waits at its start."""

    def __init__(self, real: Any) -> None:
        self.real = real
        self.precompute, self.resumed, self.click = _Hold(), _Hold(), _Hold()
        self.click_armed, self.resume_armed = threading.Event(), threading.Event()
        self._lock = threading.Lock()
        self._click_taken = False

    def __call__(
        self, inputs: SaliencyInputs, masks: np.ndarray, methods: Sequence[int], **kwargs: Any
    ) -> Iterator[SaliencyResult]:
        steps = kwargs.get("steps")
        if steps is not None and len(masks) > 1:
            kwargs["steps"] = _HeldSteps(steps, self._precompute_before, self._precompute_after)
        elif steps is not None and self.click_armed.is_set():
            with self._lock:
                mine, self._click_taken = not self._click_taken, True
            if mine:
                kwargs["steps"] = _HeldSteps(steps, self._click_before, lambda n: None)
        return self.real(inputs, masks, methods, **kwargs)

    def _click_before(self, n: int) -> None:
        if n == 1:
            self.click()

    def _precompute_before(self, n: int) -> None:
        if n == 4 and not self.precompute.blocked.is_set():
            self.precompute()

    def _precompute_after(self, n: int) -> None:
        if self.resume_armed.is_set() and not self.resumed.blocked.is_set():
            self.resumed()


def _until(what: Callable[[], str], wanted: Callable[[str], bool], timeout: float = 60) -> str:
    """Ask ``what`` until ``wanted`` says yes (its last answer in the failure otherwise)."""
    deadline = time.monotonic() + timeout
    said = what()
    while not wanted(said) and time.monotonic() < deadline:
        time.sleep(0.02)
        said = what()
    assert wanted(said), said
    return said


def _progress_text(at: AppTest) -> str:
    bars = [p.text for p in at.get("progress") if p.text.startswith("Precomputing every segment")]
    assert len(bars) == 1, [p.text for p in at.get("progress")]
    return bars[0]


def test_a_precompute_paused_by_another_users_click_says_so_and_counts_its_segments(
    app: AppTest,  # noqa: F811
    servers: Servers,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    at = run_ok(app)
    wait_prefetch(at)
    engine = servers.saliency_serving.host.get("").engine
    held = _HeldEngine(engine.saliency_batch)
    monkeypatch.setattr(engine, "saliency_batch", held)

    try:
        # A new target at word granularity: more words than one backward chunk holds.
        at.selectbox(key="w_granularity").set_value("WORDS")
        at.text_area(key="w_reference").set_value(
            " Tasty food, a friendly place and fair prices: we would gladly recommend it."
        )
        run_ok(at)
        assert held.precompute.blocked.wait(60), "the precompute never reached its second chunk"
        key = at.session_state["v_prefetch_main"]
        total = payloads(at)["main"]["target_count"]
        chunk = SaliencySettings().segment_batch_size
        assert total > chunk, total
        progress = prefetch.PREFETCHER.progress(key)
        assert progress is not None
        endpoints, rid = prefetch.PREFETCHER.endpoints(key), progress.request_id
        assert endpoints is not None

        def words() -> str:
            return queue_status.precompute_words(endpoints, rid)

        def ready() -> str:
            p = prefetch.PREFETCHER.progress(key)
            return f"{p.done} of {p.total}" if p else ""

        _until(ready, lambda s: s == f"{chunk} of {total}")  # the first chunk reached the page
        assert words() == "computing"
        run_ok(at)
        assert _progress_text(at) == (
            f"Precomputing every segment in the background: {chunk} of {total} ready · computing"
        )

        # Another user's click arrives; the precompute yields to it at its next boundary.
        held.click_armed.set()
        answers: list[saliency_pb2.SaliencyResponse] = []
        prompt = "A third user's prompt, not in the server's cache yet."
        other = threading.Thread(target=_other_user, args=(servers.saliency, answers, prompt), daemon=True)
        other.start()
        assert held.click.blocked.wait(60), "the other user's click never reached the engine"
        held.resume_armed.set()
        held.precompute.gate.set()
        paused = "paused while 1 click goes first, resumes where it stopped"
        _until(words, lambda s: s == paused)
        run_ok(at)
        assert _progress_text(at) == (
            f"Precomputing every segment in the background: {chunk} of {total} ready · {paused}"
        )

        # The click is answered; the precompute resumes where it stopped.
        held.click.gate.set()
        assert held.resumed.blocked.wait(60), "the precompute never resumed"
        other.join(60)
        assert len(answers) == 1 and answers[0].scores
        _until(words, lambda s: s == "resumed after a click")
        run_ok(at)
        assert _progress_text(at) == (
            f"Precomputing every segment in the background: {chunk} of {total} ready · resumed after a click"
        )
        held.resumed.gate.set()
        done = wait_prefetch(at)
        assert (done.done, done.total) == (total, total)
    finally:  # a failed assertion leaves nothing held on the server
        for hold in (held.precompute, held.click, held.resumed):
            hold.gate.set()


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
