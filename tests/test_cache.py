"""Tests of saliency_server.cache: keys, backends (in-process LRU and real Redis), codec, single flight.

Redis tests use the shared server at ``SEQSAL_TEST_REDIS_URL`` (default
``redis://127.0.0.1:6379/0``) under a unique key prefix that is deleted at the
end; the outage tests start their own ``redis-server`` on a free port.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from uuid import uuid4

import numpy as np
import pytest
import redis

from saliency_server.cache import (
    CACHE_FORMAT_VERSION,
    ENTRY_MAGIC,
    CorruptEntryError,
    InMemoryCache,
    RedisCache,
    SingleFlight,
    decode_entry,
    encode_entry,
    get_entry,
    make_cache,
    make_key,
    put_entry,
)
from saliency_server.settings import SaliencySettings

TEST_REDIS_URL = os.environ.get("SEQSAL_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
REDIS_SERVER = shutil.which("redis-server")


def _redis_up(url: str) -> bool:
    try:
        client = redis.Redis.from_url(url, socket_timeout=0.5, socket_connect_timeout=0.5)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except (redis.RedisError, OSError):
        return False


REDIS_AVAILABLE = _redis_up(TEST_REDIS_URL)
needs_redis = pytest.mark.skipif(not REDIS_AVAILABLE, reason=f"no Redis server answering at {TEST_REDIS_URL}")
needs_redis_server = pytest.mark.skipif(
    REDIS_SERVER is None, reason="redis-server binary not found on PATH (needed to simulate an outage)"
)


async def _until(cond: Callable[[], bool], timeout: float = 2.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0)


# ---------------------------------------------------------------------------
# keys
# ---------------------------------------------------------------------------

BASE_FIELDS: dict[str, object] = {
    "model_id": "SmolLM2-135M-Instruct",
    "revision": "abc123",
    "method": "integrated_gradients",
    "params": {"steps": 16, "baseline": "zero", "normalize": True},
    "prompt_ids": [1, 2, 3, 4],
    "target_ids": [5, 6],
    "selection": [0, 1],
    "foil": None,
}


def test_key_format_and_determinism() -> None:
    key = make_key("seqsal", "saliency", BASE_FIELDS)
    prefix, version, namespace, digest = key.split(":")
    assert (prefix, version, namespace) == ("seqsal", CACHE_FORMAT_VERSION, "saliency")
    assert len(digest) == 64 and int(digest, 16) >= 0
    reordered = dict(reversed(list(BASE_FIELDS.items())))
    reordered["params"] = {"normalize": True, "baseline": "zero", "steps": 16}
    assert make_key("seqsal", "saliency", reordered) == key
    # numpy values stand for their Python values; tuples for lists.
    with_numpy = dict(BASE_FIELDS, prompt_ids=np.array([1, 2, 3, 4]), target_ids=(np.int64(5), 6))
    assert make_key("seqsal", "saliency", with_numpy) == key


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("model_id", "other-model"),
        ("revision", "def456"),
        ("method", "gradient_x_input"),
        ("params", {"steps": 32, "baseline": "zero", "normalize": True}),
        ("params", {"steps": 16, "baseline": "pad", "normalize": True}),
        ("params", {"steps": 16, "baseline": "zero", "normalize": False}),
        ("params", {"steps": 16, "baseline": "zero"}),
        ("prompt_ids", [1, 2, 3, 5]),
        ("prompt_ids", [2, 1, 3, 4]),  # order matters
        ("prompt_ids", [1, 2, 3, 4, 0]),
        ("target_ids", [6, 5]),
        ("selection", [0, 2]),
        ("selection", None),
        ("foil", [7]),
        ("foil", []),
    ],
)
def test_every_field_changes_the_key(field: str, value: object) -> None:
    base = make_key("seqsal", "saliency", BASE_FIELDS)
    assert make_key("seqsal", "saliency", dict(BASE_FIELDS, **{field: value})) != base


def test_key_is_unambiguous() -> None:
    base = make_key("seqsal", "saliency", BASE_FIELDS)
    missing_foil = {k: v for k, v in BASE_FIELDS.items() if k != "foil"}
    assert make_key("seqsal", "saliency", missing_foil) != base  # missing != None
    assert make_key("other", "saliency", BASE_FIELDS) != base
    assert make_key("seqsal", "inference", BASE_FIELDS) != base
    values = [1, 1.0, True, "1", [1], None, 0, False, 0.0, "", []]
    keys = {make_key("p", "n", {"x": v}) for v in values}
    assert len(keys) == len(values)
    split1 = make_key("p", "n", {"a": [1, 2], "b": []})
    split2 = make_key("p", "n", {"a": [1], "b": [2]})
    assert split1 != split2
    assert make_key("p", "n", {"a": "x,y"}) != make_key("p", "n", {"a": ["x", "y"]})


def test_key_rejects_ambiguous_or_unknown_values() -> None:
    with pytest.raises(TypeError):
        make_key("p", "n", {"params": {1: "x"}})
    with pytest.raises(TypeError):
        make_key("p", "n", {"ids": [1, {2: 3}]})
    with pytest.raises(TypeError):
        make_key("p", "n", {"x": object()})
    with pytest.raises(TypeError):
        make_key("p", "n", {"x": {1, 2}})


def test_key_of_long_id_lists_is_fast() -> None:
    ids = list(range(100_000, 110_000))
    fields = dict(BASE_FIELDS, prompt_ids=ids, target_ids=ids[:2000])
    start = time.perf_counter()
    for _ in range(10):
        make_key("seqsal", "saliency", fields)
    assert (time.perf_counter() - start) / 10 < 0.05


# ---------------------------------------------------------------------------
# in-process LRU
# ---------------------------------------------------------------------------


async def test_memory_cache_basic_and_counters() -> None:
    cache = InMemoryCache(1024)
    assert await cache.get("a") is None
    await cache.set("a", b"1")
    assert await cache.get("a") == b"1"
    await cache.set("a", b"22")
    assert await cache.get("a") == b"22"
    assert cache.size_bytes == len("a") + 2
    await cache.delete("a")
    await cache.delete("a")
    assert await cache.get("a") is None
    assert (cache.hits, cache.misses, cache.errors, cache.sets) == (2, 2, 0, 2)
    assert await cache.healthy()
    await cache.close()
    assert len(cache) == 0


async def test_memory_cache_evicts_least_recently_used_by_bytes() -> None:
    entry = 2 + 100  # key "kN" + value
    cache = InMemoryCache(3 * entry)
    for i in (1, 2, 3):
        await cache.set(f"k{i}", bytes(100))
    assert cache.size_bytes == 3 * entry
    assert await cache.get("k1") is not None  # k1 now most recent; k2 is the LRU
    await cache.set("k4", bytes(100))
    assert await cache.get("k2") is None
    assert all([await cache.get(k) for k in ("k1", "k3", "k4")])
    assert cache.evictions == 1 and cache.size_bytes == 3 * entry
    # One large entry pushes out as many as needed.
    await cache.set("big", bytes(2 * entry))
    assert cache.size_bytes <= 3 * entry and await cache.get("big") is not None
    assert len(cache) == 1
    # An entry larger than the bound is not stored, and drops an old value of its key.
    await cache.set("big", bytes(3 * entry))
    assert await cache.get("big") is None
    assert cache.size_bytes == 0


async def test_memory_cache_ttl() -> None:
    now = [1000.0]
    cache = InMemoryCache(1024, ttl_s=10, clock=lambda: now[0])
    await cache.set("a", b"x")
    now[0] += 9.9
    assert await cache.get("a") == b"x"
    now[0] += 0.2
    assert await cache.get("a") is None
    assert cache.size_bytes == 0
    forever = InMemoryCache(1024, ttl_s=0, clock=lambda: now[0])
    await forever.set("a", b"x")
    now[0] += 1e9
    assert await forever.get("a") == b"x"


async def test_memory_cache_real_clock_ttl() -> None:
    cache = InMemoryCache(1024, ttl_s=0.05)
    await cache.set("a", b"x")
    assert await cache.get("a") == b"x"
    await asyncio.sleep(0.08)
    assert await cache.get("a") is None


def test_memory_cache_from_threads() -> None:
    cache = InMemoryCache(50 * 110)

    def work(n: int) -> None:
        for i in range(2000):
            key = f"{n}-{i % 97}"
            cache.set_sync(key, bytes(100))
            cache.get_sync(key)
            if i % 7 == 0:
                cache.delete_sync(key)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert cache.size_bytes == sum(len(k) + 100 for k in cache._data)
    assert cache.size_bytes <= cache.max_bytes


def test_make_cache_from_settings() -> None:
    memory = make_cache(SaliencySettings(_env_file=None, redis_url=None, cache_max_mb=3, cache_ttl_s=60))
    assert isinstance(memory, InMemoryCache)
    assert (memory.max_bytes, memory.ttl_s) == (3 * 1024 * 1024, 60)
    remote = make_cache(
        SaliencySettings(
            _env_file=None, redis_url="redis://127.0.0.1:1/0", cache_ttl_s=5, redis_timeout_s=0.25
        )
    )
    assert isinstance(remote, RedisCache)
    assert (remote.ttl_s, remote.timeout_s) == (5, 0.25)


# ---------------------------------------------------------------------------
# codec
# ---------------------------------------------------------------------------


def _sample_arrays() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "saliency": rng.standard_normal((3, 5)).astype(np.float32),
        "transposed": np.arange(12, dtype=np.int64).reshape(3, 4).T,  # not C-contiguous
        "half": np.linspace(0, 1, 7, dtype=np.float16),
        "mask": np.array([True, False, True]),
        "big_endian": np.arange(4, dtype=">i4"),
        "scalar": np.array(2.5),
        "empty": np.zeros((0, 4), dtype=np.float32),
    }


SAMPLE_META = {"model_id": "m", "tokens": ["a", "é", "😀"], "steps": 16, "ratio": 0.5, "nested": {"x": None}}


def test_codec_round_trip() -> None:
    arrays = _sample_arrays()
    data = encode_entry(SAMPLE_META, arrays)
    assert data.startswith(ENTRY_MAGIC)
    meta, out = decode_entry(data)
    assert meta == SAMPLE_META
    assert list(out) == list(arrays)
    for name, arr in arrays.items():
        assert out[name].dtype == arr.dtype and out[name].shape == arr.shape, name
        np.testing.assert_array_equal(out[name], arr)
    out["saliency"][0, 0] = 42  # writable, independent of the encoded bytes
    assert decode_entry(data)[1]["saliency"][0, 0] != 42
    assert decode_entry(bytearray(data))[0] == SAMPLE_META
    assert decode_entry(encode_entry({}, {})) == ({}, {})


def test_codec_rejects_unsupported_values() -> None:
    with pytest.raises(ValueError):
        encode_entry({}, {"o": np.array([object()])})
    with pytest.raises(ValueError):
        encode_entry({}, {"s": np.array(["text"])})
    with pytest.raises(TypeError):
        encode_entry({"x": object()}, {})


def test_codec_detects_corruption() -> None:
    data = encode_entry(SAMPLE_META, _sample_arrays())
    # Every flipped byte is caught: magic, version, header length, header, payload, checksum.
    for pos in range(0, len(data), max(1, len(data) // 97)):
        corrupt = bytearray(data)
        corrupt[pos] ^= 0x01
        with pytest.raises(CorruptEntryError):
            decode_entry(bytes(corrupt))
    for length in (0, 1, 8, 13, 20, len(data) // 2, len(data) - 1):
        with pytest.raises(CorruptEntryError):
            decode_entry(data[:length])
    with pytest.raises(CorruptEntryError, match="magic"):
        decode_entry(b"NOTSEQSL" + data[8:])
    with pytest.raises(CorruptEntryError):
        decode_entry(b"hello world, a foreign value in our key space")
    with pytest.raises(CorruptEntryError):
        decode_entry(data + b"\x00")


def test_codec_checks_version_and_header_consistency() -> None:
    data = encode_entry({"a": 1}, {"x": np.arange(3, dtype=np.int32)})
    body = bytearray(data[:-32])
    body[8] = 99  # another format version, with a valid checksum
    with pytest.raises(CorruptEntryError, match="version"):
        decode_entry(bytes(body) + hashlib.sha256(body).digest())
    # A valid checksum over a header that does not match the payload.
    good_body = data[:-32]
    forged = good_body + b"\x00\x00\x00\x00"
    with pytest.raises(CorruptEntryError, match="header describes"):
        decode_entry(forged + hashlib.sha256(forged).digest())
    assert issubclass(CorruptEntryError, ValueError)


async def test_get_entry_deletes_corrupt_entry(caplog: pytest.LogCaptureFixture) -> None:
    cache = InMemoryCache(1 << 20)
    arrays = {"s": np.arange(6, dtype=np.float32).reshape(2, 3)}
    await put_entry(cache, "k", {"m": 1}, arrays)
    meta, out = await get_entry(cache, "k")  # type: ignore[misc]
    assert meta == {"m": 1}
    np.testing.assert_array_equal(out["s"], arrays["s"])
    assert await get_entry(cache, "missing") is None

    raw = bytearray(await cache.get("k"))  # type: ignore[arg-type]
    raw[-40] ^= 0xFF
    await cache.set("k", bytes(raw))
    with caplog.at_level(logging.WARNING, logger="seqsal.cache"):
        assert await get_entry(cache, "k") is None
    assert any("corrupt" in r.getMessage() for r in caplog.records)
    assert await cache.get("k") is None
    assert cache.corrupt == 1


# ---------------------------------------------------------------------------
# single flight
# ---------------------------------------------------------------------------


async def test_single_flight_computes_once() -> None:
    flight = SingleFlight()
    calls = 0
    release = asyncio.Event()

    async def compute() -> str:
        nonlocal calls
        calls += 1
        await release.wait()
        return "result"

    tasks = [asyncio.create_task(flight.run("k", compute)) for _ in range(10)]
    await _until(lambda: calls == 1)
    await asyncio.sleep(0.01)
    release.set()
    results = await asyncio.wait_for(asyncio.gather(*tasks), 2)
    assert calls == 1
    assert all(r == "result" for r, _ in results)
    assert sorted(shared for _, shared in results) == [False] + [True] * 9
    assert len(flight) == 0
    # Nothing is remembered: the next call computes again.
    assert await flight.run("k", compute) == ("result", False)
    assert calls == 2


async def test_single_flight_shares_exceptions_and_forgets_them() -> None:
    flight = SingleFlight()
    calls = 0
    release = asyncio.Event()

    async def failing() -> int:
        nonlocal calls
        calls += 1
        await release.wait()
        raise RuntimeError("boom")

    tasks = [asyncio.create_task(flight.run("k", failing)) for _ in range(10)]
    await _until(lambda: calls == 1)
    await asyncio.sleep(0.01)
    release.set()
    results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 2)
    assert calls == 1
    assert all(isinstance(r, RuntimeError) and str(r) == "boom" for r in results)
    assert len(flight) == 0

    async def ok() -> int:
        nonlocal calls
        calls += 1
        return 7

    assert await flight.run("k", ok) == (7, False)
    assert calls == 2


async def test_single_flight_cancelled_leader_followers_retry() -> None:
    flight = SingleFlight()
    calls = 0
    release = asyncio.Event()

    async def compute() -> int:
        nonlocal calls
        calls += 1
        mine = calls
        await release.wait()
        return mine

    leader = asyncio.create_task(flight.run("k", compute))
    await _until(lambda: calls == 1)
    followers = [asyncio.create_task(flight.run("k", compute)) for _ in range(5)]
    await asyncio.sleep(0.01)
    leader.cancel()
    with pytest.raises(asyncio.CancelledError):
        await leader
    await _until(lambda: calls == 2)  # one follower took over
    assert len(flight) == 1
    release.set()
    results = await asyncio.wait_for(asyncio.gather(*followers), 2)
    assert calls == 2
    assert all(r == 2 for r, _ in results)
    assert sorted(shared for _, shared in results) == [False] + [True] * 4
    assert len(flight) == 0


async def test_single_flight_cancelled_leader_alone_and_cancelled_follower() -> None:
    flight = SingleFlight()
    release = asyncio.Event()

    async def compute() -> str:
        await release.wait()
        return "done"

    lone = asyncio.create_task(flight.run("a", compute))
    await _until(lambda: len(flight) == 1)
    lone.cancel()
    with pytest.raises(asyncio.CancelledError):
        await lone
    assert len(flight) == 0

    leader = asyncio.create_task(flight.run("b", compute))
    await _until(lambda: len(flight) == 1)
    follower = asyncio.create_task(flight.run("b", compute))
    other = asyncio.create_task(flight.run("b", compute))
    await asyncio.sleep(0.01)
    follower.cancel()
    with pytest.raises(asyncio.CancelledError):
        await follower
    release.set()
    assert await asyncio.wait_for(leader, 2) == ("done", False)
    assert await asyncio.wait_for(other, 2) == ("done", True)
    assert len(flight) == 0


# ---------------------------------------------------------------------------
# Redis
# ---------------------------------------------------------------------------


@pytest.fixture
def key_prefix() -> Iterator[str]:
    """A unique key prefix; every key under it is deleted from the shared Redis afterwards."""
    prefix = f"seqsal-test-{uuid4().hex}"
    yield prefix
    if REDIS_AVAILABLE:
        client = redis.Redis.from_url(TEST_REDIS_URL, socket_timeout=2)
        try:
            keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
            if keys:
                client.delete(*keys)
        finally:
            client.close()


@pytest.fixture
def raw_redis() -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(TEST_REDIS_URL, socket_timeout=2)
    yield client
    client.close()


@pytest.mark.redis
@needs_redis
async def test_redis_round_trip_and_counters(key_prefix: str) -> None:
    cache = RedisCache(TEST_REDIS_URL, ttl_s=60, timeout_s=1)
    try:
        key = make_key(key_prefix, "t", {"x": 1})
        assert await cache.get(key) is None
        await cache.set(key, b"\x00value\xff")
        assert await cache.get(key) == b"\x00value\xff"
        await cache.delete(key)
        assert await cache.get(key) is None
        assert (cache.hits, cache.misses, cache.errors, cache.sets) == (1, 2, 0, 1)
        assert await cache.healthy()
        assert cache.available
    finally:
        await cache.close()


@pytest.mark.redis
@needs_redis
async def test_redis_ttl(key_prefix: str, raw_redis: redis.Redis) -> None:
    one_second = RedisCache(TEST_REDIS_URL, ttl_s=1, timeout_s=1)
    forever = RedisCache(TEST_REDIS_URL, ttl_s=0, timeout_s=1)
    short = RedisCache(TEST_REDIS_URL, ttl_s=0.2, timeout_s=1)
    try:
        k1, k2, k3 = (f"{key_prefix}:{n}" for n in ("one", "forever", "short"))
        await one_second.set(k1, b"x")
        await forever.set(k2, b"x")
        await short.set(k3, b"x")
        assert raw_redis.ttl(k1) == 1
        assert raw_redis.ttl(k2) == -1
        assert 0 < raw_redis.pttl(k3) <= 200
        await asyncio.sleep(0.35)
        assert await short.get(k3) is None
        assert await forever.get(k2) == b"x"
    finally:
        for c in (one_second, forever, short):
            await c.close()


@pytest.mark.redis
@needs_redis
async def test_redis_entries_and_corruption(key_prefix: str, caplog: pytest.LogCaptureFixture) -> None:
    cache = RedisCache(TEST_REDIS_URL, ttl_s=60, timeout_s=1)
    try:
        key = make_key(key_prefix, "saliency", BASE_FIELDS)
        arrays = _sample_arrays()
        await put_entry(cache, key, SAMPLE_META, arrays)
        meta, out = await get_entry(cache, key)  # type: ignore[misc]
        assert meta == SAMPLE_META
        for name, arr in arrays.items():
            np.testing.assert_array_equal(out[name], arr)
        await cache.set(key, b"foreign value")
        with caplog.at_level(logging.WARNING, logger="seqsal.cache"):
            assert await get_entry(cache, key) is None
        assert any("corrupt" in r.getMessage() for r in caplog.records)
        assert await cache.get(key) is None
    finally:
        await cache.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class OwnRedis:
    """A private redis-server on a fixed port that tests can stop and start."""

    def __init__(self) -> None:
        self.port = _free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        assert REDIS_SERVER is not None
        args = ["--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        self.proc = subprocess.Popen(
            [REDIS_SERVER, *args, "--daemonize", "no"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while not _redis_up(self.url):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not start on port {self.port}")
            time.sleep(0.02)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.proc = None


@pytest.fixture
def own_redis() -> Iterator[OwnRedis]:
    server = OwnRedis()
    server.start()
    yield server
    server.stop()


def _cache_records(caplog: pytest.LogCaptureFixture, level: int) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "seqsal.cache" and r.levelno == level]


@pytest.mark.redis
@needs_redis_server
async def test_redis_outage_and_recovery(
    own_redis: OwnRedis, key_prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="seqsal.cache")
    cache = RedisCache(own_redis.url, ttl_s=60, timeout_s=0.5, retry_after_s=0.3)
    key = f"{key_prefix}:k"
    try:
        await cache.set(key, b"before")
        assert await cache.get(key) == b"before"

        own_redis.stop()
        assert await cache.get(key) is None  # fails, opens the breaker
        await cache.set(key, b"during")  # does not raise
        await cache.delete(key)
        start = time.perf_counter()
        for _ in range(20):
            assert await cache.get(key) is None
        assert time.perf_counter() - start < 0.05  # breaker open: no waiting for timeouts
        assert not cache.available
        assert not await cache.healthy()
        assert cache.errors == 1 and cache.skipped >= 22

        await asyncio.sleep(0.35)  # breaker half-open; Redis still down: probe fails quietly
        assert await cache.get(key) is None
        assert cache.errors == 2
        assert len(_cache_records(caplog, logging.WARNING)) == 1  # one warning per outage

        own_redis.start()  # same port, empty data
        await asyncio.sleep(0.35)
        await cache.set(key, b"after")
        assert cache.available
        assert await cache.get(key) == b"after"
        assert await cache.healthy()
        assert len(_cache_records(caplog, logging.WARNING)) == 1
        assert any("recovered" in r.getMessage() for r in _cache_records(caplog, logging.INFO))
    finally:
        await cache.close()


async def test_redis_unresponsive_server_is_bounded_by_timeout(caplog: pytest.LogCaptureFixture) -> None:
    """A server that accepts connections but never answers costs one timeout, then nothing."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)  # never accepts: the handshake completes, no reply ever comes
    port = listener.getsockname()[1]
    cache = RedisCache(f"redis://127.0.0.1:{port}/0", timeout_s=0.2, retry_after_s=30)
    try:
        with caplog.at_level(logging.WARNING, logger="seqsal.cache"):
            start = time.perf_counter()
            assert await cache.get("k") is None
            assert time.perf_counter() - start < 1.0
            start = time.perf_counter()
            await cache.set("k", b"v")
            assert await cache.get("k") is None
            assert time.perf_counter() - start < 0.05
        assert len(_cache_records(caplog, logging.WARNING)) == 1
        assert cache.errors == 1
    finally:
        await cache.close()
        listener.close()


async def test_redis_refused_connection_never_raises(caplog: pytest.LogCaptureFixture) -> None:
    port = _free_port()  # nothing listens there
    cache = RedisCache(f"redis://user:secret@127.0.0.1:{port}/0", timeout_s=0.2)
    try:
        with caplog.at_level(logging.WARNING, logger="seqsal.cache"):
            assert await cache.get("k") is None
            await cache.set("k", b"v")
            await cache.delete("k")
            assert await get_entry(cache, "k") is None
            await put_entry(cache, "k", {}, {})
        records = _cache_records(caplog, logging.WARNING)
        assert len(records) == 1
        assert "secret" not in records[0].getMessage()
    finally:
        await cache.close()
