"""Saved sessions in Redis, shared by every UI process that uses it (:mod:`ui.sessions_store`).

Layout (``v2``), under the cache's key prefix; every time is Redis's own clock (``TIME`` in the
scripts), so a key's expiry and its index entry always agree:

* ``<prefix>:ui-sessions:v2:session:<name>``: a hash of ``rev`` (changes with every save),
  ``meta`` (JSON: saved_at, saved_by) and ``body`` (the session's JSON), with the session's
  lifetime as the key's expiry (``PEXPIREAT``; none when the lifetime is 0).
* ``<prefix>:ui-sessions:v2:index``: a sorted set of the names, scored by the same expiry in
  milliseconds (``+inf`` = kept until deleted). Listing removes the entries past their time
  (Redis 7.0 has no per-field expiry in a hash, so every session is a key of its own and the
  index is pruned), and any whose key is gone.

Saving, opening (which restarts the lifetime) and moving an old entry are Lua scripts, each one
atomic step: a name's check and its write cannot interleave with another UI process's save.

Sessions saved before lifetimes existed (``v1``: one hash ``<prefix>:ui-sessions:v1`` of name ->
JSON and ``…:v1:saved-at`` of name -> time) are moved into this layout by the first operation
that finds them, each with a full lifetime from then; an entry is removed from the old hash only
if it is still the one read (an older UI process writing it meanwhile is moved on the next call).
"""

from __future__ import annotations

import json
import math
from typing import Any

from ui.sessions_store import (
    REDIS_TIMEOUT_S,
    NameTaken,
    SavedSession,
    SessionInfo,
    StoreError,
    decode,
    encode,
    new_rev,
    newest_first,
)

#: Sets the key's expiry and its index entry from one reading of Redis's clock (KEYS: key, index).
_KEEP = """
local function keep(key, index, name, ttl_ms)
  if ttl_ms > 0 then
    local t = redis.call('TIME')
    local at = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + ttl_ms
    redis.call('PEXPIREAT', key, at)
    redis.call('ZADD', index, at, name)
    return tostring(at)
  end
  redis.call('PERSIST', key)
  redis.call('ZADD', index, '+inf', name)
  return 'inf'
end
"""

#: KEYS: session key, index. ARGV: name, new rev, meta, body, ttl ms, rev it may replace ('' = none).
#: Returns {1, expiry} when written, {0, rev, meta, expiry} of the session kept instead.
_SAVE = (
    _KEEP
    + """
local current = redis.call('HGET', KEYS[1], 'rev')
if current and current ~= ARGV[6] then
  return {0, current, redis.call('HGET', KEYS[1], 'meta'), redis.call('ZSCORE', KEYS[2], ARGV[1])}
end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'rev', ARGV[2], 'meta', ARGV[3], 'body', ARGV[4])
return {1, keep(KEYS[1], KEYS[2], ARGV[1], tonumber(ARGV[5]))}
"""
)

#: KEYS: session key, index. ARGV: name, ttl ms. The body, its lifetime restarted; nil when gone.
_OPEN = (
    _KEEP
    + """
local body = redis.call('HGET', KEYS[1], 'body')
if not body then
  redis.call('ZREM', KEYS[2], ARGV[1])
  return false
end
keep(KEYS[1], KEYS[2], ARGV[1], tonumber(ARGV[2]))
return body
"""
)

#: KEYS: index. Drops the entries past their time; the rest as name, score pairs.
_LIST = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
return redis.call('ZRANGE', KEYS[1], 0, -1, 'WITHSCORES')
"""

#: KEYS: session key, index. ARGV: name. Drops an index entry whose key is gone.
_FORGET = """
if redis.call('EXISTS', KEYS[1]) == 0 then redis.call('ZREM', KEYS[2], ARGV[1]) end
return 0
"""

#: KEYS: old hash, old stamps, session key, index. ARGV: name, body read, rev, meta, ttl ms.
#: Moves one old entry if it is still the one read; a session already in the new layout wins.
_MOVE = (
    _KEEP
    + """
if redis.call('HGET', KEYS[1], ARGV[1]) ~= ARGV[2] then return 0 end
if redis.call('EXISTS', KEYS[3]) == 0 then
  redis.call('HSET', KEYS[3], 'rev', ARGV[3], 'meta', ARGV[4], 'body', ARGV[2])
  keep(KEYS[3], KEYS[4], ARGV[1], tonumber(ARGV[5]))
end
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[2], ARGV[1])
return 1
"""
)


def _text(value: bytes | str) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else value


def _expiry_s(score: bytes | str | float | None) -> float | None:
    """An index score (ms, or inf) as epoch seconds; None = kept until deleted (or unknown)."""
    if score is None:
        return None
    value = float(_text(score)) if isinstance(score, bytes | str) else float(score)
    return None if math.isinf(value) else value / 1000.0


def _meta(session: SavedSession) -> str:
    return json.dumps({"saved_at": session.saved_at, "saved_by": session.saved_by}, ensure_ascii=False)


def _info(name: str, rev: bytes | str, meta: bytes | str | None, score: Any) -> SessionInfo:
    try:
        raw = json.loads(meta) if meta is not None else {}
        saved_at, saved_by = float(raw.get("saved_at", 0.0)), str(raw.get("saved_by", ""))
    except (ValueError, TypeError, AttributeError):
        saved_at, saved_by = 0.0, ""
    return SessionInfo(
        name=name, saved_at=saved_at, saved_by=saved_by, expires_at=_expiry_s(score), rev=_text(rev)
    )


class RedisStore:
    """Sessions in Redis, a key each with its lifetime, shared by every UI process using this Redis."""

    shared = True

    def __init__(self, url: str, prefix: str, ttl_s: float) -> None:
        import redis  # only the UI processes that save sessions to Redis need it

        self.ttl_s = ttl_s
        self._errors: tuple[type[BaseException], ...] = (redis.RedisError, OSError)
        base = f"{prefix}:ui-sessions"
        self.index_key = f"{base}:v2:index"
        self._session_prefix = f"{base}:v2:session:"
        #: The layout before lifetimes (read and moved, never written).
        self.legacy_key = f"{base}:v1"
        self.legacy_stamps_key = f"{self.legacy_key}:saved-at"
        self._client = redis.Redis.from_url(
            url, socket_timeout=REDIS_TIMEOUT_S, socket_connect_timeout=REDIS_TIMEOUT_S
        )
        self._save = self._client.register_script(_SAVE)
        self._open = self._client.register_script(_OPEN)
        self._list = self._client.register_script(_LIST)
        self._forget = self._client.register_script(_FORGET)
        self._move = self._client.register_script(_MOVE)

    def session_key(self, name: str | bytes) -> bytes:
        return self._session_prefix.encode("utf-8") + (
            name if isinstance(name, bytes) else name.encode("utf-8")
        )

    @property
    def _ttl_ms(self) -> int:
        return max(0, round(self.ttl_s * 1000))

    def _do(self, what: str, op: Any) -> Any:
        try:
            self._move_old()
            return op()
        except self._errors as exc:
            raise StoreError(
                f"Could not {what}: the Redis server did not answer ({type(exc).__name__}). "
                "Check that it runs (REDIS_URL)."
            ) from None

    def _move_old(self) -> None:
        """Move the sessions saved in the old layout into this one (one EXISTS when there are none)."""
        if not self._client.exists(self.legacy_key):
            return
        stamps = self._client.hgetall(self.legacy_stamps_key)
        for name, body in self._client.hgetall(self.legacy_key).items():
            try:
                saved_at = float(stamps[name])
            except (KeyError, ValueError):
                try:
                    saved_at = decode(body).saved_at
                except StoreError:
                    saved_at = 0.0
            meta = json.dumps({"saved_at": saved_at, "saved_by": ""})
            self._move(
                keys=[self.legacy_key, self.legacy_stamps_key, self.session_key(name), self.index_key],
                args=[name, body, new_rev(), meta, self._ttl_ms],
            )

    def save(self, session: SavedSession, replace: SessionInfo | None = None) -> SessionInfo:
        rev = new_rev()
        allowed = replace.rev if replace is not None else ""

        def op() -> list[Any]:
            return list(
                self._save(
                    keys=[self.session_key(session.name), self.index_key],
                    args=[session.name, rev, _meta(session), encode(session), self._ttl_ms, allowed],
                )
            )

        reply = self._do("save the session", op)
        if int(reply[0]) != 1:
            existing = _info(session.name, reply[1], reply[2], reply[3] if len(reply) > 3 else None)
            raise NameTaken(existing)
        return SessionInfo(
            name=session.name,
            saved_at=session.saved_at,
            saved_by=session.saved_by,
            expires_at=_expiry_s(reply[1]),
            rev=rev,
        )

    def list_sessions(self) -> list[SessionInfo]:
        def op() -> list[SessionInfo]:
            flat = self._list(keys=[self.index_key])
            scored = list(zip(flat[0::2], flat[1::2], strict=True))
            with self._client.pipeline(transaction=False) as pipe:
                for name, _ in scored:
                    pipe.hmget(self.session_key(name), ["rev", "meta"])
                fields = pipe.execute()
            out = []
            for (name, score), (rev, meta) in zip(scored, fields, strict=True):
                if rev is None:  # its key is gone (deleted or expired between the two calls)
                    self._forget(keys=[self.session_key(name), self.index_key], args=[name])
                    continue
                try:
                    out.append(_info(_text(name), rev, meta, score))
                except UnicodeDecodeError:
                    continue
            return out

        return newest_first(self._do("list the saved sessions", op))

    def load(self, name: str) -> SavedSession | None:
        text = self._do(
            "open the session",
            lambda: self._open(keys=[self.session_key(name), self.index_key], args=[name, self._ttl_ms]),
        )
        return None if text is None else decode(text)

    def delete(self, name: str) -> None:
        def op() -> None:
            with self._client.pipeline() as pipe:
                pipe.delete(self.session_key(name))
                pipe.zrem(self.index_key, name)
                pipe.hdel(self.legacy_key, name)
                pipe.hdel(self.legacy_stamps_key, name)
                pipe.execute()

        self._do("delete the session", op)
