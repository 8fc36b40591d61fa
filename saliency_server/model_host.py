"""The models one saliency server hosts, loaded once at start-up."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from saliency_server.checkpointing import CheckpointPolicy
from saliency_server.engine import GradientEngine
from saliency_server.forward_cache import ForwardCache
from saliency_server.memory import MIB
from saliency_server.settings import SaliencySettings
from seqsal.v1 import common_pb2
from server_kit.fingerprint import directory_signature
from server_kit.model_registry import (
    ModelSpec,
    load_causal_lm,
    load_tokenizer,
    model_revision,
    pick_model,
    resolve_device,
    resolve_dtype,
)

logger = logging.getLogger("seqsal.saliency")


@dataclass
class HostedModel:
    """A loaded model with its tokenizer, gradient engine and public description."""

    spec: ModelSpec
    tokenizer: Any
    engine: GradientEngine
    info: common_pb2.ModelInfo
    load_seconds: float

    @property
    def id(self) -> str:
        return self.spec.id


#: SEQSAL_MAX_TOKENS's default is the model's context, but at most this (some configs say 128k+).
MAX_TOKENS_CAP = 32768
#: ... and this where the config names no context length.
FALLBACK_MAX_TOKENS = 4096


def context_length(config: Any) -> int | None:
    """The model's context length from its config, if it names one."""
    text = getattr(config, "text_config", None)
    for source in (config, text):
        for name in ("max_position_embeddings", "n_positions"):
            value = getattr(source, name, None) if source is not None else None
            if isinstance(value, int) and value > 0:
                return value
    return None


def _max_tokens(model: Any, limit: int | None) -> int:
    """``limit`` (SEQSAL_MAX_TOKENS) capped by the context; unset = the context, capped."""
    context = context_length(model.config)
    if limit is None:
        return min(context, MAX_TOKENS_CAP) if context is not None else FALLBACK_MAX_TOKENS
    return min(limit, context) if context is not None else limit


def load_hosted_model(spec: ModelSpec, settings: SaliencySettings, *, is_default: bool) -> HostedModel:
    """Load one model for gradient computation, as the settings say (device, dtype, batch sizes)."""
    started = time.perf_counter()
    device = resolve_device(settings.device)
    dtype = resolve_dtype(settings.dtype_for(spec.id), device)
    # the revision goes into every cache key: it must describe the weights actually loaded, so
    # it is taken before loading and the load is repeated if the files changed meanwhile
    for _attempt in range(3):
        before = directory_signature(spec.path)
        revision = model_revision(spec.path)
        tokenizer = load_tokenizer(spec.path)
        model = load_causal_lm(spec.path, device, dtype)
        if directory_signature(spec.path) == before:
            break
        logger.warning("model %s: files in %s changed while loading; loading again", spec.id, spec.path)
    else:
        raise RuntimeError(
            f"model {spec.id}: the files in {spec.path} keep changing; try again when they are written"
        )
    engine = GradientEngine(
        model,
        ig_batch_size=settings.ig_batch_size,
        segment_batch_size=settings.segment_batch_size,
        checkpoint_policy=CheckpointPolicy(
            mode=settings.checkpointing, min_tokens=settings.checkpoint_min_tokens
        ),
        forward_cache=ForwardCache(
            max_bytes=settings.forward_cache_mb * MIB, max_entries=4, ttl_s=settings.forward_cache_ttl_s
        ),
    )
    if tokenizer.pad_token_id is not None:
        engine.pad_id = int(tokenizer.pad_token_id)
    info = common_pb2.ModelInfo(
        id=spec.id,
        revision=revision,
        architecture=type(model).__name__,
        max_tokens=_max_tokens(model, settings.max_tokens),
        dtype=str(dtype).removeprefix("torch."),
        device=str(device),
        is_default=is_default,
    )
    seconds = time.perf_counter() - started
    logger.info(
        "loaded model %s (%s, %s on %s, revision %s) from %s in %.1f s",
        spec.id,
        info.architecture,
        info.dtype,
        info.device,
        info.revision,
        spec.path,
        seconds,
    )
    return HostedModel(spec=spec, tokenizer=tokenizer, engine=engine, info=info, load_seconds=seconds)


class ModelHost:
    """Looks hosted models up by id; the first one is the default."""

    def __init__(self, models: list[HostedModel]) -> None:
        if not models:
            raise ValueError("a server needs at least one model")
        self._models = {m.id: m for m in models}
        self.default = models[0]

    @classmethod
    def load(cls, specs: list[ModelSpec], settings: SaliencySettings) -> ModelHost:
        return cls([load_hosted_model(s, settings, is_default=i == 0) for i, s in enumerate(specs)])

    def get(self, model_id: str) -> HostedModel:
        """The model named ``model_id``; empty = the default model."""
        return pick_model(self._models, model_id, self.default)

    def infos(self) -> list[common_pb2.ModelInfo]:
        return [m.info for m in self._models.values()]
