"""Result cache shared by the seqsal services.

Pieces, from the bottom up:

* :func:`make_key` builds a key from a versioned prefix and a sha256 over a
  canonical encoding of everything that determines a result (model id and
  revision, method and its parameters, prompt and target token ids, the
  selection and the foil).
* :class:`CacheBackend` stores opaque bytes. :class:`RedisCache` is used when a
  Redis URL is configured; :class:`InMemoryCache` (a byte-bounded LRU with TTL)
  is the embedded default. :func:`make_cache` picks one from the settings.
  Backends never raise for storage trouble: a failing Redis degrades to "no
  cache" (one warning per outage, a circuit breaker so a dead Redis costs no
  latency, an info line on recovery).
* :func:`encode_entry` / :func:`decode_entry` are the codec for cached values:
  magic, format version, JSON header (which names the key the entry was stored
  under), raw array bytes and a sha256 checksum, so a corrupt, truncated or
  foreign entry, or a valid entry found under another key, is detected and
  never returned.
  :func:`get_entry` / :func:`put_entry` combine codec and backend; a corrupt
  entry is logged, deleted and reported as a miss.
* :class:`SingleFlight` makes identical concurrent requests compute once.

Callers cache only successful results: :func:`put_entry` is called after a
computation succeeded, and :class:`SingleFlight` forgets a failed computation,
so errors are never cached.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
import struct
import threading
import time
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import numpy as np
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

if TYPE_CHECKING:
    from saliency_server.settings import SaliencySettings

__all__ = [
    "CACHE_FORMAT_VERSION",
    "ENTRY_FORMAT_VERSION",
    "ENTRY_MAGIC",
    "CacheBackend",
    "CorruptEntryError",
    "InMemoryCache",
    "RedisCache",
    "SingleFlight",
    "decode_entry",
    "encode_entry",
    "get_entry",
    "make_cache",
    "make_key",
    "put_entry",
]

logger = logging.getLogger("seqsal.cache")

T = TypeVar("T")

#: Part of every key; bump it when the meaning or encoding of cached values changes,
#: so old entries are simply never found again.
CACHE_FORMAT_VERSION = "v2"

# ---------------------------------------------------------------------------
# keys
# ---------------------------------------------------------------------------

_SCALAR_TYPES = frozenset({str, int, float, bool, type(None)})


def _check_key_fields(value: object, path: str) -> None:
    """Reject what JSON would encode ambiguously: non-str dict keys (``{1: x}`` vs ``{"1": x}``)."""
    if isinstance(value, Mapping):
        for k, v in value.items():
            if not isinstance(k, str):
                raise TypeError(f"cache key field {path}: dict keys must be str, got {type(k).__name__}")
            if type(v) not in _SCALAR_TYPES:
                _check_key_fields(v, f"{path}.{k}")
    # Fast path for long lists of token ids: one C-level pass over the element types.
    elif isinstance(value, list | tuple) and not set(map(type, value)) <= _SCALAR_TYPES:
        for i, item in enumerate(value):
            if type(item) not in _SCALAR_TYPES:
                _check_key_fields(item, f"{path}[{i}]")


def _json_default(value: object) -> object:
    """Encode numpy values as the Python values they stand for; refuse anything else."""
    if isinstance(value, np.ndarray):
        if value.dtype.kind not in "biuf":
            raise TypeError(f"cache key fields cannot hold {value.dtype} arrays")
        return value.tolist()
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    raise TypeError(f"cache key fields cannot hold {type(value).__name__} values")


def make_key(prefix: str, namespace: str, fields: Mapping[str, object]) -> str:
    """The cache key ``f"{prefix}:{CACHE_FORMAT_VERSION}:{namespace}:{sha256hex}"``.

    The sha256 runs over a canonical JSON encoding of ``fields``: keys sorted,
    no whitespace, ASCII only. Values may be ``str``, ``int``, ``float``,
    ``bool``, ``None``, lists (or tuples) of those, nested dicts with ``str``
    keys, and numpy scalars/arrays (encoded as their Python values). The
    encoding is unambiguous: ``1``, ``1.0``, ``True`` and ``"1"`` all differ,
    list order matters, and a missing field differs from a ``None`` one.

    Raises:
        TypeError: a value of another type, or a dict with non-str keys.
    """
    _check_key_fields(fields, "fields")
    canonical = json.dumps(
        fields, sort_keys=True, separators=(",", ":"), ensure_ascii=True, default=_json_default
    )
    digest = hashlib.sha256(canonical.encode("ascii")).hexdigest()
    return f"{prefix}:{CACHE_FORMAT_VERSION}:{namespace}:{digest}"


# ---------------------------------------------------------------------------
# backends
# ---------------------------------------------------------------------------


class CacheBackend(ABC):
    """Stores opaque bytes under string keys.

    Implementations never raise for storage trouble (an unreachable server, a
    timeout): ``get`` then returns ``None`` and ``set``/``delete`` do nothing.

    Counters, read by metrics (monotonic, per process):

    * ``hits`` / ``misses``: ``get`` calls that returned a value / ``None``
      (for any reason, failures included);
    * ``errors``: storage operations that failed;
    * ``sets``: values stored;
    * ``corrupt``: entries :func:`get_entry` found corrupt and deleted.
    """

    name: str = "abstract"

    def __init__(self) -> None:
        self.hits = 0
        self.misses = 0
        self.errors = 0
        self.sets = 0
        self.corrupt = 0

    @abstractmethod
    async def get(self, key: str) -> bytes | None:
        """The value stored under ``key``, or ``None`` if absent, expired or unavailable."""

    @abstractmethod
    async def set(self, key: str, value: bytes) -> None:
        """Store ``value`` under ``key`` (replacing any old value), with the backend's TTL."""

    @abstractmethod
    async def delete(self, key: str) -> None:
        """Remove ``key`` if present."""

    @abstractmethod
    async def healthy(self) -> bool:
        """Whether the backend works right now. For metrics and logs only, never for health checks."""

    @abstractmethod
    async def close(self) -> None:
        """Release connections; the backend must not be used afterwards."""


class InMemoryCache(CacheBackend):
    """In-process LRU cache bounded by total bytes, with an optional TTL.

    The size of an entry is ``len(key) + len(value)``; when the total exceeds
    ``max_bytes`` the least recently used entries are evicted. An entry larger
    than ``max_bytes`` on its own is not stored. ``ttl_s`` of 0 means entries
    never expire. All state is guarded by a lock, so the cache may be used from
    the event loop and from worker threads alike (the async methods never
    block for long: they do no I/O).

    Args:
        max_bytes: memory bound, in bytes.
        ttl_s: entry lifetime in seconds; 0 = forever.
        clock: monotonic clock, replaceable in tests.
    """

    name = "memory"

    def __init__(
        self, max_bytes: int, ttl_s: float = 0, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        super().__init__()
        if max_bytes < 0:
            raise ValueError("max_bytes must be >= 0")
        if ttl_s < 0:
            raise ValueError("ttl_s must be >= 0")
        self.max_bytes = max_bytes
        self.ttl_s = ttl_s
        self.evictions = 0
        self._clock = clock
        self._lock = threading.Lock()
        # key -> (value, expires_at); most recently used last.
        self._data: OrderedDict[str, tuple[bytes, float]] = OrderedDict()
        self._size = 0

    @property
    def size_bytes(self) -> int:
        """Bytes currently accounted to stored entries."""
        return self._size

    def __len__(self) -> int:
        return len(self._data)

    def _remove(self, key: str) -> None:
        item = self._data.pop(key, None)
        if item is not None:
            self._size -= len(key) + len(item[0])

    def get_sync(self, key: str) -> bytes | None:
        """:meth:`get` for callers in worker threads."""
        with self._lock:
            item = self._data.get(key)
            if item is not None and item[1] <= self._clock():
                self._remove(key)
                item = None
            if item is None:
                self.misses += 1
                return None
            self._data.move_to_end(key)
            self.hits += 1
            return item[0]

    def set_sync(self, key: str, value: bytes) -> None:
        """:meth:`set` for callers in worker threads."""
        value = bytes(value)
        size = len(key) + len(value)
        expires_at = self._clock() + self.ttl_s if self.ttl_s > 0 else math.inf
        with self._lock:
            self._remove(key)
            if size > self.max_bytes:
                return
            self._data[key] = (value, expires_at)
            self._size += size
            self.sets += 1
            while self._size > self.max_bytes:
                old_key, _ = next(iter(self._data.items()))
                self._remove(old_key)
                self.evictions += 1

    def delete_sync(self, key: str) -> None:
        """:meth:`delete` for callers in worker threads."""
        with self._lock:
            self._remove(key)

    def clear(self) -> None:
        """Remove every entry."""
        with self._lock:
            self._data.clear()
            self._size = 0

    async def get(self, key: str) -> bytes | None:
        """The value under ``key`` (marking it recently used), or ``None`` if absent or expired."""
        return self.get_sync(key)

    async def set(self, key: str, value: bytes) -> None:
        """Store ``value``, evicting least recently used entries beyond ``max_bytes``."""
        self.set_sync(key, value)

    async def delete(self, key: str) -> None:
        """Remove ``key`` if present."""
        self.delete_sync(key)

    async def healthy(self) -> bool:
        """Always ``True``."""
        return True

    async def close(self) -> None:
        """Drop all entries."""
        self.clear()


def _redact_url(url: str) -> str:
    """``url`` with any password replaced by ``***``, for logs."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparsable url>"
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


class RedisCache(CacheBackend):
    """Redis backend (``redis.asyncio``), degrading to "no cache" when Redis fails.

    Keys are used as given (:func:`make_key` already puts the prefix in).
    Values are stored with ``SET ... EX ttl_s`` (``PX`` for fractional TTLs);
    ``ttl_s`` of 0 means no expiry.

    Every operation is bounded: ``timeout_s`` is the socket connect and read
    timeout, and an outer guard of ``2 * timeout_s`` bounds the whole call
    (connect plus command). A dropped pooled connection is retried once at
    once; there are no other retries.

    Any Redis, OS or timeout error is swallowed: ``get`` returns ``None`` and
    ``set``/``delete`` do nothing. The first failure of an outage logs one
    warning on the ``seqsal.cache`` logger and opens a circuit breaker: for
    ``retry_after_s`` seconds every call skips Redis (counted in ``skipped``),
    so a dead Redis costs no latency. After that one call probes Redis (the
    others keep skipping while it runs); if it fails the breaker opens again
    without a new warning, and if it succeeds an info line says Redis
    recovered and caching resumes.

    Args:
        url: Redis URL, e.g. ``redis://host:6379/0``.
        ttl_s: entry lifetime in seconds; 0 = forever.
        timeout_s: socket connect/read timeout of each operation.
        retry_after_s: how long the breaker skips Redis after a failure.
    """

    name = "redis"

    def __init__(
        self, url: str, *, ttl_s: float = 0, timeout_s: float = 0.5, retry_after_s: float = 5.0
    ) -> None:
        super().__init__()
        if ttl_s < 0:
            raise ValueError("ttl_s must be >= 0")
        if timeout_s <= 0:
            raise ValueError("timeout_s must be > 0")
        if retry_after_s < 0:
            raise ValueError("retry_after_s must be >= 0")
        self.url = url
        self.ttl_s = ttl_s
        self.timeout_s = timeout_s
        self.retry_after_s = retry_after_s
        self.skipped = 0
        self._safe_url = _redact_url(url)
        self._down = False
        self._open_until = 0.0
        self._client = aioredis.Redis.from_url(
            url,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
        )

    @property
    def available(self) -> bool:
        """``False`` while an outage is known (the breaker is open or probing)."""
        return not self._down

    async def _call(self, what: str, op: Callable[[], Awaitable[T]]) -> tuple[bool, T | None]:
        """Run ``op`` under the breaker and the time bound; ``(ok, result)``, never raising."""
        if self._down:
            now = time.monotonic()
            if now < self._open_until:
                self.skipped += 1
                return False, None
            # Half-open: this call probes; the others keep skipping until it is done.
            self._open_until = now + self.retry_after_s
        try:
            async with asyncio.timeout(2 * self.timeout_s):
                result = await op()
        except (RedisError, OSError, TimeoutError) as exc:
            self.errors += 1
            self._open_until = time.monotonic() + self.retry_after_s
            if not self._down:
                self._down = True
                logger.warning(
                    "Redis cache at %s failed on %s (%s: %s); serving uncached, retrying every %g s",
                    self._safe_url,
                    what,
                    type(exc).__name__,
                    exc,
                    self.retry_after_s,
                )
            else:
                logger.debug("Redis cache at %s still failing on %s: %r", self._safe_url, what, exc)
            return False, None
        if self._down:
            self._down = False
            self._open_until = 0.0
            logger.info("Redis cache at %s recovered; caching resumed", self._safe_url)
        return True, result

    async def get(self, key: str) -> bytes | None:
        """The value under ``key``, or ``None`` if absent, expired or Redis is unavailable."""
        _, value = await self._call("GET", lambda: self._client.get(key))
        if value is None:
            self.misses += 1
            return None
        self.hits += 1
        return bytes(value)

    async def set(self, key: str, value: bytes) -> None:
        """Store ``value`` with the TTL; does nothing if Redis is unavailable."""
        ttl = self.ttl_s
        if ttl <= 0:
            op = lambda: self._client.set(key, value)  # noqa: E731
        elif float(ttl).is_integer():
            op = lambda: self._client.set(key, value, ex=int(ttl))  # noqa: E731
        else:
            op = lambda: self._client.set(key, value, px=max(1, round(ttl * 1000)))  # noqa: E731
        ok, _ = await self._call("SET", op)
        if ok:
            self.sets += 1

    async def delete(self, key: str) -> None:
        """Remove ``key``; does nothing if Redis is unavailable."""
        await self._call("DEL", lambda: self._client.delete(key))

    async def healthy(self) -> bool:
        """``PING`` under the breaker: ``False`` while Redis is known to be down."""
        ok, _ = await self._call("PING", lambda: self._client.ping())
        return ok

    async def close(self) -> None:
        """Close the connection pool."""
        try:
            await self._client.aclose()
        except (RedisError, OSError) as exc:  # pragma: no cover - closing a broken pool
            logger.debug("closing Redis client: %r", exc)


def make_cache(settings: SaliencySettings) -> CacheBackend:
    """The configured backend: Redis if ``settings.redis_url`` is set, else an in-process LRU.

    The LRU is bounded by ``settings.cache_max_mb`` MiB; both use ``settings.cache_ttl_s``.
    """
    if settings.redis_url:
        cache: CacheBackend = RedisCache(
            settings.redis_url, ttl_s=settings.cache_ttl_s, timeout_s=settings.redis_timeout_s
        )
        logger.info("cache: Redis at %s, ttl %d s", _redact_url(settings.redis_url), settings.cache_ttl_s)
        return cache
    logger.info("cache: in-process LRU, %d MiB, ttl %d s", settings.cache_max_mb, settings.cache_ttl_s)
    return InMemoryCache(settings.cache_max_mb * 1024 * 1024, settings.cache_ttl_s)


# ---------------------------------------------------------------------------
# entry codec
# ---------------------------------------------------------------------------

#: First bytes of every encoded entry.
ENTRY_MAGIC = b"SQSLCACH"
#: Version of the entry layout; decoding any other version fails.
ENTRY_FORMAT_VERSION = 2

# magic, version (u16), header length (u32); little-endian.
_PREFIX = struct.Struct("<8sHI")
_DIGEST_SIZE = 32
_ALLOWED_DTYPE_KINDS = "biufc"


class CorruptEntryError(ValueError):
    """A cached value is corrupt, truncated or not an entry of this format version."""


def encode_entry(meta: Mapping[str, object], arrays: Mapping[str, np.ndarray], *, key: str = "") -> bytes:
    """Encode ``meta`` and ``arrays`` into one self-describing, checksummed byte string.

    Layout: ``ENTRY_MAGIC``, format version (u16 LE), header length (u32 LE),
    the UTF-8 JSON header ``{"key": key, "meta": ..., "arrays": [{"name", "dtype",
    "shape"}, ...]}``, each array's raw C-order bytes in header order, and
    finally the sha256 of everything before it. Dtypes keep their byte order
    (``dtype.str``), so entries are portable between machines.

    Raises:
        TypeError: ``meta`` is not JSON-serializable.
        ValueError: an array has an unsupported dtype (object, void, string...).
    """
    specs: list[dict[str, Any]] = []
    blobs: list[Any] = []
    for name, array in arrays.items():
        arr = np.asarray(array)
        if arr.dtype.kind not in _ALLOWED_DTYPE_KINDS:
            raise ValueError(f"array {name!r}: unsupported dtype {arr.dtype}")
        specs.append({"name": str(name), "dtype": arr.dtype.str, "shape": list(arr.shape)})
        # C-contiguous arrays expose their buffer as is: no copy before the join.
        blobs.append(np.ascontiguousarray(arr) if arr.size else b"")
    header = json.dumps(
        {"key": key, "meta": dict(meta), "arrays": specs}, separators=(",", ":"), ensure_ascii=False
    ).encode("utf-8")
    body = b"".join([_PREFIX.pack(ENTRY_MAGIC, ENTRY_FORMAT_VERSION, len(header)), header, *blobs])
    return body + hashlib.sha256(body).digest()


def decode_entry(data: bytes, *, key: str | None = None) -> tuple[dict, dict[str, np.ndarray]]:
    """Decode what :func:`encode_entry` produced: ``(meta, arrays)``.

    The arrays are writable and independent of ``data``. With ``key``, the entry must
    have been encoded for that key: a valid entry copied under another key (by a bug,
    a migration or by hand) would otherwise be served as this key's result.

    Raises:
        CorruptEntryError: bad magic, other format version, checksum mismatch,
            truncation, a malformed header, or an entry stored for another key.
    """
    view = memoryview(data)
    if len(view) < _PREFIX.size + _DIGEST_SIZE:
        raise CorruptEntryError(f"entry too short ({len(view)} bytes)")
    magic, version, header_len = _PREFIX.unpack_from(view, 0)
    if magic != ENTRY_MAGIC:
        raise CorruptEntryError("not a seqsal cache entry (bad magic)")
    if version != ENTRY_FORMAT_VERSION:
        raise CorruptEntryError(f"entry format version {version}, expected {ENTRY_FORMAT_VERSION}")
    body = view[:-_DIGEST_SIZE]
    if hashlib.sha256(body).digest() != view[-_DIGEST_SIZE:]:
        raise CorruptEntryError("checksum mismatch (corrupt or truncated entry)")
    start = _PREFIX.size
    if start + header_len > len(body):
        raise CorruptEntryError("header extends past the end of the entry")
    try:
        header = json.loads(bytes(body[start : start + header_len]).decode("utf-8"))
        meta = header["meta"]
        specs = header["arrays"]
        if not isinstance(meta, dict) or not isinstance(specs, list):
            raise TypeError("meta must be an object and arrays a list")
        stored_for = header.get("key", "")
        layout: list[tuple[str, np.dtype, tuple[int, ...], int]] = []
        total = 0
        for spec in specs:
            dtype = np.dtype(spec["dtype"])
            if dtype.kind not in _ALLOWED_DTYPE_KINDS:
                raise TypeError(f"unsupported dtype {dtype}")
            shape = tuple(int(n) for n in spec["shape"])
            if any(n < 0 for n in shape):
                raise ValueError(f"negative dimension in {shape}")
            nbytes = math.prod(shape) * dtype.itemsize
            layout.append((str(spec["name"]), dtype, shape, nbytes))
            total += nbytes
    except (ValueError, TypeError, KeyError, UnicodeDecodeError) as exc:
        raise CorruptEntryError(f"malformed entry header: {exc}") from exc
    if key is not None and stored_for != key:
        raise CorruptEntryError(f"entry was stored for another key ({str(stored_for)[-16:]!r})")
    payload_start = start + header_len
    if payload_start + total != len(body):
        raise CorruptEntryError(f"array data is {len(body) - payload_start} bytes, header describes {total}")
    # One copy of the payload; the arrays are writable views into it.
    payload = bytearray(body[payload_start:])
    arrays: dict[str, np.ndarray] = {}
    offset = 0
    for name, dtype, shape, nbytes in layout:
        count = nbytes // dtype.itemsize if dtype.itemsize else 0
        arrays[name] = np.frombuffer(payload, dtype=dtype, count=count, offset=offset).reshape(shape)
        offset += nbytes
    return meta, arrays


async def get_entry(cache: CacheBackend, key: str) -> tuple[dict, dict[str, np.ndarray]] | None:
    """Fetch and decode the entry under ``key``; ``None`` on a miss.

    A corrupt or foreign entry is never returned: it is logged as a warning,
    deleted, counted in ``cache.corrupt`` and reported as a miss.
    """
    data = await cache.get(key)
    if data is None:
        return None
    try:
        return decode_entry(data, key=key)
    except CorruptEntryError as exc:
        cache.corrupt += 1
        logger.warning("dropping corrupt cache entry %s from %s: %s", key, cache.name, exc)
        await cache.delete(key)
        return None


async def put_entry(
    cache: CacheBackend, key: str, meta: Mapping[str, object], arrays: Mapping[str, np.ndarray]
) -> None:
    """Encode ``meta`` and ``arrays`` and store them under ``key``. Call it only with successful results."""
    await cache.set(key, encode_entry(meta, arrays, key=key))


# ---------------------------------------------------------------------------
# single flight
# ---------------------------------------------------------------------------


class _LeaderGone(Exception):
    """Set on the shared future when the leader was cancelled: followers retry."""


class SingleFlight:
    """Identical concurrent calls compute once.

    The first caller of :meth:`run` for a key (the leader) runs ``compute`` in
    its own task; callers arriving while it runs (followers) wait for its
    outcome. Nothing is remembered afterwards: the next call computes again
    (put results in the cache for that).

    * Success: every caller gets the result; ``shared`` is ``False`` for the
      leader and ``True`` for the followers.
    * ``compute`` raises: every caller gets the same exception, and the key is
      forgotten, so the next call recomputes (errors are never cached).
    * The leader is cancelled (its client went away): the followers **retry**:
      the first of them becomes the new leader and runs its own ``compute``,
      the others wait for it. Nobody is left hanging and nobody gets a
      ``CancelledError`` that was not meant for them.
    * A follower is cancelled: only that follower stops; the computation goes on.

    The in-flight entry is removed whenever the leader finishes, however it
    finishes. Use one instance per event loop; it is not thread-safe.
    """

    def __init__(self) -> None:
        self._inflight: dict[str, asyncio.Future[Any]] = {}

    def __len__(self) -> int:
        """Keys being computed right now."""
        return len(self._inflight)

    async def run(self, key: str, compute: Callable[[], Awaitable[T]]) -> tuple[T, bool]:
        """``(result, shared)``: run ``compute`` or join an identical call in flight."""
        while True:
            future = self._inflight.get(key)
            if future is None:
                break
            try:
                # shield: a cancelled follower must not cancel the shared future.
                return await asyncio.shield(future), True
            except _LeaderGone:
                continue

        future = asyncio.get_running_loop().create_future()
        self._inflight[key] = future
        try:
            result = await compute()
        except Exception as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: no "never retrieved" log when nobody waits
            raise
        except BaseException:  # cancelled (or the process is exiting): followers retry
            future.set_exception(_LeaderGone())
            future.exception()
            raise
        else:
            future.set_result(result)
            return result, False
        finally:
            if self._inflight.get(key) is future:
                del self._inflight[key]
