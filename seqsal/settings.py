"""One typed settings object for every seqsal service, the CLI and the UI.

Values come from, in order of precedence: explicit arguments (the CLI passes
its flags here), environment variables prefixed ``SEQSAL_`` (``REDIS_URL`` is
also read as is), a ``.env`` file, then the defaults below.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AliasChoices, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

Dtype = Literal["auto", "float32", "bfloat16", "float16"]

DEFAULT_MODEL_ID = "SmolLM2-135M-Instruct"


def _default_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "seqsal"


class Settings(BaseSettings):
    """Configuration shared by all seqsal processes."""

    model_config = SettingsConfigDict(
        env_prefix="SEQSAL_", env_file=".env", extra="ignore", populate_by_name=True
    )

    # --- where things live ---------------------------------------------------
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

    # --- saliency server -----------------------------------------------------
    host: str = Field(default="127.0.0.1", description="Address the saliency server binds to.")
    port: int = Field(default=50051, ge=0, le=65535, description="Port of the saliency server.")
    device: str = Field(default="auto", description="'auto' (cuda if present, else cpu), 'cpu', 'cuda:N'.")
    dtype: Dtype = Field(default="auto", description="Model dtype; 'auto' = float32 on CPU, bfloat16 on GPU.")
    model_dtypes: Annotated[dict[str, Dtype], NoDecode] = Field(
        default_factory=dict,
        description="Per-model dtype instead of `dtype`, 'ID=DTYPE,...' with the ids of `models` "
        "(e.g. 'gemma-3-270m=bfloat16'); the models not named get `dtype`.",
    )
    max_tokens: int | None = Field(
        default=None,
        ge=1,
        description="Most tokens (prompt + target + foil) a request may have; default = each model's "
        "context length (max_position_embeddings), at most 32768.",
    )
    checkpointing: Literal["auto", "off", "full", "keep_attention"] = Field(
        default="auto",
        description="Activation checkpointing of the saliency backward: 'auto' from "
        "`checkpoint_min_tokens` tokens or when free memory is short, 'off', 'full' (every layer "
        "recomputed), 'keep_attention' (recomputed except the attention outputs).",
    )
    checkpoint_min_tokens: int = Field(
        default=1024,
        ge=1,
        description="'auto' checkpointing from this many tokens per forward pass (width x rows).",
    )
    forward_cache_mb: int = Field(
        default=1024,
        ge=0,
        description="Forward passes (their autograd graphs, MiB in all) kept per model so that the next "
        "computation of the same prompt and target (another granularity, a custom selection) runs only "
        "its backward passes; counted against the memory budget and let go when a request needs the "
        "room; 0 = off.",
    )
    forward_cache_ttl_s: float = Field(
        default=120.0, gt=0, description="A kept forward pass is dropped this long (s) after its last use."
    )
    memory_budget_mb: int | None = Field(
        default=None,
        ge=0,
        description="Memory (MiB) saliency computations may use together; a request estimated above "
        "it is refused, concurrent ones wait. Default: available memory at start less a margin; 0 = "
        "no budget.",
    )
    max_concurrency: int = Field(default=1, ge=1, description="Requests computed at the same time.")
    max_queue: int = Field(
        default=16, ge=0, description="Requests that may wait for a worker; beyond it RESOURCE_EXHAUSTED."
    )
    max_message_mb: int = Field(default=64, ge=4, description="Largest gRPC message, in MiB, each way.")
    shutdown_grace_s: float = Field(
        default=30.0, ge=0, description="On SIGTERM, how long in-flight requests may finish."
    )
    ig_steps: int = Field(default=16, ge=1, le=1024, description="Default integrated-gradients steps.")
    ig_batch_size: int = Field(default=8, ge=1, description="Interpolation points per forward pass.")
    segment_batch_size: int = Field(
        default=8, ge=1, description="Target segments per batched backward pass in SaliencyAllSegments."
    )
    batch_wait_ms: float = Field(
        default=0.0,
        ge=0,
        le=1000,
        description="Cross-request batching: how long a click waits for others to share one padded "
        "forward and backward pass (gradient methods, no foil); 0 = off.",
    )
    batch_max_requests: int = Field(default=8, ge=2, description="Most clicks in one cross-request batch.")
    score_address: str | None = Field(
        default=None,
        description="host:port of an inference server hosting the same models (same revision): the "
        "saliency server scores the perturbed prompts of OCCLUSION, LIME and Verify through its batched "
        "Score RPC. Unset (or a model it does not host): batched no-grad forward passes with "
        "transformers in the saliency process, through the scheduler; responses say which.",
    )
    max_perturbations: int = Field(
        default=512,
        ge=1,
        description="Most perturbed prompts one OCCLUSION, LIME or Verify request may score (segments, "
        "samples, draws); beyond it INVALID_ARGUMENT naming the field.",
    )
    score_batch_tokens: int = Field(
        default=8192,
        ge=64,
        description="Tokens (rows x padded width) per batched no-grad forward pass when scoring with "
        "transformers (the saliency server's fallback and the inference server's transformers backend).",
    )
    contended_chunk: int = Field(
        default=1,
        ge=0,
        description="Target segments per backward pass while other requests wait for the same model "
        "(small = a click gets in sooner; 0 = segment_batch_size).",
    )

    # --- inference server ----------------------------------------------------
    inference_host: str = Field(default="127.0.0.1", description="Address the inference server binds to.")
    inference_port: int = Field(default=50052, ge=0, le=65535, description="Port of the inference server.")
    backend: Literal["vllm", "transformers", "openai"] = Field(
        default="vllm",
        description="Generation backend: vLLM in-process, transformers (hosts without vLLM), or a remote "
        "OpenAI-compatible server (e.g. an existing vLLM deployment) at `openai_url`.",
    )
    openai_url: str | None = Field(
        default=None, description="Base URL of the remote server, e.g. http://h:8000/v1."
    )
    openai_api_key: str | None = Field(
        default=None, description="API key for the remote server, if it needs one."
    )
    openai_model: str | None = Field(
        default=None, description="Model name on the remote server; default = the local model id."
    )
    openai_timeout_s: float = Field(
        default=300.0,
        gt=0,
        description="Remote server: longest wait for a response or, while streaming, for the next token.",
    )
    tensor_parallel_size: int = Field(default=1, ge=1, description="vLLM: GPUs one model is split across.")
    gpu_memory_utilization: float = Field(
        default=0.5,
        gt=0,
        le=1,
        description="vLLM: share of GPU memory it may take (leave room for saliency).",
    )
    max_model_len: int | None = Field(
        default=None, ge=16, description="vLLM: context length; default = model's."
    )
    vllm_kv_cache_gb: int = Field(default=4, ge=1, description="vLLM on CPU: KV cache size in GiB.")
    max_candidates: int = Field(default=16, ge=1, description="Largest `n` a Generate request may ask for.")
    default_max_new_tokens: int = Field(
        default=256, ge=1, description="Generate's max_tokens when 0 is sent."
    )
    max_score_rows: int = Field(
        default=1024,
        ge=1,
        description="Most prompt-target pairs one Score call may score (prompts as token ids x targets).",
    )
    inference_max_concurrency: int = Field(
        default=64,
        ge=1,
        description="Generate, GenerateStream and Score calls in flight on the inference server at once; "
        "beyond it RESOURCE_EXHAUSTED.",
    )

    # --- UI of a shared instance --------------------------------------------
    ui_password: SecretStr | None = Field(
        default=None,
        description="Shared password for the UI (used when no OIDC login is set in .streamlit/secrets.toml).",
    )
    ui_password_file: Path | None = Field(default=None, description="File holding the UI's shared password.")
    ui_session_ttl_days: float = Field(
        default=30,
        ge=0,
        description="Lifetime (days) of a saved named UI session, counted from when it was last saved or "
        "opened (opening one keeps it); 0 = kept until deleted. Applies in Redis and in the UI's own "
        "process alike.",
    )

    # --- `seqsal up` (the whole stack on one machine) -------------------------
    ui_port: int = Field(default=8501, ge=1, le=65535, description="Port of the Streamlit UI.")
    stack_redis_port: int = Field(
        default=6390, ge=1, le=65535, description="Port of the private redis-server `seqsal up` starts."
    )

    # --- where clients find the servers (CLI, UI, batch) ----------------------
    saliency_address: str = Field(default="127.0.0.1:50051", description="host:port of the saliency server.")
    inference_address: str = Field(
        default="127.0.0.1:50052", description="host:port of the inference server."
    )

    # --- cache ---------------------------------------------------------------
    redis_url: str | None = Field(
        default=None,
        validation_alias=AliasChoices("SEQSAL_REDIS_URL", "REDIS_URL", "redis_url"),
        description="Redis URL for the shared cache; unset = in-process LRU cache.",
    )
    cache_prefix: str = Field(default="seqsal", description="Key prefix in Redis (a version is appended).")
    cache_ttl_s: int = Field(default=7 * 24 * 3600, ge=0, description="Cache entry lifetime; 0 = forever.")
    cache_max_mb: int = Field(default=256, ge=1, description="Memory bound of the in-process cache, MiB.")
    redis_timeout_s: float = Field(default=0.5, gt=0, description="Timeout of each Redis operation.")

    # --- security: servers ------------------------------------------------------
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

    # --- security: clients (CLI, UI, batch, the stack) ------------------------
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

    # --- operations ----------------------------------------------------------
    metrics_port: int = Field(
        default=9101, ge=0, le=65535, description="Prometheus /metrics port of the saliency server; 0 = off."
    )
    inference_metrics_port: int = Field(
        default=9102, ge=0, le=65535, description="Prometheus /metrics port of the inference server; 0 = off."
    )
    metrics_host: str | None = Field(
        default=None, description="Address the /metrics endpoints bind to; default = the server's own host."
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

    # --- logging -------------------------------------------------------------
    log_level: str = Field(default="INFO", description="Python logging level.")
    log_format: Literal["auto", "json", "text"] = Field(
        default="auto",
        description="Server logs: 'json' (one object per line), 'text', or 'auto' (text on a terminal).",
    )

    @field_validator("models", "auth_tokens", mode="before")
    @classmethod
    def _split_models(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

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


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read once from the environment."""
    return Settings()
