"""TLS and mutual TLS for the gRPC clients (PEM files named in the settings); the servers' side is
:mod:`server_kit.server_tls`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import grpc

from seqsal.settings import ClientSettings


class TlsConfigError(ValueError):
    """The TLS settings are incomplete or name files that cannot be read."""


def read_pem(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise TlsConfigError(f"cannot read the {what} {path}: {exc.strerror or exc}") from None


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
    def from_settings(cls, settings: ClientSettings) -> ClientTLS:
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
            root_certificates=read_pem(self.ca_file, "CA bundle") if self.ca_file else None,
            private_key=read_pem(self.key_file, "client key") if self.key_file else None,
            certificate_chain=read_pem(self.cert_file, "client certificate") if self.cert_file else None,
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
