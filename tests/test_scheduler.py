"""The saliency scheduler: order under mixed priorities, fairness, cancellation, budget, preemption.

Nothing here measures time: the scheduler records what it did (``events``), and the tests
assert on that record. Fake jobs are threads that call :meth:`Scheduler.checkpoint` once per
step; decisions are taken under the scheduler's lock from its state alone, so the order does
not depend on how the threads happen to run. The preemption tests run the real engine on the
tiny models and check that a paused-and-resumed computation gives the same numbers.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from test_engine import assert_same_result, problem, random_mask
from tiny_models import ARCHITECTURES

from saliency_server.engine import GradientEngine, SaliencyInputs, SaliencyResult
from saliency_server.scheduler import Priority, Scheduler, State, Ticket, TicketSteps, priority_from_wire
from seqsal.errors import CancelledError
from seqsal.v1 import common_pb2, saliency_pb2
from server_kit.model_registry import load_causal_lm, load_tokenizer

BG = Priority.BACKGROUND
FG = Priority.INTERACTIVE
METHODS = (common_pb2.GRAD_L2, common_pb2.GRAD_DOT_INPUT)


class FakeJobs:
    """Threads that each take ``steps`` checkpoints for a ticket, logging every step done."""

    def __init__(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler
        self.steps: list[int] = []  # ticket id per step done, in order
        self.outcome: dict[int, str] = {}
        self.threads: list[threading.Thread] = []
        self._lock = threading.Lock()

    def start(self, ticket: Ticket, steps: int) -> threading.Thread:
        def work() -> None:
            try:
                for _ in range(steps):
                    self.scheduler.checkpoint(ticket, True)
                    with self._lock:
                        self.steps.append(ticket.id)
                self.scheduler.checkpoint(ticket, True)
                self.outcome[ticket.id] = "done"
            except CancelledError:
                self.outcome[ticket.id] = "cancelled"
            finally:
                self.scheduler.finish(ticket)

        thread = threading.Thread(target=work, daemon=True)
        self.threads.append(thread)
        thread.start()
        return thread

    def join(self) -> None:
        for thread in self.threads:
            thread.join(30)
            assert not thread.is_alive()


def test_priority_from_the_wire() -> None:
    assert priority_from_wire(saliency_pb2.PRIORITY_UNSPECIFIED, FG) is FG
    assert priority_from_wire(saliency_pb2.PRIORITY_UNSPECIFIED, BG) is BG
    assert priority_from_wire(saliency_pb2.PRIORITY_INTERACTIVE, BG) is FG
    assert priority_from_wire(saliency_pb2.PRIORITY_BACKGROUND, FG) is BG


def test_interactive_work_preempts_background_then_background_resumes() -> None:
    scheduler = Scheduler("m")
    jobs = FakeJobs(scheduler)
    long_bg = scheduler.submit("alice", BG)  # granted at once: the engine was free
    click = scheduler.submit("bob", FG)
    assert long_bg.state is State.RUNNING and click.state is State.WAITING
    jobs.start(long_bg, 4)
    jobs.start(click, 2)
    jobs.join()
    # the background job gave way at its first checkpoint, the click ran to the end, then it resumed
    assert jobs.steps == [click.id] * 2 + [long_bg.id] * 4
    assert scheduler.order("start") == [long_bg.id, click.id]
    assert scheduler.order("preempt") == [long_bg.id]
    assert scheduler.order("resume") == [long_bg.id]
    assert scheduler.order("finish") == [click.id, long_bg.id]
    assert scheduler.preemptions == {BG: 1}
    assert jobs.outcome == {long_bg.id: "done", click.id: "done"}
    assert scheduler.depth == 0


def test_mixed_priorities_interactive_first_and_clients_take_turns() -> None:
    scheduler = Scheduler("m")
    jobs = FakeJobs(scheduler)
    a_bg = scheduler.submit("a", BG)
    b_bg = scheduler.submit("b", BG)
    c_click = scheduler.submit("c", FG)
    a_click = scheduler.submit("a", FG)
    for ticket, steps in ((a_bg, 3), (b_bg, 3), (c_click, 2), (a_click, 2)):
        jobs.start(ticket, steps)
    jobs.join()
    clicks = {c_click.id, a_click.id}
    # every interactive step before any background step
    assert set(jobs.steps[:4]) == clicks
    assert not clicks & set(jobs.steps[4:])
    # the two clicks (two clients) alternate; so do the two background jobs afterwards
    assert jobs.steps[:4] in ([c_click.id, a_click.id] * 2, [a_click.id, c_click.id] * 2)
    assert jobs.steps[4:] in ([a_bg.id, b_bg.id] * 3, [b_bg.id, a_bg.id] * 3)
    assert scheduler.preemptions[BG] == 1 and scheduler.preemptions[FG] == 0
    assert scheduler.finished == {BG: 2, FG: 2}


def test_one_clients_long_precompute_does_not_starve_anothers() -> None:
    scheduler = Scheduler("m")
    jobs = FakeJobs(scheduler)
    long_one = scheduler.submit("alice", BG)
    alices_next = scheduler.submit("alice", BG)  # the same client: waits for her first job
    short_one = scheduler.submit("bob", BG)
    jobs.start(long_one, 10)
    jobs.start(alices_next, 2)
    jobs.start(short_one, 3)
    jobs.join()
    done_short = max(i for i, t in enumerate(jobs.steps) if t == short_one.id)
    # bob's three steps are done while alice has done at most four of hers (round-robin), not ten
    assert jobs.steps[: done_short + 1].count(long_one.id) <= 4
    # within one client, first come first served
    assert max(i for i, t in enumerate(jobs.steps) if t == long_one.id) < jobs.steps.index(alices_next.id)
    assert scheduler.order("yield")  # the turns were taken at step boundaries


def test_cancelling_a_waiting_ticket_frees_its_place_at_once() -> None:
    scheduler = Scheduler("m")
    jobs = FakeJobs(scheduler)
    running = scheduler.submit("a", BG)  # holds the engine; its thread is not even started
    waiting = scheduler.submit("b", BG)
    jobs.start(waiting, 3)
    assert scheduler.depth == 2
    scheduler.cancel(waiting)
    assert scheduler.depth == 1
    jobs.join()
    assert jobs.outcome == {waiting.id: "cancelled"}
    assert waiting.id not in jobs.steps and ("cancel", waiting.id) in scheduler.events
    jobs.start(running, 1)
    jobs.join()
    assert jobs.outcome[running.id] == "done" and scheduler.depth == 0


def test_cancelling_a_paused_ticket_frees_its_place() -> None:
    scheduler = Scheduler("m")
    jobs = FakeJobs(scheduler)
    background = scheduler.submit("a", BG)
    click = scheduler.submit("b", FG)
    paused = threading.Event()

    def watch() -> None:  # the click is granted once the background job pauses
        while click.state is not State.RUNNING:
            threading.Event().wait(0.01)
        paused.set()

    jobs.start(background, 5)
    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    assert paused.wait(10)
    assert background.state is State.PAUSED
    scheduler.cancel(background)
    jobs.join()
    assert jobs.outcome == {background.id: "cancelled"} and scheduler.depth == 1
    jobs.start(click, 1)
    jobs.join()
    assert jobs.outcome[click.id] == "done" and scheduler.depth == 0


def test_a_stopped_client_leaves_while_waiting() -> None:
    scheduler = Scheduler("m")
    jobs = FakeJobs(scheduler)
    scheduler.submit("a", BG)  # never runs: holds the engine
    gone = threading.Event()
    waiting = scheduler.submit("b", FG, stopped=gone.is_set)
    jobs.start(waiting, 1)
    gone.set()  # the client went away: the waiting thread notices at its next poll
    jobs.join()
    assert jobs.outcome == {waiting.id: "cancelled"} and scheduler.depth == 1


def test_memory_budget_bounds_the_started_tickets() -> None:
    scheduler = Scheduler("m", slots=2, budget_bytes=100)
    big = scheduler.submit("a", BG, cost_bytes=80)
    other = scheduler.submit("b", BG, cost_bytes=50)
    assert big.state is State.RUNNING and other.state is State.WAITING  # a slot is free, memory is not
    jobs = FakeJobs(scheduler)
    jobs.start(other, 1)
    jobs.start(big, 2)
    jobs.join()
    assert scheduler.order("start") == [big.id, other.id]
    assert scheduler.order("finish")[0] == big.id
    lone = Scheduler("m", budget_bytes=10).submit("a", BG, cost_bytes=50)
    assert lone.state is State.RUNNING  # one ticket always may start


def test_urgent_selections_go_first_and_contended_chunks_are_small() -> None:
    scheduler = Scheduler("m", contended_chunk=1)
    ticket = scheduler.submit("a", BG)
    assert scheduler.next_chunk(ticket, [0, 1, 2, 3], 4) == [0, 1, 2, 3]  # alone: the full chunk
    scheduler.boost(ticket, 3)
    assert ticket.effective is FG
    assert scheduler.next_chunk(ticket, [0, 1, 2, 3], 4)[0] == 3
    scheduler.submit("b", FG)
    assert scheduler.next_chunk(ticket, [0, 1, 2], 4) == [0]  # someone waits: one at a time
    scheduler.unboost(ticket, 3)
    assert ticket.effective is BG and not ticket.urgent


# --- preemption of real engine work -----------------------------------------------------------------


@pytest.fixture(scope="module")
def models(tiny_model_dirs: dict[str, Path]) -> dict[str, tuple[Any, Any]]:
    cpu = torch.device("cpu")
    return {
        arch: (load_causal_lm(path, cpu, torch.float32), load_tokenizer(path))
        for arch, path in tiny_model_dirs.items()
    }


class InjectingSteps(TicketSteps):
    """The background ticket's steps: at its ``at``-th checkpoint of the given kind, a click arrives."""

    def __init__(
        self, scheduler: Scheduler, ticket: Ticket, *, boundary: bool, at: int, arrive: Callable[[], None]
    ) -> None:
        super().__init__(scheduler, ticket)
        self.boundary, self.at, self.arrive, self.seen = boundary, at, arrive, 0

    def checkpoint(self, boundary: bool) -> None:
        if boundary == self.boundary:
            self.seen += 1
            if self.seen == self.at:
                self.arrive()
        super().checkpoint(boundary)


def by_selection(results: Sequence[SaliencyResult]) -> list[SaliencyResult]:
    return sorted(results, key=lambda r: r.selection)


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("where", ["between chunks", "inside a backward pass"])
def test_preempted_work_gives_the_same_results(
    arch: str, where: str, models: dict[str, tuple[Any, Any]]
) -> None:
    model, tokenizer = models[arch]
    inputs = problem(tokenizer)
    n_target = len(inputs.target_ids)
    masks = np.stack([random_mask(n_target, 7 + k) for k in range(5)])
    click_inputs = SaliencyInputs(prompt_ids=inputs.prompt_ids[::-1], target_ids=inputs.target_ids)
    click_mask = np.ones((1, n_target), dtype=bool)
    reference = list(GradientEngine(model, segment_batch_size=2).saliency_batch(inputs, masks, METHODS))
    click_reference = list(GradientEngine(model).saliency_batch(click_inputs, click_mask, METHODS))

    engine = GradientEngine(model, segment_batch_size=2)
    scheduler = Scheduler(arch)
    background = scheduler.submit("alice", BG)
    click_results: list[SaliencyResult] = []

    def click() -> None:
        ticket = scheduler.submit("bob", FG)

        def run() -> None:
            try:
                steps = TicketSteps(scheduler, ticket)
                click_results.extend(engine.saliency_batch(click_inputs, click_mask, METHODS, steps=steps))
            finally:
                scheduler.finish(ticket)

        threading.Thread(target=run, daemon=True).start()

    # boundaries: start, after the forward, before chunk 1, before chunk 2 (so: after one chunk)
    # layer checkpoints: 2 per forward (2 layers), then the backward's: the 3rd is inside it
    steps = InjectingSteps(
        scheduler,
        background,
        boundary=where == "between chunks",
        at=4 if where == "between chunks" else 3,
        arrive=click,
    )
    try:
        got = list(engine.saliency_batch(inputs, masks, METHODS, steps=steps))
    finally:
        scheduler.finish(background)
    assert scheduler.order("preempt") == [background.id]
    assert scheduler.order("resume") == [background.id]
    finish = scheduler.order("finish")
    assert finish[-1] == background.id and len(finish) == 2  # the click finished first
    assert len(got) == len(reference)
    for actual, expected in zip(by_selection(got), reference, strict=True):
        assert_same_result(actual, expected)
    (clicked,) = click_results
    assert_same_result(clicked, click_reference[0])
