"""The sidebar's *Saved sessions*: save the view under a name, open one a teammate saved.

Opening a session puts back everything it holds (prompt, example, target, selection, model,
settings, display, the pinned side) and the responses it showed, so the page draws exactly what
its author saw; the saliency comes from the server's cache when it is shared. Saving under a name
that is taken replaces nothing until *Replace* is clicked under the warning, which names who
saved the one there and when (were it saved again meanwhile, the warning comes back naming the
new one). The list names who saved each session (with an OIDC login) and when, in the browser's
time zone. Where sessions are kept and for how long: :mod:`ui.sessions_store`.
"""

from __future__ import annotations

import threading
import time
from dataclasses import replace
from datetime import UTC, datetime, tzinfo
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import streamlit as st

from ui import clients, login, session
from ui.generation import Generation
from ui.sessions_store import (
    MemoryStore,
    NameTaken,
    SavedSession,
    SessionInfo,
    Store,
    StoreError,
    check_name,
    ttl_seconds,
)
from ui.views import md_escape

NAME_KEY = "w_session_name"
PICK_KEY = "w_session_pick"
MESSAGE_KEY = "v_session_message"
#: (the session kept under the name asked for, whether it changed since the last warning).
TAKEN_KEY = "v_session_taken"


_STORES: dict[tuple[str, str, float], Store] = {}
_STORES_LOCK = threading.Lock()


def store_for(redis_url: str | None, prefix: str, ttl_s: float) -> Store:
    """The store of this configuration (one per Redis URL, prefix and lifetime, shared by the process)."""
    key = (redis_url or "", prefix if redis_url else "", ttl_s)
    with _STORES_LOCK:
        store = _STORES.get(key)
        if store is None:
            if redis_url:
                from ui.sessions_redis import RedisStore  # needs the redis package

                store = RedisStore(redis_url, prefix, ttl_s)
            else:
                store = MemoryStore(ttl_s)
            _STORES[key] = store
        return store


def _store() -> Store:
    settings = clients.load_settings()
    return store_for(settings.redis_url, settings.cache_prefix, ttl_seconds(settings.ui_session_ttl_days))


def _say(kind: str, text: str) -> None:
    st.session_state[MESSAGE_KEY] = (kind, text)


def _zone() -> tzinfo:
    """The browser's time zone when it said which, else UTC."""
    try:
        name = st.context.timezone
    except Exception:  # no browser context (a bare script run)
        name = None
    if name:
        try:
            return ZoneInfo(name)
        except (ZoneInfoNotFoundError, ValueError):
            pass
    return UTC


def when(stamp: float, *, year: bool = True) -> str:
    """A time for people, e.g. "3 Mar 2025, 14:02 CET" (the browser's zone)."""
    at = datetime.fromtimestamp(stamp, _zone())
    day = f"{at.day} {at:%b %Y}" if year else f"{at.day} {at:%b}"
    return f"{day}, {at:%H:%M} {at.tzname() or ''}".rstrip()


def who_and_when(info: SessionInfo) -> str:
    """E.g. "saved by alice@example.com on 3 Mar 2025, 14:02 UTC"."""
    by = f" by {info.saved_by}" if info.saved_by else ""
    return f"saved{by} on {when(info.saved_at)}"


def lifetime(info: SessionInfo) -> str:
    if info.expires_at is None:
        return "kept until deleted"
    days = max(0.0, info.expires_at - time.time()) / 86400
    left = f"in {days:.0f} days" if days >= 2 else f"on {when(info.expires_at)}"
    return f"expires {left} unless opened or saved again"


def list_label(info: SessionInfo) -> str:
    """How the list shows a session: name, who saved it, when."""
    parts = [info.name, *([info.saved_by] if info.saved_by else []), when(info.saved_at, year=False)]
    return " · ".join(parts)


def _current(name: str, default_model: str) -> SavedSession:
    """This browser session's view and responses as a session to save under ``name``."""
    ss = st.session_state
    generations = {
        side: g for side in session.SIDES if isinstance(g := ss.get(session.generation_key(side)), Generation)
    }
    return SavedSession(
        name=name,
        view=session.current_view(ss, default_model),
        generations=generations,
        saved_by=login.user_name(),
    )


def _write(saved: SavedSession, confirmed: SessionInfo | None) -> None:
    ss = st.session_state
    try:
        info = _store().save(saved, replace=confirmed)
    except NameTaken as exc:
        ss[TAKEN_KEY] = (exc.existing, confirmed is not None)
        return
    except StoreError as exc:
        _say("error", str(exc))
        return
    ss.pop(TAKEN_KEY, None)
    _say("success", f"{'Replaced' if confirmed else 'Saved'} session “{saved.name}” ({lifetime(info)}).")
    ss[PICK_KEY] = saved.name


def _save(default_model: str) -> None:
    ss = st.session_state
    ss.pop(TAKEN_KEY, None)
    try:
        name = check_name(str(ss.get(NAME_KEY, "")))
    except ValueError as exc:
        _say("error", str(exc))
        return
    _write(_current(name, default_model), None)


def _replace(default_model: str) -> None:
    taken = st.session_state.get(TAKEN_KEY)
    if taken is None:
        return
    existing, _ = taken
    _write(_current(existing.name, default_model), existing)


def _keep() -> None:
    taken = st.session_state.pop(TAKEN_KEY, None)
    if taken is not None:
        _say("info", f"Nothing replaced: “{taken[0].name}” is as it was. Save under another name.")


def open_session(saved: SavedSession) -> None:
    """Put a saved session into this browser session (a callback: before the widgets draw)."""
    ss = st.session_state
    view = saved.view
    session.write_side(ss, view.current)
    session.write_display(ss, view.display)
    session.unpin()
    if view.pinned is not None:
        ss[session.PINNED] = replace(view.pinned, selection=())
        ss[session.selection_key("pin")] = view.pinned.selection
    for side in session.SIDES:
        ss.pop(f"sel_ctx_{side}", None)  # the saved selections belong to the saved targets
        ss.pop(session.generation_key(side), None)
        if side in saved.generations:
            ss[session.generation_key(side)] = saved.generations[side]


def _open() -> None:
    name = st.session_state.get(PICK_KEY)
    if not name:
        return
    try:
        saved = _store().load(str(name))
    except StoreError as exc:
        _say("error", str(exc))
        return
    if saved is None:
        _say("error", f"There is no session “{name}” any more (deleted by someone, or expired).")
        return
    open_session(saved)
    by = f" by {saved.saved_by}" if saved.saved_by else ""
    notes = "; ".join(saved.notes)
    _say(
        "success",
        f"Opened session “{name}”, saved{by} on {when(saved.saved_at)}."
        + (f" Skipped: {notes}." if notes else ""),
    )


def _delete() -> None:
    name = st.session_state.get(PICK_KEY)
    if not name:
        return
    try:
        _store().delete(str(name))
    except StoreError as exc:
        _say("error", str(exc))
        return
    _say("success", f"Deleted session “{name}”.")


def _taken_panel(default_model: str) -> None:
    """The warning about a taken name, with the explicit choice to replace it."""
    taken = st.session_state.get(TAKEN_KEY)
    if taken is None:
        return
    existing, changed = taken
    if changed:
        text = (
            f"“{existing.name}” was saved again meanwhile ({who_and_when(existing)}), so nothing was "
            "replaced. Replace that one with this view?"
        )
    else:
        text = (
            f"A session “{existing.name}” already exists ({who_and_when(existing)}). "
            "Replace it with this view?"
        )
    st.warning(md_escape(text), icon=":material/warning:")
    left, right = st.columns(2)
    with left:
        st.button("Replace", key="session_replace", type="primary", on_click=_replace, args=(default_model,))
    with right:
        st.button("Keep it", key="session_keep", on_click=_keep)


def panel(default_model: str) -> None:
    """The sidebar section."""
    ss = st.session_state
    store = _store()
    st.subheader("Saved sessions")
    days = store.ttl_s / 86400
    kept = f"each kept {days:g} days after it is last saved or opened" if days else "kept until deleted"
    if store.shared:
        st.caption(f"Saved in the team's Redis: everyone on this instance sees them; {kept}.")
    else:
        st.caption(
            f"No Redis is configured: sessions are kept in this UI process only (gone on restart; {kept}). "
            "Set `REDIS_URL` to share them with everyone on the instance."
        )
    # a form: the name typed and the click arrive together (no click before the name is committed)
    with st.form("session_save_form", border=False, enter_to_submit=True):
        st.text_input("Session name", key=NAME_KEY, max_chars=80, placeholder="e.g. quiche: with principles")
        st.form_submit_button(
            "Save this view",
            key="session_save",
            icon=":material/bookmark_add:",
            on_click=_save,
            args=(default_model,),
            width="stretch",
        )
    _taken_panel(default_model)
    try:
        infos = {info.name: info for info in store.list_sessions()}
    except StoreError as exc:
        infos = {}
        st.warning(md_escape(str(exc)))
    if infos:
        if ss.get(PICK_KEY) not in infos:
            ss[PICK_KEY] = next(iter(infos))
        st.selectbox(
            "Open a saved session", list(infos), key=PICK_KEY, format_func=lambda n: list_label(infos[n])
        )
        picked = infos[ss[PICK_KEY]]
        about = who_and_when(picked)
        st.caption(md_escape(f"{about[:1].upper()}{about[1:]}; {lifetime(picked)}."))
        left, right = st.columns(2)
        with left:
            st.button(
                "Open", key="session_open", icon=":material/open_in_browser:", on_click=_open, width="stretch"
            )
        with right:
            st.button(
                "Delete", key="session_delete", icon=":material/delete:", on_click=_delete, width="stretch"
            )
    message = ss.pop(MESSAGE_KEY, None)
    if message:
        kind, text = message
        show = {"success": st.success, "info": st.info}.get(kind, st.error)
        show(md_escape(text))
