"""Where a request stands on the shared saliency server, in words, while the page waits for it.

The saliency server schedules every user's work on one engine (interactive clicks first,
background precomputes paused and resumed). While a call is in flight the page asks the server
``GetRequestStatus`` for the call's request id a few times a second and says what it hears:
*waiting for the model: 2 computations ahead of yours*, *computing*, *paused while 1 click goes
first (resumes where it stopped)*, and for a precompute how many segments are ready. A call that
had to wait leaves a note saying how long and behind how many. Nothing here changes what is
computed; a server that does not know the RPC (older than seqsal.v1's GetRequestStatus) simply
gets the plain message.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TypeVar

import streamlit as st

from seqsal.errors import SeqsalError
from seqsal.request_ids import new_request_id
from seqsal.v1 import saliency_pb2
from ui import clients, targets
from ui.clients import Endpoints

T = TypeVar("T")

#: Seconds between two status questions while a call is in flight.
POLL_S = 0.25
#: Deadline of one status question (it reads the scheduler: answered in milliseconds).
STATUS_TIMEOUT_S = 2.0
#: A call seen waiting in line or paused leaves a note (and one that waited this long without either).
NOTE_AFTER_S = 0.2


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _ahead(status: saliency_pb2.RequestStatus) -> str:
    clicks = status.interactive_ahead
    words = _plural(status.ahead, "computation")
    if clicks and clicks == status.ahead:
        words = _plural(clicks, "click")  # every one of them someone waits for
    elif clicks:
        words += f" ({_plural(clicks, 'click')})"
    return words


def describe(status: saliency_pb2.RequestStatus | None, what: str) -> str:
    """Plain words for where a call stands (``None``: the server has not said yet)."""
    if status is None:
        return f"Computing saliency for {what}…"
    state = status.state
    if state == saliency_pb2.REQUEST_STATE_PREPARING:
        text = f"Preparing {what} (tokenising, reading the cache)…"
    elif state == saliency_pb2.REQUEST_STATE_QUEUED:
        text = f"Waiting for the model: {_ahead(status)} ahead of {what}…"
    elif state == saliency_pb2.REQUEST_STATE_PAUSED:
        text = (
            f"Paused while {_ahead(status)} go{'es' if status.ahead == 1 else ''} first; "
            "it resumes where it stopped…"
        )
    elif status.joined:
        text = f"Computing {what}: the background precompute computes it next, for you…"
    else:
        text = f"Computing saliency for {what}…"
    if status.segments_total > 1:
        text += f" {status.segments_done} of {status.segments_total} segments ready."
    return text


def latest(endpoints: Endpoints, request_id: str, rpc: str) -> saliency_pb2.RequestStatus | None:
    """The server's word on the ``rpc`` call sent with ``request_id`` (None if it has none)."""
    try:
        client = clients.POOL.saliency(endpoints, STATUS_TIMEOUT_S)
        answer = client.get_request_status(request_id)
    except SeqsalError:  # not there yet, an older server, a blip: the plain message will do
        return None
    return next((c for c in answer.calls if c.rpc == rpc), None)


@dataclass
class Waited:
    """What a call went through before it was answered."""

    queued_s: float = 0.0
    most_ahead: int = 0
    paused: int = 0

    def note(self) -> str:
        """One sentence, or "" when the call never waited in line."""
        if not self.most_ahead and not self.paused and self.queued_s < NOTE_AFTER_S:
            return ""
        took = f"{self.queued_s:.1f} s" if self.queued_s >= 0.1 else "briefly"
        text = f"Waited {took} for the model"
        if self.most_ahead:
            text += f", behind {_plural(self.most_ahead, 'computation')} of other requests"
        if self.paused:
            text += f"; paused {_plural(self.paused, 'time')} for clicks"
        return text + " (the server shares one engine among everyone's requests)."


def call_with_feedback(
    call: Callable[[], T],
    poll: Callable[[], saliency_pb2.RequestStatus | None],
    show: Callable[[saliency_pb2.RequestStatus | None], None],
    *,
    interval_s: float = POLL_S,
) -> tuple[T, Waited]:
    """Run ``call`` in a thread; until it returns, ``show`` what ``poll`` says every ``interval_s``.

    The call goes on if the page is interrupted meanwhile (a rerun raises out of ``show``): the
    server finishes and caches it, and the next run finds it (or joins it) there.
    """
    done: Future[T] = Future()

    def run() -> None:
        try:
            done.set_result(call())
        except BaseException as exc:  # handed to the caller
            done.set_exception(exc)

    threading.Thread(target=run, name="seqsal-ui-call", daemon=True).start()
    waited = Waited()
    queued_since: float | None = None  # when a poll first said "queued" (until one says otherwise)
    while not done.done():
        status = poll()
        now = time.monotonic()
        queued = status is not None and status.state == saliency_pb2.REQUEST_STATE_QUEUED
        if queued_since is not None and not queued:
            waited.queued_s += now - queued_since
            queued_since = None
        if status is not None:
            if queued:
                queued_since = now if queued_since is None else queued_since
                waited.most_ahead = max(waited.most_ahead, status.ahead)
            waited.paused = max(waited.paused, status.preemptions)
        show(status)
        try:
            done.result(timeout=interval_s)
        except TimeoutError:
            continue
        except BaseException:
            break
    if queued_since is not None:  # answered while the last poll said queued
        waited.queued_s += time.monotonic() - queued_since
    return done.result(), waited


def saliency(
    endpoints: Endpoints,
    request: saliency_pb2.SaliencyRequest,
    request_id: str | None,
    what: str,
    *,
    detail: Callable[[], str] | None = None,
) -> saliency_pb2.SaliencyResponse:
    """One Saliency call with its place in the server's queue shown meanwhile (typed errors);
    ``detail()`` adds words of the caller's to the line (e.g. integrated gradients' progress)."""
    rid = request_id or new_request_id()
    box = st.empty()
    try:
        response, waited = call_with_feedback(
            lambda: targets.call_saliency(endpoints, request, rid),
            lambda: latest(endpoints, rid, "Saliency"),
            lambda status: box.info(
                describe(status, what) + (f" {detail()}" if detail else ""), icon=":material/hourglass_top:"
            ),
        )
    except SeqsalError:
        box.empty()  # the caller says what went wrong
        raise
    note = waited.note()
    if note:
        box.caption(f":material/schedule: {note}")
    else:
        box.empty()
    return response


def precompute_words(endpoints: Endpoints, request_id: str) -> str:
    """Where a background precompute stands, for its progress bar ("" when the server is silent)."""
    status = latest(endpoints, request_id, "SaliencyAllSegments")
    if status is None:
        return ""
    if status.state == saliency_pb2.REQUEST_STATE_PAUSED:
        go = "goes" if status.ahead == 1 else "go"
        return f"paused while {_ahead(status)} {go} first, resumes where it stopped"
    if status.state == saliency_pb2.REQUEST_STATE_QUEUED:
        return f"waiting behind {_ahead(status)}"
    if status.state == saliency_pb2.REQUEST_STATE_RUNNING:
        return "resumed after a click" if status.preemptions else "computing"
    return ""
