"""Operations: Prometheus metrics scraped over HTTP from running servers, and readiness while draining.

Both servers run in this process at once, each with its own registry and its own /metrics
port; a scrape before and after some calls shows the counters move.
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from inference_server.settings import InferenceSettings
from saliency_server.engine import SaliencyResult
from saliency_server.settings import SaliencySettings
from seqsal.client import AsyncInferenceClient, AsyncSaliencyClient
from seqsal.errors import InvalidArgumentError
from seqsal.v1 import common_pb2
from server_kit.metrics import ServerMetrics

if TYPE_CHECKING:
    from conftest import RunningInferenceServer, RunningSaliencyServer

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


S = TypeVar("S", SaliencySettings, InferenceSettings)


def make_settings(models: list[str], *, cls: type[S] = SaliencySettings, **overrides: Any) -> S:  # type: ignore[assignment]
    values: dict[str, Any] = {
        "models": models,
        "device": "cpu",
        "dtype": "float32",
        "redis_url": None,
        "backend": "transformers",
        "auth_tokens": [],
        "auth_token_file": None,
        "rate_limit_per_minute": 0,
    }
    values.update(overrides)
    return cls(_env_file=None, **values)  # type: ignore[call-arg]


def scrape(port: int) -> Samples:
    """Every sample of ``http://127.0.0.1:port/metrics``, by name and labels."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        assert reply.status == 200
        text = reply.read().decode()
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def names(samples: Samples) -> set[str]:
    return {name for name, _ in samples}


@pytest.fixture(scope="module")
async def saliency(
    run_saliency_server: Callable[[SaliencySettings], AbstractAsyncContextManager[RunningSaliencyServer]],
    tiny_llama_dir: Path,
) -> AsyncIterator[tuple[RunningSaliencyServer, int]]:
    async with run_saliency_server(make_settings([f"tiny={tiny_llama_dir}"])) as srv:
        yield srv, srv.server.start_metrics("127.0.0.1", 0)


@pytest.fixture(scope="module")
async def inference(
    run_inference_server: Callable[[InferenceSettings], AbstractAsyncContextManager[RunningInferenceServer]],
    tiny_chat_llama_dir: Path,
) -> AsyncIterator[tuple[RunningInferenceServer, int]]:
    async with run_inference_server(
        make_settings([f"tiny={tiny_chat_llama_dir}"], cls=InferenceSettings)
    ) as srv:
        yield srv, srv.server.start_metrics("127.0.0.1", 0)


async def test_saliency_metrics_change_after_requests(saliency: tuple[RunningSaliencyServer, int]) -> None:
    srv, port = saliency
    before = await asyncio.to_thread(scrape, port)
    assert value(before, "seqsal_build_info", service="saliency", version=_version(before)) == 1
    assert value(before, "seqsal_model_load_seconds", model="tiny") > 0
    assert value(before, "seqsal_queue_depth", state="running") == 0
    assert value(before, "seqsal_queue_depth", state="waiting") == 0

    async with AsyncSaliencyClient(srv.address, token="", tls=False, timeout=60) as client:
        first = await client.saliency(prompt="Metrics: the sky is", target=" blue.")
        again = await client.saliency(prompt="Metrics: the sky is", target=" blue.")
        with pytest.raises(InvalidArgumentError):
            await client.saliency(prompt="", target=" x")
        segments = [
            m
            async for m in client.saliency_all_segments(
                prompt="Metrics: two.", target=" One. Two.", granularity=common_pb2.SENTENCES
            )
        ]
    assert not first.cache_hit and again.cache_hit and len(segments) == 2
    after = await asyncio.to_thread(scrape, port)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("seqsal_grpc_requests_total", rpc="Saliency", code="OK") == 2
    assert delta("seqsal_grpc_requests_total", rpc="Saliency", code="INVALID_ARGUMENT") == 1
    assert delta("seqsal_grpc_requests_total", rpc="SaliencyAllSegments", code="OK") == 1
    assert delta("seqsal_grpc_request_duration_seconds_count", rpc="Saliency", code="OK") == 2
    assert delta("seqsal_grpc_request_duration_seconds_sum", rpc="Saliency", code="OK") > 0
    assert value(after, "seqsal_grpc_requests_in_progress", rpc="Saliency") == 0
    backend = srv.serving.cache.name
    assert delta("seqsal_cache_hits_total", backend=backend) >= 1  # the repeated call
    assert delta("seqsal_cache_misses_total", backend=backend) >= 1
    assert delta("seqsal_cache_sets_total", backend=backend) >= 1
    prompt_tokens = sum(1 for t in first.tokens if t.part == common_pb2.PROMPT)
    target_tokens = len(first.tokens) - prompt_tokens
    segment_prompt = sum(1 for t in segments[0].saliency.tokens if t.part == common_pb2.PROMPT)
    assert (
        delta("seqsal_tokens_processed_total", model="tiny", kind="prompt")
        == 2 * prompt_tokens + segment_prompt
    )
    assert delta("seqsal_tokens_processed_total", model="tiny", kind="target") >= 2 * target_tokens
    # the saliency server's registry holds only its own calls
    assert not any(dict(labels).get("rpc") == "Generate" for _, labels in after)
    assert not any(dict(labels).get("rpc") == "Check" for _, labels in after)  # health is not counted


async def test_inference_metrics_change_after_requests(inference: tuple[RunningInferenceServer, int]) -> None:
    srv, port = inference
    before = await asyncio.to_thread(scrape, port)
    assert value(before, "seqsal_model_load_seconds", model="tiny") > 0
    assert value(before, "seqsal_queue_depth", state="running") == 0
    async with AsyncInferenceClient(srv.address, token="", tls=False, timeout=60) as client:
        response = await client.generate(prompt="The cat sat", max_tokens=4, n=2, temperature=0.9, seed=1)
        streamed = [m async for m in client.generate_stream(prompt="The cat sat", max_tokens=3)]
        scored = await client.score(prompt="The cat", targets=[" sat", " ran"])
    after = await asyncio.to_thread(scrape, port)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    for rpc in ("Generate", "GenerateStream", "Score"):
        assert delta("seqsal_grpc_requests_total", rpc=rpc, code="OK") == 1, rpc
        assert delta("seqsal_grpc_request_duration_seconds_count", rpc=rpc, code="OK") == 1, rpc
    generated = sum(len(c.token_ids) for c in response.candidates) + sum(len(m.token_ids) for m in streamed)
    prompts = (
        len(response.prompt_token_ids) + len(streamed[0].prompt_token_ids) + len(scored.prompt_token_ids)
    )
    assert delta("seqsal_tokens_processed_total", model="tiny", kind="generated") == generated
    assert delta("seqsal_tokens_processed_total", model="tiny", kind="prompt") == prompts
    assert delta("seqsal_tokens_processed_total", model="tiny", kind="target") == sum(
        len(s.token_ids) for s in scored.scores
    )
    assert "seqsal_cache_hits_total" not in names(after)  # no cache on this server
    assert not any(dict(labels).get("rpc") == "Saliency" for _, labels in after)


def test_queue_depth_and_gpu_memory_collectors(monkeypatch: pytest.MonkeyPatch) -> None:
    metrics = ServerMetrics("test")
    depth = {"running": 3, "waiting": 5}
    metrics.watch_queue(lambda: dict(depth))

    class FakeCuda:
        @staticmethod
        def is_available() -> bool:
            return True

        @staticmethod
        def is_initialized() -> bool:
            return True

        @staticmethod
        def device_count() -> int:
            return 2

        @staticmethod
        def memory_allocated(index: int) -> int:
            return 1000 * (index + 1)

        @staticmethod
        def memory_reserved(index: int) -> int:
            return 5000

    class FakeTorch:
        cuda = FakeCuda

    monkeypatch.setitem(__import__("sys").modules, "torch", FakeTorch)
    port = metrics.start_http("127.0.0.1", 0)
    try:
        samples = scrape(port)
    finally:
        metrics.stop_http()
    assert value(samples, "seqsal_queue_depth", state="running") == 3
    assert value(samples, "seqsal_queue_depth", state="waiting") == 5
    assert value(samples, "seqsal_gpu_memory_allocated_bytes", device="cuda:1") == 2000
    assert value(samples, "seqsal_gpu_memory_reserved_bytes", device="cuda:0") == 5000


def _version(samples: Samples) -> str:
    for name, labels in samples:
        if name == "seqsal_build_info":
            return dict(labels)["version"]
    raise AssertionError("no seqsal_build_info")


# --- readiness while draining ------------------------------------------------------------------------


class SlowEngine:
    """Replaces ``engine.saliency_batch``: waits ``delay_s`` in the worker thread, then runs the real one."""

    def __init__(self, real: Callable[..., Iterator[SaliencyResult]], delay_s: float) -> None:
        self.real = real
        self.delay_s = delay_s
        self.started = threading.Event()

    def __call__(self, inputs: Any, masks: np.ndarray, methods: Sequence[int], **kwargs: Any) -> Any:
        self.started.set()
        time.sleep(self.delay_s)
        return self.real(inputs, masks, methods, **kwargs)


async def _next_status(stream: Any) -> int:
    return int((await stream.read()).status)


async def test_readiness_flips_to_not_serving_at_once_on_sigterm(
    run_saliency_server: Callable[[SaliencySettings], AbstractAsyncContextManager[RunningSaliencyServer]],
    tiny_llama_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """SIGTERM during a long request: health says NOT_SERVING at once, the request still completes."""
    settings = make_settings([f"tiny={tiny_llama_dir}"], shutdown_grace_s=10.0, shutdown_delay_s=0.5)
    async with run_saliency_server(settings) as srv:
        engine = srv.serving.host.get("").engine
        slow = SlowEngine(engine.saliency_batch, delay_s=2.0)
        monkeypatch.setattr(engine, "saliency_batch", slow)
        original = signal.getsignal(signal.SIGTERM)
        serving = asyncio.create_task(srv.server.serve_until_signalled())
        async with (
            grpc.aio.insecure_channel(srv.address) as channel,
            AsyncSaliencyClient(srv.address, token="", tls=False, timeout=30) as client,
        ):
            health = health_pb2_grpc.HealthStub(channel)
            watch = health.Watch(health_pb2.HealthCheckRequest())
            assert await _next_status(watch) == health_pb2.HealthCheckResponse.SERVING
            in_flight = asyncio.create_task(client.saliency(prompt="Draining: keep going", target=" on."))
            while not slow.started.is_set():
                await asyncio.sleep(0.01)
            deadline = time.monotonic() + 5
            while signal.getsignal(signal.SIGTERM) in (original, signal.SIG_DFL):  # never kill pytest itself
                assert time.monotonic() < deadline, "the server did not install its SIGTERM handler"
                await asyncio.sleep(0.01)
            os.kill(os.getpid(), signal.SIGTERM)
            signalled = time.monotonic()
            status = await asyncio.wait_for(_next_status(watch), 1.0)
            assert status == health_pb2.HealthCheckResponse.NOT_SERVING
            assert time.monotonic() - signalled < 0.5
            # during shutdown_delay_s a new probe on a new connection sees NOT_SERVING too
            async with grpc.aio.insecure_channel(srv.address) as probe:
                reply = await health_pb2_grpc.HealthStub(probe).Check(
                    health_pb2.HealthCheckRequest(), timeout=2
                )
            assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING
            assert not in_flight.done()
            watch.cancel()
            response = await asyncio.wait_for(in_flight, 20)
            assert response.scores and not response.cache_hit
        await asyncio.wait_for(serving, 15)
        assert signal.getsignal(signal.SIGTERM) in (original, signal.SIG_DFL)
