"""Bearer-token authentication for the gRPC servers, and the rule about where an open server may listen.

Clients send ``authorization: Bearer <token>`` metadata. Accepted tokens come
from ``SEQSAL_AUTH_TOKENS`` (comma-separated) and/or ``SEQSAL_AUTH_TOKEN_FILE``
(one per line, ``#`` comments; the file is re-read when it changes, so tokens
rotate without a restart). Tokens are compared in constant time and never
logged: logs and metrics name a caller by :func:`fingerprint`.

Without any token the servers do not authenticate; they then refuse to listen
on anything but a loopback address unless ``SEQSAL_ALLOW_UNAUTHENTICATED`` is
set (for a deployment that authenticates in front of them).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import os
import threading
import time
from collections.abc import Iterable
from pathlib import Path

from seqsal.bearer import AUTHORIZATION_KEY, BEARER_PREFIX
from server_kit.settings import ServerSettings

logger = logging.getLogger("seqsal.auth")

#: Methods anyone may call: load balancers and orchestrators probe health; tools list services.
OPEN_METHOD_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")


class BindPolicyError(RuntimeError):
    """A server without authentication was asked to listen on a non-loopback address."""


class AuthFailure(Exception):
    """A call's credentials were missing or not accepted; the message is safe to send to the caller."""


def is_open_method(method: str) -> bool:
    """Whether ``method`` (a full ``/package.Service/Method`` path) needs no token."""
    return method.startswith(OPEN_METHOD_PREFIXES)


def fingerprint(token: str) -> str:
    """A short, non-reversible name for a token (for logs, metrics and rate-limit keys)."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()[:12]


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback IP addresses; any other name or address is not."""
    host = host.strip().strip("[]")
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def read_token_file(path: Path) -> list[str]:
    """The tokens in a token file: one per line, blank lines and ``#`` comments skipped."""
    tokens = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            tokens.append(line)
    return tokens


class TokenAuth:
    """The set of accepted bearer tokens, from settings and an optional file that may change.

    Args:
        tokens: tokens accepted in any case.
        token_file: file of more tokens; checked for changes at most every ``reload_interval_s``.
        reload_interval_s: how often the file's modification time is looked at.
    """

    def __init__(
        self, tokens: Iterable[str] = (), token_file: Path | None = None, *, reload_interval_s: float = 1.0
    ) -> None:
        self._static = [t.encode("utf-8") for t in tokens if t.strip()]
        self.token_file = token_file
        self.reload_interval_s = reload_interval_s
        self._from_file: list[bytes] = []
        self._stamp: tuple[int, int] | None = None
        self._checked = 0.0
        self._lock = threading.Lock()
        if token_file is not None:
            if not token_file.is_file():
                raise FileNotFoundError(
                    f"auth token file {token_file} does not exist (SEQSAL_AUTH_TOKEN_FILE)"
                )
            self._reload(force=True)

    @classmethod
    def from_settings(cls, settings: ServerSettings) -> TokenAuth | None:
        """The authenticator the settings ask for, or None when no token is configured."""
        tokens = [t.get_secret_value() for t in settings.auth_tokens]
        if not any(t.strip() for t in tokens) and settings.auth_token_file is None:
            return None
        return cls(tokens, settings.auth_token_file)

    @property
    def count(self) -> int:
        """How many tokens are accepted right now."""
        self._reload()
        return len(self._static) + len(self._from_file)

    def _reload(self, *, force: bool = False) -> None:
        if self.token_file is None:
            return
        now = time.monotonic()
        if not force and now - self._checked < self.reload_interval_s:
            return
        with self._lock:
            self._checked = now
            try:
                stat = os.stat(self.token_file)
                stamp = (stat.st_mtime_ns, stat.st_size)
                if stamp == self._stamp:
                    return
                tokens = read_token_file(self.token_file)
            except OSError as exc:
                logger.warning(
                    "cannot read auth token file %s (%s); keeping the tokens read before",
                    self.token_file,
                    exc,
                )
                return
            self._stamp = stamp
            self._from_file = [t.encode("utf-8") for t in tokens]
            if not tokens:
                logger.warning(
                    "auth token file %s has no tokens: every authenticated call is refused", self.token_file
                )
            elif not force:
                logger.info("auth token file %s changed: %d tokens", self.token_file, len(tokens))

    def matches(self, token: str) -> bool:
        """Whether ``token`` is accepted (constant time in the token's content)."""
        self._reload()
        candidate = token.encode("utf-8")
        found = False
        for accepted in (*self._static, *self._from_file):
            found |= hmac.compare_digest(candidate, accepted)
        return found

    def authenticate(self, metadata: Iterable[tuple[str, str | bytes]]) -> str:
        """The caller's token from its metadata; raises :class:`AuthFailure` (never echoing it)."""
        values = [v for k, v in metadata if k == AUTHORIZATION_KEY]
        if not values:
            raise AuthFailure(
                "this server requires a bearer token: send metadata 'authorization: Bearer <token>' "
                "(Python client: token=..., CLI: --token, or SEQSAL_AUTH_TOKEN)"
            )
        value = values[0]
        text = value.decode("utf-8", "replace") if isinstance(value, bytes) else value
        if not text[: len(BEARER_PREFIX)].lower() == BEARER_PREFIX or not text[len(BEARER_PREFIX) :].strip():
            raise AuthFailure("the authorization metadata must be 'Bearer <token>'")
        token = text[len(BEARER_PREFIX) :].strip()
        if not self.matches(token):
            raise AuthFailure("the bearer token was not accepted by this server")
        return token


def check_bind_policy(
    host: str, settings: ServerSettings, *, authenticated: bool, what: str = "server"
) -> None:
    """Refuse a non-loopback address for a server without authentication, unless explicitly allowed."""
    if authenticated or is_loopback(host) or settings.allow_unauthenticated:
        return  # the server's start-up log says which mode it runs in
    raise BindPolicyError(
        f"refusing to listen on {host!r} without authentication: anyone who can reach it could use the "
        f"{what}. Set SEQSAL_AUTH_TOKENS (or SEQSAL_AUTH_TOKEN_FILE), listen on 127.0.0.1, or set "
        "SEQSAL_ALLOW_UNAUTHENTICATED=1 if something in front of it authenticates."
    )
