"""Named sessions a team shares: the whole view (prompt, target, selection, settings, pinned side)
and the responses it showed, saved under a name and listed for everyone on the same instance.

With a Redis configured (the cache's ``REDIS_URL``, key prefix ``SEQSAL_CACHE_PREFIX``) sessions
are kept in that Redis (:mod:`ui.sessions_redis`), shared by every UI process that uses it, and
survive restarts. Without Redis they are kept in this UI process only (every browser session of
this process sees them; a restart loses them), and the page says so.

Lifetime: a session lasts ``SEQSAL_UI_SESSION_TTL_DAYS`` (30 days) from when it was last saved
*or opened* (opening one is using it, so it is kept), 0 = until deleted; both stores expire the
same way.

A name is never taken over silently: saving under a name that exists raises :class:`NameTaken`
with who saved the one there and when, and replaces it only when the caller passes that very
session (its ``rev``) back as ``replace`` (a confirmation); were it replaced by someone else
meanwhile, the confirmation no longer matches and :class:`NameTaken` names the new one. The
check and the write are one atomic step in both stores (two saves of one name: one wins).

A saved view is the link's query (:func:`ui.state.to_query`) with every field spelled out
against the defaults (so a changed examples file cannot change it) and the long texts a link
leaves out put back, read back with the link's own checks (:func:`ui.state.from_query`); the
generations are saved too, so a teammate sees the very response you saw, without generating.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Protocol

from ui.generation import CandidateText, Generation
from ui.state import SideState, ViewState, from_query, to_query

MAX_NAME_CHARS = 80
DAY_S = 24 * 3600.0
#: The default lifetime of a saved session (the setting ``ui_session_ttl_days``).
DEFAULT_TTL_S = 30 * DAY_S
#: Timeout of each Redis operation (seconds): a dead Redis must not hang the page.
REDIS_TIMEOUT_S = 2.0


class StoreError(RuntimeError):
    """Saving or reading sessions failed: plain words for the page."""


@dataclass(frozen=True)
class SessionInfo:
    """What the list shows of a saved session, and the revision a replacement must name."""

    name: str
    saved_at: float
    #: Who saved it (the login's e-mail or name); "" when the instance has no login.
    saved_by: str = ""
    #: When it expires (epoch seconds) unless opened or saved again; None = kept until deleted.
    expires_at: float | None = None
    #: Changes with every save: a replacement names the revision it was shown.
    rev: str = ""


class NameTaken(StoreError):
    """A session of that name exists and was not named as the one to replace."""

    def __init__(self, existing: SessionInfo) -> None:
        self.existing = existing
        who = f" by {existing.saved_by}" if existing.saved_by else ""
        super().__init__(
            f"A session “{existing.name}” was already saved{who}; replace it or choose another name."
        )


@dataclass(frozen=True)
class SavedSession:
    """One named session: the view and, per side ("main", "pin"), the generation it showed."""

    name: str
    view: ViewState
    generations: dict[str, Generation] = field(default_factory=dict)
    saved_at: float = field(default_factory=time.time)
    #: Who saved it, when known (see :class:`SessionInfo`).
    saved_by: str = ""
    #: Notes about anything in the stored view that could not be used (as for a link).
    notes: tuple[str, ...] = ()


def new_rev() -> str:
    return uuid.uuid4().hex


def ttl_seconds(days: float) -> float:
    """The lifetime setting in seconds (0 = forever)."""
    return max(0.0, float(days)) * DAY_S


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
            "saved_by": session.saved_by,
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
            saved_by=str(raw.get("saved_by", "")),  # sessions saved before it: unknown
            notes=tuple(notes),
        )
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise StoreError(f"The saved session could not be read ({exc}); save it again.") from None


class Store(Protocol):
    """Where sessions are kept."""

    #: True when every UI process sharing the configuration sees the same sessions.
    shared: bool
    #: Lifetime of a session from its last save or opening, seconds; 0 = until deleted.
    ttl_s: float

    def save(self, session: SavedSession, replace: SessionInfo | None = None) -> SessionInfo:
        """Store ``session`` under its name and say how it is stored. Where one of that name is
        kept, replace it only when ``replace`` is that one (same ``rev``); else :class:`NameTaken`."""
        ...

    def list_sessions(self) -> list[SessionInfo]:
        """Every session not expired, newest first."""
        ...

    def load(self, name: str) -> SavedSession | None:
        """The session of that name (its lifetime starts again), None when there is none."""
        ...

    def delete(self, name: str) -> None: ...


def newest_first(items: list[SessionInfo]) -> list[SessionInfo]:
    return sorted(items, key=lambda info: (-info.saved_at, info.name))


def may_replace(current_rev: str | None, replace: SessionInfo | None) -> bool:
    """True when a save may write: no session of that name, or the one the caller confirmed."""
    return current_rev is None or (replace is not None and replace.rev == current_rev)


@dataclass
class _Kept:
    info: SessionInfo
    text: str


class MemoryStore:
    """Sessions of this UI process (every browser session of it), lost on restart."""

    shared = False

    def __init__(self, ttl_s: float = DEFAULT_TTL_S, clock: Callable[[], float] = time.time) -> None:
        self.ttl_s = ttl_s
        self._clock = clock
        self._lock = threading.Lock()
        self._items: dict[str, _Kept] = {}

    def _expiry(self) -> float | None:
        return self._clock() + self.ttl_s if self.ttl_s > 0 else None

    def _prune(self) -> None:
        """Drop the expired sessions (under the lock)."""
        now = self._clock()
        for name in [
            n for n, k in self._items.items() if k.info.expires_at is not None and k.info.expires_at <= now
        ]:
            del self._items[name]

    def save(self, session: SavedSession, replace: SessionInfo | None = None) -> SessionInfo:
        text = encode(session)
        with self._lock:
            self._prune()
            kept = self._items.get(session.name)
            if not may_replace(None if kept is None else kept.info.rev, replace):
                assert kept is not None
                raise NameTaken(kept.info)
            info = SessionInfo(
                name=session.name,
                saved_at=session.saved_at,
                saved_by=session.saved_by,
                expires_at=self._expiry(),
                rev=new_rev(),
            )
            self._items[session.name] = _Kept(info, text)
            return info

    def list_sessions(self) -> list[SessionInfo]:
        with self._lock:
            self._prune()
            infos = [kept.info for kept in self._items.values()]
        return newest_first(infos)

    def load(self, name: str) -> SavedSession | None:
        with self._lock:
            self._prune()
            kept = self._items.get(name)
            if kept is None:
                return None
            kept.info = replace(kept.info, expires_at=self._expiry())
            text = kept.text
        return decode(text)

    def delete(self, name: str) -> None:
        with self._lock:
            self._items.pop(name, None)
