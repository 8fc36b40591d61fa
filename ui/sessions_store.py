"""Named sessions a team shares: the whole view (prompt, target, selection, settings, pinned side)
and the responses it showed, saved under a name and listed for everyone on the same instance.

With a Redis configured (the cache's ``REDIS_URL``, key prefix ``SEQSAL_CACHE_PREFIX``) sessions
live in one Redis hash, ``<prefix>:ui-sessions:v1`` (name -> JSON), shared by every UI process
that uses that Redis, and survive restarts; they do not expire (the cache's entries do), so
delete the ones you no longer need. Without Redis they are kept in this UI process only (every
browser session of this process sees them; a restart loses them), and the page says so.

A saved view is the link's query (:func:`ui.state.to_query`) with every field spelled out
against the defaults (so a changed examples file cannot change it) and the long texts a link
leaves out put back, read back with the link's own checks (:func:`ui.state.from_query`); the
generations are saved too, so a teammate sees the very response you saw, without generating.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Protocol

from ui.generation import CandidateText, Generation
from ui.state import SideState, ViewState, from_query, to_query

KEY_VERSION = "v1"
MAX_NAME_CHARS = 80
#: Timeout of each Redis operation (seconds): a dead Redis must not hang the page.
REDIS_TIMEOUT_S = 2.0


class StoreError(RuntimeError):
    """Saving or reading sessions failed: plain words for the page."""


@dataclass(frozen=True)
class SavedSession:
    """One named session: the view and, per side ("main", "pin"), the generation it showed."""

    name: str
    view: ViewState
    generations: dict[str, Generation] = field(default_factory=dict)
    saved_at: float = field(default_factory=time.time)
    #: Notes about anything in the stored view that could not be used (as for a link).
    notes: tuple[str, ...] = ()


def check_name(name: str) -> str:
    """The name to save under (trimmed); ``ValueError`` with the fix when it cannot be used."""
    text = " ".join(name.split())
    if not text:
        raise ValueError("Give the session a name.")
    if len(text) > MAX_NAME_CHARS:
        raise ValueError(f"The name is {len(text)} characters long; use at most {MAX_NAME_CHARS}.")
    return text


def _side_query(side: SideState, prefix: str) -> dict[str, str]:
    return {
        f"{prefix}ex": side.example_id,
        f"{prefix}prompt": side.prompt,
        f"{prefix}ref": side.reference,
        f"{prefix}foil": side.foil,
    }


def _full_query(view: ViewState) -> dict[str, str]:
    """The view's query, every field against the defaults, no text left out for length."""
    q = to_query(view, {})
    q.update(_side_query(view.current, ""))
    if view.pinned is not None:
        q.update(_side_query(view.pinned, "pin."))
    q.pop("ph", None)
    q.pop("pin.ph", None)
    return {k: v for k, v in q.items() if v != ""}


def _view_of(query: dict[str, str]) -> tuple[ViewState, list[str]]:
    examples = {k: query.pop(k) for k in ("ex", "pin.ex") if k in query}
    view, notes = from_query(query, {})
    current = replace(view.current, example_id=examples.get("ex", ""))
    pinned = None if view.pinned is None else replace(view.pinned, example_id=examples.get("pin.ex", ""))
    return replace(view, current=current, pinned=pinned), notes


def _generation_of(raw: dict[str, Any]) -> Generation:
    candidates = tuple(
        CandidateText(
            index=int(c["index"]),
            text=str(c["text"]),
            token_ids=tuple(int(t) for t in c["token_ids"]),
            finish_reason=str(c["finish_reason"]),
            text_token_count=int(c.get("text_token_count", -1)),  # sessions saved before it: all shown
        )
        for c in raw["candidates"]
    )
    return Generation(
        key=str(raw["key"]),
        prompt=str(raw["prompt"]),
        prompt_token_ids=tuple(int(t) for t in raw["prompt_token_ids"]),
        model=str(raw["model"]),
        candidates=candidates,
        elapsed_s=float(raw["elapsed_s"]),
        request_id=str(raw.get("request_id", "")),
    )


def encode(session: SavedSession) -> str:
    return json.dumps(
        {
            "name": session.name,
            "saved_at": session.saved_at,
            "query": _full_query(session.view),
            "generations": {side: asdict(g) for side, g in session.generations.items()},
        },
        ensure_ascii=False,
    )


def decode(text: str | bytes) -> SavedSession:
    """A stored session; ``StoreError`` when it is not one."""
    try:
        raw = json.loads(text)
        query = {str(k): str(v) for k, v in raw["query"].items()}
        view, notes = _view_of(query)
        generations = {str(side): _generation_of(g) for side, g in raw.get("generations", {}).items()}
        return SavedSession(
            name=str(raw["name"]),
            view=view,
            generations=generations,
            saved_at=float(raw["saved_at"]),
            notes=tuple(notes),
        )
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise StoreError(f"The saved session could not be read ({exc}); save it again.") from None


class Store(Protocol):
    """Where sessions are kept."""

    #: True when every UI process sharing the configuration sees the same sessions.
    shared: bool

    def save(self, session: SavedSession) -> bool:
        """Store ``session`` under its name; True when it replaced one of that name."""
        ...

    def names(self) -> list[tuple[str, float]]:
        """(name, saved_at) of every session, newest first."""
        ...

    def load(self, name: str) -> SavedSession | None: ...

    def delete(self, name: str) -> None: ...


def _newest_first(items: list[tuple[str, float]]) -> list[tuple[str, float]]:
    return sorted(items, key=lambda item: (-item[1], item[0]))


class MemoryStore:
    """Sessions of this UI process (every browser session of it), lost on restart."""

    shared = False

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._items: dict[str, str] = {}

    def save(self, session: SavedSession) -> bool:
        with self._lock:
            replaced = session.name in self._items
            self._items[session.name] = encode(session)
            return replaced

    def names(self) -> list[tuple[str, float]]:
        with self._lock:
            stored = list(self._items.items())
        return _newest_first([(name, decode(text).saved_at) for name, text in stored])

    def load(self, name: str) -> SavedSession | None:
        with self._lock:
            text = self._items.get(name)
        return None if text is None else decode(text)

    def delete(self, name: str) -> None:
        with self._lock:
            self._items.pop(name, None)


class RedisStore:
    """Sessions in one Redis hash shared by every UI process that uses this Redis."""

    shared = True

    def __init__(self, url: str, prefix: str) -> None:
        import redis  # only the UI processes that save sessions to Redis need it

        self._errors: tuple[type[BaseException], ...] = (redis.RedisError, OSError)
        self.key = f"{prefix}:ui-sessions:{KEY_VERSION}"
        self._stamps = f"{self.key}:saved-at"
        self._client = redis.Redis.from_url(
            url, socket_timeout=REDIS_TIMEOUT_S, socket_connect_timeout=REDIS_TIMEOUT_S
        )

    def _do(self, what: str, op: Any) -> Any:
        try:
            return op()
        except self._errors as exc:
            raise StoreError(
                f"Could not {what}: the Redis server did not answer ({type(exc).__name__}). "
                "Check that it runs (REDIS_URL)."
            ) from None

    def save(self, session: SavedSession) -> bool:
        def op() -> bool:
            with self._client.pipeline() as pipe:
                pipe.hset(self.key, session.name, encode(session))
                pipe.hset(self._stamps, session.name, repr(session.saved_at))
                added, _ = pipe.execute()
            return not added

        return bool(self._do("save the session", op))

    def names(self) -> list[tuple[str, float]]:
        stamps = self._do("list the saved sessions", lambda: self._client.hgetall(self._stamps))
        out = []
        for name, stamp in stamps.items():
            try:
                out.append((name.decode("utf-8"), float(stamp)))
            except (UnicodeDecodeError, ValueError):
                continue
        return _newest_first(out)

    def load(self, name: str) -> SavedSession | None:
        text = self._do("open the session", lambda: self._client.hget(self.key, name))
        return None if text is None else decode(text)

    def delete(self, name: str) -> None:
        def op() -> None:
            with self._client.pipeline() as pipe:
                pipe.hdel(self.key, name)
                pipe.hdel(self._stamps, name)
                pipe.execute()

        self._do("delete the session", op)


_STORES: dict[tuple[str, str], Store] = {}
_STORES_LOCK = threading.Lock()


def store_for(redis_url: str | None, prefix: str) -> Store:
    """The store of this configuration (one per Redis URL and prefix, shared by the process)."""
    key = (redis_url or "", prefix if redis_url else "")
    with _STORES_LOCK:
        store = _STORES.get(key)
        if store is None:
            store = RedisStore(redis_url, prefix) if redis_url else MemoryStore()
            _STORES[key] = store
        return store
