"""Queue feedback in a real browser: a click waits behind another client's precompute.

The stack (``seqsal up``, as in test_ui_browser.py) runs with a memory budget that admits one of
the computations below at a time, however fast the machine: by the server's own estimates
(saliency_server.memory), the test's precompute (a ~680-token prompt, 108 target tokens, one
segment a token) reserves ~1.7 GiB and needs at least ~0.95 GiB, each of the page's
computations well under 0.25 GiB; with :data:`BUDGET_MB` the precompute is admitted alone and a
click cannot start beside it (a budget keeps a click out where preemption would let it in).

So the engine is held by a real computation of another client, at background priority, and the
page's click waits in line: the page must say so in words while it waits. The test lets the
engine go (cancels its stream) only once the page said it, so it never depends on timing; then
the heatmap of the selection appears and the words give way to a note of how long it waited.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from test_ui_browser import (  # noqa: F401  (fixtures: browser, page)
    CHROMIUM,
    EXAMPLE_ID,
    TARGET_UNITS,
    WAIT_MS,
    RunningStack,
    browser,
    open_app,
    page,
    payload,
    running_stack,
    settled,
    shot,
    wait_precomputed,
    wait_settled_after_precompute,
    wait_until,
)

from seqsal.client import SaliencyClient, all_segments_request
from seqsal.request_ids import REQUEST_ID_KEY, new_request_id
from seqsal.v1 import common_pb2, saliency_pb2

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(600),  # the set-up starts a stack of its own
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="needs Debian's chromium at /usr/bin/chromium"),
]

from playwright.sync_api import Page, expect  # noqa: E402

#: Between the least the hold needs (~950 MiB, else it is refused) and what it reserves (~1.7 GiB).
BUDGET_MB = 1280


@pytest.fixture(scope="module")
def budget_stack(default_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningStack]:
    """``seqsal up`` whose saliency server admits one large computation at a time."""
    log_dir = tmp_path_factory.mktemp("ui_queue_browser_stack") / "logs"
    with running_stack(default_model_dir, log_dir, {"SEQSAL_MEMORY_BUDGET_MB": str(BUDGET_MB)}) as running:
        yield running


def _hold_prompt() -> tuple[str, str]:
    """A prompt and target large enough to take the budget (the restaurant example, three times)."""
    from ui.examples import load_examples

    prompt = {e.id: e for e in load_examples()[0]}[EXAMPLE_ID].prompt
    sentence = " The tart is made with eggs, cream and cheese, so it is not for you."
    return "\n\n".join([prompt] * 3), sentence * 6


class Hold:
    """Another client's SaliencyAllSegments stream, at background priority, until :meth:`release`."""

    def __init__(self, address: str) -> None:
        self.client = SaliencyClient(address, timeout=30)
        self.request_id = new_request_id()
        prompt, target = _hold_prompt()
        request = all_segments_request(
            prompt=prompt,
            target=target,
            granularity=common_pb2.TOKENS,
            methods=[common_pb2.GRAD_L2],
            priority=saliency_pb2.PRIORITY_BACKGROUND,
        )
        metadata = (*self.client.metadata, (REQUEST_ID_KEY, self.request_id))
        self.call = self.client.stub.SaliencyAllSegments(request, timeout=600, metadata=metadata)
        self.messages = 0
        self.code: grpc.StatusCode | None = None
        self.thread = threading.Thread(target=self._drain, daemon=True)
        self.thread.start()

    def _drain(self) -> None:
        try:
            for _ in self.call:
                self.messages += 1
            self.code = grpc.StatusCode.OK
        except grpc.RpcError as exc:
            self.code = exc.code()

    def status(self) -> saliency_pb2.RequestStatus | None:
        answer = self.client.get_request_status(self.request_id)
        return next((c for c in answer.calls if c.rpc == "SaliencyAllSegments"), None)

    def release(self) -> None:
        self.call.cancel()
        self.thread.join(30)
        self.client.close()


def test_a_click_behind_another_clients_precompute_says_where_it_stands(
    budget_stack: RunningStack,
    page: Page,  # noqa: F811
    tmp_path: Path,
) -> None:
    timings: dict[str, float] = {}
    open_app(page, budget_stack, {"ex": "quiche-query", "max_new": "8"})
    settled(page, lambda d: d["target"] != "", "the reference target's heatmap")
    units = page.locator(TARGET_UNITS)
    n_segments = units.count()
    assert n_segments >= 3, units.all_text_contents()
    wait_precomputed(page, n_segments)  # the page's own background work is over
    wait_settled_after_precompute(page)
    units.nth(0).click()  # answered from what the precompute returned: no call
    settled(page, lambda d: d["selected"] == [0], "the heatmap of the first word")

    hold = Hold(budget_stack.saliency_address)
    try:
        wait_until(
            page,
            lambda: (s := hold.status()) is not None and s.state == saliency_pb2.REQUEST_STATE_RUNNING,
            "the other client's precompute to hold the engine",
        )
        # A shift-click selects two words: a selection nobody computed, so the page asks the server.
        t0 = time.monotonic()
        units.nth(1).click(modifiers=["Shift"])
        waiting = page.get_by_text(
            re.compile(r"Waiting for the model: 1 computation ahead of the selected segments")
        )
        expect(waiting).to_be_visible(timeout=WAIT_MS)
        t_words = time.monotonic()
        timings["click -> waiting words"] = t_words - t0
        shot(page, tmp_path, "09-click-waits-in-line")
        status = hold.status()
        assert status is not None and status.state == saliency_pb2.REQUEST_STATE_RUNNING, status
        assert hold.code is None, f"the hold ended before the click was answered: {hold.code}"
        drawn = payload(page)  # the click is pending: the heatmap still shows the first word alone
        assert drawn["busy"] and drawn["selected"] == [0], drawn
    finally:
        t_release = time.monotonic()
        hold.release()
    assert hold.code == grpc.StatusCode.CANCELLED, (hold.code, hold.messages)

    settled(page, lambda d: d["selected"] == [0, 1], "the heatmap of the two selected words")
    timings["release -> heatmap"] = time.monotonic() - t_release
    expect(page.get_by_text(re.compile(r"Waiting for the model"))).to_have_count(0)  # the words went away
    note = page.get_by_text(
        re.compile(r"Waited \d+\.\d s for the model, behind 1 computation of other requests")
    )
    expect(note).to_be_visible()
    # It was queued from before the page said so until after the release (0.05: the note's rounding).
    waited = float(re.search(r"Waited (\d+\.\d) s", note.inner_text())[1])  # type: ignore[index]
    assert waited >= t_release - t_words - 0.05, (waited, t_release - t_words)
    shot(page, tmp_path, "10-click-answered-after-the-wait")
    print("\n[ui-queue-browser] timings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in timings.items()))
