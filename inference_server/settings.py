"""The inference server's settings: the server kit's (:class:`server_kit.settings.ServerSettings`)
and its own: the backend and its limits. Its listening address, port, metrics port and call limit
are read from ``SEQSAL_INFERENCE_HOST``, ``SEQSAL_INFERENCE_PORT``, ``SEQSAL_INFERENCE_METRICS_PORT``
and ``SEQSAL_INFERENCE_MAX_CONCURRENCY`` (``SEQSAL_PORT`` and the like are the saliency server's).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    DotEnvSettingsSource,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
)

from server_kit.settings import ServerSettings

#: The fields both servers have that the inference server reads as ``SEQSAL_INFERENCE_<NAME>``.
OWN_ENV_FIELDS = frozenset({"host", "port", "metrics_port", "max_concurrency"})


class _OwnNames:
    """An environment (or .env) source that reads :data:`OWN_ENV_FIELDS` under the inference
    server's own names only, never the saliency server's ``SEQSAL_PORT``."""

    env_vars: Any

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        if field_name in OWN_ENV_FIELDS:
            name = f"seqsal_inference_{field_name}"
            return self.env_vars.get(name), name, self.field_is_complex(field)  # type: ignore[attr-defined]
        return super().get_field_value(field, field_name)  # type: ignore[misc]


class _Env(_OwnNames, EnvSettingsSource):
    pass


class _DotEnv(_OwnNames, DotEnvSettingsSource):
    pass


class InferenceSettings(ServerSettings):
    """Configuration of one inference server."""

    @classmethod
    def env_name(cls, field_name: str) -> list[str]:
        if field_name in OWN_ENV_FIELDS:
            return [f"SEQSAL_INFERENCE_{field_name}".upper()]
        return super().env_name(field_name)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        dotenv = _DotEnv(
            settings_cls,
            env_file=getattr(dotenv_settings, "env_file", None),  # honours _env_file=
            env_file_encoding=getattr(dotenv_settings, "env_file_encoding", None),
        )
        return init_settings, _Env(settings_cls), dotenv, file_secret_settings

    host: str = Field(default="127.0.0.1", description="Address the inference server binds to.")
    port: int = Field(default=50052, ge=0, le=65535, description="Port of the inference server.")
    metrics_port: int = Field(
        default=9102,
        ge=0,
        le=65535,
        description="Prometheus /metrics port of the inference server; 0 = off.",
    )
    max_concurrency: int = Field(
        default=64,
        ge=1,
        description="Generate, GenerateStream and Score calls in flight on the inference server at once; "
        "beyond it RESOURCE_EXHAUSTED.",
    )
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
