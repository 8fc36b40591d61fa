"""What every seqsal server reads: its models (:class:`ModelSettings`) and how it listens, checks
callers and reports (:class:`ServerSettings`). Each server's own settings class derives from
:class:`ServerSettings` (``saliency_server.settings``, ``inference_server.settings``) and sets
its own ``host``, ``port`` and ``metrics_port`` (see :mod:`seqsal.settings` for how values are read).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import NoDecode

from seqsal.settings import ClientSettings, SeqsalSettings

Dtype = Literal["auto", "float32", "bfloat16", "float16"]

DEFAULT_MODEL_ID = "SmolLM2-135M-Instruct"


def _default_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "seqsal"


def split_commas(value: object) -> object:
    """A comma-separated environment value as a list (a list stays as it is)."""
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


class ModelSettings(SeqsalSettings):
    """Which models a process hosts, where converted models are stored, and their dtype."""

    data_dir: Path = Field(
        default_factory=_default_data_dir,
        description="Where converted models and other product data are stored.",
    )
    models: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description=(
            "Models to host, each 'ID=PATH' or 'PATH': a local Hugging Face model directory, a .gguf "
            "file (converted once into data_dir, keyed by its sha256) or a packaged model's short name "
            "(smollm2, gemma3); a bare PATH's id is the folder name, the file's stem or the packaged "
            "model's id. Empty = the default model. The first is the default."
        ),
    )
    device: str = Field(default="auto", description="'auto' (cuda if present, else cpu), 'cpu', 'cuda:N'.")
    dtype: Dtype = Field(default="auto", description="Model dtype; 'auto' = float32 on CPU, bfloat16 on GPU.")
    model_dtypes: Annotated[dict[str, Dtype], NoDecode] = Field(
        default_factory=dict,
        description="Per-model dtype instead of `dtype`, 'ID=DTYPE,...' with the ids of `models` "
        "(e.g. 'gemma-3-270m=bfloat16'); the models not named get `dtype`.",
    )

    @field_validator("models", mode="before")
    @classmethod
    def _split_models(cls, value: object) -> object:
        return split_commas(value)

    @field_validator("model_dtypes", mode="before")
    @classmethod
    def _split_model_dtypes(cls, value: object) -> object:
        if not isinstance(value, str):
            return value
        pairs = [part.strip().rpartition("=") for part in value.split(",") if part.strip()]
        bad = [f"{model}{sep}{dtype}" for model, sep, dtype in pairs if not model or not sep]
        if bad:
            raise ValueError(f"model_dtypes must be 'ID=DTYPE,...'; not understood: {bad}")
        return {model.strip(): dtype.strip() for model, _, dtype in pairs}

    def dtype_for(self, model_id: str) -> str:
        """The dtype a model is loaded in: its entry in `model_dtypes`, else `dtype`."""
        return self.model_dtypes.get(model_id, self.dtype)


class ServerSettings(ModelSettings, ClientSettings):
    """What both servers share: where they listen, who may call them, how they report and stop.

    A server is a client too (the saliency server may score through the inference server), so
    the client fields are here as well.
    """

    host: str = Field(default="127.0.0.1", description="Address the server binds to.")
    port: int = Field(default=0, ge=0, le=65535, description="Port of the server (0 = any free port).")
    metrics_port: int = Field(default=0, ge=0, le=65535, description="Prometheus /metrics port; 0 = off.")
    metrics_host: str | None = Field(
        default=None, description="Address the /metrics endpoints bind to; default = the server's own host."
    )
    max_score_rows: int = Field(
        default=1024,
        ge=1,
        description="Most prompt-target pairs one Score call may score (prompts as token ids x targets); "
        "the inference server refuses more, the saliency server sends no more in one call.",
    )
    score_batch_tokens: int = Field(
        default=8192,
        ge=64,
        description="Tokens (rows x padded width) per batched no-grad forward pass when scoring with "
        "transformers (the saliency server's fallback and the inference server's transformers backend).",
    )

    # --- security ------------------------------------------------------------------
    auth_tokens: Annotated[list[SecretStr], NoDecode] = Field(
        default_factory=list,
        description="Bearer tokens the servers accept (comma-separated). With none here and no "
        "`auth_token_file`, the servers run without authentication.",
    )
    auth_token_file: Path | None = Field(
        default=None,
        description="File of accepted bearer tokens, one per line ('#' starts a comment); re-read when "
        "it changes.",
    )
    allow_unauthenticated: bool = Field(
        default=False,
        description="Let a server without tokens listen on a non-loopback address (e.g. behind an "
        "authenticating proxy). Without it such a server refuses to start.",
    )
    tls_cert_file: Path | None = Field(
        default=None, description="Server: PEM certificate chain; with `tls_key_file` the servers speak TLS."
    )
    tls_key_file: Path | None = Field(default=None, description="Server: PEM private key of the certificate.")
    tls_client_ca_file: Path | None = Field(
        default=None,
        description="Server: PEM CA bundle; set = mutual TLS (clients must present a certificate it signed).",
    )
    rate_limit_per_minute: int = Field(
        default=0,
        ge=0,
        description="Requests per minute each bearer token (each client address without auth) may make, "
        "as a token bucket of that size; beyond it RESOURCE_EXHAUSTED with a retry delay. 0 = no limit.",
    )

    # --- operations ------------------------------------------------------------------
    shutdown_grace_s: float = Field(
        default=30.0, ge=0, description="On SIGTERM, how long in-flight requests may finish."
    )
    shutdown_delay_s: float = Field(
        default=0.0,
        ge=0,
        description="On SIGTERM, how long to keep serving while health says NOT_SERVING (so load "
        "balancers stop sending) before draining.",
    )
    tracing: bool = Field(
        default=False,
        description="OpenTelemetry spans per call (needs opentelemetry-sdk; exporter from the "
        "standard OTEL_* variables).",
    )
    log_format: Literal["auto", "json", "text"] = Field(
        default="auto",
        description="Server logs: 'json' (one object per line), 'text', or 'auto' (text on a terminal).",
    )

    @field_validator("auth_tokens", mode="before")
    @classmethod
    def _split_tokens(cls, value: object) -> object:
        return split_commas(value)
