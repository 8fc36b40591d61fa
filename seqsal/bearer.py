"""The bearer token on the wire: the metadata key and the pair a client sends (the servers check it
in :mod:`server_kit.auth`)."""

from __future__ import annotations

AUTHORIZATION_KEY = "authorization"
BEARER_PREFIX = "bearer "


def bearer_metadata(token: str) -> tuple[str, str]:
    """The metadata pair a client sends for ``token``."""
    return (AUTHORIZATION_KEY, f"Bearer {token}")
