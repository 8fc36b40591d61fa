"""Convert a GGUF file once into a local fp32 Hugging Face model directory, safely across processes.

Loading a GGUF through transformers de-quantises every tensor (15 s for SmolLM2,
about a minute for Gemma 3 270M); a safetensors directory loads in about a second.
:func:`convert_gguf` loads the file with ``from_pretrained(..., gguf_file=...)``,
makes its tokenizer follow the file's own metadata (special tokens, BOS/EOS
insertion, chat template: see :mod:`server_kit.gguf_metadata`), saves model and
tokenizer, reloads the copy with plain ``from_pretrained`` and checks it (a fast
tokenizer with offsets, the file's tokenizer settings, the GGUF model's logits),
and writes a completion marker last.

:func:`ensure_converted` runs a conversion into a temporary directory beside the
target and renames it into place only when complete; a file lock makes
processes that start at the same time convert once: the others wait and find it
done. Progress is shown with rich (and logged, for servers writing log files).

Nothing here downloads anything: ``HF_HUB_OFFLINE=1`` is set before transformers
is imported.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from server_kit.gguf_metadata import apply_tokenizer_metadata, read_tokenizer_metadata, tokenizer_mismatches

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

MARKER_NAME = ".seqsal-converted.json"
# Bump when the conversion changes in a way that makes older directories wrong.
CONVERSION_VERSION = 1
CHECK_PROMPT = "The capital of France is Paris. The capital of Italy is"
CHECK_ATOL = 1e-4
CONVERSION_STEPS = 5


class ModelConversionError(RuntimeError):
    """A model file can't be found or converted."""


def force_offline() -> None:
    # Must happen before huggingface_hub / transformers are first imported in the process.
    os.environ["HF_HUB_OFFLINE"] = "1"


force_offline()


def is_complete(model_dir: Path) -> bool:
    """Whether ``model_dir`` holds a finished conversion of the current format."""
    try:
        marker = json.loads((model_dir / MARKER_NAME).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(marker, dict) and marker.get("conversion_version") == CONVERSION_VERSION


def ensure_converted(target: Path, convert: Callable[[Path], None]) -> Path:
    """Make ``target`` complete, calling ``convert(tmp_dir)`` at most once across processes."""
    if is_complete(target):
        return target
    parent = target.parent
    parent.mkdir(parents=True, exist_ok=True)
    with locked(parent / f".{target.name}.lock", what=f"converting {target.name}"):
        if is_complete(target):  # another process finished while we waited
            log.info("model ready at %s (converted by another process)", target)
            return target
        _remove_leftovers(parent, target.name)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=parent))
        try:
            convert(tmp)
            if not is_complete(tmp):
                raise ModelConversionError(f"conversion into {tmp} did not write {MARKER_NAME}")
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
def locked(lock_path: Path, *, what: str = "") -> Iterator[None]:
    """An exclusive ``flock`` on ``lock_path`` (the file is left in place: deleting it would race)."""
    with open(lock_path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another process %s (%s)", what or "holding the lock", lock_path)
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


@contextlib.contextmanager
def conversion_progress(title: str, total: int) -> Iterator[Callable[[str], None]]:
    """A rich progress bar on stderr; yields ``step(description)``, which also logs the step."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console(stderr=True)
    progress = Progress(
        TextColumn("[bold]{task.fields[title]}[/]"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.description}"),
        console=console,
        transient=False,
    )
    with progress:
        task = progress.add_task("starting", total=total, title=title)
        done = -1

        def step(description: str) -> None:
            nonlocal done
            done += 1
            log.info("%s: %s (step %d of %d)", title, description, done + 1, total)
            progress.update(task, completed=done, description=description)

        yield step
        progress.update(task, completed=total, description="done")


def convert_gguf(gguf: Path, out_dir: Path, *, sha256: str | None = None) -> None:
    """Convert ``gguf`` into an fp32 safetensors model + tokenizer directory at ``out_dir``, and check it.

    Writes the completion marker last; the caller renames the directory into place.
    """
    force_offline()
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.monotonic()
    with conversion_progress(f"converting {gguf.name}", CONVERSION_STEPS) as step:
        step("reading the tokenizer")
        metadata = read_tokenizer_metadata(gguf)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        apply_tokenizer_metadata(tokenizer, metadata)
        step("de-quantising the weights")
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        model.eval()
        reference = _check_logits(model, tokenizer)

        step("saving as safetensors")
        _drop_gguf_quantization(model)
        context = getattr(model.config, "max_position_embeddings", None)
        if isinstance(context, int) and context > 0:
            tokenizer.model_max_length = context  # the GGUF tokenizer says "unbounded"
        model.save_pretrained(out_dir)
        tokenizer.save_pretrained(out_dir)
        architecture = type(model).__name__
        del model

        step("checking the saved copy")
        saved_model, saved_tokenizer = _load_saved(out_dir)
        _verify_tokenizer(saved_tokenizer)
        problems = tokenizer_mismatches(saved_tokenizer, metadata)
        if problems:
            raise ModelConversionError(
                f"the converted tokenizer does not follow {gguf.name}'s metadata: " + "; ".join(problems)
            )
        logits = _check_logits(saved_model, saved_tokenizer)
        max_diff = (logits - reference).abs().max().item()
        if logits.shape != reference.shape or max_diff > CHECK_ATOL:
            raise ModelConversionError(
                f"the converted model's logits differ from the GGUF model's (max |diff| = {max_diff:.3g})"
            )

        step("marking complete")
        marker = {
            "conversion_version": CONVERSION_VERSION,
            "source": gguf.name,
            "source_size": gguf.stat().st_size,
            "source_sha256": sha256,
            "architecture": architecture,
            "dtype": "float32",
            "transformers": transformers.__version__,
            "torch": torch.__version__,
            "check_max_abs_diff": max_diff,
            "tokenizer": {
                "special_ids": metadata.special_ids,
                "add_bos": metadata.add_bos,
                "add_eos": metadata.add_eos,
                "chat_template": metadata.chat_template is not None,
            },
        }
        (out_dir / MARKER_NAME).write_text(json.dumps(marker, indent=2) + "\n")
    log.info(
        "converted %s in %.1f s (logits max |diff| %.2g)", gguf.name, time.monotonic() - started, max_diff
    )


def _drop_gguf_quantization(model: Any) -> None:
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
        raise ModelConversionError("the model kept packed GGUF modules; it can't be saved as safetensors")


def _load_saved(model_dir: Path) -> tuple[Any, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    if getattr(model.config, "quantization_config", None) is not None:
        raise ModelConversionError(f"{model_dir} still declares a quantization config")
    return model, tokenizer


def _verify_tokenizer(tokenizer: Any) -> None:
    if not getattr(tokenizer, "is_fast", False):
        raise ModelConversionError("the saved tokenizer did not load as a fast tokenizer")
    encoded = tokenizer(CHECK_PROMPT, return_offsets_mapping=True)
    offsets = encoded["offset_mapping"]
    if len(offsets) != len(encoded["input_ids"]) or offsets[-1][1] != len(CHECK_PROMPT):
        raise ModelConversionError(f"the saved tokenizer returned unusable offsets: {offsets}")


def _check_logits(model: Any, tokenizer: Any) -> torch.Tensor:
    import torch

    input_ids = tokenizer(CHECK_PROMPT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return model(input_ids=input_ids).logits.float()
