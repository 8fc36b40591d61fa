"""Faults: Redis and servers killed and restarted, calls cancelled, weights replaced, prompts too big.

Every test is bounded in time and waits for state (health, a metric, a Redis key), never for a
fixed sleep. Redis is always a ``redis-server`` of the test's own on a free port (never the
shared one); servers are real (in-process on tiny models, or ``seqsal serve`` children that are
SIGKILLed and started again on the same port).
"""

from __future__ import annotations

import asyncio
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any
from uuid import uuid4

import pytest
import redis
from procs import REDIS_SERVER, ServerProcess, free_port, metric_value, server_process, start_redis, stop

from saliency_server.cache import decode_entry
from saliency_server.engine import CancelCheck, SaliencyResult
from saliency_server.settings import SaliencySettings
from seqsal.client import AsyncSaliencyClient, InferenceClient, SaliencyClient
from seqsal.errors import (
    DeadlineExceededError,
    InvalidArgumentError,
    ResourceExhaustedError,
    UnavailableError,
)
from seqsal.retry import RetryPolicy
from seqsal.v1 import common_pb2, saliency_pb2
from seqsal_cli.stack import grpc_serving

if TYPE_CHECKING:
    from conftest import RunningSaliencyServer, SaliencyServerFactory

needs_redis_server = pytest.mark.skipif(REDIS_SERVER is None, reason="redis-server is not installed")

PROMPT = "Question: What is the capital of France?\nAnswer:"
TARGET = " Paris is the capital. It is big. The river is long."
#: a client that waits (within its deadline) for a server that is down instead of failing at once
RIDES_OUT = RetryPolicy(wait_for_ready=True)


def make_settings(model_spec: str, **overrides: Any) -> SaliencySettings:
    values: dict[str, Any] = {
        "models": [model_spec],
        "port": 0,
        "device": "cpu",
        "dtype": "float32",
        "redis_url": None,
        "max_concurrency": 1,
        "max_queue": 16,
    }
    return SaliencySettings(_env_file=None, **(values | overrides))  # type: ignore[call-arg]


@pytest.fixture(scope="module")
def model_spec(tiny_llama_dir: Path) -> str:
    return f"tiny={tiny_llama_dir}"


async def wait_until(condition: Callable[[], Any], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what}: not reached within {timeout:.0f} s"
        await asyncio.sleep(0.02)


def scores_of(response: saliency_pb2.SaliencyResponse) -> dict[int, list[float]]:
    return {s.method: list(s.scores) for s in response.scores}


# --- the retry policy, through a real server ---------------------------------------------------


class Flaky:
    """Stands in for ``serving.list_models``: raises ``error`` for the first ``failures`` calls."""

    def __init__(self, real: Callable[..., Any], error: Exception, failures: int) -> None:
        self.real, self.error, self.failures, self.calls = real, error, failures, 0

    async def __call__(self, request: Any) -> Any:
        self.calls += 1
        if self.calls <= self.failures:
            raise self.error
        return await self.real(request)


async def test_unavailable_is_retried_by_the_channel_and_overload_is_not(
    run_saliency_server: SaliencyServerFactory, model_spec: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with run_saliency_server(make_settings(model_spec)) as srv:
        serving = srv.serving
        flaky = Flaky(serving.list_models, UnavailableError("restarting"), failures=2)
        monkeypatch.setattr(serving, "list_models", flaky)
        async with AsyncSaliencyClient(srv.address, timeout=30.0) as client:
            models = await client.list_models()
        assert [m.id for m in models.models] == ["tiny"] and flaky.calls == 3  # two retries, then OK

        flaky.calls = 0
        async with AsyncSaliencyClient(srv.address, timeout=30.0, retry=RetryPolicy(attempts=1)) as client:
            with pytest.raises(UnavailableError):
                await client.list_models()
        assert flaky.calls == 1  # retries off: one attempt

        busy = Flaky(serving.list_models, ResourceExhaustedError("queue full"), failures=1)
        monkeypatch.setattr(serving, "list_models", busy)
        async with AsyncSaliencyClient(srv.address, timeout=30.0) as client:
            with pytest.raises(ResourceExhaustedError):
                await client.list_models()
        assert busy.calls == 1  # overload is the caller's decision, never retried by the channel


class FlakyStream:
    """Stands in for ``serving.saliency_all_segments``: the first ``failures`` streams fail with
    UNAVAILABLE before their first message."""

    def __init__(self, real: Callable[..., Any], failures: int) -> None:
        self.real, self.failures, self.calls = real, failures, 0

    async def __call__(self, request: Any, **kwargs: Any) -> Any:
        self.calls += 1
        if self.calls <= self.failures:
            raise UnavailableError("restarting")
        async for message in self.real(request, **kwargs):
            yield message


async def test_a_stream_is_retried_by_asyncio_clients_and_not_by_sync_ones(
    run_saliency_server: SaliencyServerFactory, model_spec: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stream the server fails before its first message: the asyncio client's channel retries
    it; the sync client's does not (grpcio's sync stream would wait for its deadline once the
    retries fail, seqsal.retry), so its caller is told at once."""
    request = dict(prompt=PROMPT, target=TARGET, granularity=common_pb2.SENTENCES)
    async with run_saliency_server(make_settings(model_spec)) as srv:
        flaky = FlakyStream(srv.serving.saliency_all_segments, failures=1)
        monkeypatch.setattr(srv.serving, "saliency_all_segments", flaky)
        async with AsyncSaliencyClient(srv.address, timeout=60.0) as client:
            messages = [m async for m in client.saliency_all_segments(**request)]
        assert len(messages) == 3 and flaky.calls == 2  # one retry, then the three sentences

        flaky.calls = 0

        def read_sync() -> None:
            with SaliencyClient(srv.address, timeout=60.0) as client:
                list(client.saliency_all_segments(**request))

        with pytest.raises(UnavailableError):
            await asyncio.to_thread(read_sync)
        assert flaky.calls == 1  # no retry: the caller decides


# --- Redis killed and restarted mid-run ----------------------------------------------------------


@needs_redis_server
async def test_redis_killed_and_restarted_mid_run(
    run_saliency_server: SaliencyServerFactory, model_spec: str
) -> None:
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    prefix = f"seqsal-faults-{uuid4().hex[:8]}"
    redis_process = start_redis(port)
    requests = [dict(prompt=f"{PROMPT} ({i})", target=TARGET) for i in range(4)]
    settings = make_settings(model_spec, redis_url=url, cache_prefix=prefix, redis_timeout_s=0.2)
    try:
        async with run_saliency_server(settings) as srv, AsyncSaliencyClient(srv.address, timeout=60) as c:
            srv.serving.cache.retry_after_s = 0.2  # type: ignore[attr-defined]  # probe a dead Redis often
            reference = [await c.saliency(**r) for r in requests]
            keys = set(redis.Redis(port=port).keys(f"{prefix}:*"))
            assert len(keys) == 2 * len(requests)  # two methods per request

            answers: list[tuple[int, saliency_pb2.SaliencyResponse]] = []
            failures: list[BaseException] = []
            done = asyncio.Event()

            async def traffic() -> None:
                i = 0
                while not done.is_set():
                    try:
                        answers.append((i % len(requests), await c.saliency(**requests[i % len(requests)])))
                    except Exception as exc:  # recorded: the test asserts there are none
                        failures.append(exc)
                    i += 1

            task = asyncio.create_task(traffic())
            try:
                await wait_until(lambda: len(answers) >= 4, 60, "answers before the kill")
                stop(redis_process)
                served_at_kill = len(answers)
                await wait_until(lambda: len(answers) >= served_at_kill + 4, 60, "answers without Redis")
                assert not any(a.cache_hit for _, a in answers[served_at_kill + 1 :])  # really uncached
                redis_process = start_redis(port)  # empty: no persistence
                fresh = redis.Redis(port=port)
                await wait_until(lambda: set(fresh.keys(f"{prefix}:*")) >= keys, 60, "the cache to refill")
                refilled_at = len(answers)
                await wait_until(lambda: len(answers) >= refilled_at + 4, 60, "answers after the refill")
            finally:
                done.set()
                await task
            assert not failures, failures
            for index, answer in answers:  # identical answers before, during and after the outage
                assert scores_of(answer) == scores_of(reference[index])
                assert answer.target_logprob == reference[index].target_logprob
            assert all(a.cache_hit for _, a in answers[refilled_at + len(requests) :])
            assert await asyncio.to_thread(grpc_serving, srv.address)
    finally:
        stop(redis_process)


# --- a deadline or a cancellation stops the work, and nothing half-done is cached -----------------


class Gate:
    """Wraps ``engine.saliency_batch``: lets ``open_results`` results through, then holds the worker
    until the server says the call is gone (its ``cancelled`` check), then runs on, so the real
    engine stops at its next checkpoint. ``passed`` counts the results handed on before that."""

    def __init__(self, real: Callable[..., Iterator[SaliencyResult]], open_results: int) -> None:
        self.real = real
        self.open_results = open_results
        self.produced = 0
        self.passed = 0
        self.held = threading.Event()
        self.saw_cancel = threading.Event()

    def __call__(self, *args: Any, cancelled: CancelCheck, **kwargs: Any) -> Iterator[SaliencyResult]:
        for result in self.real(*args, cancelled=cancelled, **kwargs):
            if self.produced >= self.open_results:
                self.held.set()
                deadline = time.monotonic() + 60
                while not cancelled() and time.monotonic() < deadline:
                    time.sleep(0.01)
                if cancelled():
                    self.saw_cancel.set()
            self.produced += 1
            self.passed += not cancelled()
            yield result


def install_gate(srv: RunningSaliencyServer, monkeypatch: pytest.MonkeyPatch, open_results: int) -> Gate:
    """Put a :class:`Gate` in front of the default model's engine (``gate.real`` is the engine's own)."""
    engine = srv.serving.host.get("").engine
    gate = Gate(engine.saliency_batch, open_results)
    monkeypatch.setattr(engine, "saliency_batch", gate)
    return gate


def cancelled_count(srv: RunningSaliencyServer, rpc: str, reason: str) -> float:
    value = srv.server.metrics.registry.get_sample_value(
        "seqsal_saliency_cancelled_total", {"rpc": rpc, "reason": reason}
    )
    return value or 0.0


async def test_deadline_stops_saliency_counts_it_and_caches_nothing(
    run_saliency_server: SaliencyServerFactory, model_spec: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = make_settings(model_spec, segment_batch_size=1)
    request = dict(prompt=PROMPT, target=TARGET, methods=[common_pb2.INTEGRATED_GRADIENTS], ig_steps=8)
    async with run_saliency_server(settings) as srv, AsyncSaliencyClient(srv.address, timeout=60) as c:
        # the engine yields one result per selection: hold the first one until the deadline passes
        gate = install_gate(srv, monkeypatch, open_results=0)
        with pytest.raises(DeadlineExceededError):
            await c.saliency(**request, timeout=1.0)
        await wait_until(lambda: cancelled_count(srv, "Saliency", "deadline") == 1, 120, "the counter")
        assert gate.saw_cancel.is_set()
        assert srv.serving.admission.depth == 0  # the worker has stopped and freed its slot
        assert len(srv.serving.cache) == 0  # type: ignore[arg-type]  # nothing of it was cached

        monkeypatch.undo()
        later = await c.saliency(**request)
        assert not later.cache_hit  # computed now, not a leftover
        srv.serving.cache.clear()  # type: ignore[attr-defined]
        uncancelled = await c.saliency(**request)
        assert not uncancelled.cache_hit and scores_of(later) == scores_of(uncancelled)
        assert cancelled_count(srv, "Saliency", "cancelled") == 0


async def test_cancelled_stream_keeps_only_finished_segments(
    run_saliency_server: SaliencyServerFactory, model_spec: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    request = dict(prompt=PROMPT, target=TARGET, granularity=common_pb2.SENTENCES)
    async with (
        run_saliency_server(make_settings(model_spec, segment_batch_size=1)) as srv,
        AsyncSaliencyClient(srv.address, timeout=60) as c,
    ):
        gate = install_gate(srv, monkeypatch, open_results=1)  # one segment through, then it waits
        stream = c.saliency_all_segments(**request)
        first = await stream.__anext__()
        count = first.segment_count
        assert count >= 3
        await wait_until(gate.held.is_set, 120, "the worker to reach the second segment")
        await stream.aclose()  # the client goes away mid-stream
        await wait_until(
            lambda: cancelled_count(srv, "SaliencyAllSegments", "cancelled") == 1, 120, "the counter"
        )
        assert gate.saw_cancel.is_set() and srv.serving.admission.depth == 0
        cache = srv.serving.cache
        entries = dict(cache._data)  # type: ignore[attr-defined]
        # the segment handed on is cached (both methods) and nothing else: the held one reached
        # a client that had gone, and the engine stopped before the ones after it
        assert gate.passed == 1 and gate.produced < count
        assert len(entries) == 2 * gate.passed

        monkeypatch.undo()
        resumed = [m async for m in c.saliency_all_segments(**request)]
        assert sorted(m.segment_index for m in resumed) == list(range(count))
        assert sum(m.saliency.cache_hit for m in resumed) == gate.passed
        cache.clear()  # type: ignore[attr-defined]
        uncancelled = {m.segment_index: m async for m in c.saliency_all_segments(**request)}
        for message in resumed:
            assert scores_of(message.saliency) == scores_of(uncancelled[message.segment_index].saliency)
        for value, _expiry in entries.values():  # and what was cached is a complete, valid entry
            decode_entry(value)


# --- new weights in the same directory -----------------------------------------------------------


def perturb_middle_tensor(model_dir: Path) -> None:
    """Write new values into one middle layer's weights, in place: same file size, same header,
    same first and last 64 KiB (what a fine-tune of a few layers looks like on disk)."""
    import torch
    from safetensors.torch import load_file, save_file

    path = model_dir / "model.safetensors"
    before = path.read_bytes()
    tensors = load_file(path)
    name = "model.layers.0.mlp.down_proj.weight"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        tensors[name] = torch.randn_like(tensors[name]) * 0.5
    save_file(tensors, path, metadata={"format": "pt"})
    after = path.read_bytes()
    assert len(after) == len(before) and after != before
    block = 1 << 16
    assert after[:block] == before[:block] and after[-block:] == before[-block:], "not a middle tensor"


@needs_redis_server
async def test_new_weights_in_the_same_directory_never_hit_old_results(
    run_saliency_server: SaliencyServerFactory, tiny_llama_dir: Path, tmp_path: Path
) -> None:
    model_dir = tmp_path / "tiny"
    shutil.copytree(tiny_llama_dir, model_dir)
    port = free_port()
    redis_process = start_redis(port)
    settings = make_settings(
        f"tiny={model_dir}", redis_url=f"redis://127.0.0.1:{port}/0", cache_prefix="seqsal-weights"
    )
    request = dict(prompt=PROMPT, target=TARGET)
    try:
        async with run_saliency_server(settings) as srv, AsyncSaliencyClient(srv.address) as c:
            old = await c.saliency(**request)
            assert (await c.saliency(**request)).cache_hit  # cached in Redis, which outlives the server
        perturb_middle_tensor(model_dir)
        async with run_saliency_server(settings) as srv, AsyncSaliencyClient(srv.address) as c:
            new = await c.saliency(**request)
        assert not new.cache_hit and new.revision != old.revision
        assert scores_of(new) != scores_of(old)
    finally:
        stop(redis_process)


# --- a prompt too big for this server ------------------------------------------------------------


async def test_prompt_too_big_for_memory_is_refused_and_the_server_lives_on(
    run_saliency_server: SaliencyServerFactory, model_spec: str
) -> None:
    """Over the token limit (SEQSAL_MAX_TOKENS); the memory budget has its own test below."""
    settings = make_settings(model_spec, max_tokens=64)
    huge = "word " * 2_000
    too_big = [
        ("Saliency", dict(prompt=huge, target=TARGET)),
        ("SaliencyAllSegments", dict(prompt=huge, target=TARGET, granularity=common_pb2.WORDS)),
    ]
    async with run_saliency_server(settings) as srv, AsyncSaliencyClient(srv.address, timeout=60) as c:
        for rpc, request in too_big:
            with pytest.raises((InvalidArgumentError, ResourceExhaustedError)) as refused:
                if rpc == "Saliency":
                    await c.saliency(**request)
                else:
                    [m async for m in c.saliency_all_segments(**request)]
            assert refused.value.field == "prompt", refused.value
            assert "64" in refused.value.message and "shorten" in refused.value.message
            assert await asyncio.to_thread(grpc_serving, srv.address)
            fine = await c.saliency(prompt=PROMPT, target=" Paris.")
            assert len(fine.scores) == 2 and fine.tokens


async def test_prompt_over_the_memory_budget_is_refused_and_the_server_lives_on(
    run_saliency_server: SaliencyServerFactory, model_spec: str
) -> None:
    """Under the token limit (the tiny model's context, 1,024) but over the memory budget (by
    saliency_server/memory.py's estimate on the tiny model: ~64 MiB for a short prompt, ~74 MiB at
    900 tokens): refused before any compute."""
    settings = make_settings(model_spec, memory_budget_mb=70)
    huge = "word " * 450  # 900 tokens
    async with run_saliency_server(settings) as srv, AsyncSaliencyClient(srv.address, timeout=60) as c:
        for rpc in ("Saliency", "SaliencyAllSegments"):
            with pytest.raises(ResourceExhaustedError) as refused:
                if rpc == "Saliency":
                    await c.saliency(prompt=huge, target=TARGET)
                else:
                    [
                        m
                        async for m in c.saliency_all_segments(
                            prompt=huge, target=TARGET, granularity=common_pb2.WORDS
                        )
                    ]
            message = refused.value.message
            assert (
                "memory budget" in message and "SEQSAL_MEMORY_BUDGET_MB" in message and "shorten" in message
            )
            assert await asyncio.to_thread(grpc_serving, srv.address)
            fine = await c.saliency(prompt=PROMPT, target=" Paris.")
            assert len(fine.scores) == 2 and fine.tokens


# --- servers killed with SIGKILL and started again -----------------------------------------------


@pytest.fixture
def saliency_process(model_spec: str, tmp_path: Path) -> Iterator[tuple[ServerProcess, int]]:
    """A ``seqsal serve saliency`` child and its metrics port."""
    metrics_port = free_port()
    # one IG point per pass: a long IG request takes long enough to be killed mid-way
    env = {"SEQSAL_IG_BATCH_SIZE": "1", "SEQSAL_METRICS_PORT": str(metrics_port)}
    server = server_process("saliency", model_spec, tmp_path, env=env)
    server.start()
    try:
        yield server, metrics_port
    finally:
        server.kill()


def test_saliency_server_killed_and_restarted(saliency_process: tuple[ServerProcess, int]) -> None:
    server, metrics_port = saliency_process
    short = dict(prompt=PROMPT, target=" Paris.")
    long = dict(prompt=PROMPT, target=TARGET, methods=[common_pb2.INTEGRATED_GRADIENTS], ig_steps=1024)
    with (
        SaliencyClient(server.address, timeout=180, retry=RIDES_OUT) as patient,
        ThreadPoolExecutor(max_workers=2) as pool,
    ):
        before = patient.saliency(**short)
        in_flight = pool.submit(patient.saliency, **long)
        deadline = time.monotonic() + 60
        running = {"rpc": "Saliency"}
        while metric_value(metrics_port, "seqsal_grpc_requests_in_progress", running) != 1:
            assert time.monotonic() < deadline and not in_flight.done(), "the long call never ran"
            time.sleep(0.02)
        assert not in_flight.done(), "the long call ended before the kill; the test proves nothing"
        server.kill()  # mid-call: the call is retried (its server had sent no headers yet)

        # while it is down: an interactive client is told at once that it is unavailable...
        with (
            SaliencyClient(f"localhost:{server.port}", timeout=60) as impatient,
            pytest.raises(UnavailableError),
        ):
            impatient.saliency(**short)
        # ...and a call made now by a client that rides outages out is answered once it is back
        during = pool.submit(patient.saliency, **short)
        server.start()
        after_restart = during.result(timeout=180)
        finished = in_flight.result(timeout=180)  # retried on the restarted server
    assert grpc_serving(server.address)
    assert scores_of(after_restart) == scores_of(before)
    assert not after_restart.cache_hit  # computed by the new process (its cache started empty)
    assert finished.scores[0].ig_steps == 1024 and any(v != 0 for v in finished.scores[0].scores)


def test_inference_server_killed_and_restarted(model_spec: str, tmp_path: Path) -> None:
    server = server_process("inference", model_spec, tmp_path)
    server.start()
    try:
        with InferenceClient(server.address, timeout=180, retry=RIDES_OUT) as patient:
            before = patient.generate(prompt=PROMPT, max_tokens=8)
            before_score = patient.score(prompt=PROMPT, targets=[" Paris."])
            server.kill()
            assert not grpc_serving(server.address)
            with ThreadPoolExecutor(max_workers=2) as pool:
                during = pool.submit(patient.generate, prompt=PROMPT, max_tokens=8)
                score = pool.submit(patient.score, prompt=PROMPT, targets=[" Paris."])
                server.start()
                after = during.result(timeout=180)
                scored = score.result(timeout=180)
        assert list(after.candidates[0].token_ids) == list(before.candidates[0].token_ids)  # greedy
        assert list(scored.scores[0].logprobs) == list(before_score.scores[0].logprobs)
    finally:
        server.kill()
