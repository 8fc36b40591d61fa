"""Settings, one typed object per component, all read the same way.

Values come from, in order of precedence: explicit arguments (the CLI passes its flags here),
environment variables prefixed ``SEQSAL_`` (``REDIS_URL`` is also read as is), a ``.env``
file, then the defaults. Each component has its own class with only the fields it uses:

* :class:`ClientSettings` (here): where the servers are and how to reach them; what a service
  calling the API, the CLI and the UI read;
* ``server_kit.settings``: :class:`~server_kit.settings.ModelSettings` (which models, where they
  are stored, dtype) and :class:`~server_kit.settings.ServerSettings` (listening, security,
  operations), the base of ``saliency_server.settings.SaliencySettings`` and
  ``inference_server.settings.InferenceSettings``;
* ``ui.settings.UISettings`` and ``seqsal_cli.settings.StackSettings``.

The environment variables are the same for all of them (``SEQSAL_PORT`` is the saliency
server's port, ``SEQSAL_INFERENCE_PORT`` the inference server's: each server's settings have
``host``, ``port`` and ``metrics_port`` of their own).
"""

from __future__ import annotations

from pathlib import Path

from pydantic import AliasChoices, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class SeqsalSettings(BaseSettings):
    """How every seqsal settings class is read: ``SEQSAL_*`` variables and ``.env``."""

    model_config = SettingsConfigDict(
        env_prefix="SEQSAL_", env_file=".env", extra="ignore", populate_by_name=True
    )

    log_level: str = Field(default="INFO", description="Python logging level.")

    @classmethod
    def env_name(cls, field_name: str) -> list[str]:
        """The environment variables a field is read from (upper case)."""
        alias = cls.model_fields[field_name].validation_alias
        choices = getattr(alias, "choices", [alias] if isinstance(alias, str) else [])
        named = [c.upper() for c in choices if isinstance(c, str) and c != field_name]
        return named or [f"{cls.model_config.get('env_prefix', '')}{field_name}".upper()]

    @classmethod
    def env_names(cls) -> dict[str, str]:
        """Every environment variable this component reads -> the field it sets."""
        return {env: name for name in cls.model_fields for env in cls.env_name(name)}


class ClientSettings(SeqsalSettings):
    """Where a client finds the servers and how it talks to them (CLI, UI, batch, other services)."""

    saliency_address: str = Field(default="127.0.0.1:50051", description="host:port of the saliency server.")
    inference_address: str = Field(
        default="127.0.0.1:50052", description="host:port of the inference server."
    )
    max_message_mb: int = Field(default=64, ge=4, description="Largest gRPC message, in MiB, each way.")
    auth_token: SecretStr | None = Field(
        default=None, description="Bearer token the clients send (`seqsal --token`)."
    )
    tls: bool = Field(
        default=False, description="Clients connect with TLS (implied by `tls_ca_file`); system CAs."
    )
    tls_ca_file: Path | None = Field(
        default=None, description="Client: PEM CA bundle that signed the servers' certificates."
    )
    tls_client_cert_file: Path | None = Field(
        default=None, description="Client: PEM certificate to present for mutual TLS."
    )
    tls_client_key_file: Path | None = Field(
        default=None, description="Client: PEM private key of `tls_client_cert_file`."
    )
    tls_server_name: str | None = Field(
        default=None, description="Client: name to verify in the server certificate instead of the host."
    )


class RedisSettings(SeqsalSettings):
    """The shared Redis of an instance (the saliency server's result cache, the UI's saved sessions)."""

    redis_url: str | None = Field(
        default=None,
        validation_alias=AliasChoices("SEQSAL_REDIS_URL", "REDIS_URL", "redis_url"),
        description="Redis URL for the shared cache; unset = in-process LRU cache.",
    )
    cache_prefix: str = Field(default="seqsal", description="Key prefix in Redis (a version is appended).")
    redis_timeout_s: float = Field(default=0.5, gt=0, description="Timeout of each Redis operation.")
