"""The saliency service's logic, independent of gRPC: validate, look up the cache, schedule, answer.

Both the gRPC servicer and the CLI's in-process mode call this class with
wire messages (``seqsal.v1``) and get wire messages back, so the two paths
cannot drift apart.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import aclosing
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

import numpy as np
from google.protobuf.message import DecodeError

from saliency_server.cache import CacheBackend, SingleFlight, get_entry, make_key, put_entry
from saliency_server.engine import GRADIENT_METHODS, SaliencyResult
from saliency_server.engine_client import ModelEngine, SaliencyEngine
from saliency_server.memory import check_fits, memory_budget_bytes
from saliency_server.model_host import ModelHost
from saliency_server.perturbation import PERTURBATION_METHODS
from saliency_server.perturbing import PerturbationScoring, VerifyOptions, check_verify_count, verify_options
from saliency_server.request_status import StatusBoard, TrackedCall
from saliency_server.scheduler import Priority, Scheduler, Ticket, TicketSteps, priority_from_wire
from saliency_server.scores import MethodEntry, from_cache, from_result, to_cache, to_wire
from saliency_server.settings import SaliencySettings
from saliency_server.validation import Problem, build_problem, problem_message, resolve_selection
from seqsal import segmentation
from seqsal.errors import CancelledError
from seqsal.v1 import common_pb2, saliency_pb2
from server_kit.admission import Admission
from server_kit.logging_setup import request_id_var
from server_kit.threads import stream_from_thread
from server_kit.tokenization import tokenize

logger = logging.getLogger("seqsal.saliency")

T = TypeVar("T")


class _LeaderGone(Exception):
    """The computation a caller joined stopped (its own client went away): compute it yourself."""


@contextlib.contextmanager
def _ending(close: Callable[[Exception], None]) -> Iterator[None]:
    """Call ``close`` with the block's error when it ends: ``_LeaderGone`` when it finished or
    stopped (its client went away, it was cancelled), so whoever joined computes what is missing."""
    failure: Exception = _LeaderGone()
    try:
        yield
    except CancelledError:
        raise
    except Exception as exc:
        failure = exc
        raise
    finally:
        close(failure)


#: A job's memory cost in bytes, from its problem and number of selections (for the scheduler's budget).
#: The bytes a computation reserves: (problem, number of selections, methods) -> bytes.
JobCost = Callable[[Problem, int, Sequence[int]], int]

#: The client of calls made in-process (the CLI without a server).
LOCAL_CLIENT = "local"


@dataclass(eq=False)
class Flight:
    """One scheduled engine run for one problem: its ticket and a future per (selection, method).

    Registered in :attr:`SaliencyServing._inflight` under each result's cache key while it runs,
    so that any request needing one of those results (from either RPC) waits for it instead of
    computing it again.
    """

    model: str
    #: its scheduler ticket; None for a perturbation job (it takes its own ticket when it scores
    #: in this process, none when the inference server scores)
    ticket: Ticket | None
    #: the selections, one bool per target token of their problem
    masks: Sequence[np.ndarray]
    #: the problem of each selection when they differ (a cross-request batch), else None
    problems: Sequence[Problem] | None = None
    futures: dict[str, asyncio.Future[MethodEntry]] = field(default_factory=dict)
    #: cache key -> (selection index, method)
    slots: dict[str, tuple[int, int]] = field(default_factory=dict)
    started: bool = False  # its run began (and will clean up after itself)
    closed: bool = False


@dataclass(eq=False)
class _Batch:
    """Clicks gathered for one padded batch: (problem, selection, client, future) each."""

    model: str
    methods: tuple[int, ...]
    members: list[tuple[Problem, np.ndarray, str, asyncio.Future[dict[int, MethodEntry]]]] = field(
        default_factory=list
    )
    full: asyncio.Event = field(default_factory=asyncio.Event)


class SaliencyServing:
    """Answers SaliencyService calls for the models of one :class:`ModelHost`.

    Each model has an engine (:class:`~saliency_server.engine_client.SaliencyEngine`) and a
    :class:`~saliency_server.scheduler.Scheduler` in front of it, fed by both RPCs; every
    result in flight is shared (see :class:`Flight`). ``job_cost`` and ``budget_bytes`` are the
    scheduler's memory hook (default: no budget).
    """

    def __init__(
        self,
        host: ModelHost,
        cache: CacheBackend,
        settings: SaliencySettings,
        *,
        job_cost: JobCost | None = None,
        budget_bytes: int | None = None,
    ) -> None:
        self.host = host
        self.cache = cache
        self.settings = settings
        # the models are loaded: what is available now is what computations may use
        if budget_bytes is None:
            budget_bytes = memory_budget_bytes(settings)
        self.memory_budget = budget_bytes
        self.engines: dict[str, SaliencyEngine] = {
            info.id: ModelEngine(host.get(info.id).engine, on_errored=self._engine_errored)
            for info in host.infos()
        }
        self.schedulers = {
            model: Scheduler(
                model,
                slots=settings.max_concurrency,
                budget_bytes=budget_bytes,
                contended_chunk=settings.contended_chunk,
                reserve=host.get(model).engine.forward_cache,
            )
            for model in self.engines
        }
        self.admission = Admission(
            settings.max_concurrency + settings.max_queue,
            "SEQSAL_MAX_QUEUE",
            running=lambda: sum(s.running for s in self.schedulers.values()),
            bound=f"max_concurrency={settings.max_concurrency}, max_queue={settings.max_queue}",
        )
        self.job_cost: JobCost = job_cost or self._memory_cost
        self._inflight: dict[str, tuple[Flight, asyncio.Future[MethodEntry]]] = {}
        #: the calls in flight by request id (GetRequestStatus)
        self.board = StatusBoard()
        #: cross-request batching: seconds a click waits for others (0 = off), and the open batches
        self.batch_wait_s = settings.batch_wait_ms / 1000.0
        self._batches: dict[tuple[str, tuple[int, ...]], _Batch] = {}
        self._batch_tasks: set[asyncio.Task[None]] = set()
        #: Called on the event loop with False when an engine breaks (the server sets health).
        self.on_health: Callable[[bool], object] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        # every admitted request may hold a thread (running, paused or waiting for its turn)
        self.executor = ThreadPoolExecutor(
            max_workers=settings.max_concurrency + settings.max_queue, thread_name_prefix="seqsal-saliency"
        )
        #: OCCLUSION, LIME and Verify: variants scored by the inference server, or here
        self.perturbation = PerturbationScoring(
            settings,
            admission=self.admission,
            schedulers=self.schedulers,
            engines=self.engines,
            executor=self.executor,
        )
        #: Verify calls in flight, by their cache key: an identical call arriving meanwhile waits
        #: for the first one's answer (and computes it itself if that caller goes away)
        self.verifies = SingleFlight()

    def close(self, wait_s: float = 0.0) -> bool:
        """Stop every computation and wait up to ``wait_s`` for the worker threads; True if they ended.

        The server calls this after its drain: whatever still computes then (a precompute whose
        caller went away, a call past the grace period) is cancelled here, not left to run for
        minutes. A running computation stops at its next checkpoint.
        """
        cancelled = sum(scheduler.cancel_all() for scheduler in self.schedulers.values())
        if cancelled:
            logger.info("cancelled %d computation(s) still scheduled at shutdown", cancelled)
        self.executor.shutdown(wait=False, cancel_futures=True)
        deadline = time.monotonic() + wait_s
        threads = list(getattr(self.executor, "_threads", ()))
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        return not any(thread.is_alive() for thread in threads)

    @property
    def healthy(self) -> bool:
        """False once any engine is broken."""
        return all(engine.errored is None for engine in self.engines.values())

    def _engine_errored(self, why: str) -> None:  # a worker thread
        if self._loop is not None and self.on_health is not None:
            self._loop.call_soon_threadsafe(self.on_health, False)

    # --- simple calls ------------------------------------------------------------------------------

    async def list_models(self, request: common_pb2.ListModelsRequest) -> common_pb2.ListModelsResponse:
        return common_pb2.ListModelsResponse(models=self.host.infos())

    async def request_status(
        self, request: saliency_pb2.GetRequestStatusRequest
    ) -> saliency_pb2.GetRequestStatusResponse:
        """Where the calls with a request id stand (queued behind N, running, paused)."""
        return self.board.status(request, self.schedulers)

    async def tokenize(self, request: common_pb2.TokenizeRequest) -> common_pb2.TokenizeResponse:
        hosted = self.host.get(request.model)
        part = common_pb2.TARGET if request.as_target else common_pb2.PROMPT
        tokens = await asyncio.to_thread(
            tokenize, hosted.tokenizer, request.text, part=part, add_special_tokens=not request.as_target
        )
        return common_pb2.TokenizeResponse(tokens=tokens, model=hosted.id)

    # --- saliency ----------------------------------------------------------------------------------

    async def _problem(
        self,
        request: saliency_pb2.SaliencyRequest | saliency_pb2.SaliencyAllSegmentsRequest,
        *,
        all_segments: bool,
        prefix: str = "",
    ) -> Problem:
        """The request's validated problem (its ``problem``, or the deprecated top-level fields)."""
        message = problem_message(request, prefix=prefix)
        hosted = self.host.get(message.model)
        problem = await asyncio.to_thread(
            build_problem,
            hosted,
            message,
            default_ig_steps=self.settings.ig_steps,
            require_granularity=all_segments,
            max_perturbations=self.settings.max_perturbations,
        )
        if any(m in PERTURBATION_METHODS for m in problem.methods):  # their cache keys name it
            problem.scorer = await self.perturbation.scorer(problem)
        return problem

    def cache_key(self, problem: Problem, method: int, mask: np.ndarray) -> str:
        """The cache key of one method's scores for one selection."""
        info = problem.hosted.info
        inputs = problem.inputs
        fields = {
            "model": info.id,
            "revision": info.revision,
            "dtype": info.dtype,
            "method": common_pb2.Method.Name(method),
            "ig_steps": problem.ig_steps if method == common_pb2.INTEGRATED_GRADIENTS else 0,
            "prompt_ids": list(inputs.prompt_ids),
            "target_ids": list(inputs.target_ids),
            "selection": "".join("1" if b else "0" for b in mask),
            "foil_ids": None if inputs.foil_ids is None else list(inputs.foil_ids),
        }
        if method in PERTURBATION_METHODS:  # the segments removed and how, and what scored them
            assert problem.scorer is not None, "the serving layer sets the scorer of such a problem"
            fields |= {"granularity": problem.granularity, "custom_regex": problem.custom_regex}
            fields["segmentation"] = segmentation.SEGMENTATION_VERSION
            fields |= problem.perturbation.key_fields(method) | problem.scorer.key_fields()
        if inputs.foil_ids is not None and method not in PERTURBATION_METHODS:
            # the foil replaces the target from the first selected token on (engine docstring);
            # entries made when it was contrasted with the selection alone are never served
            fields["contrast"] = "foil-from-first-selected"
        return make_key(self.settings.cache_prefix, "saliency", fields)

    async def _cached(self, problem: Problem, mask: np.ndarray) -> dict[int, MethodEntry]:
        found: dict[int, MethodEntry] = {}
        sizes = {"n_tokens": len(problem.tokens), "n_target": len(problem.target_tokens)}
        for method in problem.methods:
            stored = await get_entry(self.cache, self.cache_key(problem, method, mask))
            entry = None if stored is None else from_cache(*stored, **sizes)
            if entry is not None:
                found[method] = entry
        return found

    async def _store(self, problem: Problem, mask: np.ndarray, entries: dict[int, MethodEntry]) -> None:
        for method, entry in entries.items():
            await put_entry(self.cache, self.cache_key(problem, method, mask), *to_cache(method, entry))

    def _memory_cost(self, problem: Problem, selections: int, methods: Sequence[int]) -> int:
        """The estimated peak bytes of a computation (saliency_server.memory); RESOURCE_EXHAUSTED
        naming the budget when it can never fit."""
        return check_fits(
            problem.hosted.engine,
            problem.inputs,
            n_selections=selections,
            methods=methods,
            ig_steps=problem.ig_steps,
            budget=self.memory_budget,
            model_id=problem.hosted.id,
        )

    def _begin(
        self,
        problem: Problem,
        masks: Sequence[np.ndarray],
        methods: Sequence[int],
        priority: Priority,
        client: str,
        *,
        problems: Sequence[Problem] | None = None,
        tracked: TrackedCall | None = None,
    ) -> Flight:
        """Take a place and a ticket and register what the run will compute (``problems``: the
        problem of each selection, for a cross-request batch; else ``problem`` for all).

        Synchronous, so a request arriving right after finds the run and joins it.
        """
        self._loop = asyncio.get_running_loop()
        cost = self.job_cost(problem, len(masks), methods)  # refuses what can never fit, before a place
        self.admission.acquire()
        model = problem.hosted.id
        ticket = self.schedulers[model].submit(
            client,
            priority,
            cost_bytes=cost,
            label=f"{len(masks)} selection(s), {len(problem.inputs.prompt_ids)} prompt tokens",
        )
        flight = Flight(model=model, ticket=ticket, masks=masks, problems=problems)
        if tracked is not None:
            tracked.own.append(flight)
        self._register(flight, problem, methods)
        return flight

    def _register(self, flight: Flight, problem: Problem, methods: Sequence[int]) -> None:
        """A future per (selection, method) of ``flight``, findable by its cache key."""
        loop = asyncio.get_running_loop()
        for index, mask in enumerate(flight.masks):
            for method in methods:
                key = self.cache_key(flight.problems[index] if flight.problems else problem, method, mask)
                future: asyncio.Future[MethodEntry] = loop.create_future()
                flight.futures[key] = future
                flight.slots[key] = (index, method)
                self._inflight.setdefault(key, (flight, future))

    def settle(self, flight: Flight, index: int, entries: dict[int, MethodEntry]) -> None:
        """Hand selection ``index``'s entries to whoever joined it."""
        for key, (i, method) in flight.slots.items():
            future = flight.futures[key]
            if i == index and method in entries and not future.done():
                future.set_result(entries[method])

    def _unregister(self, flight: Flight, failure: Exception | None) -> None:
        """Fail what ``flight`` did not give (``_LeaderGone``: joiners compute it) and forget it."""
        for key, future in flight.futures.items():
            if not future.done():
                future.set_exception(failure or _LeaderGone())
                future.exception()  # retrieved: no log when nobody joined
            if self._inflight.get(key, (None, None))[0] is flight:
                del self._inflight[key]

    def open_flight(self, problem: Problem, masks: Sequence[np.ndarray], methods: Sequence[int]) -> Flight:
        """A flight without a ticket of its own (a perturbation job's, run by :meth:`_perturbation`:
        :meth:`settle` hands its results out, :meth:`flying` ends it). Synchronous, so a request
        arriving right after finds it and joins it."""
        flight = Flight(model=problem.hosted.id, ticket=None, masks=masks)
        self._register(flight, problem, methods)
        return flight

    @contextlib.contextmanager
    def flying(self, flight: Flight) -> Iterator[None]:
        """The ``with`` block computes ``flight``: if it stops (its client went away), those who
        joined compute themselves; if it fails, they get its error."""
        with _ending(lambda failure: self._unregister(flight, failure)):
            yield

    async def _run(
        self, flight: Flight, problem: Problem, methods: Sequence[int]
    ) -> AsyncIterator[tuple[int, dict[int, MethodEntry]]]:
        """Compute a flight in a worker thread when its scheduler says so.

        Yields ``(selection index, entries)`` as results come; each is cached and handed to
        whoever joined it. If the caller stops listening (client cancelled, deadline passed),
        the ticket leaves the scheduler (at once when waiting or paused, at the next checkpoint
        when running) and those who joined compute what is missing themselves.
        """
        scheduler = self.schedulers[flight.model]
        engine = self.engines[flight.model]
        ticket = flight.ticket
        assert ticket is not None
        steps = TicketSteps(scheduler, ticket)

        def produce(emit: Callable[[SaliencyResult], None], stopped: Callable[[], bool]) -> None:
            ticket.stopped = stopped
            try:
                if flight.problems is None:
                    results = engine.compute(
                        problem.inputs,
                        np.asarray(flight.masks, dtype=bool),
                        methods,
                        ig_steps=problem.ig_steps,
                        cancelled=stopped,
                        steps=steps,
                    )
                else:
                    items = [
                        (p.inputs, m.tolist()) for p, m in zip(flight.problems, flight.masks, strict=True)
                    ]
                    results = engine.compute_many(items, methods, cancelled=stopped, steps=steps)
                for result in results:
                    emit(result)
            finally:
                scheduler.finish(ticket)

        flight.started = True
        with _ending(lambda failure: self._close_flight(flight, failure)):
            async with aclosing(stream_from_thread(produce, self.executor)) as stream:
                async for result in stream:
                    index = result.selection
                    entries = from_result(result)
                    owner = flight.problems[index] if flight.problems else problem
                    await self._store(owner, flight.masks[index], entries)
                    self.settle(flight, index, entries)
                    yield index, entries

    def _close_flight(self, flight: Flight, failure: Exception | None = None) -> None:
        """Give back a flight's ticket, place and registrations (once; after its worker is done)."""
        if flight.closed:
            return
        flight.closed = True
        if flight.ticket is not None:
            self.schedulers[flight.model].cancel(flight.ticket)  # nothing once finished
        self._unregister(flight, failure)
        self.admission.release()

    def _task(self, flight: Flight, coroutine: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
        """A task running ``coroutine`` (which runs ``flight``); if it is cancelled before the
        run began, the flight is closed all the same (no place or ticket is ever lost)."""
        task = asyncio.create_task(coroutine)
        task.add_done_callback(lambda _: None if flight.started else self._close_flight(flight))
        return task

    async def _collect(
        self, flight: Flight, problem: Problem, methods: Sequence[int]
    ) -> dict[int, MethodEntry]:
        """The entries of a one-selection flight."""
        out: dict[int, MethodEntry] = {}
        async with aclosing(self._run(flight, problem, methods)) as run:
            async for _, entries in run:
                out = entries
        return out

    def _batchable(self, problem: Problem, methods: Sequence[int], priority: Priority) -> bool:
        return (
            self.batch_wait_s > 0
            and priority is Priority.INTERACTIVE
            and problem.inputs.foil_ids is None
            and all(m in GRADIENT_METHODS for m in methods)
        )

    async def _batched(
        self, problem: Problem, mask: np.ndarray, methods: Sequence[int], client: str
    ) -> dict[int, MethodEntry]:
        """One click's entries, computed in one padded batch with the clicks (for the same model
        and methods) that arrive within ``SEQSAL_BATCH_WAIT_MS`` of the first; {} if the batch
        stopped (the caller computes again)."""
        key = (problem.hosted.id, tuple(methods))
        batch = self._batches.get(key)
        if batch is None:
            batch = self._batches[key] = _Batch(problem.hosted.id, tuple(methods))
            task = asyncio.create_task(self._dispatch(batch, key))
            self._batch_tasks.add(task)
            task.add_done_callback(self._batch_tasks.discard)
        future: asyncio.Future[dict[int, MethodEntry]] = asyncio.get_running_loop().create_future()
        batch.members.append((problem, mask, client, future))
        if len(batch.members) >= self.settings.batch_max_requests:
            batch.full.set()
        try:
            return await asyncio.shield(future)
        except _LeaderGone:
            return {}

    async def _dispatch(self, batch: _Batch, key: tuple[str, tuple[int, ...]]) -> None:
        """Close ``batch`` when full or after the bounded wait, then compute it as one flight."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(batch.full.wait(), self.batch_wait_s)
        if self._batches.get(key) is batch:
            del self._batches[key]
        rows: dict[str, int] = {}  # identical clicks share a row
        problems: list[Problem] = []
        masks: list[np.ndarray] = []
        for problem, mask, _, _ in batch.members:
            row = self.cache_key(problem, batch.methods[0], mask)
            if row not in rows:
                rows[row] = len(problems)
                problems.append(problem)
                masks.append(mask)
        failure: BaseException = _LeaderGone()
        try:
            flight = self._begin(
                problems[0],
                masks,
                batch.methods,
                Priority.INTERACTIVE,
                batch.members[0][2],
                problems=problems if len(problems) > 1 else None,
            )
            found: dict[int, dict[int, MethodEntry]] = {}
            try:
                async with aclosing(self._run(flight, problems[0], batch.methods)) as run:
                    async for index, entries in run:
                        found[index] = entries
            finally:
                if not flight.started:
                    self._close_flight(flight)
            for problem, mask, _, future in batch.members:
                if not future.done():
                    future.set_result(found[rows[self.cache_key(problem, batch.methods[0], mask)]])
        except Exception as exc:
            failure = exc
        finally:
            for *_, future in batch.members:
                if not future.done():
                    future.set_exception(failure)
                    future.exception()

    def _joinable(
        self, problem: Problem, mask: np.ndarray, methods: Sequence[int]
    ) -> dict[int, tuple[Flight, asyncio.Future[MethodEntry]]]:
        """The methods of ``methods`` that a run in flight is computing for ``mask``."""
        found = {}
        for method in methods:
            hit = self._inflight.get(self.cache_key(problem, method, mask))
            if hit is not None:
                found[method] = hit
        return found

    async def _join(
        self,
        joined: dict[int, tuple[Flight, asyncio.Future[MethodEntry]]],
        problem: Problem,
        mask: np.ndarray,
        priority: Priority,
        tracked: TrackedCall | None = None,
    ) -> dict[int, MethodEntry]:
        """Wait for results in flight; an interactive caller boosts the runs it waits for (their
        selection goes first, at interactive priority). Methods whose run stopped are left out."""
        boosted: list[tuple[Flight, int]] = []
        if tracked is not None:
            tracked.joined.extend(f for f, _ in joined.values() if f.ticket is not None)  # a ticket to report
        if priority is Priority.INTERACTIVE:
            for method, (flight, _) in joined.items():
                index = flight.slots[self.cache_key(problem, method, mask)][0]
                if flight.ticket is not None and (flight, index) not in boosted:
                    self.schedulers[flight.model].boost(flight.ticket, index)
                    boosted.append((flight, index))
        try:
            out: dict[int, MethodEntry] = {}
            for method, (_, future) in joined.items():
                try:
                    out[method] = await asyncio.shield(future)  # a cancelled joiner leaves the run alone
                except _LeaderGone:
                    continue
            return out
        finally:
            for flight, index in boosted:
                assert flight.ticket is not None
                self.schedulers[flight.model].unboost(flight.ticket, index)

    def _response(
        self,
        problem: Problem,
        mask: np.ndarray,
        entries: dict[int, MethodEntry],
        *,
        cache_hit: bool,
        started: float,
        with_tokens: bool = True,
    ) -> saliency_pb2.SaliencyResponse:
        """The wire response (``with_tokens=False``: without the tokens and segments)."""
        info = problem.hosted.info
        first = entries[problem.methods[0]]
        response = saliency_pb2.SaliencyResponse(
            tokens=problem.tokens if with_tokens else [],
            granularity=problem.granularity,
            target_mask=[bool(b) for b in mask],
            target_logprob=first.target_logprob,
            target_token_logprobs=first.target_token_logprobs.tolist(),
            model=info.id,
            revision=info.revision,
            dtype=info.dtype,
            device=info.device,
            cache_hit=cache_hit,
        )
        if first.foil_logprob is not None:
            response.foil_logprob = first.foil_logprob
        response.scores.extend(to_wire(m, entries[m]) for m in problem.methods)
        if with_tokens and problem.granularity != common_pb2.GRANULARITY_UNSPECIFIED:
            segments = problem.segments
            response.segments.extend(
                segmentation.with_scores(segments, [entries[m].scores for m in problem.methods])
            )
        response.server_time_ms = (time.perf_counter() - started) * 1000.0
        return response

    async def saliency(
        self, request: saliency_pb2.SaliencyRequest, *, client: str = LOCAL_CLIENT
    ) -> saliency_pb2.SaliencyResponse:
        """Saliency for one selection: from the cache, a run in flight, or one forward and one backward."""
        priority = priority_from_wire(request.priority, Priority.INTERACTIVE)
        with self.board.track(request_id_var.get(), "Saliency", request.model, priority) as tracked:
            return await self._saliency(request, client, priority, tracked)

    async def _saliency(
        self,
        request: saliency_pb2.SaliencyRequest,
        client: str,
        priority: Priority,
        tracked: TrackedCall | None,
    ) -> saliency_pb2.SaliencyResponse:
        started = time.perf_counter()
        problem = await self._problem(request, all_segments=False)
        mask = resolve_selection(problem, request)
        if tracked is not None:
            tracked.model, tracked.segments_total = problem.hosted.id, 1
        entries = await self._cached(problem, mask)
        cache_hit = len(entries) == len(problem.methods)
        while missing := [m for m in problem.methods if m not in entries]:
            joined = self._joinable(problem, mask, missing)
            own = [m for m in missing if m not in joined and m not in PERTURBATION_METHODS]
            tasks: list[asyncio.Task[dict[int, MethodEntry]]] = []
            if perturbed := [m for m in missing if m in PERTURBATION_METHODS and m not in joined]:
                flight = self.open_flight(problem, [mask], perturbed)
                task = asyncio.create_task(self._perturbed(problem, flight, perturbed, priority, client))
                # a task cancelled before it ran leaves no registration behind
                task.add_done_callback(lambda _, flight=flight: self._unregister(flight, None))
                tasks.append(task)
            if own and self._batchable(problem, own, priority):
                tasks.append(asyncio.create_task(self._batched(problem, mask, own, client)))
            elif own:
                flight = self._begin(problem, [mask], own, priority, client, tracked=tracked)
                tasks.append(self._task(flight, self._collect(flight, problem, own)))
            if joined:
                tasks.append(asyncio.create_task(self._join(joined, problem, mask, priority, tracked)))
            try:
                for found in await asyncio.gather(*tasks):
                    entries.update(found)
            finally:
                for task in tasks:
                    task.cancel()  # nothing once done
        return self._response(problem, mask, entries, cache_hit=cache_hit, started=started)

    async def _perturbed(
        self, problem: Problem, flight: Flight, methods: Sequence[int], priority: Priority, client: str
    ) -> dict[int, MethodEntry]:
        return (await self._perturbation(problem, flight, methods, priority, client))[0]

    async def _perturbation(
        self, problem: Problem, flight: Flight, methods: Sequence[int], priority: Priority, client: str
    ) -> list[dict[int, MethodEntry]]:
        """The perturbation methods' entries for each selection of ``flight`` (an
        :meth:`open_flight`; one scoring job for all), cached and handed to the requests that
        joined the flight instead of scoring again."""
        with self.flying(flight):
            scorer, found = await self.perturbation.entries(problem, flight.masks, methods, priority, client)
            # stored under the scorer that scored them (it changes if the inference server went away)
            owner = problem if scorer == problem.scorer else replace(problem, scorer=scorer)
            for index, (mask, entries) in enumerate(zip(flight.masks, found, strict=True)):
                await self._store(owner, mask, entries)
                self.settle(flight, index, entries)
        return found

    # --- Verify ------------------------------------------------------------------------------------

    async def verify(
        self, request: saliency_pb2.VerifyRequest, *, client: str = LOCAL_CLIENT
    ) -> saliency_pb2.VerifyResponse:
        """The ablation test of one method's explanation (see :mod:`saliency_server.perturbing`):
        from the cache, an identical call in flight, or scored here."""
        started = time.perf_counter()
        options = verify_options(request)
        problem = await self._problem(request.problem, all_segments=False, prefix="problem.")
        mask = resolve_selection(problem, request.problem)
        check_verify_count(problem, options, self.settings.max_perturbations)
        if problem.scorer is None:  # a gradient method's problem: what scores the ablations is in the key
            problem.scorer = await self.perturbation.scorer(problem)
        key = self.verify_key(problem, mask, options)
        response = await self._cached_verify(key)
        if response is None:
            shared, _ = await self.verifies.run(
                key, lambda: self._verified(request, problem, mask, options, key, client)
            )
            response = saliency_pb2.VerifyResponse()
            response.CopyFrom(shared)  # the callers that joined got the same message
        else:  # the explanation, too, is the cache's
            response.saliency.cache_hit = True
            response.saliency.server_time_ms = (time.perf_counter() - started) * 1000.0
        response.server_time_ms = (time.perf_counter() - started) * 1000.0
        return response

    async def _verified(
        self,
        request: saliency_pb2.VerifyRequest,
        problem: Problem,
        mask: np.ndarray,
        options: VerifyOptions,
        key: str,
        client: str,
    ) -> saliency_pb2.VerifyResponse:
        """Verify's answer computed here: the explanation (from Saliency), its ablations scored,
        cached when scored by the scorer ``key`` names."""
        explanation = await self.saliency(request.problem, client=client)
        priority = priority_from_wire(request.problem.priority, Priority.INTERACTIVE)
        response, scorer = await self.perturbation.verify(
            problem, mask, explanation, options, priority, client
        )
        if scorer == problem.scorer:  # else the inference server went away meanwhile: not its entry
            await put_entry(self.cache, key, {"kind": "verify"}, {"response": _bytes(response)})
        return response

    def verify_key(self, problem: Problem, mask: np.ndarray, options: VerifyOptions) -> str:
        """The cache key of a Verify answer: everything its explanation depends on (and the
        tokens it shows), the segments ranked and removed, the ks, draws and seed of the random
        removals, and what scores the ablations."""
        assert problem.scorer is not None, "Verify sets the scorer of its problem"
        fields = {
            "explanation": self.cache_key(problem, options.method, mask),
            "device": problem.hosted.info.device,
            "tokens": [[t.text, t.start, t.end, t.special] for t in problem.tokens],
            "granularity": problem.granularity,
            "custom_regex": problem.custom_regex,
            "segmentation": segmentation.SEGMENTATION_VERSION,
        }
        fields |= options.key_fields() | problem.scorer.key_fields()
        return make_key(self.settings.cache_prefix, "verify", fields)

    async def _cached_verify(self, key: str) -> saliency_pb2.VerifyResponse | None:
        stored = await get_entry(self.cache, key)
        if stored is None or stored[0].get("kind") != "verify" or "response" not in stored[1]:
            return None
        try:
            return saliency_pb2.VerifyResponse.FromString(stored[1]["response"].tobytes())
        except DecodeError:
            logger.warning("ignoring an undecodable Verify entry under %s", key)
            return None

    async def saliency_all_segments(
        self, request: saliency_pb2.SaliencyAllSegmentsRequest, *, client: str = LOCAL_CLIENT
    ) -> AsyncIterator[saliency_pb2.SaliencyAllSegmentsResponse]:
        """Saliency for every target segment: cached ones first, then the rest from one batched
        computation (joining segments that another request is computing already)."""
        priority = priority_from_wire(request.priority, Priority.BACKGROUND)
        rid = request_id_var.get()
        with self.board.track(rid, "SaliencyAllSegments", request.model, priority) as tracked:
            async with aclosing(self._all_segments(request, client, priority, tracked)) as stream:
                async for message in stream:
                    if tracked is not None:
                        tracked.segments_done += 1
                    yield message

    async def _all_segments(
        self,
        request: saliency_pb2.SaliencyAllSegmentsRequest,
        client: str,
        priority: Priority,
        tracked: TrackedCall | None,
    ) -> AsyncIterator[saliency_pb2.SaliencyAllSegmentsResponse]:
        started = time.perf_counter()
        problem = await self._problem(request, all_segments=True)
        segments = problem.segments
        targets = segmentation.segment_target_masks(problem.tokens, segments)
        count = len(targets)
        sent_tokens = False  # with tokens_once: the first message carries them, no other
        if tracked is not None:
            tracked.model, tracked.segments_total = problem.hosted.id, count

        def message(
            index: int, entries: dict[int, MethodEntry], cache_hit: bool
        ) -> saliency_pb2.SaliencyAllSegmentsResponse:
            nonlocal sent_tokens
            segment, mask = targets[index]
            saliency = self._response(
                problem,
                np.asarray(mask),
                entries,
                cache_hit=cache_hit,
                started=started,
                with_tokens=not (request.tokens_once and sent_tokens),
            )
            sent_tokens = True
            scored = segmentation.with_scores([segment], [entries[m].scores for m in problem.methods])[0]
            return saliency_pb2.SaliencyAllSegmentsResponse(
                segment_index=index, segment_count=count, target_segment=scored, saliency=saliency
            )

        def missing(index: int) -> list[int]:
            return [m for m in problem.methods if m not in known[index]]

        known: dict[int, dict[int, MethodEntry]] = {}
        pending: list[int] = []
        for index, (_, mask) in enumerate(targets):
            known[index] = await self._cached(problem, np.asarray(mask))
            if missing(index):
                pending.append(index)
            else:
                yield message(index, known[index], True)
        perturbed = [m for m in problem.methods if m in PERTURBATION_METHODS]
        if todo := [i for i in pending if any(m not in known[i] for m in perturbed)]:
            # the variants do not depend on the selection: one scoring job for every segment
            masks = [np.asarray(targets[i][1]) for i in todo]
            flight = self.open_flight(problem, masks, perturbed)
            found = await self._perturbation(problem, flight, perturbed, priority, client)
            for index, entries in zip(todo, found, strict=True):
                known[index].update(entries)
            ready = [i for i in pending if not missing(i)]
            pending = [i for i in pending if missing(i)]
            for index in ready:
                yield message(index, known[index], False)
        while pending:
            joined: dict[int, dict[int, tuple[Flight, asyncio.Future[MethodEntry]]]] = {}
            own: list[int] = []
            for index in pending:
                found = self._joinable(problem, np.asarray(targets[index][1]), missing(index))
                if found and len(found) == len(missing(index)):
                    joined[index] = found
                else:
                    own.append(index)
            pending = []
            if own:
                methods = [m for m in problem.methods if any(m not in known[i] for i in own)]
                masks = np.asarray([targets[i][1] for i in own], dtype=bool)
                flight = self._begin(problem, masks, methods, priority, client, tracked=tracked)
                try:
                    async with aclosing(self._run(flight, problem, methods)) as run:
                        async for position, entries in run:
                            index = own[position]
                            known[index].update(entries)
                            yield message(index, known[index], False)
                finally:
                    if not flight.started:
                        self._close_flight(flight)
            for index, found in joined.items():
                mask = np.asarray(targets[index][1])
                known[index].update(await self._join(found, problem, mask, priority, tracked))
                if missing(index):  # the run it joined stopped: compute it here
                    pending.append(index)
                else:
                    yield message(index, known[index], False)


def _bytes(message: saliency_pb2.VerifyResponse) -> np.ndarray:
    """A message's wire bytes, as the array a cache entry holds."""
    return np.frombuffer(message.SerializeToString(), dtype=np.uint8)
