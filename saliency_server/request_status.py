"""Where each call stands, by request id: the answer of ``GetRequestStatus``.

Serving registers every ``Saliency`` call and ``SaliencyAllSegments`` stream that carries a
request id (:meth:`StatusBoard.track`) together with the computations it runs or joins (its
flights' scheduler tickets) and the segments it has answered. :meth:`StatusBoard.status` reads
that against the schedulers: *preparing* until the call has a computation, then *queued* with
the number of computations ahead of it, *running*, or *paused* (preempted by interactive work;
it resumes where it stopped). Everything here runs on the server's event loop; the scheduler
locks itself.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Protocol

from saliency_server.scheduler import Priority, Scheduler, State, Ticket
from seqsal.errors import InvalidArgumentError
from seqsal.request_ids import clean_request_id
from seqsal.v1 import saliency_pb2


class _Flight(Protocol):
    model: str
    ticket: Ticket
    closed: bool


_WIRE_PRIORITY = {
    Priority.INTERACTIVE: saliency_pb2.PRIORITY_INTERACTIVE,
    Priority.BACKGROUND: saliency_pb2.PRIORITY_BACKGROUND,
}
#: Least advanced first: a call stands where its least advanced computation stands.
_ORDER = {State.WAITING: 0, State.PAUSED: 1, State.RUNNING: 2, State.DONE: 3}
_WIRE_STATE = {
    State.WAITING: saliency_pb2.REQUEST_STATE_QUEUED,
    State.PAUSED: saliency_pb2.REQUEST_STATE_PAUSED,
    State.RUNNING: saliency_pb2.REQUEST_STATE_RUNNING,
    State.DONE: saliency_pb2.REQUEST_STATE_RUNNING,  # finishing: its results are on their way
}


@dataclass(eq=False)
class TrackedCall:
    """One call in flight: its computations and the segments it answered."""

    request_id: str
    rpc: str
    model: str
    priority: Priority
    started: float = field(default_factory=time.monotonic)
    segments_total: int = 0
    segments_done: int = 0
    #: computations it runs itself, and those of other calls it waits for
    own: list[_Flight] = field(default_factory=list)
    joined: list[_Flight] = field(default_factory=list)


class StatusBoard:
    """The calls in flight, by request id."""

    def __init__(self) -> None:
        self._calls: dict[str, list[TrackedCall]] = {}

    @contextmanager
    def track(
        self, request_id: str | None, rpc: str, model: str, priority: Priority
    ) -> Iterator[TrackedCall | None]:
        """Register a call for the duration of the block (nothing without a request id)."""
        if not request_id:
            yield None
            return
        call = TrackedCall(request_id, rpc, model, priority)
        self._calls.setdefault(request_id, []).append(call)
        try:
            yield call
        finally:
            calls = self._calls.get(request_id, [])
            if call in calls:
                calls.remove(call)
            if not calls:
                self._calls.pop(request_id, None)

    def __len__(self) -> int:
        return sum(len(calls) for calls in self._calls.values())

    def status(
        self, request: saliency_pb2.GetRequestStatusRequest, schedulers: Mapping[str, Scheduler]
    ) -> saliency_pb2.GetRequestStatusResponse:
        request_id = clean_request_id(request.request_id)
        if request_id is None:
            raise InvalidArgumentError(
                "request_id is required: the x-request-id (printable ASCII, at most 128 chars) the "
                "calls were sent with",
                field="request_id",
            )
        now = time.monotonic()
        return saliency_pb2.GetRequestStatusResponse(
            calls=[self._one(call, schedulers, now) for call in self._calls.get(request_id, [])]
        )

    @staticmethod
    def _one(
        call: TrackedCall, schedulers: Mapping[str, Scheduler], now: float
    ) -> saliency_pb2.RequestStatus:
        out = saliency_pb2.RequestStatus(
            rpc=call.rpc,
            model=call.model,
            state=saliency_pb2.REQUEST_STATE_PREPARING,
            priority=_WIRE_PRIORITY[call.priority],  # type: ignore[arg-type]
            segments_total=call.segments_total,
            segments_done=call.segments_done,
            elapsed_ms=(now - call.started) * 1000.0,
        )
        live = [(f, False) for f in call.own if not f.closed]
        live += [(f, True) for f in call.joined if not f.closed]
        if not live:
            return out
        flight, joined = min(live, key=lambda item: _ORDER[item[0].ticket.state])
        ticket = flight.ticket
        out.state = _WIRE_STATE[ticket.state]
        out.priority = _WIRE_PRIORITY[ticket.effective]  # type: ignore[assignment]
        out.joined = joined
        out.preemptions = sum(f.ticket.pauses for f in call.own)
        scheduler = schedulers.get(flight.model)
        if scheduler is not None:
            out.ahead, out.interactive_ahead = scheduler.position(ticket)
        return out
