"""TLS and mutual TLS for the gRPC servers (PEM files named in the settings; clients: :mod:`seqsal.tls`)."""

from __future__ import annotations

import grpc

from seqsal.tls import TlsConfigError, read_pem
from server_kit.settings import ServerSettings


def server_tls_enabled(settings: ServerSettings) -> bool:
    """Whether the servers should speak TLS (a certificate or key is configured)."""
    return settings.tls_cert_file is not None or settings.tls_key_file is not None


def server_credentials(settings: ServerSettings) -> grpc.ServerCredentials | None:
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
    key = read_pem(settings.tls_key_file, "TLS key")
    chain = read_pem(settings.tls_cert_file, "TLS certificate")
    client_ca = (
        read_pem(settings.tls_client_ca_file, "client CA bundle") if settings.tls_client_ca_file else None
    )
    return grpc.ssl_server_credentials(
        [(key, chain)], root_certificates=client_ca, require_client_auth=client_ca is not None
    )


def server_tls_mode(settings: ServerSettings) -> str:
    """``off``, ``tls`` or ``mutual`` (for the start-up log)."""
    if not server_tls_enabled(settings):
        return "off"
    return "mutual" if settings.tls_client_ca_file else "tls"
