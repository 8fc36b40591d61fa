"""Who may use a shared instance: Streamlit's built-in OIDC login when configured, else a shared password.

* OIDC: put an ``[auth]`` section in ``.streamlit/secrets.toml`` (Streamlit's ``st.login``
  documentation lists the keys: redirect_uri, cookie_secret, client_id, client_secret,
  server_metadata_url). Everyone the identity provider lets in may use the page.
* Shared password: set ``SEQSAL_UI_PASSWORD`` (or ``SEQSAL_UI_PASSWORD_FILE``); the page asks
  for it once per browser session and compares in constant time.
* Neither: the page is open, as it should be on one's own machine (``seqsal up`` binds the UI to
  127.0.0.1).
"""

from __future__ import annotations

import hmac
from pathlib import Path

import streamlit as st

from ui.settings import UISettings

_AUTHED = "_seqsal_password_ok"


def oidc_configured() -> bool:
    """True when ``.streamlit/secrets.toml`` has an ``[auth]`` section for ``st.login``."""
    try:
        return "auth" in st.secrets
    except Exception:  # no secrets file at all
        return False


def shared_password(settings: UISettings) -> str | None:
    """The configured shared password, from the setting or the file it names."""
    secret = getattr(settings, "ui_password", None)
    if secret is not None:
        value = secret.get_secret_value() if hasattr(secret, "get_secret_value") else str(secret)
        return value or None
    path = getattr(settings, "ui_password_file", None)
    if path:
        return Path(path).read_text(encoding="utf-8").strip() or None
    return None


def user_name() -> str:
    """Who is logged in (the OIDC login's e-mail, else its name); "" without an OIDC login."""
    if not oidc_configured() or not st.user.is_logged_in:
        return ""
    return str(st.user.get("email") or st.user.get("name") or "")


def require_login(settings: UISettings) -> None:
    """Stop the script run until the visitor is let in; a no-op on an open instance."""
    if oidc_configured():
        if not st.user.is_logged_in:
            st.title("seqsal · Sequence Saliency")
            st.write("This shared instance needs you to log in.")
            st.button("Log in", on_click=st.login, type="primary")
            st.stop()
        with st.sidebar:
            st.caption(f"Logged in as {user_name() or 'you'}")
            st.button("Log out", on_click=st.logout)
        return
    password = shared_password(settings)
    if password is None or st.session_state.get(_AUTHED):
        return
    st.title("seqsal · Sequence Saliency")
    with st.form("seqsal-login"):
        attempt = st.text_input("Password for this shared instance", type="password", key="seqsal-password")
        submitted = st.form_submit_button("Enter", type="primary")
    if submitted:
        if hmac.compare_digest(attempt.encode(), password.encode()):
            st.session_state[_AUTHED] = True
            st.rerun()
        st.error("Wrong password. Ask whoever runs this instance for it.")
    st.stop()
