"""GetRequestStatus: where a call stands in the scheduler's queue, by request id (tiny Llama, gRPC).

Computations are held at step boundaries by a gate (one per call, opened by the test), so each
state is reached for certain before it is asserted: a precompute computing, a click queued behind
it, the precompute paused by the click and resuming; never timed.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest
from test_grpc_saliency import collect, make_settings, wait_for
from test_grpc_scheduling import _GateSteps

from saliency_server.engine import SaliencyInputs, SaliencyResult
from saliency_server.scheduler import State
from seqsal.client import AsyncSaliencyClient
from seqsal.errors import InvalidArgumentError
from seqsal.v1 import common_pb2, saliency_pb2

if TYPE_CHECKING:
    from conftest import SaliencyServerFactory

pytestmark = pytest.mark.asyncio(loop_scope="session")

PROMPT = "Question: Which rivers flow through Paris, Rome and London?\nAnswer:"
TARGET = " The Seine, the Tiber and the Thames, in that order."


class _Gate:
    """What ``test_grpc_scheduling._GateSteps`` holds a computation with: boundary, gate, blocked."""

    def __init__(self, at: int) -> None:
        self.at = at
        self.gate, self.blocked = threading.Event(), threading.Event()


class Gates:
    """Replaces ``engine.saliency_batch``: the k-th computation waits at boundary ``at[k]`` (1 = its
    start, 4 = after the forward pass and the first backward chunk) until its gate opens."""

    def __init__(self, real: Any, at: Sequence[int]) -> None:
        self.real = real
        self.gates = [_Gate(a) for a in at]
        self.calls = 0

    def __call__(
        self, inputs: SaliencyInputs, masks: np.ndarray, methods: Sequence[int], **kwargs: Any
    ) -> Iterator[SaliencyResult]:
        if self.calls < len(self.gates) and kwargs.get("steps") is not None:
            kwargs["steps"] = _GateSteps(kwargs["steps"], self.gates[self.calls])
        self.calls += 1
        return self.real(inputs, masks, methods, **kwargs)


async def status(client: AsyncSaliencyClient, request_id: str) -> list[saliency_pb2.RequestStatus]:
    return list((await client.get_request_status(request_id)).calls)


async def test_status_follows_a_click_queued_behind_a_precompute_that_it_then_pauses(
    run_saliency_server: SaliencyServerFactory,
    tiny_model_dirs: dict[str, Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings = make_settings([f"tiny={tiny_model_dirs['llama']}"], segment_batch_size=1)
    async with run_saliency_server(settings) as srv, AsyncSaliencyClient(srv.address, timeout=60) as c:
        engine = srv.serving.host.get("").engine
        gates = Gates(engine.saliency_batch, at=[4, 1])
        monkeypatch.setattr(engine, "saliency_batch", gates)
        precompute, click = gates.gates
        assert await status(c, "pre") == []  # nothing in flight with this id yet

        stream = asyncio.create_task(
            collect(
                c.saliency_all_segments(
                    prompt=PROMPT, target=TARGET, granularity=common_pb2.WORDS, request_id="pre"
                )
            )
        )
        await wait_for(precompute.blocked.is_set, timeout=30)
        (pre,) = await status(c, "pre")
        assert pre.rpc == "SaliencyAllSegments" and pre.model == "tiny"
        assert pre.state == saliency_pb2.REQUEST_STATE_RUNNING and pre.ahead == 0
        assert pre.priority == saliency_pb2.PRIORITY_BACKGROUND
        words = pre.segments_total
        assert words >= 4 and 0 <= pre.segments_done < words

        # Another user's click arrives: it waits behind the running precompute.
        clicked = asyncio.create_task(
            c.saliency(prompt="Another user's prompt.", target=" Something else.", request_id="click")
        )
        await wait_for(click.blocked.is_set, timeout=30)
        (queued,) = await status(c, "click")
        assert queued.rpc == "Saliency" and queued.state == saliency_pb2.REQUEST_STATE_QUEUED
        assert (queued.ahead, queued.interactive_ahead) == (1, 0) and queued.segments_total == 1
        assert queued.priority == saliency_pb2.PRIORITY_INTERACTIVE and not queued.joined

        # The precompute reaches its next checkpoint and yields: paused behind the click, which runs.
        precompute.gate.set()
        scheduler = srv.serving.schedulers["tiny"]
        await wait_for(lambda: any(t.state is State.PAUSED for t in scheduler.active()), timeout=30)
        (paused,) = await status(c, "pre")
        assert paused.state == saliency_pb2.REQUEST_STATE_PAUSED and paused.preemptions == 1
        assert (paused.ahead, paused.interactive_ahead) == (1, 1)
        (running,) = await status(c, "click")
        assert running.state == saliency_pb2.REQUEST_STATE_RUNNING and running.ahead == 0

        click.gate.set()
        assert len((await clicked).scores) == 2
        assert await status(c, "click") == []  # finished: no longer in flight
        messages = await stream
        assert len(messages) == words and await status(c, "pre") == []
        assert len(srv.serving.board) == 0

        with pytest.raises(InvalidArgumentError) as info:
            await c.get_request_status("")
        assert info.value.field == "request_id"
