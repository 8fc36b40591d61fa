"""The saliency service with a Redis cache: shared between servers, surviving outages and corruption.

Shared-cache tests use the Redis at ``SEQSAL_TEST_REDIS_URL`` (default
``redis://127.0.0.1:6379/0``) under a unique key prefix whose keys are deleted afterwards;
the outage test starts (and kills) its own ``redis-server`` on a free port.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any
from uuid import uuid4

import grpc
import pytest
import redis
import redis.asyncio as aioredis
from grpc_health.v1 import health_pb2, health_pb2_grpc

from saliency_server.cache import CACHE_FORMAT_VERSION, CorruptEntryError, RedisCache, decode_entry
from saliency_server.settings import SaliencySettings
from seqsal.client import AsyncSaliencyClient
from seqsal.v1 import common_pb2, saliency_pb2

if TYPE_CHECKING:
    from conftest import SaliencyServerFactory

TEST_REDIS_URL = os.environ.get("SEQSAL_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
REDIS_SERVER = shutil.which("redis-server")
PROMPT = "Question: What is the capital of France?\nAnswer:"
TARGET = " Paris is the capital."


def _redis_up(url: str) -> bool:
    try:
        client = redis.Redis.from_url(url, socket_timeout=0.5, socket_connect_timeout=0.5)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except (redis.RedisError, OSError):
        return False


pytestmark = [pytest.mark.redis, pytest.mark.asyncio(loop_scope="session")]
needs_redis = pytest.mark.skipif(
    not _redis_up(TEST_REDIS_URL), reason=f"no Redis server answering at {TEST_REDIS_URL}"
)
needs_redis_server = pytest.mark.skipif(
    REDIS_SERVER is None, reason="redis-server binary not found on PATH (needed to simulate an outage)"
)


def make_settings(model_spec: str, redis_url: str, prefix: str, **overrides: Any) -> SaliencySettings:
    values: dict[str, Any] = {
        "models": [model_spec],
        "port": 0,
        "device": "cpu",
        "dtype": "float32",
        "redis_url": redis_url,
        "cache_prefix": prefix,
        "cache_ttl_s": 600,
        "redis_timeout_s": 0.5,
    }
    values.update(overrides)
    return SaliencySettings(_env_file=None, **values)  # type: ignore[call-arg]


def scores_of(response: saliency_pb2.SaliencyResponse) -> dict[int, list[float]]:
    return {s.method: list(s.scores) for s in response.scores}


@pytest.fixture(scope="module")
def model_spec(tiny_model_dirs: dict[str, Path]) -> str:
    return f"tiny={tiny_model_dirs['llama']}"


@pytest.fixture
async def shared_redis() -> AsyncIterator[tuple[aioredis.Redis, str]]:
    """A client of the shared Redis and a unique key prefix; every key under it is deleted afterwards."""
    prefix = f"seqsal-test-{uuid4().hex}"
    client = aioredis.Redis.from_url(TEST_REDIS_URL, socket_timeout=2, socket_connect_timeout=2)
    try:
        yield client, prefix
    finally:
        keys = [key async for key in client.scan_iter(match=f"{prefix}:*", count=500)]
        if keys:
            await client.delete(*keys)
        assert not [key async for key in client.scan_iter(match=f"{prefix}:*")]
        await client.aclose()


async def keys_under(client: aioredis.Redis, prefix: str) -> list[bytes]:
    return sorted([key async for key in client.scan_iter(match=f"{prefix}:*", count=500)])


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _start_redis(port: int) -> subprocess.Popen[bytes]:
    assert REDIS_SERVER is not None
    process = subprocess.Popen(
        [REDIS_SERVER, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"
    deadline = time.monotonic() + 10
    while not _redis_up(url):
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise RuntimeError(f"redis-server on port {port} did not start")
        time.sleep(0.05)
    return process


@pytest.fixture
def private_redis() -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    """Our own throwaway redis-server (no persistence) on a free port; killed at the end."""
    port = _free_port()
    process = _start_redis(port)
    try:
        yield process, port
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=10)


async def health_status(address: str) -> int:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        response = await stub.Check(
            health_pb2.HealthCheckRequest(service="seqsal.v1.SaliencyService"), timeout=5
        )
        return int(response.status)


@needs_redis
async def test_two_servers_share_the_redis_cache(
    run_saliency_server: SaliencyServerFactory, model_spec: str, shared_redis: tuple[aioredis.Redis, str]
) -> None:
    redis_client, prefix = shared_redis
    settings = make_settings(model_spec, TEST_REDIS_URL, prefix)
    methods = [common_pb2.GRAD_L2, common_pb2.GRAD_DOT_INPUT, common_pb2.INTEGRATED_GRADIENTS]
    async with (
        run_saliency_server(settings) as first,
        run_saliency_server(settings) as second,
        AsyncSaliencyClient(first.address, timeout=60.0) as c1,
        AsyncSaliencyClient(second.address, timeout=60.0) as c2,
    ):
        assert first.port != second.port
        assert isinstance(first.serving.cache, RedisCache) and isinstance(second.serving.cache, RedisCache)
        computed = await c1.saliency(prompt=PROMPT, target=TARGET, methods=methods, ig_steps=4)
        assert not computed.cache_hit
        keys = await keys_under(redis_client, prefix)
        assert len(keys) == 3  # one entry per method
        assert all(key.decode().startswith(f"{prefix}:{CACHE_FORMAT_VERSION}:saliency:") for key in keys)
        ttl = await redis_client.ttl(keys[0])
        assert 0 < ttl <= 600

        shared = await c2.saliency(prompt=PROMPT, target=TARGET, methods=methods, ig_steps=4)
        assert shared.cache_hit
        assert scores_of(shared) == scores_of(computed)
        assert shared.target_logprob == computed.target_logprob
        assert shared.scores[2].completeness_residual == computed.scores[2].completeness_residual
        # a subset of the methods is served from the same entries on either server
        subset = await c2.saliency(prompt=PROMPT, target=TARGET, methods=[common_pb2.GRAD_DOT_INPUT])
        assert subset.cache_hit and list(subset.scores[0].scores) == list(computed.scores[1].scores)

        # and the other way round, for segments computed on the second server
        streamed = [
            m
            async for m in c2.saliency_all_segments(
                prompt=PROMPT, target=TARGET, granularity=common_pb2.WORDS
            )
        ]
        assert streamed and not any(m.saliency.cache_hit for m in streamed)
        for message in streamed:
            again = await c1.saliency(
                prompt=PROMPT,
                target=TARGET,
                target_mask=list(message.saliency.target_mask),
                granularity=common_pb2.WORDS,
            )
            assert again.cache_hit and scores_of(again) == scores_of(message.saliency)
        assert len(await keys_under(redis_client, prefix)) == 3 + 2 * len(streamed)


@needs_redis
@pytest.mark.parametrize("damage", ["garbage", "truncated", "flipped byte", "empty"])
async def test_corrupt_entry_is_recomputed_and_replaced(
    run_saliency_server: SaliencyServerFactory,
    model_spec: str,
    shared_redis: tuple[aioredis.Redis, str],
    caplog: pytest.LogCaptureFixture,
    damage: str,
) -> None:
    redis_client, prefix = shared_redis
    async with (
        run_saliency_server(make_settings(model_spec, TEST_REDIS_URL, prefix)) as srv,
        AsyncSaliencyClient(srv.address, timeout=60.0) as c,
    ):
        kwargs: dict[str, Any] = {"prompt": PROMPT, "target": TARGET, "methods": [common_pb2.GRAD_DOT_INPUT]}
        original = await c.saliency(**kwargs)
        (key,) = await keys_under(redis_client, prefix)
        good = await redis_client.get(key)
        assert good is not None
        decode_entry(good)
        bad = {
            "garbage": b"this is not a cache entry",
            "truncated": good[: len(good) // 2],
            "flipped byte": good[:40] + bytes([good[40] ^ 0xFF]) + good[41:],
            "empty": b"",
        }[damage]
        await redis_client.set(key, bad)
        with pytest.raises(CorruptEntryError):
            decode_entry(bad)

        with caplog.at_level(logging.WARNING, logger="seqsal.cache"):
            recomputed = await c.saliency(**kwargs)
        assert not recomputed.cache_hit
        assert scores_of(recomputed) == scores_of(original)
        assert recomputed.target_logprob == original.target_logprob
        assert any("corrupt" in r.getMessage() and r.name == "seqsal.cache" for r in caplog.records)
        assert srv.serving.cache.corrupt == 1

        # the bad value was replaced by a valid entry holding the right scores
        replaced = await redis_client.get(key)
        assert replaced is not None and replaced != bad
        meta, arrays = decode_entry(replaced)
        assert arrays["scores"].tolist() == list(original.scores[0].scores)
        assert meta["target_logprob"] == pytest.approx(original.target_logprob)
        assert await keys_under(redis_client, prefix) == [key]
        hit = await c.saliency(**kwargs)
        assert hit.cache_hit and scores_of(hit) == scores_of(original)


@needs_redis_server
async def test_redis_outage_degrades_to_uncached_serving(
    run_saliency_server: SaliencyServerFactory,
    model_spec: str,
    private_redis: tuple[subprocess.Popen[bytes], int],
    caplog: pytest.LogCaptureFixture,
) -> None:
    process, port = private_redis
    url = f"redis://127.0.0.1:{port}/0"
    settings = make_settings(model_spec, url, f"seqsal-test-{uuid4().hex}", redis_timeout_s=0.2)
    async with run_saliency_server(settings) as srv, AsyncSaliencyClient(srv.address, timeout=60.0) as c:
        cache = srv.serving.cache
        assert isinstance(cache, RedisCache)
        cache.retry_after_s = 0.2  # probe a dead Redis often, so its recovery is seen quickly
        first = await c.saliency(prompt=PROMPT, target=TARGET)
        cached = await c.saliency(prompt=PROMPT, target=TARGET)
        assert not first.cache_hit and cached.cache_hit

        process.kill()
        process.wait(timeout=10)
        with caplog.at_level(logging.INFO, logger="seqsal.cache"):
            started = time.perf_counter()
            after = await c.saliency(prompt=PROMPT, target=TARGET)
            assert not after.cache_hit  # the entry lived in the dead Redis
            assert scores_of(after) == scores_of(first)
            fresh = await c.saliency(prompt="A new prompt.", target=TARGET)
            fresh_again = await c.saliency(prompt="A new prompt.", target=TARGET)
            assert not fresh.cache_hit and not fresh_again.cache_hit  # nothing can be cached now
            assert scores_of(fresh_again) == scores_of(fresh)
            streamed = [
                m
                async for m in c.saliency_all_segments(
                    prompt="A new prompt.", target=TARGET, granularity=common_pb2.WORDS
                )
            ]
            assert streamed and len(streamed) == streamed[0].segment_count
            assert time.perf_counter() - started < 10  # the breaker keeps a dead Redis cheap
            assert await health_status(srv.address) == health_pb2.HealthCheckResponse.SERVING
            warnings = [
                r for r in caplog.records if r.name == "seqsal.cache" and r.levelno == logging.WARNING
            ]
            assert len(warnings) == 1, [r.getMessage() for r in warnings]  # one warning per outage
            assert "Redis" in warnings[0].getMessage() and str(port) in warnings[0].getMessage()
            assert cache.errors >= 1 and not cache.available

            # Redis comes back: the next probe finds it and caching resumes
            restarted = _start_redis(port)
            try:
                await asyncio.sleep(0.3)
                recomputed = await c.saliency(prompt=PROMPT, target=TARGET)
                assert not recomputed.cache_hit
                deadline = time.monotonic() + 5
                while not (await c.saliency(prompt=PROMPT, target=TARGET)).cache_hit:
                    assert time.monotonic() < deadline, "caching did not resume after Redis came back"
                    await asyncio.sleep(0.1)
                assert cache.available
                assert any("recovered" in r.getMessage() for r in caplog.records if r.name == "seqsal.cache")
            finally:
                restarted.kill()
                restarted.wait(timeout=10)
