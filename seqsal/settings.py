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

from pydantic import AliasChoices, Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

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
            "Models to host, each 'ID=PATH' or 'PATH' (a local Hugging Face model directory; "
            "the id is then the directory name). Empty = the default model. The first is the default."
        ),
    )

    # --- saliency server -----------------------------------------------------
    host: str = Field(default="127.0.0.1", description="Address the saliency server binds to.")
    port: int = Field(default=50051, ge=0, le=65535, description="Port of the saliency server.")
    device: str = Field(default="auto", description="'auto' (cuda if present, else cpu), 'cpu', 'cuda:N'.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        default="auto", description="Model dtype; 'auto' = float32 on CPU, bfloat16 on GPU."
    )
    max_tokens: int = Field(
        default=4096, ge=1, description="Most tokens (prompt + target + foil) a request may have."
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

    # --- logging -------------------------------------------------------------
    log_level: str = Field(default="INFO", description="Python logging level.")

    @field_validator("models", mode="before")
    @classmethod
    def _split_models(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read once from the environment."""
    return Settings()
