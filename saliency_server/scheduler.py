"""Who computes next on one model's engine: priorities, preemption at checkpoints, fairness.

Every computation (one ``Saliency`` call, or one ``SaliencyAllSegments`` stream's missing
segments) gets a :class:`Ticket` and runs in its own worker thread, but only the tickets the
scheduler *grants* run; the others wait in :meth:`Scheduler.checkpoint`, which the engine calls
at its checkpoints (before and after the forward pass, between chunks of selections, and at
every decoder layer of a pass; see :class:`saliency_server.engine.Steps`). So:

* **Priorities.** ``INTERACTIVE`` goes before ``BACKGROUND``. A running background ticket
  yields at its next checkpoint as soon as interactive work is ready, and is *paused*, not
  stopped: its thread keeps its forward pass and the selections done, and it resumes where it
  stopped when no interactive work is left (a preemption).
* **Fairness.** Within a priority, clients (a bearer token's fingerprint, or the peer) take
  turns: at every step boundary the running ticket yields to another client's ready ticket of
  the same priority that was served less recently (round-robin), so one client's long
  precompute cannot starve another's. Within one client, first come first served.
* **Joining.** A ticket someone waits for interactively (a click on a segment that a
  background precompute is about to compute) is *boosted*: it runs at interactive priority
  while the boost lasts, and its boosted selections go first (:meth:`Ticket.urgent`).
* **Memory.** Each ticket may carry a cost in bytes; with a budget, a ticket starts only while
  the costs of the started (running or paused) tickets stay within it (one always may start).
  Memory held between tickets (forward passes the engine keeps for reuse, see
  :mod:`saliency_server.forward_cache`) counts too, and is let go when a ticket needs the room.
* **Cancellation.** A waiting or paused ticket whose client went away leaves at once
  (:meth:`Scheduler.cancel`, or its ``stopped`` callable at the next poll) and frees its place.

The scheduler records what it did (:attr:`Scheduler.events`: ``start``, ``resume``,
``preempt``, ``yield``, ``step``, ``finish``, ``cancel`` with the ticket id), so tests can
assert on the order of execution without timing anything, and keeps the counts the metrics
export (:meth:`Scheduler.snapshot`).
"""

from __future__ import annotations

import enum
import itertools
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from seqsal.errors import CancelledError
from seqsal.v1 import saliency_pb2

#: How often a waiting thread re-checks whether its client went away (seconds).
POLL_S = 0.05
#: Buckets of the wait-time histogram (seconds), as in :data:`server_kit.metrics.LATENCY_BUCKETS`.
WAIT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class Priority(enum.IntEnum):
    """Lower runs first."""

    INTERACTIVE = 0
    BACKGROUND = 1

    @property
    def label(self) -> str:
        return self.name.lower()


def priority_from_wire(value: int, default: Priority) -> Priority:
    """The :class:`Priority` of a request's ``priority`` field (PRIORITY_UNSPECIFIED = ``default``)."""
    if value == saliency_pb2.PRIORITY_INTERACTIVE:
        return Priority.INTERACTIVE
    if value == saliency_pb2.PRIORITY_BACKGROUND:
        return Priority.BACKGROUND
    return default


class Reserve(Protocol):
    """Memory held outside the tickets that can be let go (the engine's forward cache)."""

    def bytes_held(self) -> int: ...

    def release(self) -> int: ...


class State(enum.Enum):
    WAITING = "waiting"  # not started yet
    RUNNING = "running"  # granted the engine
    PAUSED = "paused"  # started, then preempted: holds its memory, waits to resume
    DONE = "done"


@dataclass(eq=False)
class Ticket:
    """One computation's place in the scheduler."""

    id: int
    client: str
    priority: Priority
    cost_bytes: int = 0
    stopped: Callable[[], bool] | None = None
    label: str = ""
    state: State = State.WAITING
    cancelled: bool = False
    submitted_at: float = field(default_factory=time.monotonic)
    #: Selections someone waits for interactively, in the order they asked (see :meth:`boost`).
    urgent: list[int] = field(default_factory=list)
    boosts: int = 0
    #: Times it was paused so far (preempted, or yielded to another client).
    pauses: int = 0

    @property
    def effective(self) -> Priority:
        """The priority it runs at now: interactive while boosted."""
        return Priority.INTERACTIVE if self.boosts > 0 else self.priority

    @property
    def started(self) -> bool:
        return self.state in (State.RUNNING, State.PAUSED)


class Scheduler:
    """Grants one model's engine to ``slots`` tickets at a time (see the module docstring).

    Thread-safe: tickets are submitted and cancelled from the event loop, checkpoints are called
    from worker threads.

    Args:
        name: the model id (for metrics).
        slots: tickets computing at the same time (``SEQSAL_MAX_CONCURRENCY``).
        budget_bytes: most bytes the started tickets may hold together; None = no budget.
        contended_chunk: selections per backward chunk of a ticket while other work is ready
            (small chunks give way sooner); 0 = the engine's own chunk size.
        reserve: memory held between tickets (the engine's forward cache): counted against the
            budget, and released when a ticket would not fit because of it.
    """

    def __init__(
        self,
        name: str = "",
        *,
        slots: int = 1,
        budget_bytes: int | None = None,
        contended_chunk: int = 0,
        reserve: Reserve | None = None,
    ) -> None:
        if slots < 1:
            raise ValueError("slots must be >= 1")
        self.name = name
        self.slots = slots
        self.budget_bytes = budget_bytes
        self.contended_chunk = contended_chunk
        self.reserve = reserve
        self._cond = threading.Condition()
        self._ids = itertools.count(1)
        self._tickets: list[Ticket] = []  # not done, in submission order
        self._served: dict[str, int] = {}  # client -> tick of its last grant or step
        self._tick = itertools.count(1)
        #: (event, ticket id) in the order they happened.
        self.events: list[tuple[str, int]] = []
        self.preemptions: Counter[Priority] = Counter()
        self.finished: Counter[Priority] = Counter()
        self._wait_counts: dict[Priority, list[int]] = {p: [0] * len(WAIT_BUCKETS) for p in Priority}
        self._wait_sum: Counter[Priority] = Counter()
        self._wait_n: Counter[Priority] = Counter()

    # --- the event loop's side --------------------------------------------------------------------

    def submit(
        self,
        client: str,
        priority: Priority,
        *,
        cost_bytes: int = 0,
        stopped: Callable[[], bool] | None = None,
        label: str = "",
    ) -> Ticket:
        """A new waiting ticket; its thread waits in :meth:`checkpoint` until granted."""
        with self._cond:
            ticket = Ticket(
                next(self._ids), client, priority, cost_bytes=cost_bytes, stopped=stopped, label=label
            )
            self._tickets.append(ticket)
            self.events.append(("submit", ticket.id))
            self._grant()
            return ticket

    def cancel(self, ticket: Ticket) -> None:
        """The ticket's client went away: a waiting or paused ticket leaves now, a running one at
        its next checkpoint (its thread raises :class:`CancelledError`)."""
        with self._cond:
            if ticket.state is State.DONE or ticket.cancelled:
                return
            ticket.cancelled = True
            if ticket.state is not State.RUNNING:
                self._remove(ticket, "cancel")
            self._cond.notify_all()

    def cancel_all(self) -> int:
        """Cancel every ticket (the server is shutting down); returns how many there were."""
        with self._cond:
            tickets = list(self._tickets)
        for ticket in tickets:
            self.cancel(ticket)
        return len(tickets)

    def boost(self, ticket: Ticket, selection: int | None = None) -> None:
        """Someone waits interactively for ``selection`` of ``ticket``: run it at interactive
        priority, that selection first, until :meth:`unboost`."""
        with self._cond:
            ticket.boosts += 1
            if selection is not None and selection not in ticket.urgent:
                ticket.urgent.append(selection)
            self._cond.notify_all()

    def unboost(self, ticket: Ticket, selection: int | None = None) -> None:
        with self._cond:
            ticket.boosts = max(0, ticket.boosts - 1)
            if selection is not None and selection in ticket.urgent:
                ticket.urgent.remove(selection)
            self._cond.notify_all()

    # --- the worker threads' side ------------------------------------------------------------------

    def checkpoint(self, ticket: Ticket, boundary: bool = True) -> None:
        """Return when ``ticket`` may compute; raises :class:`CancelledError` when it must stop.

        A running ticket yields here to better work: interactive work at any checkpoint, another
        client's work of the same priority at a step ``boundary``.
        """
        with self._cond:
            self._raise_if_stopped(ticket)
            if ticket.state is State.RUNNING:
                reason = self._yield_reason(ticket, boundary)
                if reason is None:
                    if boundary:
                        self.events.append(("step", ticket.id))
                        self._served[ticket.client] = next(self._tick)
                    return
                ticket.state = State.PAUSED
                ticket.pauses += 1
                if reason == "preempt":
                    self.preemptions[ticket.effective] += 1
                self.events.append((reason, ticket.id))
                self._grant()
            while ticket.state is not State.RUNNING:
                self._raise_if_stopped(ticket)
                self._cond.wait(POLL_S)
                if ticket.state is not State.RUNNING:
                    self._grant()  # e.g. a budget freed by a ticket that left while we slept

    def finish(self, ticket: Ticket) -> None:
        """The ticket's computation ended (done, failed or cancelled): free its slot."""
        with self._cond:
            if ticket.state is not State.DONE:
                if not ticket.cancelled:
                    self.finished[ticket.priority] += 1
                self._remove(ticket, "cancel" if ticket.cancelled else "finish")

    def next_chunk(self, ticket: Ticket, remaining: Sequence[int], size: int) -> list[int]:
        """The selections ``ticket`` computes next: urgent ones first; smaller chunks while other
        work is ready, so the ticket reaches its next step boundary sooner."""
        with self._cond:
            urgent = [k for k in ticket.urgent if k in remaining]
            if self.contended_chunk and any(t is not ticket and not t.cancelled for t in self._tickets):
                size = min(size, self.contended_chunk)
            chunk = urgent[:size]
            chunk += [k for k in remaining if k not in chunk][: size - len(chunk)]
            return chunk

    # --- reading the state ---------------------------------------------------------------------------

    def snapshot(self) -> dict[str, object]:
        """Counts for metrics: tickets per (priority, state), preemptions, finished, wait histogram."""
        with self._cond:
            depth = {(p.label, s.value): 0 for p in Priority for s in State if s is not State.DONE}
            for t in self._tickets:
                depth[(t.priority.label, t.state.value)] += 1
            return {
                "depth": depth,
                "preemptions": {p.label: self.preemptions[p] for p in Priority},
                "finished": {p.label: self.finished[p] for p in Priority},
                "wait": {
                    p.label: (list(self._wait_counts[p]), self._wait_sum[p], self._wait_n[p])
                    for p in Priority
                },
            }

    @property
    def depth(self) -> int:
        """Tickets not done (waiting, running or paused)."""
        with self._cond:
            return len(self._tickets)

    def active(self) -> list[Ticket]:
        """The tickets not done, in submission order."""
        with self._cond:
            return list(self._tickets)

    def position(self, ticket: Ticket) -> tuple[int, int]:
        """(tickets that run before ``ticket``, how many of them are interactive) for a waiting or
        paused ticket: the running ones and the ready ones of better rank; (0, 0) otherwise."""
        with self._cond:
            if ticket.state not in (State.WAITING, State.PAUSED):
                return 0, 0
            rank = self._rank(ticket)
            ahead = [
                t
                for t in self._tickets
                if t is not ticket
                and not t.cancelled
                and (t.state is State.RUNNING or (t.state is not State.DONE and self._rank(t) < rank))
            ]
            return len(ahead), sum(1 for t in ahead if t.effective is Priority.INTERACTIVE)

    @property
    def running(self) -> int:
        with self._cond:
            return sum(1 for t in self._tickets if t.state is State.RUNNING)

    @property
    def bytes_held(self) -> int:
        """The estimated bytes of the started (running or paused) tickets."""
        with self._cond:
            return sum(t.cost_bytes for t in self._tickets if t.started)

    def order(self, event: str = "start") -> list[int]:
        """Ticket ids in the order of ``event`` (e.g. the order tickets started)."""
        with self._cond:
            return [tid for name, tid in self.events if name == event]

    # --- internals (hold the lock) ---------------------------------------------------------------------

    def _raise_if_stopped(self, ticket: Ticket) -> None:
        if not ticket.cancelled and ticket.stopped is not None and ticket.stopped():
            ticket.cancelled = True
            if ticket.state is not State.RUNNING:
                self._remove(ticket, "cancel")
        if ticket.cancelled:
            raise CancelledError("request cancelled by the client or its deadline passed")

    def _remove(self, ticket: Ticket, event: str) -> None:
        if ticket in self._tickets:
            self._tickets.remove(ticket)
        ticket.state = State.DONE
        self.events.append((event, ticket.id))
        self._grant()
        self._cond.notify_all()

    def _rank(self, ticket: Ticket) -> tuple[int, int, int]:
        return (int(ticket.effective), self._served.get(ticket.client, 0), ticket.id)

    def _ready(self) -> list[Ticket]:
        return [t for t in self._tickets if t.state in (State.WAITING, State.PAUSED) and not t.cancelled]

    def _fits(self, ticket: Ticket) -> bool:
        if ticket.started or self.budget_bytes is None:
            return True
        held = sum(t.cost_bytes for t in self._tickets if t.started)
        fits = held == 0 or held + ticket.cost_bytes <= self.budget_bytes
        if self.reserve is None or not fits:
            return fits
        if held + self.reserve.bytes_held() + ticket.cost_bytes > self.budget_bytes:
            self.reserve.release()  # kept forward passes give way to a computation that needs the room
        return True

    def _yield_reason(self, running: Ticket, boundary: bool) -> str | None:
        ready = [t for t in self._ready() if self._fits(t)]
        if not ready:
            return None
        best = min(ready, key=self._rank)
        if best.effective < running.effective:
            return "preempt"
        if (
            boundary
            and best.effective == running.effective
            and best.client != running.client
            and self._served.get(best.client, 0) < self._served.get(running.client, 0)
        ):
            return "yield"
        return None

    def _grant(self) -> None:
        while sum(1 for t in self._tickets if t.state is State.RUNNING) < self.slots:
            ready = [t for t in self._ready() if self._fits(t)]
            if not ready:
                return
            ticket = min(ready, key=self._rank)
            self.events.append(("resume" if ticket.state is State.PAUSED else "start", ticket.id))
            if ticket.state is State.WAITING:
                self._observe_wait(ticket)
            ticket.state = State.RUNNING
            self._served[ticket.client] = next(self._tick)
            self._cond.notify_all()

    def _observe_wait(self, ticket: Ticket) -> None:
        waited = time.monotonic() - ticket.submitted_at
        counts = self._wait_counts[ticket.priority]
        for i, bound in enumerate(WAIT_BUCKETS):
            if waited <= bound:
                counts[i] += 1
        self._wait_sum[ticket.priority] += waited
        self._wait_n[ticket.priority] += 1


class TicketSteps:
    """The :class:`~saliency_server.engine.Steps` of one ticket: the engine's hooks into the scheduler."""

    def __init__(self, scheduler: Scheduler, ticket: Ticket) -> None:
        self.scheduler = scheduler
        self.ticket = ticket

    def checkpoint(self, boundary: bool) -> None:
        self.scheduler.checkpoint(self.ticket, boundary)

    def next_chunk(self, remaining: Sequence[int], size: int) -> Sequence[int]:
        return self.scheduler.next_chunk(self.ticket, remaining, size)
