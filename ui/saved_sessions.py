"""The sidebar's *Saved sessions*: save the view under a name, open one a teammate saved.

Opening a session puts back everything it holds (prompt, example, target, selection, model,
settings, display, the pinned side) and the responses it showed, so the page draws exactly what
its author saw; the saliency comes from the server's cache when it is shared. Where sessions are
kept: :mod:`ui.sessions_store`.
"""

from __future__ import annotations

from dataclasses import replace

import streamlit as st

from ui import clients, session
from ui.generation import Generation
from ui.sessions_store import SavedSession, Store, StoreError, check_name, store_for
from ui.views import md_escape

NAME_KEY = "w_session_name"
PICK_KEY = "w_session_pick"
MESSAGE_KEY = "v_session_message"


def _store() -> Store:
    settings = clients.load_settings()
    return store_for(settings.redis_url, settings.cache_prefix)


def _say(kind: str, text: str) -> None:
    st.session_state[MESSAGE_KEY] = (kind, text)


def _save(default_model: str) -> None:
    ss = st.session_state
    try:
        name = check_name(str(ss.get(NAME_KEY, "")))
    except ValueError as exc:
        _say("error", str(exc))
        return
    view = session.current_view(ss, default_model)
    generations = {
        side: g for side in session.SIDES if isinstance(g := ss.get(session.generation_key(side)), Generation)
    }
    try:
        replaced = _store().save(SavedSession(name=name, view=view, generations=generations))
    except StoreError as exc:
        _say("error", str(exc))
        return
    _say("success", f"{'Replaced' if replaced else 'Saved'} session “{name}”.")
    ss[PICK_KEY] = name


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
        _say("error", f"There is no session “{name}” any more (deleted by someone?).")
        return
    open_session(saved)
    notes = "; ".join(saved.notes)
    _say("success", f"Opened session “{name}”." + (f" Skipped: {notes}." if notes else ""))


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


def panel(default_model: str) -> None:
    """The sidebar section."""
    ss = st.session_state
    store = _store()
    st.subheader("Saved sessions")
    if store.shared:
        st.caption("Saved in the team's Redis: everyone on this instance sees them.")
    else:
        st.caption(
            "No Redis is configured: sessions are kept in this UI process only (gone on restart). "
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
    try:
        names = [name for name, _ in store.names()]
    except StoreError as exc:
        names = []
        st.warning(md_escape(str(exc)))
    if names:
        if ss.get(PICK_KEY) not in names:
            ss[PICK_KEY] = names[0]
        st.selectbox("Open a saved session", names, key=PICK_KEY, format_func=str)
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
        (st.success if kind == "success" else st.error)(md_escape(text))
