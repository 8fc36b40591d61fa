"""The saliency server's scheduling, end to end over gRPC (tiny Llama).

A :class:`GatedEngine` holds the first computation at one of its step boundaries (while it
holds the engine) until the test opens the gate, so what arrives meanwhile is queued in a
known state; the tests then assert on the scheduler's record and on the results, never on
time.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from test_grpc_saliency import assert_close_scores, assert_same_scores, collect, make_settings, wait_for

from saliency_server.engine import SaliencyInputs, SaliencyResult, Steps
from seqsal.client import AsyncSaliencyClient
from seqsal.errors import InternalError, ResourceExhaustedError, UnavailableError
from seqsal.segmentation import segment_target_masks
from seqsal.v1 import common_pb2, saliency_pb2

if TYPE_CHECKING:
    from conftest import RunningSaliencyServer, SaliencyServerFactory

pytestmark = pytest.mark.asyncio(loop_scope="session")

PROMPT = "Question: Which rivers flow through Paris, Rome and London?\nAnswer:"
TARGET = " The Seine, the Tiber and the Thames, in that order."
WORDS = common_pb2.WORDS


class _GateSteps:
    def __init__(self, inner: Steps, spy: GatedEngine) -> None:
        self.inner, self.spy, self.boundaries = inner, spy, 0

    def checkpoint(self, boundary: bool) -> None:
        if boundary:
            self.boundaries += 1
            if self.boundaries == self.spy.at:
                self.spy.blocked.set()
                assert self.spy.gate.wait(30), "the test never opened the gate"
        self.inner.checkpoint(boundary)

    def next_chunk(self, remaining: Sequence[int], size: int) -> Sequence[int]:
        return self.inner.next_chunk(remaining, size)


class GatedEngine:
    """Replaces ``engine.saliency_batch``; its first call waits at boundary ``at`` for ``gate``.

    Boundaries: 1 = start, 2 = after the forward pass, 3 = before the first backward chunk.
    """

    def __init__(self, real: Any, at: int = 3) -> None:
        self.real, self.at = real, at
        self.masks: list[np.ndarray] = []
        self.gate, self.blocked = threading.Event(), threading.Event()

    def __call__(
        self, inputs: SaliencyInputs, masks: np.ndarray, methods: Sequence[int], **kwargs: Any
    ) -> Iterator[SaliencyResult]:
        self.masks.append(np.array(masks, dtype=bool))
        if len(self.masks) == 1 and kwargs.get("steps") is not None:
            kwargs["steps"] = _GateSteps(kwargs["steps"], self)
        return self.real(inputs, masks, methods, **kwargs)


def gate_engine(monkeypatch: pytest.MonkeyPatch, srv: RunningSaliencyServer, at: int = 3) -> GatedEngine:
    engine = srv.serving.host.get("").engine
    spy = GatedEngine(engine.saliency_batch, at)
    monkeypatch.setattr(engine, "saliency_batch", spy)
    return spy


@pytest.fixture(scope="module")
def llama(tiny_model_dirs: dict[str, Path]) -> str:
    return f"tiny={tiny_model_dirs['llama']}"


async def target_masks(client: AsyncSaliencyClient, prompt: str) -> list[list[bool]]:
    whole = await client.saliency(prompt=prompt, target=TARGET, granularity=WORDS)
    return [mask for _, mask in segment_target_masks(list(whole.tokens), list(whole.segments))]


async def test_a_click_joins_the_precompute_that_is_about_to_compute_it(
    run_saliency_server: SaliencyServerFactory, llama: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = make_settings([llama], segment_batch_size=1)
    async with run_saliency_server(settings) as srv, AsyncSaliencyClient(srv.address, timeout=60) as c:
        masks = await target_masks(c, PROMPT)
        assert len(masks) >= 4
        spy = gate_engine(monkeypatch, srv)
        stream = asyncio.create_task(
            collect(c.saliency_all_segments(prompt=PROMPT, target=TARGET, granularity=WORDS))
        )
        await wait_for(spy.blocked.is_set, timeout=30)
        last = len(masks) - 1
        click = asyncio.create_task(c.saliency(prompt=PROMPT, target=TARGET, target_mask=masks[last]))
        scheduler = srv.serving.schedulers["tiny"]
        await wait_for(lambda: any(t.boosts for t in scheduler.active()), timeout=30)
        spy.gate.set()
        clicked, messages = await click, await stream
        assert len(spy.masks) == 1  # the click computed nothing itself
        by_index = {m.segment_index: m for m in messages}
        assert sorted(by_index) == list(range(len(masks)))
        assert messages[0].segment_index == last  # the clicked segment went first
        assert_same_scores(clicked, by_index[last].saliency)
        assert list(clicked.target_mask) == masks[last] and not clicked.cache_hit
        assert scheduler.depth == 0 and srv.serving.admission.depth == 0


async def test_a_click_preempts_the_precompute_which_completes_with_the_same_scores(
    run_saliency_server: SaliencyServerFactory, llama: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = make_settings([llama], segment_batch_size=2)
    async with run_saliency_server(settings) as quiet, AsyncSaliencyClient(quiet.address, timeout=60) as c:
        reference = await collect(c.saliency_all_segments(prompt=PROMPT, target=TARGET, granularity=WORDS))
    async with run_saliency_server(settings) as srv, AsyncSaliencyClient(srv.address, timeout=60) as c:
        spy = gate_engine(monkeypatch, srv, at=4)  # after the forward and one chunk
        stream = asyncio.create_task(
            collect(c.saliency_all_segments(prompt=PROMPT, target=TARGET, granularity=WORDS))
        )
        await wait_for(spy.blocked.is_set, timeout=30)
        click = asyncio.create_task(c.saliency(prompt="Another user's prompt.", target=" Something else."))
        scheduler = srv.serving.schedulers["tiny"]
        await wait_for(lambda: len(scheduler.active()) == 2, timeout=30)
        spy.gate.set()
        clicked, messages = await click, await stream
        precompute, click_ticket = scheduler.order("submit")
        assert scheduler.order("preempt") == [precompute] and scheduler.order("resume") == [precompute]
        assert scheduler.order("finish") == [click_ticket, precompute]
        assert len(clicked.scores) == 2
        assert len(messages) == len(reference)
        expected = {m.segment_index: m for m in reference}
        for message in messages:
            assert_same_scores(message.saliency, expected[message.segment_index].saliency)


async def test_cancelling_a_waiting_request_frees_its_place(
    run_saliency_server: SaliencyServerFactory, llama: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = make_settings([llama], max_concurrency=1, max_queue=1)
    async with run_saliency_server(settings) as srv, AsyncSaliencyClient(srv.address, timeout=60) as c:
        spy = gate_engine(monkeypatch, srv, at=2)
        first = asyncio.create_task(c.saliency(prompt=PROMPT, target=TARGET))
        await wait_for(spy.blocked.is_set, timeout=30)
        waiting = asyncio.create_task(c.saliency(prompt="Waiting in line.", target=TARGET))
        scheduler = srv.serving.schedulers["tiny"]
        await wait_for(lambda: len(scheduler.active()) == 2, timeout=30)
        with pytest.raises(ResourceExhaustedError):  # the line is full
            await c.saliency(prompt="No room.", target=TARGET)
        waiting.cancel()
        await wait_for(lambda: srv.serving.admission.depth == 1, timeout=30)
        _, gone = scheduler.order("submit")
        assert ("cancel", gone) in scheduler.events and gone not in scheduler.order("start")
        third = asyncio.create_task(c.saliency(prompt="Room again.", target=TARGET))  # admitted now
        await wait_for(lambda: len(scheduler.active()) == 2, timeout=30)
        spy.gate.set()
        assert len((await first).scores) == 2 and len((await third).scores) == 2
        await wait_for(lambda: srv.serving.admission.depth == 0, timeout=30)


async def test_background_priority_on_the_wire_and_defaults(
    run_saliency_server: SaliencyServerFactory, llama: str
) -> None:
    async with (
        run_saliency_server(make_settings([llama])) as srv,
        AsyncSaliencyClient(srv.address, timeout=60) as c,
    ):
        await c.saliency(prompt="Interactive by default.", target=TARGET)
        await c.saliency(
            prompt="Marked background.", target=TARGET, priority=saliency_pb2.PRIORITY_BACKGROUND
        )
        await collect(c.saliency_all_segments(prompt="A precompute.", target=TARGET, granularity=WORDS))
        finished = srv.serving.schedulers["tiny"].finished
        assert finished == {0: 1, 1: 2}  # one interactive, two background


async def health_status(address: str) -> int:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        response = await stub.Check(health_pb2.HealthCheckRequest(service="seqsal.v1.SaliencyService"))
        return int(response.status)


@pytest.mark.parametrize("probe_fails", [False, True])
async def test_a_broken_engine_turns_health_not_serving(
    run_saliency_server: SaliencyServerFactory, llama: str, monkeypatch: pytest.MonkeyPatch, probe_fails: bool
) -> None:
    async with (
        run_saliency_server(make_settings([llama])) as srv,
        AsyncSaliencyClient(srv.address, timeout=60) as c,
    ):
        engine = srv.serving.host.get("").engine

        def fail(*args: Any, **kwargs: Any) -> Iterator[SaliencyResult]:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
            yield  # a generator, like the real one

        def broken_probe() -> None:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")

        monkeypatch.setattr(engine, "saliency_batch", fail)
        if probe_fails:
            monkeypatch.setattr(engine, "probe", broken_probe)
        assert await health_status(srv.address) == health_pb2.HealthCheckResponse.SERVING
        expected = UnavailableError if probe_fails else InternalError
        with pytest.raises(expected):
            await c.saliency(prompt=PROMPT, target=TARGET)
        if probe_fails:  # the model itself is broken: out of rotation, and it says why
            await wait_for(lambda: not srv.serving.healthy, timeout=10)
            for _ in range(100):
                if await health_status(srv.address) == health_pb2.HealthCheckResponse.NOT_SERVING:
                    break
                await asyncio.sleep(0.05)
            assert await health_status(srv.address) == health_pb2.HealthCheckResponse.NOT_SERVING
            with pytest.raises(UnavailableError, match="broken"):
                await c.saliency(prompt="Another one.", target=TARGET)
        else:  # only that request failed: the engine answers probes, the server stays in rotation
            assert srv.serving.healthy
            assert await health_status(srv.address) == health_pb2.HealthCheckResponse.SERVING
        assert srv.serving.admission.depth == 0


async def test_concurrent_clicks_share_one_padded_batch(
    run_saliency_server: SaliencyServerFactory, llama: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    prompts = [
        "A short one.",
        "A somewhat longer prompt than that.",
        "The longest prompt of the three, by far.",
    ]
    async with (
        run_saliency_server(make_settings([llama])) as plain,
        AsyncSaliencyClient(plain.address, timeout=60) as c,
    ):
        expected = [await c.saliency(prompt=p, target=TARGET) for p in prompts]
    settings = make_settings([llama], batch_wait_ms=1000, batch_max_requests=3)
    async with run_saliency_server(settings) as srv, AsyncSaliencyClient(srv.address, timeout=60) as c:
        engine = srv.serving.host.get("").engine
        batches: list[int] = []
        real_many = engine.saliency_many

        def many(items: Any, methods: Any, **kwargs: Any) -> Iterator[SaliencyResult]:
            batches.append(len(items))
            return real_many(items, methods, **kwargs)

        monkeypatch.setattr(engine, "saliency_many", many)
        got = await asyncio.gather(*(c.saliency(prompt=p, target=TARGET) for p in prompts))
        assert batches == [3]  # full before the wait ran out: one forward and one backward for all
        for response, reference in zip(got, expected, strict=True):
            assert_close_scores(response, reference)  # padded rows: equal to float tolerance
            assert list(response.target_token_logprobs) == pytest.approx(
                list(reference.target_token_logprobs), abs=1e-4
            )
        lone = await c.saliency(prompt="Alone: the wait runs out, then it computes unbatched.", target=TARGET)
        assert batches == [3] and len(lone.scores) == 2
        again = await c.saliency(prompt=prompts[0], target=TARGET)
        assert again.cache_hit  # batched results were cached under the usual keys
