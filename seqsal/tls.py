"""TLS and mutual TLS for the gRPC servers and clients (PEM files named in the settings)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import grpc

from seqsal.settings import Settings


class TlsConfigError(ValueError):
    """The TLS settings are incomplete or name files that cannot be read."""


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise TlsConfigError(f"cannot read the {what} {path}: {exc.strerror or exc}") from None


def server_tls_enabled(settings: Settings) -> bool:
    """Whether the servers should speak TLS (a certificate or key is configured)."""
    return settings.tls_cert_file is not None or settings.tls_key_file is not None


def server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    """Server credentials from ``tls_cert_file``/``tls_key_file`` (+ ``tls_client_ca_file`` = mTLS).

    None when TLS is off; :class:`TlsConfigError` when it is half configured.
    """
    if not server_tls_enabled(settings):
        if settings.tls_client_ca_file is not None:
            raise TlsConfigError(
                "SEQSAL_TLS_CLIENT_CA_FILE needs SEQSAL_TLS_CERT_FILE and SEQSAL_TLS_KEY_FILE"
            )
        return None
    if settings.tls_cert_file is None or settings.tls_key_file is None:
        raise TlsConfigError("TLS needs both SEQSAL_TLS_CERT_FILE and SEQSAL_TLS_KEY_FILE")
    key = _read(settings.tls_key_file, "TLS key")
    chain = _read(settings.tls_cert_file, "TLS certificate")
    client_ca = (
        _read(settings.tls_client_ca_file, "client CA bundle") if settings.tls_client_ca_file else None
    )
    return grpc.ssl_server_credentials(
        [(key, chain)], root_certificates=client_ca, require_client_auth=client_ca is not None
    )


def server_tls_mode(settings: Settings) -> str:
    """``off``, ``tls`` or ``mutual`` (for the start-up log)."""
    if not server_tls_enabled(settings):
        return "off"
    return "mutual" if settings.tls_client_ca_file else "tls"


@dataclass(frozen=True)
class ClientTLS:
    """How a client connects: plaintext, or TLS verified against a CA, optionally with its own certificate.

    Attributes:
        enabled: TLS at all; False = plaintext.
        ca_file: CA bundle that signed the server certificate; None = the system's CAs.
        cert_file: client certificate chain for mutual TLS.
        key_file: its private key.
        server_name: name to check the server certificate against instead of the target's host.
    """

    enabled: bool = True
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    server_name: str | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> ClientTLS:
        """The client TLS the settings ask for (off unless ``tls`` or ``tls_ca_file`` is set)."""
        return cls(
            enabled=settings.tls or settings.tls_ca_file is not None,
            ca_file=settings.tls_ca_file,
            cert_file=settings.tls_client_cert_file,
            key_file=settings.tls_client_key_file,
            server_name=settings.tls_server_name,
        )

    def credentials(self) -> grpc.ChannelCredentials | None:
        """Channel credentials, or None for plaintext."""
        if not self.enabled:
            return None
        if (self.cert_file is None) != (self.key_file is None):
            raise TlsConfigError("a client certificate needs its key and the key its certificate")
        return grpc.ssl_channel_credentials(
            root_certificates=_read(self.ca_file, "CA bundle") if self.ca_file else None,
            private_key=_read(self.key_file, "client key") if self.key_file else None,
            certificate_chain=_read(self.cert_file, "client certificate") if self.cert_file else None,
        )

    def options(self) -> list[tuple[str, str]]:
        """Channel options (the server-name override)."""
        if self.enabled and self.server_name:
            return [("grpc.ssl_target_name_override", self.server_name)]
        return []


def sync_channel(target: str, tls: ClientTLS | None, options: list[tuple[str, object]]) -> grpc.Channel:
    """A blocking channel to ``target``: TLS when ``tls`` is enabled, plaintext otherwise."""
    credentials = tls.credentials() if tls is not None else None
    if tls is None or credentials is None:
        return grpc.insecure_channel(target, options=options)
    return grpc.secure_channel(target, credentials, options=[*options, *tls.options()])


def aio_channel(target: str, tls: ClientTLS | None, options: list[tuple[str, object]]) -> grpc.aio.Channel:
    """An asyncio channel to ``target``: TLS when ``tls`` is enabled, plaintext otherwise."""
    credentials = tls.credentials() if tls is not None else None
    if tls is None or credentials is None:
        return grpc.aio.insecure_channel(target, options=options)
    return grpc.aio.secure_channel(target, credentials, options=[*options, *tls.options()])
