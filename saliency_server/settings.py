"""The saliency server's settings: the server kit's (:class:`server_kit.settings.ServerSettings`)
and its own: the gradient computation, the scheduler, perturbation scoring and the result cache.
Environment variables as :mod:`seqsal.settings` says (``SEQSAL_PORT``, ``SEQSAL_MAX_QUEUE``...).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from seqsal.settings import RedisSettings
from server_kit.settings import ServerSettings


class SaliencySettings(ServerSettings, RedisSettings):
    """Configuration of one saliency server."""

    port: int = Field(default=50051, ge=0, le=65535, description="Port of the saliency server.")
    metrics_port: int = Field(
        default=9101, ge=0, le=65535, description="Prometheus /metrics port of the saliency server; 0 = off."
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
    contended_chunk: int = Field(
        default=1,
        ge=0,
        description="Target segments per backward pass while other requests wait for the same model "
        "(small = a click gets in sooner; 0 = segment_batch_size).",
    )
    cache_ttl_s: int = Field(default=7 * 24 * 3600, ge=0, description="Cache entry lifetime; 0 = forever.")
    cache_max_mb: int = Field(default=256, ge=1, description="Memory bound of the in-process cache, MiB.")
